"""The OpenAPI 3.1 document of a served model, built from its manifest: `POST /` with its request and
response bodies and the error body, `GET /-/manifest` and `GET /-/stats`."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

from tenfold.packaging import Manifest, Spec, TensorSpec, ValueSpec

from . import codec
from .routes import MODEL_HEADER

_NUMBER: dict[str, dict[str, Any]] = {
    "float": {"type": "number"},
    "int": {"type": "integer"},
    "uint": {"type": "integer", "minimum": 0},
    "bool": {"type": "boolean"},
}

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["status", "type", "message"],
        "properties": {
            "status": {"type": "integer", "description": "the HTTP status"},
            "type": {"type": "string", "description": "e.g. InvalidInput, MalformedRequest, ModelError, Timeout"},
            "message": {"type": "string", "description": "what was wrong and what to do"},
        },
    }},
}


def tensor_schema(spec: TensorSpec) -> dict[str, Any]:
    """Nested JSON arrays of numbers with the spec's rank (fixed sizes bounded)."""
    kind = next((k for k in ("uint", "int", "float", "bool") if spec.dtype.startswith(k)), "float")
    schema: dict[str, Any] = dict(_NUMBER[kind])
    for size in reversed(spec.shape):
        schema = {"type": "array", "items": schema}
        if size is not None:
            schema.update(minItems=size, maxItems=size)
    schema["description"] = spec.describe()
    return schema


def _schema(spec: Spec, defs: dict[str, Any]) -> dict[str, Any]:
    if isinstance(spec, TensorSpec):
        return tensor_schema(spec)
    schema = copy.deepcopy(spec.json_schema)
    # pydantic puts referenced models under $defs of each schema: gathered into components, refs rewritten.
    defs.update(schema.pop("$defs", {}))
    return {**_rewrite_refs(schema), "description": spec.describe()}


