"""The application's arguments: what `serve run configs/<name>.yaml` passes to `app_builder`."""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from tenfold.runtime import MAX_INTERPRETERS

from .sources import ArchiveSource, check_pinned

DEFAULT_INTERPRETERS = 2
#: 16 MiB: a JSON body parses into several times its size of Python objects in an interpreter, and a call on
#: one much larger may outlast request_timeout_s in native code (costing the interpreter). Raise it for large
#: tensor batches, best sent as Arrow.
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: A model's name in an application of several archives: one segment of a URL path (`POST /{name}`).
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]{0,127}")
#: Models one application may name. The interpreters' HTTP servers tell the replica which models they are asked
#: for in a bit per model (see `tenfold.integration._server`).
MAX_ARCHIVES = 256


class DeployError(ValueError):
    """The application cannot be deployed as configured; the message says why and what to change."""


def _digest(value: str | None) -> str | None:
    if value is None:
        return None
    digest = value.strip().lower().removeprefix("sha256:")
    if not _SHA256.fullmatch(digest):
        raise ValueError(f"sha256 must be 64 hex digits, got {value!r}")
    return digest


class AutoscalingArgs(BaseModel):
    """Replica autoscaling on interpreter utilization (see `tenfold.integration.policy`)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: NonNegativeInt = Field(1, description="Fewest replicas kept running.")
    max_replicas: PositiveInt = Field(4, description="Most replicas; each needs `num_cpus` CPUs.")
    initial_replicas: NonNegativeInt | None = Field(None, description="Replicas at deploy time (default: min).")
    target_utilization: float = Field(
        0.7, gt=0.0, le=1.0, description="Mean interpreter utilization (busy time / wall time) to track."
    )
    upscale_delay_s: NonNegativeFloat = Field(10.0, description="How long load must stay high before scaling up.")
    downscale_delay_s: NonNegativeFloat = Field(60.0, description="How long load must stay low before scaling down.")
    look_back_period_s: PositiveFloat = Field(
        10.0, description="Window over which utilization is measured and averaged."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingArgs:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError(
                f"initial_replicas ({self.initial_replicas}) must be between min_replicas ({self.min_replicas})"
                f" and max_replicas ({self.max_replicas})"
            )
        return self


class ArchiveRef(BaseModel):
    """One of the archives of an application that serves several (`AppArgs.archives`): where it is, and its pin."""

    model_config = ConfigDict(extra="forbid")

    archive: str = Field(
        description="Where the archive is, in any form `AppArgs.archive` takes (a local path, file://, s3://, "
        "http(s)://). Every form but a local file needs sha256."
    )
    sha256: str | None = Field(None, description="Expected hex sha256 of the whole archive; refuse any other.")
    endpoint_url: str | None = Field(
        None, description="S3-compatible store serving an s3:// archive (default: the application's endpoint_url)."
    )

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        return _digest(value)


class AppArgs(BaseModel):
    """Arguments of `tenfold.integration:app_builder`, one field per knob; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    archive: str | None = Field(
        None, description="Where the torch.package archive is, read once by the builder: a local path (relative to "
        "the directory the application is built in), file:///absolute/path, s3://bucket/key (see endpoint_url) or "
        "http(s)://host/path. Every form but a local file needs sha256. Give this or `archives`."
    )
    sha256: str | None = Field(None, description="Expected hex sha256 of the whole archive; refuse any other.")
    archives: dict[str, ArchiveRef] | None = Field(
        None, description="Several models in one application, by name: {name: {archive: ..., sha256: ...}} (or "
        "{name: path} for a local file). A request picks one by its path (POST /{name}) or by Serve's "
        "multiplexing (the serve_multiplexed_model_id header, handle.options(multiplexed_model_id=name)); a replica "
        "loads each into all its interpreters on first use. Give this or `archive`."
    )
    max_models_per_replica: PositiveInt | None = Field(
        None, description="With `archives`: how many a replica holds at once; loading one more unloads the least "
        "recently used, and its weights' memory goes with it (default: all of them)."
    )
    require_sha256: bool = Field(False, description="Refuse to deploy an archive whose sha256 is not pinned.")
    endpoint_url: str | None = Field(
        None, description="S3-compatible store serving an s3:// archive, e.g. http://minio:9000 (default: "
        "AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL, else AWS S3). Credentials and region come from the AWS_* "
        "environment variables."
    )
    name: str | None = Field(None, description="Deployment name (default: the manifest's model name).")
    interpreters: PositiveInt | None = Field(
        None, description=f"Interpreters per replica (default: num_cpus, else {DEFAULT_INTERPRETERS})."
    )
    num_cpus: PositiveFloat | None = Field(None, description="CPUs reserved per replica (default: interpreters).")
    backend: Literal["auto", "namespaces", "threads"] = Field(
        "namespaces", description="'namespaces': one CPython per interpreter; 'threads': one GIL (for comparison)."
    )
    threads_per_interpreter: PositiveInt | None = Field(
        None, description="Intra-op threads per interpreter (default: the replica's cores / interpreters)."
    )
    resources: dict[str, PositiveFloat] = Field(
        default_factory=dict, description="Custom Ray resources each replica needs besides its CPUs, as in Serve's "
        "ray_actor_options.resources: e.g. {\"model-node\": 1} places replicas only on nodes started with "
        "--resources='{\"model-node\": N}'."
    )
    num_replicas: PositiveInt = Field(1, description="Fixed replica count (when `autoscaling` is not set).")
    autoscaling: AutoscalingArgs | None = Field(None, description="Scale replicas on interpreter utilization.")
    max_ongoing_requests: PositiveInt | None = Field(
        None, description="Requests a replica accepts at once (default: 4 per interpreter)."
    )
    max_queued_requests: int = Field(
        -1, ge=-1, description="Requests each caller may queue beyond that before a 503 (-1: unbounded)."
    )
    retry_after_s: PositiveFloat = Field(1.0, description="Retry-After of a 503 sent past max_queued_requests.")
    max_batch_size: PositiveInt | None = Field(
        None, description="Dynamic batching: join up to this many requests along dimension 0 (default: off)."
    )
    batch_wait_timeout_s: NonNegativeFloat = Field(0.005, description="How long a batch waits to fill up.")
    request_timeout_s: PositiveFloat | None = Field(30.0, description="A call running longer answers 504.")
    replace_lost_interpreters: bool = Field(
        True, description="Start an interpreter in the place of one lost in native code, while the process has "
        "room; without it (or without room) a replica whose interpreters are all lost fails its health check."
    )
    interrupt_grace_s: PositiveFloat = Field(
        1.0, description="How long a timed-out call may take to stop once interrupted before its interpreter is "
        "declared lost (stuck in native code)."
    )
    max_request_bytes: PositiveInt = Field(
        DEFAULT_MAX_REQUEST_BYTES, description="A larger request body is refused with 413 before it is parsed "
        "(default 16 MiB; raise it for large tensor batches, best sent as Arrow)."
    )
    max_lost_memory_mb: PositiveFloat | None = Field(
        2048.0, description="A replica whose lost interpreters (stuck in native code; their memory can never be "
        "returned) held more than this, by their heaps at the last health check, recycles: its health check fails, "
        "Serve drains it and starts a fresh process. A replica that cannot replace a lost interpreter recycles "
        "too. None: never for memory."
    )
    http_port: int | None = Field(
        None, ge=1, le=65535, description="Also serve the application's routes on this port of every node with a "
        "replica, from inside the interpreters: each interpreter accepts, parses, runs and answers requests itself, "
        "so that the replica's host interpreter is never on their path. The replicas of a node share the port."
    )
    http_host: str = Field("0.0.0.0", description="Address that http_port is bound to.")
    http_keep_alive_s: PositiveFloat = Field(5.0, description="An idle keep-alive connection on http_port closes "
                                             "after this long.")
    http_read_timeout_s: PositiveFloat = Field(
        30.0, description="A request on http_port whose headers and body have not all arrived after this long is "
        "answered 408 and its connection closed (the interpreter serves other connections meanwhile)."
    )
    graceful_shutdown_timeout_s: PositiveFloat = Field(
        20.0, description="How long a stopping replica (a redeploy, a downscale, a failed health check) may take to "
        "finish the requests it holds before Serve kills it (Serve's own default: 20 s)."
    )
    http_drain_timeout_s: PositiveFloat = Field(
        10.0, description="When a replica stops, how long its servers on http_port may take to finish the requests "
        "they accepted (they stop accepting at once; the node's other replicas take new connections)."
    )
    env_vars: dict[str, str] = Field(
        default_factory=dict, description="Environment variables of the replicas' processes, beside those tenfold "
        "sets (GLIBC_TUNABLES, which a replica needs set before it starts, and Serve's replica settings below)."
    )
    health_check_period_s: PositiveFloat = Field(10.0, description="How often Serve pings every interpreter.")
    health_check_timeout_s: PositiveFloat = Field(30.0, description="A ping slower than this fails the replica.")

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        return _digest(value)

    @field_validator("archives", mode="before")
    @classmethod
    def _archive_refs(cls, value: Any) -> Any:
        if isinstance(value, dict):  # {name: path} is short for {name: {archive: path}}
            return {name: {"archive": ref} if isinstance(ref, str) else ref for name, ref in value.items()}
        return value

    @field_validator("archives")
    @classmethod
    def _model_names(cls, value: dict[str, ArchiveRef] | None) -> dict[str, ArchiveRef] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("archives names no archive: give at least one {name: {archive: ..., sha256: ...}}")
        if len(value) > MAX_ARCHIVES:
            raise ValueError(f"archives names {len(value)} archives, more than {MAX_ARCHIVES} per application; "
                             "split them into several applications")
        bad = [name for name in value if not _MODEL_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"archive names {bad} cannot be a segment of a URL path (POST /{{name}}): use letters, "
                             "digits and . _ ~ -, starting with a letter or digit, at most 128")
        return value

    @field_validator("max_queued_requests")
    @classmethod
    def _queue_bound(cls, value: int) -> int:
        if value == 0:
            raise ValueError("max_queued_requests must be -1 (no limit) or at least 1, as Serve takes it")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AppArgs:
        if self.autoscaling is not None and "num_replicas" in self.model_fields_set:
            raise ValueError("set either num_replicas or autoscaling, not both")
        if self.http_port is not None and self.http_drain_timeout_s > self.graceful_shutdown_timeout_s:
            raise ValueError(f"http_drain_timeout_s ({self.http_drain_timeout_s:g}) must not exceed "
                             f"graceful_shutdown_timeout_s ({self.graceful_shutdown_timeout_s:g}): Serve would kill "
                             "the replica before its servers on http_port finish; raise the one or lower the other")
        if "batch_wait_timeout_s" in self.model_fields_set and self.max_batch_size is None:
            raise ValueError("batch_wait_timeout_s needs max_batch_size")
        if self.interpreters is not None and self.interpreters > MAX_INTERPRETERS:
            raise ValueError(f"interpreters must be at most {MAX_INTERPRETERS} per replica (glibc allows 16 link-map "
                             f"namespaces per process, one of them the host's), got {self.interpreters}; use more "
                             "replicas for more cores")
        if self.interpreters is None and self.replica_interpreters > MAX_INTERPRETERS:
            raise ValueError(f"num_cpus {self.num_cpus:g} would give a replica {self.replica_interpreters} "
                             f"interpreters; set interpreters (at most {MAX_INTERPRETERS}), or use more replicas")
        return self

    @model_validator(mode="after")
    def _archive_source(self) -> AppArgs:
        if (self.archive is None) == (self.archives is None):
            raise ValueError("give either archive (one model) or archives (several, by name), not "
                             + ("both" if self.archive is not None else "neither"))
        if self.archives is not None:
            if self.sha256 is not None:
                raise ValueError("sha256 pins archive; with archives, give each its own sha256")
        elif self.max_models_per_replica is not None:
            raise ValueError("max_models_per_replica bounds the models of archives; with archive there is one")
        # A form the builder cannot read is refused here; an archive from the network runs pickled code, so only
        # its digest makes it trustworthy.
        for name, ref in self.archive_refs.items():
            where = f"archives[{name!r}]: " if self.archives is not None else ""
            if self.require_sha256 and ref.sha256 is None:
                raise ValueError(f"{where}require_sha256 is set but no sha256 is pinned for {ref.archive!r}")
            try:
                check_pinned(self.source_of(ref), ref.sha256)
            except ValueError as exc:
                raise ValueError(f"{where}{exc}") from None
        return self

    @property
    def serves_several(self) -> bool:
        """Whether the application serves several archives, picked per request by name."""
        return self.archives is not None

    @property
    def archive_refs(self) -> dict[str, ArchiveRef]:
        """The application's archives by name; the one of `archive` is named "" (served at /)."""
        if self.archives is not None:
            return dict(self.archives)
        assert self.archive is not None  # one of the two, checked above
        return {"": ArchiveRef(archive=self.archive, sha256=self.sha256, endpoint_url=self.endpoint_url)}

    def source_of(self, ref: ArchiveRef) -> ArchiveSource:
        """Where `ref`'s archive is (its endpoint_url, else the application's)."""
        return ArchiveSource.parse(ref.archive, endpoint_url=ref.endpoint_url or self.endpoint_url)

    @property
    def replica_interpreters(self) -> int:
        """Interpreters each replica hosts."""
        if self.interpreters is not None:
            return self.interpreters
        if self.num_cpus is not None:
            return max(1, math.floor(self.num_cpus))
        return DEFAULT_INTERPRETERS

    @property
    def replica_num_cpus(self) -> float:
        """CPUs Ray reserves for each replica."""
        return self.num_cpus if self.num_cpus is not None else float(self.replica_interpreters)

    @property
    def replica_max_ongoing_requests(self) -> int:
        """Serve's per-replica concurrency: enough to keep every interpreter and the batcher fed."""
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        per_interpreter = 4 * (self.max_batch_size or 1)
        return per_interpreter * self.replica_interpreters


