"""Archive byte format: code packing, row-group locations, version and codec checks."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import archive
from pipeline.errors import ArchiveFormatError
from pipeline.manifest import ARCHIVED, CodecRecord, Location, ManifestEntry

CODEC = CodecRecord("mdct_rvq", "1", "abc", 24000, 320, 1024, 8, 6.0)


@pytest.mark.parametrize("bits,shape", [(10, (2, 8, 37)), (10, (1, 1, 1)), (7, (3, 4, 5)), (1, (1, 2, 9))])
def test_pack_unpack_round_trip(bits, shape):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 1 << bits, size=shape)
    data = archive.pack_codes(codes, bits)
    assert len(data) == -(-codes.size * bits // 8)  # tight: no padding beyond the last byte
    np.testing.assert_array_equal(archive.unpack_codes(data, shape, bits), codes)


def test_pack_rejects_codes_that_do_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        archive.pack_codes(np.array([[[1024]]]), 10)


def test_file_codes_come_from_their_own_row_groups(tmp_path):
    """Three files in one shard, small row groups: each file's locations name only its groups."""
    url = str(tmp_path / "shard.parquet")
    w = archive.ShardWriter(url, CODEC, row_group_bytes=300)
    rng = np.random.default_rng(1)
    truth = {}
    for fid in (11, 22, 33):
        truth[fid] = []
        for seq in range(3):
            c = rng.integers(0, 1024, size=(1, 8, 20))
            truth[fid].append(c)
            w.add({"file_id": fid, "seq": seq, "frame_start": seq * 20, "n_frames": 20, "channels": 1, "n_q": 8,
                   "codes": archive.pack_codes(c, 10)})
    w.close()
    groups = {fid: set(g) for fid, g in w.where.items()}
    assert w.n_groups == 5  # 9 rows of 200 bytes, a group closes once it holds >= 300 bytes
    assert not (groups[11] & groups[33])  # a file's restore does not touch the others' row groups
    entry = ManifestEntry(source="s", relpath="s", file_id=22, size=0, content_hash="", status=ARCHIVED,
                          n_windows=3, locations=tuple(Location("shard.parquet", g) for g in w.where[22]))
    got = list(archive.read_file_codes(str(tmp_path), entry, CODEC))
    assert [fs for fs, _ in got] == [0, 20, 40]
    for (_, c), want in zip(got, truth[22]):
        np.testing.assert_array_equal(c, want)


def test_parquet_files_carry_format_and_version(tmp_path):
    import pyarrow.parquet as pq
    url = str(tmp_path / "m.parquet")
    archive.write_manifest(url, [ManifestEntry(source="a", relpath="a", file_id=1, size=3, content_hash="h",
                                               status=ARCHIVED)])
    md = pq.read_schema(url).metadata
    assert md[b"audioarc.format"] == b"audioarc"
    assert md[b"audioarc.format_version"].startswith(b"1.")
    assert archive.read_manifest_file(url)[0].source == "a"


@pytest.mark.parametrize("version,ok", [("1.0", True), ("1.7", True), ("2.0", False), ("0.9", False)])
def test_readers_reject_unknown_major_versions(version, ok):
    if ok:
        archive.check_version("audioarc", version, "x")
    else:
        with pytest.raises(ArchiveFormatError, match="not supported"):
            archive.check_version("audioarc", version, "x")


def test_foreign_json_is_not_an_archive(tmp_path):
    (tmp_path / "archive.json").write_text(json.dumps({"format": "something-else", "format_version": "1.0"}))
    with pytest.raises(ArchiveFormatError, match="not an audioarc archive"):
        archive.read_record(str(tmp_path))


def test_missing_archive_says_how_to_make_one(tmp_path):
    with pytest.raises(ArchiveFormatError, match="audioarc encode"):
        archive.require_record(str(tmp_path))
