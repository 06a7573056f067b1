"""tenfold.integration: Ray Serve replicas that each host an interpreter pool.

`app_builder` (for `serve run configs/<name>.yaml` and Python) turns `AppArgs` into a Serve application.
Names are imported on first use, so that `tenfold --help` does not import Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AppArgs": ".config",
    "ArchiveLocator": ".archive_cache",
    "ArchiveSource": ".sources",
    "ArchiveUnavailable": ".sources",
    "AutoscalingArgs": ".config",
    "DeployError": ".config",
    "ModelUpdate": ".config",
    "ModelsUpdate": ".config",
    "RequestTimeout": ".deployment",
    "TenfoldModel": ".deployment",
    "UtilizationPolicy": ".policy",
    "app_builder": ".builder",
    "published_digests": ".archive_cache",
    "utilization_policy": ".policy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