class ModelUpdate(BaseModel):
    """A deployment's `user_config`: the archive its running replicas serve, swapped in place when a `serve deploy`
    changes it (same processes, same interpreters; see `TenfoldModel.reconfigure`)."""

    model_config = ConfigDict(extra="forbid")

    archive: str = Field(
        description="The archive to serve, in any form `archive` takes; a relative path is resolved against the "
        "directory the application was built in."
    )
    sha256: str = Field(description="The archive's hex sha256: a live update names the exact archive it rolls out "
                        "(`tenfold package` prints it).")
    endpoint_url: str | None = Field(None, description="S3-compatible store serving an s3:// archive.")

    @model_validator(mode="before")
    @classmethod
    def _not_several(cls, value: Any) -> Any:
        if isinstance(value, dict) and "archives" in value and "archive" not in value:
            raise ValueError("this application serves one archive: give user_config as {archive: ..., sha256: ...}")
        return value

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        digest = _digest(value)
        assert digest is not None
        return digest


class ModelsUpdate(BaseModel):
    """The `user_config` of an application of several archives: the archive each model it names serves, swapped in
    place when a `serve deploy` changes it; the models it leaves out serve their archives of `args` (see
    `ModelUpdate`)."""

    model_config = ConfigDict(extra="forbid")

    archives: dict[str, ModelUpdate] = Field(
        description="For models of the application's `archives`, by name: the archive to serve and its sha256. "
        "A model left out serves its archive of `args`.")

    @model_validator(mode="before")
    @classmethod
    def _not_one(cls, value: Any) -> Any:
        if isinstance(value, dict) and "archive" in value and "archives" not in value:
            raise ValueError("this application serves several models: give user_config as "
                             "{archives: {NAME: {archive: ..., sha256: ...}}}, naming the models to update")
        return value


