"""audioarc on object storage, against a real S3 server (SeaweedFS ``weed mini`` on 127.0.0.1)."""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.s3_fixtures import clear_s3_cache, upload_tree, write_tones


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"window_seconds": 2.0, "commit_every": 2, "actors": 1}


def _cfg(src, dest, **kw):
    from pipeline.encode import EncodeConfig
    return EncodeConfig(src=src, dest=dest, **{**SMALL, **kw})


def _committed_rows(dest):
    """Every catalog row of every committed generation (not merged)."""
    from pipeline.archive import catalog
    return list(catalog.entries(catalog.table(dest)))


def _first_commit(dest):
    """The catalog's first commit after its creation (Delta log version 1)."""
    from pipeline import storage
    return storage.join(dest, "catalog/_delta_log/00000000000000000001.json")


def _assert_each_archived_once(dest, sources):
    from pipeline.manifest import ARCHIVED
    rows = _committed_rows(dest)
    archived = collections.Counter(r.source for r in rows if r.status == ARCHIVED)
    assert set(archived) == set(sources), (set(sources) - set(archived), set(archived) - set(sources))
    assert all(n == 1 for n in archived.values()), {k: n for k, n in archived.items() if n != 1}
    # nothing uncommitted left behind
    from pipeline.archive import catalog, commit
    assert commit.garbage(dest, set(catalog.generations(dest))) == []
    from pipeline.verify import run_verify
    rep = run_verify(dest, deep=True)
    assert rep.ok, rep.damaged


@pytest.fixture(scope="session")
def corpus(devs3, tmp_path_factory):
    """Five tiny files uploaded once; returns (s3 prefix, {s3 uri: local path})."""
    local = tmp_path_factory.mktemp("corpus")
    paths = write_tones(str(local), 5)
    url = f"s3://{devs3.bucket}/corpus"
    upload_tree(str(local), url)
    return url, {f"{url}/{os.path.relpath(p, local)}": p for p in paths}


# -- units: no server ----------------------------------------------------------------------------
def test_transient_classification():
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    from pipeline import storage

    def client_error(code, status):
        return ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert storage.is_transient(client_error("SlowDown", 503))
    assert storage.is_transient(client_error("InternalError", 500))
    assert storage.is_transient(client_error("ThrottlingException", 400))
    assert storage.is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert storage.is_transient(ReadTimeoutError(endpoint_url="http://127.0.0.1:1"))
    assert storage.is_transient(ConnectionResetError())
    assert storage.is_transient(OSError(16, "Please reduce your request rate."))  # s3fs SlowDown
    assert not storage.is_transient(client_error("AccessDenied", 403))
    assert not storage.is_transient(client_error("NoSuchKey", 404))
    assert not storage.is_transient(PermissionError("Forbidden"))
    assert not storage.is_transient(ValueError("bad data"))
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise client_error("SlowDown", 503)
        return "ok"
    assert storage.retry(flaky, "x", base=0.01) == "ok" and len(calls) == 3

    def denied():
        calls.append(1)
        raise PermissionError("Forbidden")
    calls.clear()
    with pytest.raises(Exception) as ei:
        storage.retry(denied, "reading s3://b/k", url="s3://b/k", base=0.01)
    assert len(calls) == 1 and "s3://b/k" in str(ei.value) and "AWS_ACCESS_KEY_ID" in str(ei.value)


def test_input_list_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.encode import read_input_list
    (tmp_path / "l.txt").write_text("# comment\ns3://b/x/a.wav\nrel/b.flac\nnot-audio.txt\n\n")
    got = [(o.uri, o.size) for o in read_input_list(str(tmp_path / "l.txt"), "s3://b/root")]
    assert got == [("s3://b/x/a.wav", -1), ("s3://b/root/rel/b.flac", -1)]
    (tmp_path / "l.csv").write_text("bucket,key,size\nbk,p/a%20b.wav,10\nbk,p/c.flac,\n")
    got = [(o.uri, o.size) for o in read_input_list(str(tmp_path / "l.csv"), "s3://other")]
    assert got == [("s3://bk/p/a%20b.wav", 10), ("s3://bk/p/c.flac", -1)]
    # S3 Inventory CSV: no header, URL-encoded keys
    (tmp_path / "inv.csv").write_text('"bk","p/a%20b.wav","10","2024-01-01"\n"bk","p/d.ogg","7","x"\n')
    got = [(o.uri, o.size) for o in read_input_list(str(tmp_path / "inv.csv"), "s3://other")]
    assert got == [("s3://bk/p/a b.wav", 10), ("s3://bk/p/d.ogg", 7)]
    pq.write_table(pa.table({"key": ["k/1.wav", "k/2.txt", "k/3.flac"], "size": [1, 2, 3]}),
                   tmp_path / "inv.parquet", row_group_size=1)
    got = [(o.uri, o.size) for o in read_input_list(str(tmp_path / "inv.parquet"), "s3://bk")]
    assert got == [("s3://bk/k/1.wav", 1), ("s3://bk/k/3.flac", 3)]


