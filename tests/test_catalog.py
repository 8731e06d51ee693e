"""The catalog at scale: bounded lookups by name, prefix and list; streaming ls; inspect from totals kept at commit;
compaction keeping lookups exact; resume that recognises unchanged inputs without reading them."""
from __future__ import annotations

import json
import os

import pytest

from pipeline import archive
from pipeline.archive import catalog
from pipeline.manifest import ARCHIVED, FAILED, ManifestEntry
from tests import audio_factory as af


def _entry(i: int, gen: int, status: str = ARCHIVED, secs: float = 1.0, h: str = "h") -> ManifestEntry:
    rel = f"d{i % 3}/sub{i % 2}/f{i:04d}.wav"
    return ManifestEntry(source=f"/lib/{rel}", relpath=rel, file_id=i, size=1000 + i, content_hash=h, status=status,
                         duration_s=secs if status == ARCHIVED else 0.0, frames=16000, channels=1,
                         archive_bytes=10 if status == ARCHIVED else 0, generation=gen,
                         reason="" if status == ARCHIVED else f"/lib/{rel}: broken")


@pytest.fixture
def synthetic(tmp_path):
    """120 inputs over 6 generations (appended as jobs do, totals kept), then: 5 re-encoded, 4 failed then fixed,
    3 still failing, one archived file whose later retry failed."""
    from pipeline.codec import registry
    dest = str(tmp_path / "arc")
    archive.create_or_open(dest, registry.load("mdct_rvq"), 8)
    arc = archive.Archive(dest, archive.require_record(dest))

    def commit(entries, gen):
        prev = arc.by_sources([e.source for e in entries])
        t = catalog.Totals(prev)
        for e in entries:
            t.add(e)
        catalog.append(dest, entries, gen, f"job{gen}", totals=t.sum)

    for g in range(6):
        commit([_entry(i, g + 1, FAILED if i in (7, 8, 9, 10, 50, 51, 52) else ARCHIVED) for i in range(g * 20, g * 20 + 20)],
               g + 1)
    commit([_entry(i, 7, secs=2.0, h="new") for i in (1, 2, 3, 4, 5)] + [_entry(i, 7) for i in (7, 8, 9, 10)], 7)
    commit([_entry(60, 8, FAILED)], 8)  # a retry failed: the archived copy stays current
    return dest, arc


def test_totals_kept_at_commit_equal_a_full_scan(synthetic):
    dest, arc = synthetic
    kept, exact = catalog.totals(dest), catalog.exact_totals(dest)
    for k in catalog.TOTAL_KEYS:
        assert kept[k] == pytest.approx(exact[k]), k
    assert (exact["files"], exact["archived"], exact["failed"], exact["generations"]) == (120, 117, 3, 8)
    assert exact["seconds"] == pytest.approx(117 + 5)
    catalog.compact(dest, vacuum_hours=0)
    again = catalog.totals(dest)
    for k in catalog.TOTAL_KEYS:
        assert again[k] == pytest.approx(exact[k]), k


def _names(entries):
    return sorted(e.relpath for e in entries)


@pytest.mark.parametrize("compacted", [False, True])
def test_lookups_by_name_prefix_basename_and_source(synthetic, compacted):
    dest, arc = synthetic
    if compacted:
        catalog.compact(dest, vacuum_hours=0)
        arc = archive.Archive(dest, archive.require_record(dest))
    everything = {e.relpath: e for e in arc.latest()}
    assert len(everything) == 120
    got = arc.matching(("d1/sub0/f0004.wav",))
    assert _names(got) == ["d1/sub0/f0004.wav"] and got[0].content_hash == "new"  # the re-encoded row
    assert _names(arc.matching(("d2/sub1/*",))) == sorted(r for r in everything if r.startswith("d2/sub1/"))
    assert _names(arc.matching(("f0060.wav",))) == ["d0/sub0/f0060.wav"]  # base name, anywhere
    assert arc.matching(("f0060.wav",))[0].status == ARCHIVED  # its later failed retry does not hide it
    assert _names(arc.matching(("*f001?.wav",))) == sorted(r for r in everything if r.rsplit("/", 1)[1][:4] == "f001")
    assert _names(arc.matching(("/lib/d0/*",))) == sorted(r for r in everything if r.startswith("d0/"))
    assert arc.matching(("nope/*",)) == []
    assert {e.relpath for e in arc.failures()} == {everything[r].relpath for r in everything
                                                  if everything[r].status == FAILED}
    by = arc.by_sources(["/lib/d1/sub1/f0001.wav", "/lib/none.wav"])
    assert list(by) == ["/lib/d1/sub1/f0001.wav"] and by["/lib/d1/sub1/f0001.wav"].content_hash == "new"


def test_restore_from_a_list_streams_names_and_uris(synthetic, tmp_path, monkeypatch):
    from pipeline import restore
    dest, arc = synthetic
    monkeypatch.setattr(restore, "LIST_CHUNK", 3)  # several chunks
    names = ["d1/sub0/f0004.wav", "/lib/d2/sub1/f0005.wav", "missing.wav", "# a comment", "", "d0/sub0/f0060.wav",
             "d1/sub1/f0007.wav", "d1/sub1/f0052.wav"]  # f0052 failed: not restorable
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(names) + "\n")
    got = restore.choose(arc, (), str(lst))
    assert _names(got) == ["d0/sub0/f0060.wav", "d1/sub0/f0004.wav", "d1/sub1/f0007.wav", "d2/sub1/f0005.wav"]


