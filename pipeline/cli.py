"""The ``audioarc`` command line: thin argument parsing over the library functions.

Exit codes: 0 success; 1 the job could not run (bad options, unreadable archive, codec error);
2 usage error; 3 the job finished but some inputs failed (each recorded in the manifest with its reason);
4 the sampled quality fell below a --min-quality floor (files are still archived; 4 wins over 3).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
_entrypoint = False  # main() runs as the process entrypoint (not called in-process by a test or a library user)


def _say(*parts, **kw) -> None:
    """Print a result line (never a diagnostic) to the command's real stdout."""
    print(*parts, file=_result_stream or sys.stdout, **kw)


def _print_json(obj) -> None:
    _say(json.dumps(obj, indent=2, default=str))


def _default(cls, name: str):
    """The default of field ``name`` of dataclass ``cls``: each option's default is stated there, once."""
    (f,) = [f for f in dataclasses.fields(cls) if f.name == name]
    return f.default


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def cmd_encode(args) -> int:
    if not args.json and sys.stderr.isatty():  # a first word before the heavy imports and Ray's start-up
        from .runtime import ray_log_path
        log = ray_log_path()
        print(f"audioarc: encoding {args.src} -> {args.dest}" + (f"; Ray's log lines go to {log}" if log else ""),
              file=sys.stderr, flush=True)
    from .encode.config import EncodeConfig
    qcfg = _quality_config(args, args.quality_sample)
    cfg = EncodeConfig(quality=qcfg, src=args.src, dest=args.dest, bitrate_kbps=args.bitrate, codec=args.codec,
                       codec_weights=args.codec_weights, window_seconds=args.window_seconds, actors=args.actors,
                       gpus_per_actor=args.gpus_per_actor, threads_per_actor=args.threads_per_actor,
                       batch_windows=args.batch_windows, batch_seconds=args.batch_seconds,
                       commit_every=args.commit_every, shard_mb=args.shard_mb,
                       address=args.address, input_list=args.input_list, metrics_port=args.metrics_port,
                       metrics_host=args.metrics_host, metrics_linger=args.metrics_linger,
                       emit_metrics=not args.no_metrics, min_actors=args.min_actors,
                       max_actors=args.max_actors, precision=args.precision, rehash=args.rehash,
                       executor=args.executor).validate()
    if _entrypoint and "pandas" not in sys.modules:
        from .encode.executors import choose_executor
        if choose_executor(cfg) == "local":  # no Ray in this process: pyarrow's look for pandas is ~0.3-0.5 s
            from .runtime import keep_pandas_out
            keep_pandas_out()
    from .encode import run_encode
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
    from .runtime import ray_log_path
    if args.json:
        _print_json({**s.to_json(), "ray_log": ray_log_path()})
    else:
        if s.files_total and s.files_skipped == s.files_total:
            _say(f"nothing changed: {s.files_total} files checked, all already archived and unchanged "
                 f"({s.audio_seconds / 3600:.3f} h of audio); checked in {s.wall_seconds:.1f} s")
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
        if ray_log_path():
            _say(f"ray log: {ray_log_path()}")
    if s.quality and s.quality["violations"]:
        return EXIT_QUALITY
    return EXIT_PARTIAL if s.files_failed else EXIT_OK


def _quality_config(args, fraction: float):
    from .quality import QualityConfig, parse_gates
    return QualityConfig(fraction=fraction, seed=args.quality_seed, excerpt_seconds=args.excerpt_seconds,
                         visqol=not args.no_visqol, gates=parse_gates(args.min_quality),
                         min_files=getattr(args, "quality_min_files", _default(QualityConfig, "min_files")),
                         sample_files=getattr(args, "sample", _default(QualityConfig, "sample_files"))).validate()


def _print_quality(summary: dict, violations: list[dict]) -> None:
    keys = [("mel", "mel"), ("si_sdr", "SI-SDR dB"), ("stoi", "STOI"), ("visqol", "ViSQOL"),
            ("compression_ratio", "ratio")]
    vals = ", ".join(f"{label} {summary[k]['median']:.3g}" for k, label in keys if k in summary)
    of = f" of {summary['files_archived']} archived" if summary.get("files_archived") is not None else ""
    _say(f"quality: {summary['files_measured']}{of} files measured ({summary['files_sampled']} sampled; "
         f"medians: {vals}); {summary['files_bad_pairs']} bad pairs")
    for v in violations:
        _say(f"BELOW QUALITY FLOOR {v['source']}: {', '.join(v['failed'])}")