# -- against the server ---------------------------------------------------------------------------
def test_storage_basics_on_s3(s3_prefix):
    from pipeline import storage
    a, b = f"{s3_prefix}/d/a.bin", f"{s3_prefix}/e/a.bin"
    storage.write_bytes(a, b"1")
    assert storage.list_dir(f"{s3_prefix}/d") == [a]
    assert storage.list_dir(f"{s3_prefix}/nothing") == []
    with pytest.raises(FileExistsError):  # conditional create (If-None-Match: *)
        storage.write_bytes(a, b"2", exclusive=True)
    assert storage.read_bytes(a) == b"1"
    storage.move(a, b)
    assert not storage.exists(a) and storage.read_bytes(b) == b"1"
    storage.move(a, b)  # a retried move whose copy+delete already happened is a no-op
    assert [o.uri for o in storage.walk_files(s3_prefix, (".bin",))] == [b]


def test_s3_encode_and_restore(ray_s3, corpus, s3_prefix, tmp_path):
    import numpy as np
    import soundfile as sf

    from pipeline.encode import run_encode
    from pipeline.restore import RestoreConfig, run_restore
    from tests.content import spectrogram_similarity
    src, files = corpus
    # tiny shards: a generation writes several, all moved from staging at once at commit
    s = run_encode(_cfg(src, f"{s3_prefix}/arc", commit_every=3, shard_mb=0.001))
    assert (s.files_total, s.files_archived, s.files_failed) == (5, 5, 0), s.failures
    assert s.report.startswith("s3://")
    _assert_each_archived_once(f"{s3_prefix}/arc", files)
    from pipeline import storage
    assert len(storage.list_dir(f"{s3_prefix}/arc/shards/g000001")) > 1
    assert storage.list_dir(f"{s3_prefix}/arc/_staging") == []
    out = run_restore(RestoreConfig(dest=f"{s3_prefix}/arc", out=str(tmp_path / "out"), format="wav")).restored
    assert len(out) == 5
    for r in out:
        a, b = sf.info(files[r["source"]]), sf.info(r["path"])
        assert (b.frames, b.samplerate, b.channels) == (a.frames, a.samplerate, a.channels)
        # its own tone comes back (each file and channel has its own pitch): that pitch, its level (measured
        # 0.80-0.86), its sound (spectrogram 0.93-0.97) and from its first sample on (first 50 ms: 0.68-0.79 of the
        # level; 100 ms late: 0)
        orig, back = (sf.read(p, always_2d=True)[0] for p in (files[r["source"]], r["path"]))
        onset = a.samplerate // 20
        for c in range(a.channels):
            fo, fb = (np.fft.rfftfreq(len(x), 1 / a.samplerate)[np.abs(np.fft.rfft(x[:, c])).argmax()]
                      for x in (orig, back))
            assert abs(fo - fb) <= 2.0, (r["source"], c, fo, fb)
            assert 0.6 < float(np.sqrt(np.mean(back[:, c] ** 2) / np.mean(orig[:, c] ** 2))) < 1.4, (r["source"], c)
            assert spectrogram_similarity(orig[:, c], back[:, c], a.samplerate) > 0.85, (r["source"], c)
            assert np.mean(back[:onset, c] ** 2) > 0.3 ** 2 * np.mean(orig[:onset, c] ** 2), (r["source"], c)
    # unchanged inputs are skipped on a second run
    s2 = run_encode(_cfg(src, f"{s3_prefix}/arc", commit_every=3))
    assert s2.files_skipped == 5 and s2.files_failed == 0


