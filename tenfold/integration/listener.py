"""One listening socket per port and node, shared by every replica of the application there.

The first replica on a node binds the port; the others receive the same socket (a duplicate of its file
descriptor, over a Unix socket with SCM_RIGHTS) rather than a socket of their own. So there is one accept
queue: a replica that stops only stops accepting from it, and a connection waiting there is taken by a
sibling instead of being reset, as it would be with one SO_REUSEPORT socket per replica. Whichever replica
holds the socket hands it on; when the one doing so stops, another takes over. Only processes of the same
user may ask, and a replica of another application is refused the port by name.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import threading
import time

_logger = logging.getLogger("ray.serve")
_BACKLOG = 4096


class PortInUse(OSError):
    """The port is held by another program, or by another application's replicas."""


class SharedListener:
    """This replica's hold on the node's listening socket for one (host, port)."""

    def __init__(self, sock: socket.socket, host: str, port: int, owner: str) -> None:
        self.socket, self.host, self.port, self.owner = sock, host, port, owner
        self._name = _unix_name(host, port)
        self._closed = threading.Event()
        self._handoff: socket.socket | None = None
        self._thread = threading.Thread(target=self._hand_on, name=f"tenfold-listener-{port}", daemon=True)
        self._thread.start()

    def fileno(self) -> int:
        return self.socket.fileno()

    @property
    def handing_on(self) -> bool:
        """Whether this replica is the one that gives the socket to the others now."""
        return self._handoff is not None

    def close(self) -> None:
        """Stop handing the socket on and close this replica's copy (the others' stay open). Safe twice."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._handoff is not None:
            with contextlib.suppress(OSError):
                self._handoff.shutdown(socket.SHUT_RDWR)
        self._thread.join(2.0)
        self.socket.close()

    def _hand_on(self) -> None:
        # Every holder tries to be the one that hands the socket on; the abstract name admits one at a time,
        # and is free again as soon as that one's process closes it or dies.
        while not self._closed.is_set():
            if self._handoff is None:
                self._handoff = _bind_unix(self._name)
                if self._handoff is None:
                    self._closed.wait(0.5)
                    continue
            try:
                conn, _ = self._handoff.accept()
            except OSError:
                break
            with conn:
                try:
                    _give(conn, self.socket.fileno(), self.owner)
                except OSError as exc:
                    _logger.warning("could not hand the listening socket of port %d on: %s", self.port, exc)
        if self._handoff is not None:
            self._handoff.close()
            self._handoff = None


def listen(host: str, port: int, owner: str, *, wait_s: float = 15.0) -> SharedListener:
    """The node's listening socket on (host, port) for application `owner`: received from a replica that
    holds it, or bound here when none does. Raises PortInUse when another program or application has it."""
    name = _unix_name(host, port)
    deadline = time.monotonic() + wait_s
    while True:
        received = _receive(name, owner, port)
        if received is not None:
            return SharedListener(received, host, port, owner)
        sock = _bind_tcp(host, port)
        if sock is not None:
            return SharedListener(sock, host, port, owner)
        # Held, but nobody hands it on: a holder is taking over (at most a second), or another program has it.
        if time.monotonic() > deadline:
            raise PortInUse(errno.EADDRINUSE,
                            f"port {port} on {host} is in use by another program; set http_port to a free port")
        time.sleep(0.2)


def _unix_name(host: str, port: int) -> str:
    return f"\0tenfold-http-{host}-{port}"  # abstract: no file, gone with the last process that binds it


def _bind_unix(name: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(name)
    except OSError:
        sock.close()
        return None
    sock.listen(64)
    return sock


def _bind_tcp(host: str, port: int) -> socket.socket | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, never past a live listener
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            return None
        raise
    sock.listen(_BACKLOG)
    sock.setblocking(False)
    return sock


def _give(conn: socket.socket, fd: int, owner: str) -> None:
    uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
    conn.settimeout(5.0)
    if uid != os.getuid():
        conn.sendall(b"refused: another user")
        return
    socket.send_fds(conn, [owner.encode()], [fd])


def _receive(name: str, owner: str, port: int) -> socket.socket | None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5.0)
    try:
        client.connect(name)
        message, fds, _, _ = socket.recv_fds(client, 4096, 1)
    except (TimeoutError, ConnectionRefusedError, FileNotFoundError, ConnectionResetError):
        return None
    finally:
        client.close()
    if not fds:
        return None
    sock = socket.socket(fileno=fds[0])
    holder = message.decode(errors="replace")
    if holder != owner:
        sock.close()
        raise PortInUse(errno.EADDRINUSE, f"port {port} is served by the application {holder!r} on this node; "
                        f"give {owner!r} another http_port")
    return sock
