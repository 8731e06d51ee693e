"""The ``audioarc`` command line: thin argument parsing over the library functions.

Exit codes: 0 success; 1 the job could not run (bad options, unreadable archive, codec error);
2 usage error; 3 the job finished but some inputs failed (each recorded in the manifest with its reason);
4 the sampled quality fell below a --min-quality floor (files are still archived; 4 wins over 3).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from . import __version__
from .errors import AudioarcError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_QUALITY = 4


# Results go to the stdout the command was started with; while a command runs, sys.stdout points at
# stderr, because Ray's driver thread prints cluster warnings ("(raylet) WARNING: ...") to sys.stdout
# at any moment, and they must not land inside `--json` output piped to another program.
_result_stream = None


def _say(*parts, **kw) -> None:
    """Print a result line (never a diagnostic) to the command's real stdout."""
    print(*parts, file=_result_stream or sys.stdout, **kw)


def _print_json(obj) -> None:
    _say(json.dumps(obj, indent=2, default=str))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def cmd_encode(args) -> int:
    from .encode import EncodeConfig, run_encode
    qcfg = _quality_config(args, args.quality_sample)
    cfg = EncodeConfig(quality=qcfg, src=args.src, dest=args.dest, bitrate_kbps=args.bitrate, codec=args.codec,
                       codec_weights=args.codec_weights, window_seconds=args.window_seconds, actors=args.actors,
                       gpus_per_actor=args.gpus_per_actor, threads_per_actor=args.threads_per_actor,
                       batch_windows=args.batch_windows, batch_seconds=args.batch_seconds,
                       commit_every=args.commit_every, shard_mb=args.shard_mb,
                       address=args.address, input_list=args.input_list, metrics_port=args.metrics_port,
                       metrics_host=args.metrics_host, metrics_linger=args.metrics_linger,
                       emit_metrics=not args.no_metrics, min_actors=args.min_actors,
                       max_actors=args.max_actors, precision=args.precision).validate()
    bar = None
    on_progress = None
    if not args.json and sys.stderr.isatty() or args.progress:
        from tqdm import tqdm
        bar = tqdm(total=0, unit="file", file=sys.stderr, dynamic_ncols=True)
        import time
        t0 = time.time()

        def on_progress(files: int, total: int, seconds: float) -> None:
            bar.total = total
            bar.n = files
            rt = seconds / max(1e-9, time.time() - t0)
            bar.set_postfix_str(f"{seconds / 3600:.3f} h audio, {rt:.1f}x realtime", refresh=False)
            bar.refresh()
    try:
        s = run_encode(cfg, on_progress,
                       on_metrics=lambda url: print(f"audioarc: metrics at {url}", file=sys.stderr, flush=True))
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        _print_json(s.to_json())
    else:
        _say(f"archived {s.files_archived}/{s.files_total} files ({s.files_skipped} unchanged, "
              f"{s.files_failed} failed), {s.audio_seconds / 3600:.3f} h of audio in {s.wall_seconds:.1f} s "
              f"({s.x_realtime:.1f}x realtime)")
        _say(f"codec {s.codec} at {s.bitrate_kbps:g} kbps/channel: {_human_bytes(s.source_bytes)} -> "
              f"{_human_bytes(s.archive_bytes)} (ratio {s.compression_ratio:g}, vs 16-bit PCM "
              f"{s.pcm_compression_ratio:g}; {s.effective_kbps:g} kbps stored)")
        for f in s.failures:
            _say(f"FAILED {f['reason']}")
        if s.quality:
            _print_quality(s.quality["summary"], s.quality["violations"])
        _say(f"archive: {s.archive}")
        _say(f"report:  {s.report}")
        if s.quality:
            _say(f"quality: {s.quality['report']}")
    if s.quality and s.quality["violations"]:
        return EXIT_QUALITY
    return EXIT_PARTIAL if s.files_failed else EXIT_OK


def _quality_config(args, fraction: float):
    from .quality import QualityConfig, parse_gates
    return QualityConfig(fraction=fraction, seed=args.quality_seed, excerpt_seconds=args.excerpt_seconds,
                         visqol=not args.no_visqol, gates=parse_gates(args.min_quality)).validate()


def _print_quality(summary: dict, violations: list[dict]) -> None:
    keys = [("mel", "mel"), ("si_sdr", "SI-SDR dB"), ("stoi", "STOI"), ("visqol", "ViSQOL"),
            ("compression_ratio", "ratio")]
    vals = ", ".join(f"{label} {summary[k]['median']:.3g}" for k, label in keys if k in summary)
    _say(f"quality: {summary['files_measured']}/{summary['files_sampled']} sampled files measured "
          f"(medians: {vals}); {summary['files_bad_pairs']} bad pairs")
    for v in violations:
        _say(f"BELOW QUALITY FLOOR {v['source']}: {', '.join(v['failed'])}")