def cmd_quality(args) -> int:
    from .quality import run_quality
    r = run_quality(args.dest, _quality_config(args, 0.0), patterns=tuple(args.patterns),
                    address=args.address, weights=args.codec_weights)
    if args.json:
        _print_json({"summary": r.summary, "violations": r.violations, "files": r.rows, "table": r.table,
                     "report": r.report})
    else:
        _print_quality(r.summary, r.violations)
        _say(f"table:  {r.table}\nreport: {r.report}")
    return EXIT_QUALITY if r.violations else EXIT_OK


def _add_quality_options(p) -> None:
    from .quality.config import QualityConfig
    p.add_argument("--min-quality", help="quality floor, e.g. 'mel<=1.2,stoi>=0.7' (exit 4 if a sampled file "
                   "falls below)")
    p.add_argument("--quality-seed", type=int, default=_default(QualityConfig, "seed"),
                   help="seed of the stratified sample")
    p.add_argument("--excerpt-seconds", type=float, default=_default(QualityConfig, "excerpt_seconds"),
                   help="seconds evaluated per sampled file (from its middle; 0 = whole file)")
    p.add_argument("--no-visqol", action="store_true", help="skip ViSQOL (slow) even when installed")


def cmd_ls(args) -> int:
    from .restore import iter_listing
    rows = iter_listing(args.dest, tuple(args.patterns), args.status)
    if args.jsonl:  # one JSON object a line, written as it comes (big archives)
        for r in rows:
            _say(json.dumps(r, default=str))
        return EXIT_OK
    if args.json:
        _print_json(list(rows))
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
    res = run_restore(RestoreConfig(dest=args.dest, out=args.out, patterns=tuple(args.patterns),
                                    format=args.format, codec_weights=args.codec_weights,
                                    address=args.address, bitrate_kbps=args.bitrate, from_list=args.from_list))
    if args.json:
        _print_json(res.restored)
    else:
        for r in res.restored:
            _say(f"{r['source']} -> {r['path']}")
    for r in res.refused:
        print(f"audioarc: NOT RESTORED {r['reason']}", file=sys.stderr)
    if res.refused:
        print(f"audioarc: {len(res.refused)} of {len(res.refused) + len(res.restored)} files were not restored "
              f"(listed above); the others were", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


def cmd_rebitrate(args) -> int:
    from .rebitrate import RebitrateConfig, run_rebitrate
    s = run_rebitrate(RebitrateConfig(dest=args.dest, new_dest=args.new_dest, bitrate_kbps=args.bitrate,
                                      patterns=tuple(args.patterns), commit_every=args.commit_every,
                                      shard_mb=args.shard_mb, codec_weights=args.codec_weights))
    if args.json:
        _print_json(s)
    else:
        _say(f"rebitrated {s['files_rebitrated']}/{s['files_total']} files ({s['files_skipped']} already there, "
             f"{s['files_failed']} failed), {s['audio_seconds'] / 3600:.3f} h of audio in {s['wall_seconds']:.1f} s "
             f"({s['x_realtime']:.0f}x realtime)")
        _say(f"{s['source_bitrate_kbps']:g} -> {s['bitrate_kbps']:g} kbps/channel: "
             f"{_human_bytes(s['bytes_before'])} -> {_human_bytes(s['bytes_after'])}")
        for f in s["failures"]:
            _say(f"FAILED {f['reason']}")
        _say(f"archive: {s['archive']}")
    return EXIT_PARTIAL if s["files_failed"] else EXIT_OK


def cmd_verify(args) -> int:
    from .verify import run_verify
    rep = run_verify(args.dest, deep=args.deep)
    if args.json:
        _print_json(rep.to_json())
    else:
        what = f"{rep.objects_checked} objects ({_human_bytes(rep.bytes_checked)})"
        if rep.deep:
            what += f", {rep.rows_checked} code rows"
        _say(f"checked {what} of {rep.files_checked} archived files in {rep.seconds:.1f} s "
             f"({rep.gb_per_s:g} GB/s)")
        for n in rep.notes:
            _say(f"note: {n}")
        for d in rep.damaged:
            files = ", ".join(d.files[:20]) + (f" and {len(d.files) - 20} more" if len(d.files) > 20 else "")
            _say(f"DAMAGED {d.object}: {d.problem}\n        affects: {files}")
        _say("archive is intact" if rep.ok else f"{len(rep.damaged)} damaged objects affect {rep.files_affected} files")
    return EXIT_OK if rep.ok else EXIT_PARTIAL


def cmd_compact(args) -> int:
    from . import archive
    from .errors import ArchiveFormatError
    rec = archive.require_record(args.dest)
    if rec.major < 2:
        raise ArchiveFormatError(f"{args.dest}: a format {rec.format_version} archive has no catalog to compact; "
                                 f"`audioarc upgrade {args.dest}` converts it")
    r = archive.catalog.compact(args.dest, target_mb=args.target_mb, vacuum_hours=args.vacuum_hours)
    if args.json:
        _print_json(r)
    else:
        _say(f"compacted the catalog of {args.dest} as of version {r['version']}: {r['files_removed']} files -> "
             f"{r['files_added']}; {r['vacuumed']} old files removed")
    return EXIT_OK


def cmd_adopt_weights(args) -> int:
    from . import archive
    rec = archive.require_record(args.dest)
    ref = archive.weights.adopt(args.dest, rec, args.weights)
    if args.json:
        _print_json({"archive": args.dest, "weights": ref.path, "sha256": ref.sha256, "bytes": ref.bytes})
    else:
        from .storage import join
        _say(f"stored the codec weights in the archive: {join(args.dest, ref.path)}")
    return EXIT_OK


def cmd_upgrade(args) -> int:
    from . import archive
    rec = archive.upgrade(args.dest, args.codec_weights)
    if args.json:
        _print_json({"archive": args.dest, "format_version": rec.format_version})
    else:
        _say(f"{args.dest}: format {rec.format_version}")
    return EXIT_OK


def cmd_codecs(args) -> int:
    from .codec.registry import describe
    rows = describe()
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
    return run_demo(args.workdir, args.files, main)


def cmd_monitor(args) -> int:
    from .monitor import run_monitor
    try:
        return run_monitor(port=args.port, ray_session=args.ray_session, workdir=args.workdir,
                           grafana_port=args.grafana_port, driver=args.driver, once=args.once)
    except RuntimeError as e:
        print(f"audioarc: error: {e}", file=sys.stderr)
        return EXIT_ERROR


def cmd_tune(args) -> int:
    from .tune import TuneConfig, format_table, run_tune
    cfg = TuneConfig(src=args.src, minutes=args.minutes, base=args.base, base_weights=args.base_weights,
                     out=args.out, heldout_fraction=args.heldout_fraction, max_files=args.max_files, seed=args.seed,
                     eval_seconds=args.eval_seconds, visqol=args.visqol, workers=args.workers, threads=args.threads,
                     ray=False if args.no_ray else None, cpu=args.cpu, force=args.force, work_dir=args.work_dir,
                     keep_work=args.keep_work, steps=args.steps, batch=args.batch, lr=args.lr,
                     seg_frames=args.seg_frames, val_segments=args.val_segments, ckpt_every=args.ckpt_every)
    report = run_tune(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.json:
        _print_json(report)
    else:
        _say(format_table(report))
    return EXIT_OK


#: commands whose process never needs pandas: pyarrow imports it (~45 MiB) only to ask whether an argument is a
#: DataFrame, so their process entrypoint keeps it out (restore of one file from a 10M-entry catalog stays small)
LEAN_COMMANDS = frozenset({"restore", "ls", "inspect"})  # read-side commands: runtime.lean_process



JOB_COMMANDS = {"train": "pipeline.train", "codec-eval": "jobs.tools.codec_eval"}


def cmd_job(command: str, job_args: list[str]) -> int:
    """``audioarc train`` / ``audioarc codec-eval``: the job entrypoints, with their own options."""
    import importlib
    try:
        mod = importlib.import_module(JOB_COMMANDS[command])
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("jobs"):
            raise
        from .errors import ConfigError
        raise ConfigError(f"`audioarc {command}` runs {JOB_COMMANDS[command]}, which is part of a source checkout, "
                          f"not of the installed package; run it from a clone of audioarc") from None
    rc = mod.main(job_args)
    return rc if isinstance(rc, int) else EXIT_OK


VERBOSE_HELP = ("show Ray's own log lines on the terminal (by default they go to a log file under "
                "~/.cache/audioarc/logs/ that the summary names)")


def build_parser() -> argparse.ArgumentParser:
    from .encode.config import EXECUTORS, EncodeConfig  # light: the defaults, no torch
    from .placement import PRECISIONS  # light: stdlib only
    from .quality.config import QualityConfig
    from .rebitrate.config import RebitrateConfig
    p = argparse.ArgumentParser(prog="audioarc", description="Archive audio collections with a neural RVQ codec.")
    p.add_argument("--version", action="version", version=f"audioarc {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("encode", help="archive a folder/URL prefix of audio into DEST")
    e.add_argument("src", help="folder or URL prefix of audio files (or one file)")
    e.add_argument("dest", help="archive root (folder or URL)")
    bitrate, codec = _default(EncodeConfig, "bitrate_kbps"), _default(EncodeConfig, "codec")
    e.add_argument("--bitrate", type=float, default=bitrate,
                   help=f"kbps per channel, on the codec's ladder (default {bitrate:g})")
    e.add_argument("--codec", default=codec, help=f"codec name (default {codec}; see `codecs`)")
    e.add_argument("--codec-weights", help="checkpoint file for the codec (default: the shipped one)")
    e.add_argument("--window-seconds", type=float, default=_default(EncodeConfig, "window_seconds"),
                   help="codec window length (memory bound)")
    e.add_argument("--actors", type=int, help="codec actors (default: 1 per GPU, else 1 per CPU)")
    e.add_argument("--gpus-per-actor", type=float, help="GPUs per codec actor (fractional packs several)")
    e.add_argument("--threads-per-actor", type=int, help="torch threads per CPU codec actor (default: 1 under "
                   "Ray; in-process, every core)")
    e.add_argument("--executor", choices=EXECUTORS, default=_default(EncodeConfig, "executor"),
                   help="where the stages run: local = in this process (no Ray start-up), ray = a Ray Data "
                   "pipeline with codec actors; auto (default): ray with --address/RAY_ADDRESS, --actors or a "
                   "GPU, else local")
    e.add_argument("--batch-windows", type=int, help="windows per codec forward pass (default 1 on CPU, 64 "
                   "on GPU)")
    e.add_argument("--batch-seconds", type=float, help="the same in seconds of audio per forward pass (whole "
                   "windows of --window-seconds, at least one), e.g. 1920 = 64 windows of 30 s")
    e.add_argument("--min-actors", type=int, help="autoscaling codec actor pool: fewest actors (default "
                   "--actors or 1)")
    e.add_argument("--max-actors", type=int, help="autoscaling codec actor pool: most actors (default "
                   "--actors, else 1 per GPU slot or 1 per CPU)")
    e.add_argument("--precision", default=_default(EncodeConfig, "precision"), choices=PRECISIONS,
                   help="GPU autocast precision (CPU always fp32); check fidelity with jobs/bench/bench_codec.py")
    e.add_argument("--commit-every", type=int, default=_default(EncodeConfig, "commit_every"),
                   help="files per committed generation")
    e.add_argument("--shard-mb", type=float, default=_default(EncodeConfig, "shard_mb"),
                   help="target shard size in MiB")
    e.add_argument("--address", help="Ray cluster: http://HEAD:8265 submits this command as a Ray job; "
                   "HOST:PORT or ray://HOST:10001 connects this driver (default: RAY_ADDRESS or a local node)")
    fraction, min_files = _default(QualityConfig, "fraction"), _default(QualityConfig, "min_files")
    e.add_argument("--quality-sample", type=float, default=fraction,
                   help=f"fraction of files to sample for fidelity beside the encode (0 = off; default {fraction:g})")
    e.add_argument("--quality-min-files", type=int, default=min_files, metavar="N",
                   help=f"sample at least N files (every file of a smaller job), then the fraction (default "
                   f"{min_files})")
    _add_quality_options(e)
    e.add_argument("--input-list", metavar="FILE",
                   help="encode the inputs listed in FILE (path or URL) instead of listing SRC: text with one "
                        "URI per line, or CSV/Parquet with a uri or key column (an S3 Inventory report works); "
                        "keys are relative to SRC")
    e.add_argument("--metrics-port", type=int, help="serve job metrics for Prometheus on this port (0: any free)")
    e.add_argument("--metrics-host", default=_default(EncodeConfig, "metrics_host"),
                   help="address of the metrics endpoint (default loopback)")
    e.add_argument("--metrics-linger", type=float, default=_default(EncodeConfig, "metrics_linger"), metavar="SECONDS",
                   help="after the job, keep the endpoint up until its final values were scraped (at most this)")
    e.add_argument("--no-metrics", action="store_true", help="no worker-side Ray metrics (overhead checks)")
    e.add_argument("--rehash", action="store_true", help="read and hash every input to find changes, even those "
                   "whose listed size and ETag/mtime match their archived entry (default: those are unchanged)")
    e.add_argument("--json", action="store_true", help="print one JSON summary when the job ends")
    e.add_argument("--progress", action="store_true", help="show the progress bar even when not on a terminal")
    e.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    e.set_defaults(fn=cmd_encode)

    ls = sub.add_parser("ls", help="list every input of an archive")
    ls.add_argument("dest")
    ls.add_argument("patterns", nargs="*", help="only inputs whose path matches these globs")
    ls.add_argument("--status", choices=["archived", "failed"], help="only inputs with this status")
    ls.add_argument("--json", action="store_true", help="one JSON array")
    ls.add_argument("--jsonl", action="store_true", help="JSON Lines: one object a line, streamed")
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
    r.add_argument("--bitrate", type=float, help="decode only the stages of this lower rate (kbps per channel, "
                   "on the codec's ladder, at most the archive's): a quick preview")
    r.add_argument("--from-list", metavar="FILE", help="restore the files named in FILE (path or URL): relpaths or "
                   "source URIs, one per line (read as a stream: millions of lines are fine)")
    r.add_argument("--json", action="store_true")
    r.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    r.set_defaults(fn=cmd_restore)

    rb = sub.add_parser("rebitrate", help="copy an archive's files at a lower rate into a new archive (keeps the "
                        "first stages of their codes; no re-encode)")
    rb.add_argument("dest", help="the archive to read")
    rb.add_argument("new_dest", help="the archive to write (created, or added to: a re-run resumes)")
    rb.add_argument("patterns", nargs="*", help="glob patterns on the source path (default: everything)")
    rb.add_argument("--bitrate", type=float, required=True, help="kbps per channel, on the codec's ladder, at "
                    "most DEST's")
    rb.add_argument("--commit-every", type=int, default=_default(RebitrateConfig, "commit_every"),
                    help="files per committed generation")
    rb.add_argument("--shard-mb", type=float, default=_default(RebitrateConfig, "shard_mb"),
                    help="target shard size in MiB")
    rb.add_argument("--codec-weights", help="checkpoint of the archive's codec, if it does not carry it")
    rb.add_argument("--json", action="store_true")
    rb.set_defaults(fn=cmd_rebitrate)

    q = sub.add_parser("quality", help="measure fidelity of a sample of an archive against the originals")
    q.add_argument("dest")
    q.add_argument("patterns", nargs="*", help="evaluate files matching these globs instead of a sample")
    sample_files = _default(QualityConfig, "sample_files")
    q.add_argument("--sample", type=int, default=sample_files,
                   help=f"number of files (stratified; default {sample_files})")
    q.add_argument("--address", help="Ray cluster address")
    q.add_argument("--codec-weights", help="checkpoint of the archive's codec, if not the shipped one")
    q.add_argument("--json", action="store_true")
    q.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    _add_quality_options(q)
    q.set_defaults(fn=cmd_quality)

    cp = sub.add_parser("compact", help="rewrite the catalog sorted by path into few large files (fast lookups at "
                        "any size); safe beside running jobs")
    cp.add_argument("dest")
    cp.add_argument("--target-mb", type=int, default=64, help="catalog data file size (default 64 MiB)")
    cp.add_argument("--vacuum-hours", type=float, help="also delete catalog files no version younger than this "
                    "needs (readers older than that may fail; default: keep them)")
    cp.add_argument("--json", action="store_true")
    cp.set_defaults(fn=cmd_compact)

    v = sub.add_parser("verify", help="check every committed object of an archive; name the files damage affects")
    v.add_argument("dest")
    v.add_argument("--deep", action="store_true", help="also read every code row and check its checksum")
    v.add_argument("--json", action="store_true")
    v.set_defaults(fn=cmd_verify)

    aw = sub.add_parser("adopt-weights", help="store the codec checkpoint that made an archive inside it (once)")
    aw.add_argument("dest")
    aw.add_argument("weights", help="the checkpoint file (.pt or .safetensors); its hash must be the archive's")
    aw.add_argument("--json", action="store_true")
    aw.set_defaults(fn=cmd_adopt_weights)

    up = sub.add_parser("upgrade", help="convert a format 1.x archive to format 2 in place (keeps every shard)")
    up.add_argument("dest")
    up.add_argument("--codec-weights", help="checkpoint of the archive's codec, if the archive does not carry it")
    up.add_argument("--json", action="store_true")
    up.set_defaults(fn=cmd_upgrade)

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

    tu = sub.add_parser("tune", help="fine-tune neural_rvq on a library's own audio; keep it only if better on "
                        "the library's held-out files")
    tu.add_argument("src", help="folder or URL prefix (s3://...) of the library's audio")
    tu.add_argument("--minutes", type=float, required=True, help="training wall time (the fine-tune's budget)")
    tu.add_argument("--base", default="neural_rvq", help="codec to fine-tune (neural_rvq)")
    tu.add_argument("--base-weights", help="weights to start from (default: the shipped release)")
    tu.add_argument("--out", help="tuned weights file (default ./tuned-<checkpoint hash>.pt); its report: "
                    "the same name with .json")
    tu.add_argument("--heldout-fraction", type=float, default=0.2, help="share of the sample held out (by a "
                    "hash of the relative path) to score base vs tuned; never trained on")
    tu.add_argument("--max-files", type=int, default=200, help="files to sample (stratified by folder and size)")
    tu.add_argument("--eval-seconds", type=float, default=10.0, help="excerpt of each held-out file scored")
    tu.add_argument("--visqol", action="store_true", help="also score ViSQOL (slow; needs visqol-python)")
    tu.add_argument("--workers", type=int, default=1, help="data-parallel Ray Train workers (one: in-process)")
    tu.add_argument("--threads", type=int, default=1, help="torch threads (per worker)")
    tu.add_argument("--no-ray", action="store_true", help=argparse.SUPPRESS)
    tu.add_argument("--cpu", action="store_true", help="train and score on the CPU even with a GPU")
    tu.add_argument("--seed", type=int, default=0)
    tu.add_argument("--force", action="store_true", help="write the tuned weights even when they are not better")
    tu.add_argument("--work-dir", help=argparse.SUPPRESS)
    tu.add_argument("--keep-work", action="store_true", help=argparse.SUPPRESS)
    for opt, typ in (("--steps", int), ("--batch", int), ("--lr", float), ("--seg-frames", int),
                     ("--val-segments", int), ("--ckpt-every", int)):  # advanced: passed to pipeline/train.py
        tu.add_argument(opt, type=typ, default=None, help=argparse.SUPPRESS)
    tu.add_argument("--s3-endpoint", metavar="URL",
                    help="S3-compatible endpoint for s3:// URLs (default: AWS_ENDPOINT_URL, else AWS)")
    tu.add_argument("--json", action="store_true")
    tu.set_defaults(fn=cmd_tune)

    # listed for --help; main() hands their arguments to the job entrypoints untouched
    sub.add_parser("train", help="train the neural codec (pipeline/train.py; `audioarc train --help`)")
    sub.add_parser("codec-eval", help="evaluate codecs vs Opus/MP3 (jobs/tools/codec_eval.py; `audioarc codec-eval --help`)")

    d = sub.add_parser("demo", help="set up a small real corpus and archive it (the README's first command)")
    d.add_argument("--workdir", default="out/demo")
    d.add_argument("--files", type=int, default=24, help="files to take from the corpus")
    d.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    d.set_defaults(fn=cmd_demo)
    for sp in (e, ls, i, r, rb, q, v, aw, up):
        sp.add_argument("--s3-endpoint", metavar="URL",
                        help="S3-compatible endpoint for s3:// URLs (default: AWS_ENDPOINT_URL, else AWS)")
    return p


def main(argv: list[str] | None = None, out=None) -> int:
    """Run one command (see ``_main``); as the process entrypoint (``argv`` None) its exit skips the final
    garbage collection (``_no_collection_at_exit``)."""
    if argv is None:
        _no_collection_at_exit()
    return _main(argv, out)


def _no_collection_at_exit() -> None:
    """Freeze the heap once every other exit handler has run (atexit runs them last-registered first, and this is
    registered before torch is imported), so the interpreter's final collections skip it: they walk every torch
    and Arrow object, ~0.28 s of each command that loaded a codec (measured on this 2-core VM). Module teardown
    still frees by reference count; only objects in reference cycles are left to the process's end."""
    import atexit
    import gc
    global _frozen_at_exit
    if not _frozen_at_exit:
        atexit.register(gc.freeze)
        _frozen_at_exit = True


_frozen_at_exit = False


def _main(argv: list[str] | None, out) -> int:
    """Run one command. For the commands that print results (those with ``--json``) the results go to
    ``out`` (default: sys.stdout as it is on entry) and sys.stdout points at stderr while they run. As the
    process entrypoint (``argv`` None) it stays so after the results are written, so Ray's shutdown cannot
    append to them; an in-process caller gets its sys.stdout back (and, sharing a running Ray driver whose
    thread may print at any moment, should pass its own ``out``)."""
    global _result_stream, _entrypoint
    entrypoint = _entrypoint = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in JOB_COMMANDS:
        return cmd_job(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    if entrypoint and args.command in LEAN_COMMANDS and "pandas" not in sys.modules:
        from .runtime import lean_process
        lean_process()
    if entrypoint and args.command == "demo" and not getattr(args, "verbose", False) \
            and not os.environ.get("AUDIOARC_RAY_LOGS"):
        from .runtime import route_ray_logs
        route_ray_logs("demo")  # the encode it runs names the log in its summary
    elif getattr(args, "verbose", False) and args.command == "demo":
        os.environ["AUDIOARC_RAY_LOGS"] = "1"
    if not hasattr(args, "json"):  # demo, dev-s3, monitor: human-facing output, no results to keep clean
        if out is None:
            return _run(args, argv)
        with contextlib.redirect_stdout(out):
            return _run(args, argv)
    _result_stream, saved = out or sys.stdout, sys.stdout
    sys.stdout = sys.stderr
    if hasattr(args, "verbose"):  # a command that starts Ray
        if args.verbose:
            os.environ["AUDIOARC_RAY_LOGS"] = "1"
        elif entrypoint and not os.environ.get("AUDIOARC_RAY_LOGS"):
            from .runtime import route_ray_logs
            route_ray_logs(args.command)  # Ray's log lines -> a file, named in the summary
        if "pipeline.runtime" in sys.modules and sys.modules["pipeline.runtime"].log_stream() is not None:
            sys.stdout = sys.modules["pipeline.runtime"].log_stream()  # Ray's driver thread prints there
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
        print(f"audioarc: error: {e}{_log_hint()}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("audioarc: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a crash still gets a one-line reason and exit 1
        if os.environ.get("AUDIOARC_DEBUG"):
            raise
        print(f"audioarc: error: unexpected {type(e).__name__}: {str(e)[:2000]}\n"
              f"(set AUDIOARC_DEBUG=1 for the traceback; re-running the same command resumes){_log_hint()}",
              file=sys.stderr)
        return EXIT_ERROR


def _log_hint() -> str:
    if "pipeline.runtime" not in sys.modules:
        return ""
    from .runtime import ray_log_path
    path = ray_log_path()
    return f"\n(Ray's log: {path})" if path and os.path.exists(path) and os.path.getsize(path) else ""


if __name__ == "__main__":
    sys.exit(main())