def test_resume_after_killed_job(ray_s3, devs3, s3_prefix, tmp_path):
    import ray

    from pipeline import archive, storage
    from pipeline.encode import run_encode
    paths = write_tones(str(tmp_path / "src"), 10, seconds=1.5)
    src, dest = f"{s3_prefix}/src", f"{s3_prefix}/arc"
    upload_tree(str(tmp_path / "src"), src)
    sources = {f"{src}/{os.path.relpath(p, tmp_path / 'src')}" for p in paths}
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    addr = ray.get_runtime_context().gcs_address  # join the session's Ray node: no second cluster
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "encode", src, dest, "--window-seconds", "2",
                             "--commit-every", "2", "--actors", "1", "--address", addr],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first = _first_commit(dest)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None and not storage.exists(first):
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    rec = archive.read_record(dest)
    gens = archive.Archive(dest, rec).generations() if rec is not None else ()
    assert len(gens) >= 1, "the killed job committed nothing"
    killed_mid_run = len(gens) < 5
    s = run_encode(_cfg(src, dest))
    assert s.files_failed == 0 and s.files_total == 10
    if killed_mid_run:
        assert s.files_skipped >= 2
    _assert_each_archived_once(dest, sources)


def test_server_restart_mid_encode(ray_s3, devs3, s3_prefix, tmp_path):
    from pipeline import storage
    from pipeline.encode import run_encode
    paths = write_tones(str(tmp_path / "src"), 8, seconds=1.5)
    src, dest = f"{s3_prefix}/src", f"{s3_prefix}/arc"
    upload_tree(str(tmp_path / "src"), src)
    sources = {f"{src}/{os.path.relpath(p, tmp_path / 'src')}" for p in paths}
    result: list = []

    def job():
        try:
            result.append(run_encode(_cfg(src, dest)))
        except Exception as e:  # noqa: BLE001 - a re-run must then resume
            result.append(e)

    t = threading.Thread(target=job)
    t.start()
    first = _first_commit(dest)
    deadline = time.time() + 120
    while time.time() < deadline and t.is_alive() and not storage.exists(first):
        time.sleep(0.2)
    devs3.stop()
    time.sleep(1.0)
    devs3.start()
    t.join(240)
    assert not t.is_alive()
    r = result[0]
    if isinstance(r, Exception) or r.files_failed:  # finishing is not required; resuming is
        r = run_encode(_cfg(src, dest))
    assert r.files_failed == 0 and r.files_total == 8
    _assert_each_archived_once(dest, sources)


def test_object_deleted_after_listing_is_recorded_failed(ray_s3, s3_prefix, tmp_path, monkeypatch):
    from pipeline import encode, storage
    from pipeline.encode import job
    from pipeline.manifest import FAILED
    write_tones(str(tmp_path / "src"), 3, seconds=1.0)
    src, dest = f"{s3_prefix}/src", f"{s3_prefix}/arc"
    upload_tree(str(tmp_path / "src"), src)
    real = job._list_inputs
    gone = []

    def listing_then_delete(*a, **k):
        for obj in real(*a, **k):
            if not gone:
                storage.remove(obj.uri)
                gone.append(obj.uri)
            yield obj
    monkeypatch.setattr(job, "_list_inputs", listing_then_delete)
    s = encode.run_encode(_cfg(src, dest, commit_every=5))
    assert (s.files_total, s.files_archived, s.files_failed) == (3, 2, 1)
    assert s.failures[0]["source"] == gone[0] and "no such object" in s.failures[0]["reason"]
    rows = {r.source: r for r in _committed_rows(dest)}
    assert rows[gone[0]].status == FAILED


def test_wrong_credentials_clear_error(devs3, corpus, s3_prefix):
    secret = "definitely-not-the-secret"
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY=secret, AUDIOARC_STORAGE_ATTEMPTS="2",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "encode", corpus[0], f"{s3_prefix}/arc"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "AWS_ACCESS_KEY_ID" in p.stderr and f"{s3_prefix}/arc" in p.stderr, p.stderr[-2000:]
    assert secret not in p.stderr + p.stdout
    assert devs3.secret_key not in p.stderr + p.stdout


def test_missing_bucket_clear_error(ray_s3, corpus, s3_prefix):
    from pipeline import storage
    from pipeline.encode import run_encode
    from pipeline.errors import StorageError
    clear_s3_cache()
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x1' does not exist"):
        run_encode(_cfg(corpus[0], "s3://no-such-bucket-x1/arc"))
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x2' does not exist"):
        run_encode(_cfg("s3://no-such-bucket-x2/src", f"{s3_prefix}/arc"))
    with pytest.raises(StorageError, match="no-such-bucket-x3"):
        storage.read_bytes("s3://no-such-bucket-x3/archive.json")