def _rewrite_refs(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: (v.replace("#/$defs/", "#/components/schemas/") if k == "$ref" and isinstance(v, str)
                    else _rewrite_refs(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite_refs(v) for v in node]
    return node


def document(manifest: Manifest, *, title: str | None = None, sha256: str | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document for a deployment serving `manifest`'s model. Its version is the archive file's
    `sha256` (the digest users pin) when given, else the manifest's content digest."""
    defs: dict[str, Any] = {}
    inputs = [_schema(s, defs) for s in manifest.inputs]
    names = [s.name for s in manifest.inputs]
    request = {
        "type": "object",
        "required": ["inputs"],
        "additionalProperties": False,
        "properties": {"inputs": {"oneOf": [
            {"type": "array", "prefixItems": inputs, "minItems": len(inputs), "maxItems": len(inputs),
             "description": "positional: one entry per input, in order"},
            {"type": "object", "properties": dict(zip(names, inputs)), "required": names,
             "additionalProperties": False, "description": "by parameter name"},
        ]}},
    }
    if manifest.streams and isinstance(manifest.outputs[0], ValueSpec):
        item = _schema(manifest.outputs[0], defs)
        # OpenAPI 3.1 has no schema for a stream as a whole: each line (or event's data) is one item.
        streamed = {"schema": {"type": "string", "description": "one item per line (or per event's data), as JSON"},
                    "itemSchema": item}
        ok = {"description": "the items the model yields, each sent as soon as it is produced: newline-delimited "
                             f"JSON, or server-sent events with Accept: {codec.EVENT_STREAM_TYPE}. An error after "
                             'the first item ends the stream with {"error": {...}} (an event named error)',
              "content": {codec.NDJSON_TYPE: streamed, codec.EVENT_STREAM_TYPE: streamed}}
    elif manifest.output_structure == "value" and isinstance(manifest.outputs[0], ValueSpec):
        outputs = _schema(manifest.outputs[0], defs)
    else:
        outs = [_schema(s, defs) for s in manifest.outputs]
        outputs = {"type": "array", "prefixItems": outs, "minItems": len(outs), "maxItems": len(outs),
                   "description": "one entry per output, in order"}
    if not manifest.streams:
        response = {"type": "object", "required": ["outputs"], "properties": {"outputs": outputs}}
        ok = {"description": "the model's outputs", "content": {codec.JSON_TYPE: {"schema": response}}}
    error = {"$ref": "#/components/schemas/Error"}

    def errors(*statuses: int) -> dict[str, Any]:
        return {str(s): {"description": _ERRORS[s], "content": {codec.JSON_TYPE: {"schema": error}}}
                for s in statuses}

    predict: dict[str, Any] = {
        "summary": f"Run {manifest.name} {manifest.signature()}",
        "operationId": "predict",
        "requestBody": {"required": True, "content": {codec.JSON_TYPE: {"schema": request}}},
        "responses": {
            "200": ok,
            **errors(400, 413, 415, 422, 500, 503, 504),
        },
    }
    if not manifest.takes_values:
        predict["requestBody"]["content"][codec.ARROW_TYPE] = {
            "schema": {"type": "string", "format": "binary", "description": "an Arrow IPC stream, one column "
                       f"per input ({', '.join(names)}), rows along the first dimension"}}
        predict["responses"]["200"]["content"][codec.ARROW_TYPE] = {"schema": {"type": "string", "format": "binary"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": title or manifest.name, "version": (sha256 or manifest.content_sha256)[:12] or "0",
                 "description": f"{manifest.name} served by tenfold: {manifest.signature()}"},
        "paths": {
            "/": {"post": predict},
            "/-/manifest": {"get": {"summary": "the archive's manifest, its sha256 and this replica's interpreters",
                                    "operationId": "manifest",
                                    "responses": {"200": {"description": "the manifest"}}}},
            "/-/stats": {"get": {"summary": "this replica's interpreter figures", "operationId": "stats",
                                 "responses": {"200": {"description": "calls, errors, busy time, queue depth"}}}},
        },
        "components": {"schemas": {"Error": ERROR_SCHEMA, **_rewrite_refs(defs)}},
    }


_ERRORS = {
    400: "the body is not valid JSON (or not an Arrow stream)",
    413: "the body is over max_request_bytes",
    415: "a Content-Type this model is not served in",
    422: "the inputs do not fit the model's signature",
    500: "the model raised an exception (its type and message are in the body)",
    503: "the replica cannot serve now (every interpreter lost, or the queue is full): retry after Retry-After",
    504: "the call ran past request_timeout_s",
}


def document_of_several(models: dict[str, tuple[Manifest, str]], *, title: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of an application that serves several models ({name: (manifest, sha256)}): each
    model's routes under /{name}, its schemas renamed `{name}.{schema}` so that models' own names cannot clash."""
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {"Error": ERROR_SCHEMA}
    for name, (manifest, sha256) in models.items():
        doc = document(manifest, sha256=sha256)
        own = {k: v for k, v in doc["components"]["schemas"].items() if k != "Error"}
        renamed = _renamed_refs({"paths": doc["paths"], "schemas": own}, {k: f"{name}.{k}" for k in own})
        predict = renamed["paths"]["/"]["post"]
        predict["operationId"] = f"predict_{name}"
        predict["description"] = (f"The same as POST / with the header {MODEL_HEADER}: {name}. Archive sha256 "
                                  f"{sha256}.")
        paths[f"/{name}"] = {"post": predict}
        paths[f"/{name}/-/manifest"] = {"get": {"summary": f"{name}'s manifest, sha256 and source",
                                                "operationId": f"manifest_{name}",
                                                "responses": {"200": {"description": "the manifest"}}}}
        schemas.update({f"{name}.{k}": v for k, v in renamed["schemas"].items()})
    paths["/-/manifest"] = {"get": {"summary": "every model's manifest, sha256 and source",
                                    "operationId": "manifest", "responses": {"200": {"description": "the models"}}}}
    paths["/-/stats"] = {"get": {"summary": "this replica's interpreter figures, and the models it holds",
                                 "operationId": "stats",
                                 "responses": {"200": {"description": "calls, errors, busy time, queue depth"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": hashlib.sha256("".join(sha for _, sha in models.values()).encode())
                 .hexdigest()[:12],
                 "description": f"{len(models)} models served by tenfold: "
                                + "; ".join(f"{name} {m.signature()}" for name, (m, _) in models.items())},
        "paths": paths,
        "components": {"schemas": schemas},
    }



def _renamed_refs(node: Any, names: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str) and v.startswith("#/components/schemas/"):
                target = v.removeprefix("#/components/schemas/")
                v = "#/components/schemas/" + names.get(target, target)
            out[k] = _renamed_refs(v, names)
        return out
    if isinstance(node, list):
        return [_renamed_refs(v, names) for v in node]
    return node
