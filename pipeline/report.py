"""The quality report: one self-contained HTML page (job facts, verdict against the floors, a guide to the
numbers, excerpt players, inline PNG plots, worst files first)."""
from __future__ import annotations

import base64
import html
import io
import math

import numpy as np

# metric -> (name, unit, which way is better, what a value means)
METRICS = {
    "mel": ("Mel distance", "", "lower",
            "multi-scale log-mel spectral distance. 0 = identical; for scale, white noise added at 30 dB SNR "
            "scores about 0.4, at 20 dB about 0.9, at 10 dB about 1.7"),
    "si_sdr": ("SI-SDR", "dB", "higher",
               "scale-invariant signal-to-distortion ratio of the waveform. Above 20 dB the waveform is nearly "
               "intact, 10-20 dB good, 0-10 dB clearly changed. Low-bitrate neural codecs often score low here "
               "while sounding fine (they keep the sound, not the exact phase): judge with mel, ViSQOL and your ears"),
    "stoi": ("STOI", "0-1", "higher",
             "speech intelligibility, speech-like files only: above 0.9 excellent, 0.75-0.9 good, "
             "0.6-0.75 fair, below 0.6 poor"),
    "visqol": ("ViSQOL", "MOS 1-5", "higher",
               "predicted listener opinion score: above 4 excellent (near transparent), 3-4 good to fair, "
               "below 3 poor"),
    "tones": ("Added tones", "share 0-1", "lower",
              "share of the restored energy above 2 kHz in narrow stationary peaks the original lacks "
              "(whistles): below 0.05 good, 0.05-0.15 may be audible, above 0.15 bad"),
    "lufs_diff": ("Loudness change", "LU", "near 0",
                  "integrated loudness, restored minus original: within ±1 LU inaudible, beyond ±2 LU noticeable"),
    "clipping_added": ("Clipping added", "share of samples", "lower",
                       "samples at full scale that the original did not have: 0 ideal, above 0.001 (0.1 %) "
                       "clicks may be audible"),
    "bandwidth_ratio": ("Bandwidth kept", "restored / original", "higher",
                        "99.5 % energy roll-off frequency of the restored file over the original's: 1 = all "
                        "kept. A 24 kHz codec keeps nothing above 12 kHz, so 44.1/48 kHz music with highs "
                        "scores about 0.5-0.6 by design"),
    "mel_24k": ("Mel distance at codec rate", "", "lower",
                "the same as mel, on both signals resampled to the codec's rate (the codec's own error, "
                "without the bandwidth it cannot carry)"),
    "si_sdr_24k": ("SI-SDR at codec rate", "dB", "higher", "the same as SI-SDR, at the codec's rate"),
    "compression_ratio": ("Compression ratio", "source bytes / archive bytes", "higher",
                          "how much smaller the archive is than the source files as stored"),
    "pcm_compression_ratio": ("Ratio vs 16-bit PCM", "PCM bytes / archive bytes", "higher",
                              "the same against uncompressed 16-bit PCM (independent of the source format)"),
}
# the gate metric names (the quality module's gate names) shown as the metric they test
GATE_SHOWN = {"lufs_diff": "|loudness change| LU", "clipping": "clipping added", "bandwidth": "bandwidth kept",
              "ratio": "compression ratio"}
CONTEXT_LABELS = {"date": "date", "job": "job id", "archive": "archive", "codec": "codec",
                  "checkpoint": "checkpoint hash", "bitrate_kbps": "nominal bitrate (kbps per channel)",
                  "effective_kbps": "effective bitrate stored (kbps)", "files in job": "inputs in job",
                  "files": "inputs in archive", "files_failed": "failed inputs"}
# plot ranges of bounded metrics (a histogram of one value otherwise runs past them)
RANGES = {"stoi": (0.0, 1.0), "visqol": (1.0, 5.0), "tones": (0.0, None),
          "clipping_added": (0.0, None)}
# columns of the file table: (row key, header)
FILE_COLS = [("mel", "mel distance"), ("si_sdr", "SI-SDR dB"), ("stoi", "STOI 0-1"), ("visqol", "ViSQOL 1-5"),
             ("tones", "added tones"), ("lufs_diff", "loudness Δ LU"), ("bandwidth_ratio", "bandwidth kept"),
             ("compression_ratio", "ratio ×")]


