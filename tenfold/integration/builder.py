"""`app_builder`: AppArgs in, a Serve application out (for `serve run configs/<name>.yaml` and Python).

No `from __future__ import annotations` here: Serve reads the builder's parameter annotation to turn
the YAML's `args` into `AppArgs`, and a string annotation would hide the class from it.
"""

import os
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from .archive_cache import ArchiveLocator, file_stamp, this_node
from .catalog import DEFAULT_NAME, Catalog
from .config import AppArgs, ArchiveRef, DeployError, check_model
from .deployment import TenfoldModel
from .sources import ArchiveUnavailable, fetch_with_digest

#: Serve's settings for a replica process that tenfold sets (a user's env_vars override them). Every method of a
#: tenfold replica is async and hands its work to the pool, so user code can run on the replica's event loop
#: rather than on a thread of its own: 0.91x the replica CPU per handle call, 1.15x the calls/s
#: (`tenfold bench dataplane`, docs/benchmarks.md).
REPLICA_ENV: dict[str, str] = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
#: How often a stopping replica looks for requests still in flight. Serve's default, 2 s, is waited at least once,
#: so that even an idle replica takes 2 s to stop on every redeploy, downscale and delete.
SHUTDOWN_WAIT_LOOP_S = 0.25


def _check_resources(args: AppArgs) -> None:
    """Refuse a replica that no node of the running cluster could host (Serve would wait for one forever)."""
    import ray

    if not ray.is_initialized():
        return  # built before Ray starts (serve.run starts it): Serve reports a replica it cannot place
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    most = max((float(n.get("Resources", {}).get("CPU", 0.0)) for n in nodes), default=0.0)
    if nodes and args.replica_num_cpus > most:
        raise DeployError(
            f"a replica needs {args.replica_num_cpus:g} CPUs (num_cpus, or one per interpreter: "
            f"{args.replica_interpreters}), but the largest node of this cluster has {most:g}. Give fewer "
            f"interpreters or a smaller num_cpus (e.g. num_cpus: {most:g}), or add a node with more CPUs"
        )


def _deployment_options(args: AppArgs, name: str) -> dict[str, Any]:
    from tenfold.runtime import GLIBC_TUNABLES

    env = {**REPLICA_ENV, **args.env_vars, "GLIBC_TUNABLES": GLIBC_TUNABLES}
    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": {"num_cpus": args.replica_num_cpus, "runtime_env": {"env_vars": env},
                              **({"resources": dict(args.resources)} if args.resources else {})},
        "max_ongoing_requests": args.replica_max_ongoing_requests,
        "max_queued_requests": args.max_queued_requests,
        # Requests refused past max_queued_requests: a 503 that tells the caller when to come back.
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=args.retry_after_s),
        "health_check_period_s": args.health_check_period_s,
        "health_check_timeout_s": args.health_check_timeout_s,
        "graceful_shutdown_timeout_s": args.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": SHUTDOWN_WAIT_LOOP_S,
    }
    if args.http_port is not None:
        # A rolling update starts the new replicas before it stops the old ones, so that the port always has a
        # replica holding its socket (Serve's default stops the old ones first).
        options["max_surge_percent"] = 100
    if args.autoscaling is None:
        options["num_replicas"] = args.num_replicas
    else:
        a = args.autoscaling
        options["autoscaling_config"] = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "initial_replicas": a.initial_replicas,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
            "look_back_period_s": a.look_back_period_s,
            "policy": {
                "policy_function": "tenfold.integration.policy:UtilizationPolicy",
                "policy_kwargs": {"target_utilization": a.target_utilization},
            },
        }
    return options


def app_builder(args: AppArgs) -> Application:
    """Reads and checks each archive once (from a path, file://, s3:// or http(s)://) and binds where it is,
    with its digest, into the deployment; nothing is put anywhere, and no process is started for it.

    A deployment's `user_config` (`ModelUpdate`: archive and sha256) overrides the archive, and a `serve deploy`
    that changes only that updates the running replicas in place (see `TenfoldModel.reconfigure`). With
    `archives` (several models by name), each replica loads a model into its interpreters on the first request
    for it (see `tenfold.integration.catalog`), and `user_config` (`ModelsUpdate`) overrides the archives of the
    models it names.

    Each replica maps a local archive itself (one copy per node, in the page cache) or takes a remote one
    from the node's object store, where the first replica that needs it puts it; a replica on a node that
    cannot read a local path gets it that way too, read on the node this builds on (see
    `tenfold.integration.archive_cache`). `args` may be an `AppArgs` or a dict of its fields (as in a
    `serve run` YAML's `args`).
    """
    args = AppArgs.model_validate(args) if not isinstance(args, AppArgs) else args
    entries = {name: _read(args, name, ref) for name, ref in args.archive_refs.items()}
    _check_resources(args)
    options = _deployment_options(args, args.name or (DEFAULT_NAME if args.serves_several else entries[""][1].name))
    deployment = serve.deployment(TenfoldModel).options(**options)
    workdir = os.getcwd()  # where relative paths are taken from, for an archive given later in user_config
    bound_args = args.model_dump(mode="json", exclude_unset=True)
    if not args.serves_several:
        return deployment.bind(entries[""][0], bound_args, workdir)
    return deployment.bind(Catalog.of(entries), bound_args, workdir)


def _read(args: AppArgs, name: str, ref: ArchiveRef) -> tuple[ArchiveLocator, Any]:
    """Read and check one archive; where it is, and its manifest. DeployError naming it when it cannot be
    served with `args`."""
    from tenfold.packaging import Archive, PackageError

    source = args.source_of(ref)
    try:
        # Stamped before it is read: a file changed from here on no longer matches, and is hashed again.
        stamp = file_stamp(source.location) if source.is_local else None
        view, digest = fetch_with_digest(source, sha256=ref.sha256)
        manifest = Archive(view, source.describe()).verify()
    except (ArchiveUnavailable, PackageError) as exc:  # each names the source
        raise DeployError(f"refusing to deploy{f' archives[{name!r}]' if name else ''}: {exc}") from exc
    try:
        check_model(args, manifest)
    except DeployError as exc:
        if not name:
            raise
        raise DeployError(f"archives[{name!r}]: {exc}") from None
    return ArchiveLocator(source, digest, len(view), stamp, this_node() if source.is_local else None), manifest
