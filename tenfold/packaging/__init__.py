"""tenfold.packaging: models as torch.package archives with a manifest, a digest and zero-copy weights.

`save` writes an archive (code + weights + manifest.json); `load` rebuilds the model with its weights
as views into the archive's bytes; `replicate` loads one archive into every interpreter of a pool
from one shared buffer. Loading runs pickled code: load only archives you trust, and pin their
`sha256` (see `archive_sha256`).
"""

from .archive import Archive, Source, archive_sha256, open_archive, open_source, read_manifest, verify_archive
from .errors import (
    DigestMismatch,
    EntryPointMissing,
    ExternMissing,
    ManifestInvalid,
    ManifestMissing,
    NotAnArchive,
    PackageError,
    PackagingFailed,
    PinMismatch,
    ReferenceMismatch,
    RequirementMismatch,
    RequirementWarning,
    SharedWeightWrite,
    TorchVersionWarning,
)
from .manifest import Manifest, ReferenceCheck, Spec, TensorSpec, ValueSpec
from .reader import load, read_example_inputs
from .replicated import ReplicatedModel, replicate
from .streaming import ModelStream, StreamClosed
from .writer import repackage, save

__all__ = [
    "Archive",
    "DigestMismatch",
    "EntryPointMissing",
    "ExternMissing",
    "Manifest",
    "ModelStream",
    "ManifestInvalid",
    "ManifestMissing",
    "NotAnArchive",
    "PackageError",
    "PackagingFailed",
    "PinMismatch",
    "ReferenceCheck",
    "ReferenceMismatch",
    "RequirementMismatch",
    "RequirementWarning",
    "ReplicatedModel",
    "SharedWeightWrite",
    "Source",
    "Spec",
    "StreamClosed",
    "TensorSpec",
    "TorchVersionWarning",
    "ValueSpec",
    "archive_sha256",
    "load",
    "open_archive",
    "open_source",
    "read_example_inputs",
    "read_manifest",
    "replicate",
    "repackage",
    "save",
    "verify_archive",
]
