"""Exceptions and warnings of tenfold.packaging.

Every error names the archive, the problem and what to do next.
"""

from __future__ import annotations


class PackageError(Exception):
    """Base of tenfold.packaging's errors. `archive` names the file (or buffer) concerned."""

    def __init__(self, archive: str, message: str) -> None:
        super().__init__(f"{archive}: {message}")
        self.archive = archive

    def __reduce__(self) -> tuple[type[PackageError], tuple[str, str]]:  # crosses back from interpreters
        return (type(self), (self.archive, str(self).removeprefix(f"{self.archive}: ")))


class NotAnArchive(PackageError):
    """The source is not a zip archive, or it is truncated."""


class ManifestMissing(PackageError):
    """The archive has no manifest.json (it was not made by tenfold.packaging.save)."""


class ManifestInvalid(PackageError):
    """manifest.json is not valid JSON or does not match the Manifest schema."""


class DigestMismatch(PackageError):
    """The archive's content does not match the digests in its manifest: it was changed after packaging."""


class PinMismatch(PackageError):
    """The archive's sha256 differs from the one the caller pinned."""


class ExternMissing(PackageError):
    """A module the archive expects from the environment (extern) cannot be imported here, or a distribution
    it requires is not installed."""


class RequirementMismatch(PackageError):
    """An installed distribution the archive needs has another version than the one it was packaged with
    (raised with `strict_requirements=True`; a RequirementWarning otherwise)."""


class EntryPointMissing(PackageError):
    """The resource to load (the entry point) is not in the archive."""


class ReferenceMismatch(PackageError):
    """The loaded model's output on the stored example inputs differs from the output recorded at packaging."""


class PackagingFailed(PackageError):
    """`save` could not package the model (dependencies unresolved, smoke run failed, unsupported outputs)."""


class SharedWeightWrite(PackageError):
    """The model wrote into a shared, read-only weight during inference."""


class RequirementWarning(UserWarning):
    """An installed distribution the archive needs has another version than the one it was packaged with."""


class TorchVersionWarning(UserWarning):
    """The archive was packaged with a different torch major.minor than the one loading it."""
