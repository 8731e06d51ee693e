"""Which catalog entries a command acts on (glob patterns), and where a restored file may land (never outside OUT)."""
from __future__ import annotations

import fnmatch
import os
import posixpath
import re
from typing import Iterable

from . import storage
from .errors import AudioarcError
from .manifest import ARCHIVED, ManifestEntry


class UnsafePathError(AudioarcError):
    """A catalog entry's path would land outside the output folder (a crafted or damaged archive)."""


_DRIVE = re.compile(r"^[A-Za-z]:")


def check_relpath(relpath: str) -> str:
    """``relpath`` if it is a plain relative POSIX path below its root; raises UnsafePathError otherwise
    (empty, absolute, ``..`` components, backslashes, NUL or control characters, drive letters)."""
    why = None
    if not relpath:
        why = "it is empty"
    elif any(ord(ch) < 32 for ch in relpath):
        why = "it holds a NUL or control character"
    elif "\\" in relpath:
        why = "it holds a backslash"
    elif relpath.startswith("/"):
        why = "it is absolute"
    elif _DRIVE.match(relpath):
        why = "it starts with a drive letter"
    elif any(p in ("..", ".") for p in relpath.split("/")) or "//" in relpath:
        why = "it has '.', '..' or empty components"
    if why:
        raise UnsafePathError(f"refusing to restore catalog entry {relpath!r}: {why}, so it could land outside "
                              f"the output folder (a crafted or damaged archive); the other files are restored")
    return relpath


def output_path(out: str, entry: ManifestEntry, fmt: str) -> str:
    """Where ``entry`` is restored under ``out`` (checked to stay inside it, symlinks included for local paths)."""
    stem, _ = posixpath.splitext(check_relpath(entry.relpath))
    path = storage.join(out, f"{stem}.{fmt}")
    if storage.is_local(out):
        root = os.path.realpath(storage.local_path(out))
        real = os.path.realpath(storage.local_path(path))
        if os.path.commonpath([root, real]) != root:
            raise UnsafePathError(f"refusing to restore catalog entry {entry.relpath!r}: it resolves to {real}, "
                                  f"outside the output folder {root} (a symbolic link inside it?)")
    return path


def matches(entry: ManifestEntry, patterns: tuple[str, ...]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(entry.relpath, p) or fnmatch.fnmatchcase(entry.source, p)
                               or fnmatch.fnmatchcase(posixpath.basename(entry.relpath), p) for p in patterns)


def select(entries: dict[str, ManifestEntry] | Iterable[ManifestEntry], patterns: tuple[str, ...]) -> list[ManifestEntry]:
    """Archived entries whose relpath, source URI or base name matches any glob pattern (all if none), by relpath."""
    items = entries.values() if isinstance(entries, dict) else entries
    return [e for e in sorted(items, key=lambda e: e.relpath) if e.status == ARCHIVED and matches(e, patterns)]
