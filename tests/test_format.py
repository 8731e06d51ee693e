"""Archive byte format: code packing, row checksums, row-group locations, catalog, version and weights checks."""
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


def _shard(tmp_path, fids=(7,), windows=4):
    url = str(tmp_path / "shards/g000001/part-00000.parquet")
    w = archive.ShardWriter(url, CODEC, row_group_bytes=300)
    rng = np.random.default_rng(2)
    for fid in fids:
        for seq in range(windows):
            w.add({"file_id": fid, "seq": seq, "frame_start": seq * 20, "n_frames": 20, "channels": 1, "n_q": 8,
                   "codes": archive.pack_codes(rng.integers(0, 1024, size=(1, 8, 20)), 10)})
    w.close()
    entries = {fid: ManifestEntry(source=f"/src/{fid}.wav", relpath=f"{fid}.wav", file_id=fid, size=1,
                                  content_hash="h", status=ARCHIVED, n_windows=windows,
                                  locations=tuple(Location("shards/g000001/part-00000.parquet", g, w.bytes, w.sha256)
                                                  for g in w.where[fid])) for fid in fids}
    return url, w, entries


def test_shard_writer_records_what_it_wrote(tmp_path):
    import hashlib

    import pyarrow.parquet as pq
    url, w, _ = _shard(tmp_path)
    data = open(url, "rb").read()
    assert (w.bytes, w.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    md = pq.read_schema(url).metadata
    assert md[b"audioarc.format"] == b"audioarc" and md[b"audioarc.format_version"] == b"2.0"
    t = pq.read_table(url)
    for r in t.to_pylist():  # every row carries the CRC-32C of its identity and payload
        assert r["crc32c"] == archive.row_checksum(r["file_id"], r["seq"], r["frame_start"], r["n_frames"],
                                                   r["channels"], r["n_q"], r["codes"], r["gains"])


def test_row_checksum_covers_identity_and_payload():
    base = (1, 0, 0, 20, 1, 8, b"abc", None)
    c = archive.row_checksum(*base)
    for i, other in enumerate((2, 1, 20, 21, 2, 7, b"abd", b"g")):
        changed = list(base)
        changed[i] = other
        assert archive.row_checksum(*changed) != c, i


@pytest.mark.parametrize("where", ["codes", "footer", "truncate"])
def test_damaged_shard_is_an_error_naming_file_and_shard_never_audio(tmp_path, where):
    from pipeline.errors import IntegrityError
    url, w, entries = _shard(tmp_path, fids=(7, 8))
    data = bytearray(open(url, "rb").read())
    if where == "codes":  # a byte in the middle of the first row group's codes
        data[len(data) // 4] ^= 0x40
    elif where == "footer":
        data[-20] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    open(url, "wb").write(bytes(data))
    with pytest.raises(IntegrityError) as e:
        list(archive.read_file_windows(str(tmp_path), entries[7], CODEC))
    assert "7.wav" in str(e.value) and "shards/g000001/part-00000.parquet" in str(e.value)


def test_a_row_moved_between_files_fails_its_checksum(tmp_path):
    """A crafted shard whose row claims another file id than it was written for."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.errors import IntegrityError
    url, w, entries = _shard(tmp_path, fids=(7,), windows=1)
    t = pq.read_table(url)
    t = t.set_column(0, "file_id", pa.array([9], pa.int64()))
    pq.write_table(t, url)
    e = ManifestEntry(**{**entries[7].__dict__, "file_id": 9, "locations": tuple(
        Location(loc.shard, loc.row_group) for loc in entries[7].locations)})
    with pytest.raises(IntegrityError, match="checksum"):
        list(archive.read_file_windows(str(tmp_path), e, CODEC))


def test_catalog_appends_and_the_newest_archived_row_wins(tmp_path):
    from pipeline.archive import catalog
    dest = str(tmp_path)
    catalog.create(dest)
    catalog.create(dest)  # a second creator finds it there
    a1 = ManifestEntry(source="/s/a", relpath="a", file_id=1, size=1, content_hash="h1", status=ARCHIVED, generation=1)
    b1 = ManifestEntry(source="/s/b", relpath="b", file_id=2, size=1, content_hash="x", status="failed", generation=1)
    catalog.append(dest, [a1, b1], 1, "job1")
    a3 = ManifestEntry(source="/s/a", relpath="a", file_id=1, size=1, content_hash="h3", status=ARCHIVED, generation=3)
    catalog.append(dest, [a3], 3, "job2")
    a2 = ManifestEntry(source="/s/a", relpath="a", file_id=1, size=1, content_hash="h2", status="failed", generation=4)
    b2 = ManifestEntry(source="/s/b", relpath="b", file_id=2, size=1, content_hash="y", status="failed", generation=2)
    catalog.append(dest, [a2, b2], 4, "job3")
    got = {e.source: e for e in catalog.entries(catalog.latest(catalog.table(dest)))}
    assert got["/s/a"].content_hash == "h3"  # a later failed attempt never hides archived audio
    assert got["/s/b"].content_hash == "y"  # without an archived row: the newest
    assert catalog.generations(dest) == (1, 2, 3, 4)


def test_generation_numbers_are_never_shared(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.archive import commit
    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda i: commit.claim_generation(str(tmp_path), f"job{i}", 0), range(24)))
    assert sorted(got) == list(range(1, 25))


def test_garbage_spares_a_live_job_and_takes_a_dead_ones(tmp_path):
    import json as _json
    import os
    import subprocess
    import sys

    from pipeline.archive import commit, layout
    dest = str(tmp_path)
    live = commit.Lease(dest, "live-job")
    g_live = commit.claim_generation(dest, "live-job", 0)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    g_dead = commit.claim_generation(dest, "dead-job", g_live)
    (tmp_path / layout.LEASES_DIR / "dead-job.json").write_text(_json.dumps(
        {"job_id": "dead-job", "host": os.uname().nodename, "pid": int(dead.stdout), "heartbeat": 1e12}))
    g_done = commit.claim_generation(dest, "done-job", g_dead)
    g_committed = commit.claim_generation(dest, "dead-job", g_done)
    for g in (g_live, g_dead, g_done, g_committed):
        p = tmp_path / layout.shard_relpath(g, 0)
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
    removed = commit.collect(dest, lambda: {g_committed})
    left = sorted(layout.gen_of(p.name) for p in (tmp_path / "shards").iterdir())
    assert left == [g_live, g_committed]
    assert not (tmp_path / layout.LEASES_DIR / "dead-job.json").exists() and len(removed) == 3
    live.release()
    assert not (tmp_path / layout.LEASES_DIR / "live-job.json").exists()


def test_weights_round_trip_and_are_hash_checked(tmp_path):
    from pipeline.archive import weights
    from pipeline.codec import registry
    from pipeline.errors import IntegrityError
    codec = registry.load("mdct_rvq")
    ref = weights.embed(str(tmp_path), codec)
    assert ref.path == f"weights/{codec.checkpoint_hash()}.safetensors"
    data = (tmp_path / ref.path).read_bytes()
    back = weights.from_bytes(data, "mdct_rvq", codec.checkpoint_hash(), "w")
    assert back.checkpoint_hash() == codec.checkpoint_hash()
    with pytest.raises(IntegrityError):
        weights.from_bytes(data, "mdct_rvq", "0" * 16, "w")
    rec = archive.ArchiveRecord("audioarc", "2.0", codec.record(8), (), "", "", ref)
    assert weights.load_codec(str(tmp_path), rec).checkpoint_hash() == codec.checkpoint_hash()  # through the record
    bad = bytearray(data)
    bad[-100] ^= 1
    (tmp_path / ref.path).write_bytes(bytes(bad))
    with pytest.raises(IntegrityError, match="sha256"):  # the archive record's sha256 catches it before anything loads
        weights.load_codec(str(tmp_path), rec)




def test_weights_load_in_place_equal_the_safetensors_library_and_refuse_crafted_files():
    """Weights are read straight into the model (no second copy); every tensor equals what the safetensors
    library reads, and a file whose header lies about its byte ranges is refused before any model sees it."""
    import struct

    import torch
    from safetensors.torch import load, save

    from pipeline.archive import weights
    from pipeline.codec import registry
    from pipeline.errors import IntegrityError
    codec = registry.load("neural_rvq")
    data = weights.to_bytes(codec)
    ref = load(data)
    back = weights.from_bytes(data, "neural_rvq", codec.checkpoint_hash(), "w")
    got = back.state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    assert back.checkpoint_hash() == codec.checkpoint_hash()
    assert back.rvq.pair_search == codec.rvq.pair_search  # the load hooks still run

    def crafted(header: dict, body: bytes) -> bytes:
        h = json.dumps(header).encode()
        return struct.pack("<Q", len(h)) + h + body

    md = {"format": weights.MAGIC, "version": weights.VERSION, "codec": "neural_rvq", "checkpoint_hash": "0" * 16}
    good = save({"a": torch.ones(4), "b": torch.zeros(2)}, metadata=md)
    with pytest.raises(IntegrityError, match="unreadable weights.*(Missing|Unexpected)"):  # well formed, wrong tensors
        weights.from_bytes(good, "neural_rvq", "0" * 16, "good")
    bad = [
        crafted({"__metadata__": md, "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                 "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24)),  # overlap
        crafted({"__metadata__": md, "a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, bytes(16)),  # past the end
        crafted({"__metadata__": md, "a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}, bytes(16)),  # shape lies
        crafted({"__metadata__": md, "a": {"dtype": "X9", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)),  # dtype
        crafted({"__metadata__": md, "a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16)),  # gap
        crafted({"__metadata__": md, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(16)),  # trailing
        struct.pack("<Q", 1 << 40) + b"{}",  # header longer than the file
        crafted({"__metadata__": md, "x": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 1 << 42]}},
                bytes(16)),  # a tensor no file holds: refused before anything is allocated for it
        b"\x01\x02",  # not even a header length
    ]
    for i, b in enumerate(bad):
        with pytest.raises(IntegrityError, match="unreadable weights|not a safetensors|not an audioarc weights"):
            weights.from_bytes(b, "neural_rvq", "0" * 16, f"crafted{i}")
    with pytest.raises(IntegrityError, match="does not hold shape"):  # by the header check, not a failed allocation
        weights.from_bytes(bad[-2], "neural_rvq", "0" * 16, "huge")


def test_a_damaged_weights_file_is_named_damaged_whatever_else_fails(tmp_path):
    """A weights file whose bytes no longer match the archive record is reported as failing its sha256, even when
    the damage also breaks its header (the load reads the file once, straight into the model)."""
    from pipeline.archive import weights
    from pipeline.codec import registry
    from pipeline.errors import IntegrityError
    codec = registry.load("mdct_rvq")
    ref = weights.embed(str(tmp_path), codec)
    path = tmp_path / ref.path
    data = path.read_bytes()
    rec = archive.ArchiveRecord("audioarc", "2.0", codec.record(8), (), "", "", ref)
    for where in (3, 20, len(data) // 2, len(data) - 1):  # header length, header JSON, a tensor, the last byte
        bad = bytearray(data)
        bad[where] ^= 0x41
        path.write_bytes(bytes(bad))
        with pytest.raises(IntegrityError, match="sha256 check"):
            weights.load_codec(str(tmp_path), rec)
    path.write_bytes(data + b"x")  # bytes appended
    with pytest.raises(IntegrityError, match="sha256 check"):
        weights.load_codec(str(tmp_path), rec)
    path.write_bytes(data)
    assert weights.load_codec(str(tmp_path), rec).checkpoint_hash() == codec.checkpoint_hash()


@pytest.mark.parametrize("version,ok", [("1.0", True), ("1.7", True), ("2.0", True), ("2.3", True), ("3.0", False),
                                        ("0.9", False)])
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