def test_lookup_reads_only_matching_data_files(tmp_path):
    """Generations of a sorted listing cover disjoint relpath ranges: a name lookup opens only the one that holds it."""
    from deltalake import DeltaTable

    from pipeline import storage
    dest = str(tmp_path)
    catalog.create(dest)
    for g in range(5):
        es = [ManifestEntry(source=f"/lib/g{g}/f{i:03d}.wav", relpath=f"g{g}/f{i:03d}.wav", file_id=i, size=1,
                            content_hash="h", status=ARCHIVED, generation=g + 1) for i in range(50)]
        catalog.append(dest, es[::-1], g + 1, "job")  # rows sorted on the way in, whatever their order
    uri, opts = storage.delta_location(storage.join(dest, "catalog"))
    dt = DeltaTable(uri, storage_options=opts)
    some = dt.file_uris(file_pruning_predicate=[("relpath", ">=", "g3/f010.wav"), ("relpath", "<=", "g3/f010.wav")])
    assert len(dt.file_uris()) == 5 and len(some) == 1
    t = catalog.by_values(dest, "relpath", ["g3/f010.wav", "g1/f049.wav"])
    assert sorted(t["relpath"].to_pylist()) == ["g1/f049.wav", "g3/f010.wav"]
    import pyarrow.parquet as pq
    assert pq.read_table(some[0])["relpath"].to_pylist() == sorted(pq.read_table(some[0])["relpath"].to_pylist())


@pytest.mark.parametrize("compacted", [False, True])
def test_streamed_latest_equals_the_whole(synthetic, compacted, monkeypatch):
    dest, arc = synthetic
    if compacted:
        catalog.compact(dest, vacuum_hours=0)
    whole = [e.to_row() for e in arc.latest()]
    assert [e.to_row() for e in arc.iter_latest()] == whole
    monkeypatch.setattr(catalog, "MAX_FOOTER_FILES", 0)  # ranges from the log's per-file statistics instead
    assert [e.to_row() for e in archive.Archive(dest, arc.record).iter_latest()] == whole
    assert compacted or len(list(catalog.iter_latest(dest))) > 1  # it did come in pieces (one file: one piece)


def test_ls_streams_json_lines_with_filters(synthetic, cli_noray):
    dest, _ = synthetic
    code, out = cli_noray("ls", dest, "--jsonl")
    rows = [json.loads(x) for x in out.splitlines()]
    assert code == 0 and len(rows) == 120 and rows == sorted(rows, key=lambda r: r["relpath"])
    code, out = cli_noray("ls", dest, "--jsonl", "--status", "failed")
    assert sorted(json.loads(x)["relpath"] for x in out.splitlines()) == ["d0/sub1/f0051.wav", "d1/sub0/f0052.wav",
                                                                          "d2/sub0/f0050.wav"]
    assert len(cli_noray.json("ls", dest, "d0/*")) == 40
    d = cli_noray.json("inspect", dest)
    assert (d["files"], d["files_archived"], d["files_failed"], d["generations"]) == (120, 117, 3, 8)
    assert len(d["failures"]) == 3


def test_resume_recognises_unchanged_inputs_without_reading_them(tmp_path, cli):
    src, dest = tmp_path / "src", tmp_path / "arc"
    for i in range(4):
        af.write(src / f"f{i}.wav", 0.5, 16000, freq=300 + 50 * i)
    first = cli.json("encode", src, dest, "--quality-sample", "0")
    again = cli.json("encode", src, dest, "--quality-sample", "0")
    assert again["files_skipped"] == 4 and again["placement"] is None  # nothing read: Ray never started
    # content changed behind the listing's back (same size, same mtime): only --rehash reads and finds it
    p = src / "f0.wav"
    st = p.stat()
    data = bytearray(p.read_bytes())
    data[-10] ^= 0x55
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cli.json("encode", src, dest, "--quality-sample", "0")["files_skipped"] == 4
    s = cli.json("encode", src, dest, "--quality-sample", "0", "--rehash")
    assert s["files_skipped"] == 3 and s["files_archived"] == 4
    p.touch()  # a new mtime alone: hashed (unchanged content), skipped by its hash
    s = cli.json("encode", src, dest, "--quality-sample", "0")
    assert s["files_skipped"] == 4 and s["placement"] is not None
    d = cli.json("inspect", dest)
    # generations: the first run, the --rehash run's re-encode, the new mtime recorded (so the next run reads nothing)
    assert (d["files"], d["files_archived"], d["generations"]) == (4, 4, first["generation"] + 2)
    assert cli.json("encode", src, dest, "--quality-sample", "0")["placement"] is None
    assert catalog.totals(str(dest))["seconds"] == pytest.approx(catalog.exact_totals(str(dest))["seconds"])