def check_model(args: AppArgs, manifest: Any) -> None:
    """Raise DeployError when `manifest`'s model cannot be served with `args` (the batching it asks for)."""
    from . import codec

    if args.max_batch_size is None:
        return
    if manifest.streams:
        raise DeployError(
            f"max_batch_size joins requests into one call, but {manifest.name} streams ({manifest.signature()}): "
            "each request is its own stream. Drop max_batch_size"
        )
    if manifest.takes_values:
        if codec.batches_values(manifest):
            return  # requests' lists are joined into one list, and the results split back
        raise DeployError(
            f"max_batch_size joins requests into one call: the items of a model that maps one list to a list of "
            f"results of the same length, as (texts: list[str]) -> list[list[float]], or tensor inputs along "
            f"their first dimension. {manifest.name} takes {manifest.signature()}, neither. Drop max_batch_size "
            "(each request is then one call), or give the model a list-to-list signature"
        )
    fixed = [s.describe() for s in [*manifest.inputs, *manifest.outputs] if not s.shape or s.shape[0] is not None]
    if fixed:
        raise DeployError(
            f"max_batch_size needs a dynamic first (batch) dimension on every input and output of "
            f"{manifest.name}; these have none: {', '.join(fixed)}. Package the model with a batch dimension "
            "or drop max_batch_size"
        )