def _png(fig) -> str:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return html.escape(str(v))


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _label(k: str) -> str:
    name, unit, _, _ = METRICS[k]
    return f"{name} ({unit})" if unit else name


def _gate_failures(rows: list[dict], gates) -> dict[int, set[str]]:
    """Row index -> row keys of the metrics failing a floor."""
    out: dict[int, set[str]] = {}
    for i, r in enumerate(rows):
        if r.get("error"):
            continue
        for g in gates:
            if not g.passes(r):
                col = g.column
                out.setdefault(i, set()).add("lufs_diff" if col == "lufs_diff_abs" else col)
    return out


def _sample_sentence(summary: dict, cfg) -> str:
    n, sampled = summary["files_measured"], summary["files_sampled"]
    of = summary.get("files_archived")
    head = f"Measured <b>{n} of {of} archived files</b>" if of is not None else f"Measured <b>{n} files</b>"
    if cfg.fraction > 0:
        how = (f"every file up to {cfg.min_files}, beyond that {cfg.fraction:.0%} of them" if cfg.min_files
               else f"{cfg.fraction:.0%} of them")
        how += ", stratified by duration, folder, sample rate and channels"
    else:
        how = "a stratified sample (duration, folder, sample rate, channels)"
    bad = (f"; {summary['files_bad_pairs']} of the {sampled} sampled could not be compared (original changed or "
           f"gone: see the errors below)") if summary["files_bad_pairs"] else ""
    ex = (f"{cfg.excerpt_seconds:g} s from the middle of each file" if cfg.excerpt_seconds > 0 else "whole files")
    return f"<p id='sample'>{head} ({how}; seed {cfg.seed}){bad}. Measured on {ex}.</p>"


