"""The quality report: one self-contained HTML page (tables, inline PNG plots, worst files first)."""
from __future__ import annotations

import base64
import html
import io
import math

import numpy as np

LABELS = {
    "compression_ratio": "compression ratio (source bytes / archive bytes)",
    "pcm_compression_ratio": "compression ratio vs 16-bit PCM",
    "mel": "log-mel distance, source rate (lower is better)",
    "si_sdr": "SI-SDR dB, source rate (higher is better)",
    "mel_24k": "log-mel distance, codec rate",
    "si_sdr_24k": "SI-SDR dB, codec rate",
    "stoi": "STOI, speech-like files (higher is better)",
    "visqol": "ViSQOL MOS-LQO (higher is better)",
    "lufs_diff": "loudness difference LU (restored - original)",
    "clipping_added": "clipping introduced (fraction of samples)",
    "bandwidth_ratio": "bandwidth kept (99.5% energy roll-off, restored / original)",
}


def _png(fig) -> str:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return html.escape(str(v))


def render_report(rows: list[dict], summary: dict, violations: list[dict], cfg, context: dict) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in rows if not r.get("error")]
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>audioarc quality report</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}"
             "td.l,th.l{text-align:left}.bad{background:#fdd}img{margin:4px}</style></head><body>",
             "<h1>audioarc quality report</h1>",
             "<p>" + " · ".join(f"<b>{html.escape(str(k))}</b>: {_fmt(v)}" for k, v in context.items()) + "</p>"]
    parts.append(f"<p>{summary['files_sampled']} files sampled (stratified by duration, folder, rate and "
                 f"channels; seed {cfg.seed}); {summary['files_measured']} measured, "
                 f"{summary['files_bad_pairs']} bad pairs. Excerpt per file: "
                 f"{cfg.excerpt_seconds:g} s from the middle{' (whole file)' if cfg.excerpt_seconds <= 0 else ''}."
                 "</p>")
    # summary table
    parts.append("<h2>Summary</h2><table id='summary'><tr><th class='l'>metric</th><th>mean</th><th>median</th>"
                 "<th>min</th><th>max</th><th>files</th></tr>")
    for k, label in LABELS.items():
        if k in summary:
            s = summary[k]
            parts.append(f"<tr><td class='l'>{label}</td><td>{_fmt(s['mean'])}</td><td>{_fmt(s['median'])}</td>"
                         f"<td>{_fmt(s['min'])}</td><td>{_fmt(s['max'])}</td><td>{s['n']}</td></tr>")
    parts.append("</table>")
    if summary.get("gates"):
        verdict = "PASSED" if not violations else f"FAILED by {len(violations)} file(s)"
        parts.append(f"<h2>Quality gates: {verdict}</h2><p>{html.escape(', '.join(summary['gates']))}</p>")
        if violations:
            parts.append("<table id='violations'><tr><th class='l'>file</th><th class='l'>failed</th></tr>")
            for v in violations:
                parts.append(f"<tr class='bad'><td class='l'>{html.escape(v['source'])}</td>"
                             f"<td class='l'>{html.escape(', '.join(v['failed']))}</td></tr>")
            parts.append("</table>")
    # distributions
    if good:
        parts.append("<h2>Distributions</h2><div id='plots'>")
        for k in ("mel", "si_sdr", "stoi", "visqol", "compression_ratio", "lufs_diff"):
            vals = [r[k] for r in good if r.get(k) is not None]
            if not vals:
                continue
            fig, ax = plt.subplots(figsize=(4, 2.6))
            ax.hist(vals, bins=min(20, max(3, len(vals))), color="#4a7")
            ax.set_title(LABELS[k], fontsize=8)
            parts.append(f"<img alt='histogram of {k}' src='{_png(fig)}'>")
        fig, ax = plt.subplots(figsize=(4, 2.6))
        ax.scatter([r["duration_s"] for r in good], [r["compression_ratio"] or 0 for r in good], s=12)
        ax.set_xscale("log")
        ax.set_xlabel("duration (s)")
        ax.set_ylabel("compression ratio")
        ax.set_title("ratio vs duration", fontsize=8)
        parts.append(f"<img alt='ratio vs duration' src='{_png(fig)}'></div>")
    # worst first
    order = sorted(rows, key=lambda r: (not r.get("error"), -(r.get("mel") or 0.0)))
    cols = ["mel", "si_sdr", "stoi", "visqol", "lufs_diff", "bandwidth_ratio", "compression_ratio"]
    parts.append("<h2>Files, worst first</h2><table id='files'><tr><th class='l'>file</th><th>s</th>"
                 "<th>Hz</th><th>ch</th>" + "".join(f"<th>{c}</th>" for c in cols) + "<th class='l'>error</th></tr>")
    for r in order:
        parts.append(f"<tr{' class=bad' if r.get('error') else ''}><td class='l'>{html.escape(r['relpath'])}</td>"
                     f"<td>{_fmt(r['duration_s'])}</td><td>{r['sample_rate']}</td><td>{r['channels']}</td>"
                     + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols)
                     + f"<td class='l'>{html.escape(r.get('error') or '')}</td></tr>")
    parts.append("</table>")
    # spectrograms of the worst few
    worst = [r for r in order if not r.get("error") and r.get("spec_ref")][: cfg.worst_spectrograms]
    if worst:
        parts.append("<h2>Worst files: original vs restored (codec rate)</h2><div id='spectrograms'>")
        for r in worst:
            (sr_shape, sd_shape) = r["spec_shape"]
            a = np.frombuffer(r["spec_ref"], np.float16).reshape(sr_shape).astype(np.float32)
            b = np.frombuffer(r["spec_deg"], np.float16).reshape(sd_shape).astype(np.float32)
            fig, axes = plt.subplots(1, 2, figsize=(9, 2.8), sharey=True)
            vmax = float(max(a.max(), b.max()))
            for ax, s, title in ((axes[0], a, "original"), (axes[1], b, "restored")):
                ax.imshow(s, origin="lower", aspect="auto", vmin=vmax - 90, vmax=vmax, cmap="magma",
                          extent=(0, r.get("excerpt_s") or 1, 0, 12))
                ax.set_title(f"{title}: {r['relpath']}", fontsize=8)
                ax.set_xlabel("s")
            axes[0].set_ylabel("kHz")
            parts.append(f"<img alt='spectrogram {html.escape(r['relpath'])}' src='{_png(fig)}'>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
