"""One listening socket per port and node, shared by the replicas there (no Ray needed)."""

from __future__ import annotations

import socket

import pytest
from support import free_port

from tenfold.integration.listener import PortInUse, listen


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def test_a_second_holder_receives_the_same_socket_and_keeps_it_open_when_the_first_closes() -> None:
    port = free_port()
    first = listen("127.0.0.1", port, "app")
    second = listen("127.0.0.1", port, "app")
    try:
        assert first.fileno() != second.fileno()
        assert second.socket.getsockname() == first.socket.getsockname()
        assert first.handing_on and not second.handing_on
        first.close()
        assert _accepts(port), "the socket closed with its first holder"
        # The second holder takes over handing it on, so that a third replica still gets it.
        third = listen("127.0.0.1", port, "app")
        assert third.socket.getsockname() == second.socket.getsockname()
        assert second.handing_on
        third.close()
    finally:
        first.close()
        second.close()
    assert not _accepts(port)


def test_another_application_is_refused_the_port_by_name() -> None:
    port = free_port()
    holder = listen("127.0.0.1", port, "embedder")
    try:
        with pytest.raises(PortInUse, match="served by the application 'embedder'.*give 'tagger' another http_port"):
            listen("127.0.0.1", port, "tagger")
    finally:
        holder.close()


def test_a_port_held_by_another_program_is_refused_with_what_to_do() -> None:
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen()
    try:
        with pytest.raises(PortInUse, match="in use by another program; set http_port to a free port"):
            listen("127.0.0.1", other.getsockname()[1], "app", wait_s=0.5)
    finally:
        other.close()
