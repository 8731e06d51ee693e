"""Format 1.x archives, read-only: ``archive.json`` listing the committed generations, ``manifest/gNNNNNN.parquet``
per generation (later generations override earlier rows), shards without row checksums."""
from __future__ import annotations

import pyarrow.parquet as pq

from .. import storage
from ..errors import IntegrityError, StorageError
from ..manifest import ManifestEntry
from . import layout
from .exitgc import exit_gc


def manifest_relpath(gen: int) -> str:
    return f"manifest/{layout.gen_name(gen)}.parquet"


def read_manifest_file(url: str) -> list[ManifestEntry]:
    exit_gc()
    try:
        with storage.open_read(url) as f:
            pf = pq.ParquetFile(f)
            layout.check_parquet_meta(pf.schema_arrow, url)
            table = pf.read()
    except StorageError:
        raise IntegrityError(f"{url}: a committed manifest is missing; the archive is damaged there (restore "
                             f"the file from a replica or backup)") from None
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{url}: a committed manifest is unreadable ({type(e).__name__}: {str(e)[:200]}); "
                             f"the archive is damaged there") from None
    return [ManifestEntry.from_row(r) for r in table.to_pylist()]


def read_manifest(dest: str, generations: tuple[int, ...]) -> dict[str, ManifestEntry]:
    """Merged manifest of the committed generations: source URI -> latest entry."""
    out: dict[str, ManifestEntry] = {}
    for gen in generations:
        for e in read_manifest_file(storage.join(dest, manifest_relpath(gen))):
            out[e.source] = e
    return out
