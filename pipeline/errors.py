"""Named exceptions of audioarc; each message names the object at fault and the fix."""


class AudioarcError(Exception):
    """Base of every error audioarc raises on purpose."""


class InputError(AudioarcError):
    """A source object cannot be archived (not audio, empty, truncated, unreadable)."""


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
