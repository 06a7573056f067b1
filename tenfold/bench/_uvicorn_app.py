"""The limit set-up of `tenfold bench dataplane`: one uvicorn worker process per core, no Ray, answering
`POST /` with the same code as a tenfold interpreter (`codec.predict_json` on the archive's model)."""

from __future__ import annotations

import os
from typing import Any

import torch

from tenfold.integration import codec
from tenfold.packaging import load, read_manifest

torch.set_num_threads(1)
_ARCHIVE = os.environ["TENFOLD_BENCH_ARCHIVE"]
_MODEL = load(_ARCHIVE)
_INTERFACE = codec.Interface.of(read_manifest(_ARCHIVE))


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    with torch.no_grad():
        body = codec.predict_json(_MODEL, b"".join(chunks), _INTERFACE)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