def cmd_quality(args) -> int:
    from .quality import run_quality
    r = run_quality(args.dest, _quality_config(args, 0.0), sample=args.sample, patterns=tuple(args.patterns),
                    address=args.address, weights=args.codec_weights)
    if args.json:
        _print_json({"summary": r.summary, "violations": r.violations, "files": r.rows, "table": r.table,
                     "report": r.report})
    else:
        _print_quality(r.summary, r.violations)
        _say(f"table:  {r.table}\nreport: {r.report}")
    return EXIT_QUALITY if r.violations else EXIT_OK


def _add_quality_options(p) -> None:
    p.add_argument("--min-quality", help="quality floor, e.g. 'mel<=1.2,stoi>=0.7' (exit 4 if a sampled file "
                   "falls below)")
    p.add_argument("--quality-seed", type=int, default=0, help="seed of the stratified sample")
    p.add_argument("--excerpt-seconds", type=float, default=30.0, help="seconds evaluated per sampled file "
                   "(from its middle; 0 = whole file)")
    p.add_argument("--no-visqol", action="store_true", help="skip ViSQOL (slow) even when installed")


def cmd_ls(args) -> int:
    from .restore import listing
    rows = listing(args.dest)
    if args.json:
        _print_json(rows)
        return EXIT_OK
    _say(f"{'status':9} {'duration':>9} {'rate':>6} {'ch':>2} {'bytes':>10} {'codes':>9}  path")
    for r in rows:
        _say(f"{r['status']:9} {r['duration_s']:9.2f} {r['sample_rate']:6d} {r['channels']:2d} "
              f"{_human_bytes(r['bytes']):>10} {_human_bytes(r['archive_bytes']):>9}  {r['relpath']}"
              + (f"  ({r['reason']})" if r["reason"] else ""))
    return EXIT_OK


def cmd_inspect(args) -> int:
    from .restore import inspect
    d = inspect(args.dest)
    if args.json:
        _print_json(d)
        return EXIT_OK
    c = d["codec"]
    _say(f"archive        {d['archive']}  ({d['format']} format {d['format_version']}, "
          f"{d['generations']} generations)")
    _say(f"codec          {c['name']} v{c['version']} checkpoint {c['checkpoint_hash']}, {c['n_q']} stages")
    _say(f"bitrate        {d['bitrate_kbps']:g} kbps per channel nominal, {d['effective_kbps']:g} kbps stored")
    _say(f"files          {d['files']} ({d['files_archived']} archived, {d['files_failed']} failed)")
    _say(f"audio          {d['hours']:.3f} h")
    _say(f"size           {_human_bytes(d['source_bytes'])} -> {_human_bytes(d['archive_bytes'])} "
          f"(ratio {d['compression_ratio']:g})")
    for f in d["failures"]:
        _say(f"failed         {f['reason']}")
    return EXIT_OK


def cmd_restore(args) -> int:
    from .restore import RestoreConfig, run_restore
    out = run_restore(RestoreConfig(dest=args.dest, out=args.out, patterns=tuple(args.patterns),
                                    format=args.format, codec_weights=args.codec_weights,
                                    address=args.address))
    if args.json:
        _print_json(out)
    else:
        for r in out:
            _say(f"{r['source']} -> {r['path']}")
    return EXIT_OK


def cmd_codecs(args) -> int:
    from .restore import codecs_table
    rows = codecs_table()
    if args.json:
        _print_json(rows)
        return EXIT_OK
    for r in rows:
        if "unavailable" in r:
            _say(f"{r['name']:14} unavailable: {r['unavailable']}")
            continue
        rates = ", ".join(f"{b:g}" for b in r["bitrates_kbps"])
        per = "per channel" if r["channels"] == 1 else f"per {r['channels']}-channel stream"
        _say(f"{r['name']:14}{' (default)' if r['default'] else ''} {r['sample_rate']} Hz, "
              f"{r['frame_rate']:g} frames/s, {r['codebook_size']}-entry codebooks x {r['n_q']}; "
              f"kbps {per}: {rates}\n{'':14} {r['description']}")
        if r["needs_weights"]:
            _say(f"{'':14} needs --codec-weights PATH: {r['weights']}")
    return EXIT_OK


def cmd_dev_s3(args) -> int:
    from .devs3 import serve
    return serve(args.dir, args.port)


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args.workdir, args.files)


def cmd_monitor(args) -> int:
    from .monitor import run_monitor
    try:
        return run_monitor(port=args.port, ray_session=args.ray_session, workdir=args.workdir,
                           grafana_port=args.grafana_port, driver=args.driver, once=args.once)
    except RuntimeError as e:
        print(f"audioarc: error: {e}", file=sys.stderr)
        return EXIT_ERROR


