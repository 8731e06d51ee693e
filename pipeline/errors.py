"""Named exceptions of audioarc; each message names the object at fault and the fix."""


class AudioarcError(Exception):
    """Base of every error audioarc raises on purpose."""


class InputError(AudioarcError):
    """A source object cannot be archived (not audio, empty, truncated, unreadable).

    ``code`` names the kind for machines (metrics labels, ``reason_code`` in the catalog): one of
    ``telemetry.FAILURE_REASONS``; rewording the message never changes it."""

    def __init__(self, message: str, code: str = "other"):
        super().__init__(message)
        self.code = code


class ArchiveFormatError(AudioarcError):
    """An archive (or a file in it) is not one this version of audioarc can read."""


class CodecUnavailableError(AudioarcError):
    """A codec named by the user or by an archive cannot be loaded."""


class CodecMismatchError(AudioarcError):
    """An archive was made by a codec (name + checkpoint hash) other than the one available."""


class StorageError(AudioarcError):
    """A storage operation failed permanently (permission, missing bucket, missing object)."""


class ConfigError(AudioarcError, ValueError):
    """Invalid options or configuration."""


class IntegrityError(ArchiveFormatError):
    """Archived data failed a check: a checksum mismatch, a missing or truncated object, a lost code row."""


class ConcurrencyError(AudioarcError):
    """Another job's state got in the way of a commit (e.g. this job's lease expired); nothing was damaged."""