def test_one_file_reads_only_its_row_groups(devs3, s3_prefix, monkeypatch):
    """Reading one file's codes from an S3 shard fetches its row groups' byte ranges, not the shard."""
    import numpy as np
    import s3fs

    from pipeline import archive, storage
    from pipeline.manifest import ARCHIVED, CodecRecord, Location, ManifestEntry
    codec = CodecRecord("t", "1", "h", 24000, 320, 1024, 8, 6.0)
    url = f"{s3_prefix}/shards/g000001/part-00000.parquet"
    rng = np.random.default_rng(0)
    w = archive.ShardWriter(url, codec, row_group_bytes=64 << 10)
    truth = {}
    for fid in range(40):  # 40 files x 2 windows x ~50 KB of codes: a ~4 MB shard, ~40 row groups
        for seq in range(2):
            c = rng.integers(0, 1024, (1, 8, 5000))
            truth[(fid, seq)] = c
            w.add({"file_id": fid, "seq": seq, "frame_start": seq * 5000, "n_frames": 5000, "channels": 1,
                   "n_q": 8, "codes": archive.pack_codes(c, 10)})
    w.close()
    shard_bytes = storage.size(url)
    fetched = []
    real = s3fs.S3FileSystem._call_s3

    async def counting(self, method, *a, **k):
        out = await real(self, method, *a, **k)
        if method == "get_object":
            fetched.append(int(out.get("ContentLength") or 0))
        return out
    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)
    fid = 17
    entry = ManifestEntry(source="s3://x/17.wav", relpath="17.wav", file_id=fid, size=1, content_hash="",
                          status=ARCHIVED, n_windows=2,
                          locations=tuple(Location("shards/g000001/part-00000.parquet", g) for g in w.where[fid]))
    got = list(archive.read_file_codes(s3_prefix, entry, codec))
    assert [fs for fs, _ in got] == [0, 5000]
    assert all((c == truth[(fid, i)]).all() for i, (_, c) in enumerate(got))
    assert sum(fetched) < shard_bytes / 4, (sum(fetched), shard_bytes, fetched)


def test_concurrent_jobs_on_one_s3_archive_both_commit(ray_s3, s3_prefix, tmp_path):
    """Two encode jobs at once on one S3 DEST (two input lists over one SRC, overlapping): both commit, generation
    numbers never collide (conditional PUTs), and every committed file verifies and restores."""
    from pipeline import storage
    from pipeline.encode import run_encode
    from pipeline.restore import RestoreConfig, run_restore
    paths = write_tones(str(tmp_path / "src"), 8, seconds=1.0)
    src, dest = f"{s3_prefix}/src", f"{s3_prefix}/arc"
    upload_tree(str(tmp_path / "src"), src)
    uris = sorted(f"{src}/{os.path.relpath(p, tmp_path / 'src')}" for p in paths)
    lists = []
    for k, part in enumerate((uris[:5], uris[3:])):
        url = f"{s3_prefix}/list{k}.txt"
        storage.write_bytes(url, "".join(u + "\n" for u in part).encode())
        lists.append(url)
    results: list = [None, None]

    def job(k):
        try:
            results[k] = run_encode(_cfg(src, dest, input_list=lists[k]))
        except Exception as e:  # noqa: BLE001 - asserted below
            results[k] = e

    threads = [threading.Thread(target=job, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    for r in results:
        assert not isinstance(r, Exception), r
        assert r.files_failed == 0 and r.files_archived == 5
    _assert_each_archived_overall(dest, set(uris))
    out = run_restore(RestoreConfig(dest=dest, out=str(tmp_path / "out"), format="wav"))
    assert len(out.restored) == 8 and not out.refused


def _assert_each_archived_overall(dest, sources):
    from pipeline.archive import catalog, commit
    from pipeline.verify import run_verify
    latest = {e.source: e for e in catalog.entries(catalog.latest(catalog.table(dest)))}
    assert set(latest) == sources and all(e.status == "archived" for e in latest.values())
    gens = [e.generation for e in _committed_rows(dest)]
    assert commit.garbage(dest, set(gens)) == []
    rep = run_verify(dest, deep=True)
    assert rep.ok and rep.files_checked == len(sources), rep.damaged