JOB_COMMANDS = {"train": "jobs.train_codec", "codec-eval": "jobs.codec_eval"}


def cmd_job(command: str, job_args: list[str]) -> int:
    """``audioarc train`` / ``audioarc codec-eval``: the job entrypoints, with their own options."""
    import importlib
    rc = importlib.import_module(JOB_COMMANDS[command]).main(job_args)
    return rc if isinstance(rc, int) else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from .codec.registry import DEFAULT_CODEC
    p = argparse.ArgumentParser(prog="audioarc", description="Archive audio collections with a neural RVQ codec.")
    p.add_argument("--version", action="version", version=f"audioarc {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("encode", help="archive a folder/URL prefix of audio into DEST")
    e.add_argument("src", help="folder or URL prefix of audio files (or one file)")
    e.add_argument("dest", help="archive root (folder or URL)")
    e.add_argument("--bitrate", type=float, default=6.0, help="kbps per channel, on the codec's ladder (default 6)")
    e.add_argument("--codec", default=DEFAULT_CODEC, help=f"codec name (default {DEFAULT_CODEC}; see `codecs`)")
    e.add_argument("--codec-weights", help="checkpoint file for the codec (default: the shipped one)")
    e.add_argument("--window-seconds", type=float, default=30.0, help="codec window length (memory bound)")
    e.add_argument("--actors", type=int, help="codec actors (default: 1 per GPU, else 1 per CPU)")
    e.add_argument("--gpus-per-actor", type=float, help="GPUs per codec actor (fractional packs several)")
    e.add_argument("--threads-per-actor", type=int, default=1, help="torch threads per CPU codec actor")
    e.add_argument("--batch-windows", type=int, help="windows per codec forward pass (default 1 on CPU, 64 "
                   "on GPU)")
    e.add_argument("--batch-seconds", type=float, help="the same in seconds of audio per forward pass (whole "
                   "windows of --window-seconds, at least one), e.g. 1920 = 64 windows of 30 s")
    e.add_argument("--min-actors", type=int, help="autoscaling codec actor pool: fewest actors (default "
                   "--actors or 1)")
    e.add_argument("--max-actors", type=int, help="autoscaling codec actor pool: most actors (default "
                   "--actors, else 1 per GPU slot or 1 per CPU)")
    e.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="GPU autocast precision (CPU always fp32); check fidelity with jobs/bench_codec.py")
    e.add_argument("--commit-every", type=int, default=500, help="files per committed generation")
    e.add_argument("--shard-mb", type=float, default=64.0, help="target shard size in MiB")
    e.add_argument("--address", help="Ray cluster: http://HEAD:8265 submits this command as a Ray job; "
                   "HOST:PORT or ray://HOST:10001 connects this driver (default: RAY_ADDRESS or a local node)")
    e.add_argument("--quality-sample", type=float, default=0.02,
                   help="fraction of files to sample for fidelity beside the encode (0 = off; default 0.02)")
    _add_quality_options(e)
    e.add_argument("--input-list", metavar="FILE",
                   help="encode the inputs listed in FILE (path or URL) instead of listing SRC: text with one "
                        "URI per line, or CSV/Parquet with a uri or key column (an S3 Inventory report works); "
                        "keys are relative to SRC")
    e.add_argument("--metrics-port", type=int, help="serve job metrics for Prometheus on this port (0: any free)")
    e.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint (default loopback)")
    e.add_argument("--metrics-linger", type=float, default=0.0, metavar="SECONDS",
                   help="after the job, keep the endpoint up until its final values were scraped (at most this)")
    e.add_argument("--no-metrics", action="store_true", help="no worker-side Ray metrics (overhead checks)")
    e.add_argument("--json", action="store_true", help="print one JSON summary when the job ends")
    e.add_argument("--progress", action="store_true", help="show the progress bar even when not on a terminal")
    e.set_defaults(fn=cmd_encode)

    ls = sub.add_parser("ls", help="list every input of an archive")
    ls.add_argument("dest")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_ls)

    i = sub.add_parser("inspect", help="summary of an archive")
    i.add_argument("dest")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    r = sub.add_parser("restore", help="decode files from an archive")
    r.add_argument("dest")
    r.add_argument("out", help="output folder (source paths are recreated below it)")
    r.add_argument("patterns", nargs="*", help="glob patterns on the source path (default: everything)")
    r.add_argument("--format", default="flac", choices=["flac", "wav"])
    r.add_argument("--codec-weights", help="checkpoint of the archive's codec, if not the shipped one")
    r.add_argument("--address", help="Ray cluster address for large restores (http://HEAD:8265 submits a "
                   "Ray job)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_restore)

    q = sub.add_parser("quality", help="measure fidelity of a sample of an archive against the originals")
    q.add_argument("dest")
    q.add_argument("patterns", nargs="*", help="evaluate files matching these globs instead of a sample")
    q.add_argument("--sample", type=int, default=None, help="number of files (stratified; default 20)")
    q.add_argument("--address", help="Ray cluster address")
    q.add_argument("--codec-weights", help="checkpoint of the archive's codec, if not the shipped one")
    q.add_argument("--json", action="store_true")
    _add_quality_options(q)
    q.set_defaults(fn=cmd_quality)

    c = sub.add_parser("codecs", help="available codecs and their bitrates")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_codecs)

    s3 = sub.add_parser("dev-s3", help="run a local S3 server (SeaweedFS) for trying audioarc on object storage")
    s3.add_argument("--dir", default="out/dev-s3", help="data directory (default out/dev-s3)")
    s3.add_argument("--port", type=int, help="S3 port on 127.0.0.1 (default: a free one)")
    s3.set_defaults(fn=cmd_dev_s3)
    m = sub.add_parser("monitor", help="start Prometheus (and Grafana if installed) on a local job's metrics")
    m.add_argument("--port", type=int, default=9090, help="Prometheus port on 127.0.0.1 (default 9090)")
    m.add_argument("--ray-session", help="Ray session dir to watch (default /tmp/ray/session_latest)")
    m.add_argument("--driver", action="append", metavar="HOST:PORT",
                   help="also scrape this encode --metrics-port endpoint (repeatable)")
    m.add_argument("--grafana-port", type=int, default=3000)
    m.add_argument("--workdir", help="Prometheus config and TSDB (default ~/.cache/audioarc/monitor)")
    m.add_argument("--once", action="store_true", help="start, show the targets it scrapes, stop (a check)")
    m.set_defaults(fn=cmd_monitor)

    # listed for --help; main() hands their arguments to the job entrypoints untouched
    sub.add_parser("train", help="train the neural codec (jobs/train_codec.py; `audioarc train --help`)")
    sub.add_parser("codec-eval", help="evaluate codecs vs Opus/MP3 (jobs/codec_eval.py; `audioarc codec-eval --help`)")

    d = sub.add_parser("demo", help="set up a small real corpus and archive it (the README's first command)")
    d.add_argument("--workdir", default="out/demo")
    d.add_argument("--files", type=int, default=24, help="files to take from the corpus")
    d.set_defaults(fn=cmd_demo)
    for sp in (e, ls, i, r):
        sp.add_argument("--s3-endpoint", metavar="URL",
                        help="S3-compatible endpoint for s3:// URLs (default: AWS_ENDPOINT_URL, else AWS)")
    return p