def render_report(rows: list[dict], summary: dict, violations: list[dict], cfg, context: dict) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gates = tuple(getattr(cfg, "gates", ()))
    fails = _gate_failures(rows, gates)
    good = [r for r in rows if not r.get("error")]
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>audioarc quality report"
             f"{' ' + _e(context['job']) if context.get('job') else ''}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1200px;color:#222}table{border-collapse:"
             "collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;vertical-align:top}"
             "th{background:#eee}td.l,th.l{text-align:left}.bad{background:#fdd}.ok{background:#dfd}img{margin:4px}"
             ".verdict{font-size:1.3em;padding:6px 12px;display:inline-block}.pair{display:inline-block;margin:"
             "6px 12px 12px 0;padding:8px;border:1px solid #ddd;vertical-align:top}.pair audio{display:block;"
             "width:300px;margin:2px 0 8px}.small{font-size:.85em;color:#555}</style></head><body>",
             "<h1>audioarc quality report</h1>"]
    # job facts
    parts.append("<table id='job'>")
    for k, v in context.items():
        if k == "effective_kbps" and isinstance(v, float):
            v = round(v, 3)
        parts.append(f"<tr><th class='l'>{_e(CONTEXT_LABELS.get(k, k))}</th><td class='l'>{_fmt(v)}</td></tr>")
    parts.append("</table>")
    parts.append(_sample_sentence(summary, cfg))
    # verdict against the floors
    parts.append("<h2>Quality floors</h2>")
    if gates:
        ok = not violations
        parts.append(f"<p id='verdict' class='verdict {'ok' if ok else 'bad'}'>"
                     f"{'PASSED' if ok else 'FAILED'}: {len(violations)} of {len(good)} measured files below a "
                     f"floor</p>")
        parts.append("<table id='gates'><tr><th class='l'>floor (--min-quality)</th><th class='l'>metric</th>"
                     "<th>files measured</th><th>below the floor</th><th>worst value</th><th>verdict</th></tr>")
        for g in gates:
            col = g.column
            vals = [r[col] for r in good if r.get(col) is not None and not (isinstance(r[col], float)
                                                                           and math.isnan(r[col]))]
            below = sum(not g.passes(r) for r in good)
            worst = (max(vals) if g.op == "<=" else min(vals)) if vals else None
            name = GATE_SHOWN.get(g.metric) or (_label(col) if col in METRICS else col)
            verdict = "no files measured" if not vals else ("PASS" if not below else "FAIL")
            cls = "" if not vals else (" class='ok'" if not below else " class='bad'")
            parts.append(f"<tr{cls}><td class='l'>{_e(g)}</td><td class='l'>{_e(name)}</td><td>{len(vals)}</td>"
                         f"<td>{below}</td><td>{_fmt(worst)}</td><td>{verdict}</td></tr>")
        parts.append("</table>")
        if violations:
            parts.append("<table id='violations'><tr><th class='l'>file</th><th class='l'>below</th></tr>")
            for v in violations:
                parts.append(f"<tr class='bad'><td class='l'>{_e(v['source'])}</td>"
                             f"<td class='l'>{_e(', '.join(v['failed']))}</td></tr>")
            parts.append("</table>")
    else:
        parts.append("<p id='verdict'>No floors were set, so nothing passed or failed. Set them with "
                     "<code>--min-quality 'mel&lt;=1.2,stoi&gt;=0.7'</code> (the job then exits 4 when a sampled "
                     "file falls below one); the guide below says what values mean.</p>")
    # summary
    parts.append("<h2>Summary</h2><table id='summary'><tr><th class='l'>metric</th><th class='l'>better</th>"
                 "<th>median</th><th>mean</th><th>min</th><th>max</th><th>files</th></tr>")
    for k in METRICS:
        if k in summary:
            s = summary[k]
            parts.append(f"<tr><td class='l' title='{_e(METRICS[k][3])}'>{_e(_label(k))}</td>"
                         f"<td class='l'>{_e(METRICS[k][2])}</td><td>{_fmt(s['median'])}</td><td>{_fmt(s['mean'])}"
                         f"</td><td>{_fmt(s['min'])}</td><td>{_fmt(s['max'])}</td><td>{s['n']}</td></tr>")
    parts.append("</table>")
    # guide
    parts.append("<h2>How to read the numbers</h2><table id='guide'><tr><th class='l'>metric</th>"
                 "<th class='l'>unit</th><th class='l'>better</th><th class='l'>what a value means</th></tr>")
    for k, (name, unit, better, guide) in METRICS.items():
        parts.append(f"<tr><td class='l'>{_e(name)}</td><td class='l'>{_e(unit or '–')}</td>"
                     f"<td class='l'>{_e(better)}</td><td class='l'>{_e(guide)}</td></tr>")
    parts.append("</table><p class='small'>Metrics compare the restored audio with the original at the original's "
                 "sample rate and channels unless marked 'at codec rate'. Numbers are a guide: listen to the "
                 "worst files below before trusting a setting.</p>")
    # worst first: errors, then files below a floor, then by mel distance
    order = sorted(range(len(rows)), key=lambda i: (not rows[i].get("error"), i not in fails,
                                                      -(rows[i].get("mel") or 0.0)))
    # listening
    listen = [i for i in order if not rows[i].get("error") and rows[i].get("clip_ref")][: cfg.listen_files]
    if listen:
        parts.append(f"<h2>Listen: the {len(listen)} worst files</h2><p class='small'>The same "
                     f"{cfg.listen_seconds:g} s from the middle of each file, original then restored (both as "
                     "Ogg Vorbis for the page; at the original's sample rate).</p><div id='listen'>")
        for i in listen:
            r = rows[i]
            facts = ", ".join(f"{h} {_fmt(r.get(k))}" for k, h in FILE_COLS[:5] if r.get(k) is not None)
            parts.append(f"<div class='pair{' bad' if i in fails else ''}'><b>{_e(r['relpath'])}</b>"
                         f"<div class='small'>{facts}</div>")
            for key, what in (("clip_ref", "original"), ("clip_deg", "restored")):
                b64 = base64.b64encode(r[key]).decode()
                parts.append(f"<span class='small'>{what}</span><audio controls preload='metadata' "
                             f"data-kind='{what}' src='data:audio/ogg;base64,{b64}'></audio>")
            parts.append("</div>")
        parts.append("</div>")
    # distributions
    if good:
        parts.append("<h2>Distributions</h2><div id='plots'>")
        for k in ("mel", "si_sdr", "stoi", "visqol", "tones", "lufs_diff", "bandwidth_ratio", "compression_ratio"):
            vals = [float(r[k]) for r in good if r.get(k) is not None and math.isfinite(float(r[k]))]
            if not vals:
                continue
            lo, hi = min(vals), max(vals)
            rlo, rhi = RANGES.get(k, (None, None))
            pad = max(0.05 * (hi - lo), 0.05 * abs(hi), 0.01)
            lo, hi = lo - pad, hi + pad
            if rlo is not None:
                lo = max(lo, rlo) if k not in ("stoi", "visqol") else rlo
            if rhi is not None:
                hi = min(hi, rhi) if k not in ("stoi", "visqol") else rhi
            if hi <= lo:
                hi = lo + 1e-3
            fig, ax = plt.subplots(figsize=(4, 2.6))
            ax.hist(np.clip(vals, lo, hi), bins=min(20, max(3, len(vals))), range=(lo, hi), color="#4a7")
            for g in gates:
                col = g.column
                if col == k and lo <= g.value <= hi:
                    ax.axvline(g.value, color="#c33", ls="--", lw=1.2, label=f"floor {g}")
                    ax.legend(fontsize=7)
            ax.set_xlim(lo, hi)
            ax.set_xlabel(_label(k), fontsize=8)
            ax.set_ylabel("files", fontsize=8)
            ax.yaxis.get_major_locator().set_params(integer=True)
            ax.set_title(f"{METRICS[k][0]} ({METRICS[k][2]} is better)", fontsize=8)
            parts.append(f"<img alt='histogram of {_e(METRICS[k][0])}' src='{_png(fig)}'>")
        fig, ax = plt.subplots(figsize=(4, 2.6))
        ax.scatter([r["duration_s"] for r in good], [r["compression_ratio"] or 0 for r in good], s=12)
        ax.set_xscale("log")
        ax.set_xlabel("file duration (s, log scale)", fontsize=8)
        ax.set_ylabel("compression ratio (×)", fontsize=8)
        ax.set_title("compression ratio vs duration", fontsize=8)
        parts.append(f"<img alt='compression ratio vs duration' src='{_png(fig)}'></div>")
    # the file table
    parts.append("<h2>Files, worst first</h2><table id='files'><tr><th class='l'>file</th><th>duration s</th>"
                 "<th>rate kHz</th><th>channels</th>"
                 + "".join(f"<th title='{_e(METRICS[k][3])}'>{_e(h)}</th>" for k, h in FILE_COLS)
                 + "<th class='l'>error</th></tr>")
    for i in order:
        r = rows[i]
        bad_cols = fails.get(i, set())
        parts.append(f"<tr{' class=bad' if r.get('error') else ''}><td class='l'>{_e(r['relpath'])}</td>"
                     f"<td>{_fmt(r['duration_s'])}</td><td>{_fmt(r['sample_rate'] / 1000)}</td>"
                     f"<td>{r['channels']}</td>"
                     + "".join(f"<td{' class=bad' if k in bad_cols else ''}>{_fmt(r.get(k))}</td>"
                               for k, _ in FILE_COLS)
                     + f"<td class='l'>{_e(r.get('error') or '')}</td></tr>")
    parts.append("</table>")
    # spectrograms of the worst few, at the original's rate (lost bandwidth shows as an empty top)
    worst = [rows[i] for i in order if not rows[i].get("error") and rows[i].get("spec_ref")][: cfg.worst_spectrograms]
    if worst:
        parts.append("<h2>Worst files: original vs restored spectrograms (original's sample rate)</h2>"
                     "<div id='spectrograms'>")
        for r in worst:
            (sr_shape, sd_shape) = r["spec_shape"]
            a = np.frombuffer(r["spec_ref"], np.float16).reshape(sr_shape).astype(np.float32)
            b = np.frombuffer(r["spec_deg"], np.float16).reshape(sd_shape).astype(np.float32)
            nyq = (r.get("spec_rate") or 24000) / 2000
            fig, axes = plt.subplots(1, 2, figsize=(9, 2.8), sharey=True)
            vmax = float(max(a.max(), b.max()))
            im = None
            for ax, s, title in ((axes[0], a, "original"), (axes[1], b, "restored")):
                im = ax.imshow(s, origin="lower", aspect="auto", vmin=vmax - 90, vmax=vmax, cmap="magma",
                               extent=(0, r.get("excerpt_s") or 1, 0, nyq))
                ax.set_title(f"{title}: {r['relpath']}", fontsize=8)
                ax.set_xlabel("time in excerpt (s)", fontsize=8)
            axes[0].set_ylabel("frequency (kHz)", fontsize=8)
            fig.colorbar(im, ax=list(axes), label="level (dB)", pad=0.01)
            parts.append(f"<img alt='spectrogram {_e(r['relpath'])}' src='{_png(fig)}'>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
