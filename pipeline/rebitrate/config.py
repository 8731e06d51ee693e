"""What a rebitrate job is asked to do: ``RebitrateConfig`` (light: the CLI's parser reads its defaults)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class RebitrateConfig:
    dest: str  # the archive to read
    new_dest: str  # the archive to write (created, or added to)
    bitrate_kbps: float
    patterns: tuple[str, ...] = ()
    commit_every: int = 500  # files per committed generation
    shard_mb: float = 64.0
    codec_weights: str | None = None

    def validate(self) -> RebitrateConfig:
        from .. import storage
        if self.commit_every < 1:
            raise ConfigError(f"--commit-every must be >= 1, got {self.commit_every}")
        if self.shard_mb <= 0:
            raise ConfigError(f"--shard-mb must be > 0, got {self.shard_mb}")
        if storage.absolute(self.dest).rstrip("/") == storage.absolute(self.new_dest).rstrip("/"):
            raise ConfigError(f"{self.new_dest}: NEW_DEST is DEST; an archive's rate is fixed, so rebitrate writes "
                              f"a new archive: choose another NEW_DEST")
        if storage.is_local(self.new_dest) and os.path.isfile(storage.local_path(self.new_dest)):
            raise ConfigError(f"{self.new_dest}: NEW_DEST is a file, not a folder; choose a folder (or URL prefix)")
        return self