def main(argv: list[str] | None = None, out=None) -> int:
    """Run one command. For the commands that print results (those with ``--json``) the results go to
    ``out`` (default: sys.stdout as it is on entry) and sys.stdout points at stderr while they run. As the
    process entrypoint (``argv`` None) it stays so after the results are written, so Ray's shutdown cannot
    append to them; an in-process caller gets its sys.stdout back (and, sharing a running Ray driver whose
    thread may print at any moment, should pass its own ``out``)."""
    global _result_stream
    entrypoint = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in JOB_COMMANDS:
        return cmd_job(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    if not hasattr(args, "json"):  # demo, dev-s3, monitor: human-facing output, no results to keep clean
        if out is None:
            return _run(args, argv)
        with contextlib.redirect_stdout(out):
            return _run(args, argv)
    _result_stream, saved = out or sys.stdout, sys.stdout
    sys.stdout = sys.stderr
    try:
        return _run(args, argv)
    finally:
        _result_stream.flush()
        _result_stream = None
        if not entrypoint:
            sys.stdout = saved


def _run(args, argv: list[str]) -> int:
    if getattr(args, "s3_endpoint", None):
        os.environ["AUDIOARC_S3_ENDPOINT"] = args.s3_endpoint  # read by storage and passed on to Ray workers
    try:
        from .cluster import is_job_server
        if is_job_server(getattr(args, "address", None)):
            from .cluster import submit
            return submit(argv, args.address, out=_result_stream)
        return args.fn(args)
    except AudioarcError as e:
        print(f"audioarc: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("audioarc: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a crash still gets a one-line reason and exit 1
        if os.environ.get("AUDIOARC_DEBUG"):
            raise
        print(f"audioarc: error: unexpected {type(e).__name__}: {str(e)[:2000]}\n"
              f"(set AUDIOARC_DEBUG=1 for the traceback; re-running the same command resumes)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
