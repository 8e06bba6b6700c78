"""
The kit's HTML pages: self-contained files (inline SVG, no script, nothing fetched) that a browser opens from disk.
topology_page is topology.py's and windows.py's report.html, ablation_page ablate.py's ablation.html, training_page
train.py's report.html; svg_chart draws their charts.
"""

import html
import math
import os
from types import SimpleNamespace

import numpy as np

from common import atomic_write, fmt_time

# -----------------------------------------------------------------------------
# Charts: small inline-SVG charts on self-contained pages (no plotting library)


def nice_ticks(lo, hi, log=False, n=5):
    """About n round tick values in [lo, hi] and their labels: steps of 1, 2 or 5 x 10^k; on a log axis the values
    1, 2, 5 x 10^k, or linear steps when the range holds fewer than two of those."""
    if log:
        ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                 for m in (1, 2, 5) if lo <= m * 10.0 ** e <= hi]
        if len(ticks) > 2 * n:
            ticks = [t for t in ticks if round(t / 10 ** math.floor(math.log10(t))) == 1]
        if len(ticks) >= 2:
            return ticks, [fmt_num(t) for t in ticks]
    raw = (hi - lo) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    ticks = [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]
    digits = max(0, -math.floor(math.log10(step) + 1e-9))  # as many decimals as the step needs, no float noise
    return ticks, [f"{t:.{digits}f}" for t in ticks]


def fmt_num(v):
    """A number for a tooltip or a caption: 4 significant digits."""
    return f"{v:.4g}"


def chart_frame(series, width, height, log, vlines, hlines, xcats, yrange):
    """svg_chart's plot area: the box (left, top, pw, ph) in pixels, the axes' ranges x0..x1 and y0..y1 (y padded
    by 6%, in log10 on a log axis), ok(y) (a y that can be drawn) and the maps X(x), Y(y) from data to pixels."""
    left, right, top, bottom = 58, 10, 22, 34 if xcats is None else 46  # margins: y labels, legend, x labels
    pw, ph = width - left - right, height - top - bottom  # the plot area in pixels
    ok = lambda v: v is not None and math.isfinite(v) and (v > 0 or not log)
    ys = [v for s in series for y in s["y"] for v in (y if s.get("kind") == "range" else [y]) if ok(v)]  # drawn ys
    ys += [y for y, _, _ in hlines if ok(y)]
    xs = [x for s in series for x in s["x"]] + [v[0] for v in vlines]
    if xcats is not None:
        x0, x1 = -0.5, len(xcats) - 0.5  # category i centred in its slot
    else:
        x0, x1 = (min(xs), max(xs)) if xs else (0, 1)
        x1 = x1 if x1 > x0 else x0 + 1
    y0, y1 = yrange or ((min(ys), max(ys)) if ys else (1.0, 2.0))
    if log:
        y0, y1 = math.log10(y0), math.log10(y1)
    pad = (y1 - y0) * 0.06 or (abs(y0) * 0.1 or 1.0)  # a flat series still gets a visible range
    y0, y1 = y0 - pad, y1 + pad
    X = lambda x: left + (x - x0) / (x1 - x0) * pw  # data -> pixels
    Y = lambda y: top + (1 - ((math.log10(y) if log else y) - y0) / (y1 - y0)) * ph  # SVG's y grows downwards
    return SimpleNamespace(left=left, top=top, pw=pw, ph=ph, x0=x0, x1=x1, y0=y0, y1=y1, xs=xs, ok=ok, X=X, Y=Y)


def chart_data(fr, series, xcats, yrange):
    """svg_chart's data: each series as its kind draws it (with the points' tooltips), then the legend."""
    left, top, pw, X, Y, ok = fr.left, fr.top, fr.pw, fr.X, fr.Y, fr.ok
    out = []
    for s in series:
        kind, color = s.get("kind", "line"), s["color"]
        tips = s.get("tips") or [None] * len(s["x"])
        tip = lambda t: f"<title>{html.escape(t)}</title>" if t else ""  # an SVG tooltip
        if kind == "line":
            pts = [f"{X(x):.1f},{Y(y):.1f}" for x, y in zip(s["x"], s["y"]) if ok(y)]
            out.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{color}" stroke-width="1.4"/>')
        for x, y, t in zip(s["x"], s["y"], tips):
            if kind == "dots" and ok(y):
                out.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3.2" fill="{color}" fill-opacity="0.8">'
                           f'{tip(t)}</circle>')
            elif kind == "mean" and ok(y):
                half = 0.28 * pw / max(len(xcats or ()), 1)  # the bar spans about half a category's slot
                out.append(f'<line x1="{X(x) - half:.1f}" x2="{X(x) + half:.1f}" y1="{Y(y):.1f}" y2="{Y(y):.1f}" '
                           f'stroke="{color}" stroke-width="2.5">{tip(t)}</line>')
            elif kind == "range" and ok(y[0]) and ok(y[1]):
                if yrange:  # within the axis: a rate's mean - std may lie below 0
                    y = [min(max(v, yrange[0]), yrange[1]) for v in y]
                out.append(f'<line x1="{X(x):.1f}" x2="{X(x):.1f}" y1="{Y(y[0]):.1f}" y2="{Y(y[1]):.1f}" '
                           f'stroke="{color}" stroke-width="1.2">{tip(t)}</line>')
    # the legend, top right, one entry per labelled series: 110 px each, narrower when they would not fit the plot
    labelled = [s for s in series if s.get("label")]
    slot = min(110, (pw - 8) // max(len(labelled), 1))
    for i, s in enumerate(labelled):
        x = left + pw - 8 - slot * (len(labelled) - i) + 10  # the entry's colour box
        out.append(f'<rect x="{x}" y="{top - 15}" width="9" height="9" fill="{s["color"]}"/>'
                   f'<text x="{x + 12}" y="{top - 7}" fill="#333">{html.escape(s["label"])}</text>')
    return out


def svg_chart(series, *, width=480, height=210, log=False, vlines=(), hlines=(), xcats=None, xlabel="",
              yrange=None):
    """One small chart as an inline <svg> string. series: dicts with x, y (None or NaN points skipped), color, label,
    tips (optional tooltips) and kind: 'line', 'dots', 'mean' (a short bar) or 'range' (y holding (low, high) pairs).
    vlines: (x, color, label, dash) markers; hlines: (y, color, label) dashed lines; xcats: names of the categories
    x = 0, 1, ...; log: log-scale y; yrange: (low, high) of the y axis, by default the data's range."""
    fr = chart_frame(series, width, height, log, vlines, hlines, xcats, yrange)
    left, top, pw, ph, X, Y = fr.left, fr.top, fr.pw, fr.ph, fr.X, fr.Y
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="system-ui,sans-serif" font-size="11">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fbfbfb" stroke="#bbb"/>']
    # the y grid and its labels, the x axis (category names, or round steps) and its label
    for t, name in zip(*nice_ticks(10 ** fr.y0 if log else fr.y0, 10 ** fr.y1 if log else fr.y1, log)):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" stroke="#e4e4e4"/>'
                   f'<text x="{left - 4}" y="{Y(t) + 4:.1f}" text-anchor="end" fill="#555">{name}</text>')
    if xcats is not None:
        for i, name in enumerate(xcats):  # a long name on two lines (split at its last space), so names never overlap
            lines = name.rsplit(" ", 1) if len(name) > 8 and " " in name else [name]
            out.append(f'<text x="{X(i):.1f}" y="{top + ph + 14}" text-anchor="middle" fill="#333">' + "".join(
                f'<tspan x="{X(i):.1f}" dy="{13 * (j > 0)}">{html.escape(t)}</tspan>' for j, t in enumerate(lines))
                + "</text>")
    else:
        for t, name in zip(*nice_ticks(fr.x0, fr.x1, n=6)):
            if t != int(t) and all(float(x).is_integer() for x in fr.xs):
                continue  # steps are whole numbers
            out.append(f'<line x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#888"/>'
                       f'<text x="{X(t):.1f}" y="{top + ph + 15}" text-anchor="middle" fill="#555">{name}</text>')
    if xlabel:
        out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 4}" text-anchor="middle" fill="#333">'
                   f'{html.escape(xlabel)}</text>')
    for x, color, label, dash in vlines:  # markers first, so the data is drawn over them
        out.append(f'<line x1="{X(x):.1f}" x2="{X(x):.1f}" y1="{top}" y2="{top + ph}" stroke="{color}" '
                   f'stroke-width="1.5" stroke-dasharray="{dash}"><title>{html.escape(label)}</title></line>')
    for y, color, label in hlines:
        if fr.ok(y):
            out.append(f'<line x1="{left}" x2="{left + pw}" y1="{Y(y):.1f}" y2="{Y(y):.1f}" stroke="{color}" '
                       f'stroke-dasharray="6 3"><title>{html.escape(label)}</title></line>')
    out += chart_data(fr, series, xcats, yrange)
    out.append("</svg>")
    return "".join(out)


def html_page(title, body):
    """A self-contained page around `body` (HTML): one style block, no script, nothing fetched."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font:14px system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#1a202c}}
h1{{font-size:22px;margin-bottom:.2em}} h2{{font-size:17px;margin:1.2em 0 .4em}} .note{{color:#555}}
table{{border-collapse:collapse;margin:.5em 0}} td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th:first-child,td:first-child,.facts td{{text-align:left}} .grid{{display:flex;flex-wrap:wrap;gap:10px 18px}}
figure{{margin:0}} figcaption{{font-weight:600;margin:.3em 0 .1em}} .sig{{font-weight:700;color:#b7202e}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
{body}
</body></html>
"""


# -----------------------------------------------------------------------------
# topology.py's report.html (windows.py's too, with its cuts)

ROLE_COLORS = ["#999999", "#2b6cb0", "#c05621", "#2f855a"]  # prompt, explore, examine, response


def topology_page(path, cache, arr, report, cuts=None, doc=None, max_tokens=700):
    """Write report.html: one document's tokens coloured by discrepancy (jumps boxed, roles underlined, cuts as bars),
    the signal with its jumps, and the block channels. arr, report: the topology's; cuts: (row, title) pairs."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(cache.tokenizer_path) if os.path.isfile(cache.tokenizer_path) else None
    if doc is None:  # the document with the most jumps per token: the most to look at
        doc = max(report["per_document"], key=lambda r: r["jumps"] / r["length"])["doc"]
    a, b = cache.doc_range(doc)
    b = min(b, a + max_tokens)
    disc = np.asarray(arr["disc"][a:b], dtype=np.float64)
    jump = np.asarray(arr["jump"][a:b])
    f = np.asarray(arr["f"][a:b], dtype=np.float64)
    roles = np.asarray(cache.roles[a:b])
    top = np.percentile(disc, 99) or 1.0  # the colour scale saturates at the 99th percentile
    cut_at = {} if cuts is None else {int(c) - a: kind for c, kind in cuts if a <= c < b}
    spans, ids, shown = [], [int(t) for t in cache.tokens[a:b]], ""
    for i, t in enumerate(ids):
        if tok:  # the text this token adds; a token ending inside a UTF-8 character shows with the next one
            full = tok.decode(ids[:i + 1])
            piece, shown = ("", shown) if full.endswith("\ufffd") else (full[len(shown):], full)
        else:
            piece = f"[{t}]"
        if i in cut_at:
            spans.append(f'<b class="cut" title="{cut_at[i]}">|</b>')
        x = min(disc[i] / top, 1.0)  # red's opacity
        style = (f"background:rgba(220,38,38,{x:.2f});border-bottom:2px solid {ROLE_COLORS[roles[i]]}"
                 + (";outline:2px solid #111" if jump[i] else ""))
        text = html.escape(piece).replace("\n", "&#8629;<br>")
        spans.append(f'<span style="{style}" title="row {a + i}: f={f[i]:.3g} disc={disc[i]:.3g}">{text}</span>')
    # signal plot for the same stretch
    W, H = 1000, 160
    n = len(f)
    fy = lambda v: H - 10 - (v - f.min()) / (np.ptp(f) or 1.0) * (H - 20)  # f -> pixels, 10 px margins
    line = " ".join(f"{i * W / max(n - 1, 1):.1f},{fy(v):.1f}" for i, v in enumerate(f))
    marks = "".join(f'<line x1="{i * W / max(n - 1, 1):.1f}" x2="{i * W / max(n - 1, 1):.1f}" y1="0" y2="{H}" '
                    f'stroke="#dc2626" stroke-width="1"/>' for i in np.flatnonzero(jump))
    sig = (f'<svg width="{W}" height="{H}" style="background:#fafafa">{marks}'
           f'<polyline points="{line}" fill="none" stroke="#1a202c" stroke-width="1"/></svg>')
    # block channels over the whole stream (stacked: jump, smooth, drift), at most 400 bars
    blk = {c: np.asarray(arr[f"block_{c}"], dtype=np.float64) for c in ["jump", "smooth", "drift"]}
    nb = len(blk["jump"])
    g = max(1, -(-nb // 400))  # blocks per bar
    agg = {c: np.add.reduceat(v, np.arange(0, nb, g)) for c, v in blk.items()}
    peak = max((agg["jump"] + agg["smooth"] + agg["drift"]).max(), 1e-12)
    bw = W / len(agg["jump"])  # bar width in pixels
    bars = []
    for i in range(len(agg["jump"])):
        y = H
        for c, col in [("smooth", "#3182ce"), ("drift", "#805ad5"), ("jump", "#e53e3e")]:
            h = agg[c][i] / peak * (H - 10)
            y -= h
            bars.append(f'<rect x="{i * bw:.2f}" y="{y:.2f}" width="{max(bw - 0.3, 0.3):.2f}" height="{h:.2f}" '
                        f'fill="{col}"/>')
    chans = f'<svg width="{W}" height="{H}" style="background:#fafafa">{"".join(bars)}</svg>'
    head = "<tr><th>signal</th><th>mean delta</th><th>std delta</th><th>3-sigma firing rate</th><th>mean f</th></tr>"
    rows = "".join(f"<tr><td>{k}</td><td>{v['delta_mean']:.4g}</td><td>{v['delta_std']:.4g}</td>"
                   f"<td>{v['firing_rate']:.3%}</td><td>{v['f_mean']:.4g}</td></tr>"
                   for k, v in report["signals"].items())
    ch = report["channels"]
    cut_note = "; green bars = window cuts" if cuts is not None else ""
    page = f"""<!doctype html><meta charset="utf-8"><title>TKD topology</title>
<style>body{{font:14px system-ui,sans-serif;max-width:1040px;margin:2em auto;color:#1a202c}}
.tok{{font:13px/1.9 ui-monospace,monospace;white-space:pre-wrap}} .cut{{color:#0a0;font-size:20px}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:2px 8px}}</style>
<h1>Topology of the teacher stream</h1>
<p>{report['positions']:,} positions in {report['documents']:,} documents; signal <b>{report['signal']}</b>;
{report['jumps']:,} jumps ({report['jump_rate']:.2%}) above the threshold {report['threshold']:.4g}.
Variation: jump {ch['jump']:.4g}, smooth {ch['smooth']:.4g}, drift {ch['drift']:.4g} of {ch['tv']:.4g}.</p>
<h2>Document {doc}: tokens coloured by discrepancy</h2>
<p>Red = higher disc; boxed = jump (delta above threshold); underline = role (grey prompt, blue explore,
orange examine, green response){cut_note}. Hover a token for its values.</p>
<div class="tok">{''.join(spans)}</div>
<h2>The signal f over the same tokens (red lines: jumps)</h2>{sig}
<h2>Block channels over the stream (red jump, blue smooth, purple drift)</h2>{chans}
<h2>The signals compared on this stream</h2>
<table>{head}{rows}</table>
"""
    with atomic_write(path) as fh:
        fh.write(page)


# -----------------------------------------------------------------------------
# ablate.py's ablation.html


PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563")  # one colour per line


def ablation_page(result, labels, metrics, cell):
    """ablation.html: the table, then a chart per metric (each seed's paired difference to full TKD as a dot, their
    mean +- 2 standard errors, zero dashed), then the warm starts' held-out CE curves. labels: variant -> its name;
    metrics: metric -> (name, higher is better); cell(summary entry, digits) -> text."""
    summary, runs, cfg = result["summary"], result["runs"], result["config"]
    variants = [v for v in summary if v != "full"]
    seeds = cfg["seeds"]
    figs = []
    for k, (name, higher) in metrics.items():
        xs, ys, tips = [], [], []
        for i, v in enumerate(variants):
            for s, d in summary[v][k]["diffs"].items():
                xs.append(i + 0.12 * (seeds.index(int(s)) - (len(seeds) - 1) / 2))  # the seeds side by side
                ys.append(d)
                tips.append(f"{labels[v]} - full TKD, seed {s}: {fmt_num(d)}")
        means = [summary[v][k]["diff"] for v in variants]
        ses = [summary[v][k]["se"] for v in variants]
        rng = [(m - 2 * e, m + 2 * e) if m is not None and e is not None else (None, None) for m, e in zip(means, ses)]
        # per variant: +- 2 SE as a segment, the mean paired difference as a bar, then every seed as a dot
        series = [dict(x=list(range(len(variants))), y=rng, kind="range", color="#64748b"),
                  dict(x=list(range(len(variants))), y=means, kind="mean", color="#1e293b",
                       label="mean ± 2 SE", tips=[f"{labels[v]}: {cell(summary[v][k])}" for v in variants]),
                  dict(x=xs, y=ys, kind="dots", color="#2563eb", label="one seed", tips=tips)]
        chart = svg_chart(series, xcats=[labels[v] for v in variants], width=535, height=230,
                          hlines=[(0.0, "#dc2626", "no difference")])
        figs.append(f'<figure data-metric="{k}"><figcaption>{name}: variant - full TKD, same seed <span class="note">'
                    f'({"higher" if higher else "lower"} is better for the variant)</span></figcaption>'
                    f'{chart}</figure>')
    if result.get("pretrain"):  # the warm starts: held-out CE against the step, one line per seed
        series = [dict(x=[p for p, _ in c["ce_curve"]], y=[ce for _, ce in c["ce_curve"]], kind="line",
                       color=PALETTE[i % len(PALETTE)], label=f"seed {s}")
                  for i, (s, c) in enumerate(result["pretrain"].items())]
        figs.append('<figure data-metric="pretrain"><figcaption>the warm start: held-out CE of next-token training'
                    f'</figcaption>{svg_chart(series, width=535, height=230, log=True, xlabel="step")}</figure>')
    # a table cell breaks only between 'mean ± std' and '(difference)', never inside a number
    nowrap = lambda text: " (".join(f'<span style="white-space:nowrap">{html.escape(t)}</span>'
                                    for t in text.split(" ("))
    rows = "".join(  # the table: a row per variant, a cell per metric (red where beyond two standard errors)
        f"<tr><td>{labels[v]}</td>" + "".join(
            f'<td{" class=sig" if summary[v][k]["sig"] else ""}>'
            f'{nowrap(cell(summary[v][k], 3 if k == "layout" else 4))}</td>' for k in metrics) + "</tr>"
        for v in summary)
    m = result["machine"]
    length = f'{cfg["steps"]} optimizer steps' if cfg.get("steps") else f'{cfg.get("epochs", 0):g} epochs'
    start = ("each from its seed's warm start (next-token training, the curve below)" if cfg.get("init") == "warm"
             else "from random weights")
    body = (f'<p class="note">{len(runs)} runs: {len(summary)} variants x {len(seeds)} seeds '
            f'({", ".join(map(str, seeds))}), {start}, {length} of {cfg.get("batch_size", 2)} x {cfg["grad_accum"]} '
            f'windows a step, the same held-out documents '
            f'(split seed {cfg["split_seed"]}: {result["held_out"]["windows"]} windows, '
            f'{result["held_out"]["rows"]:,} rows, {result["held_out"]["prompts"]} prompts). '
            f'The runs took {fmt_time(result["runs_wall_s"])} ({fmt_time(result["runs_cpu_s"])} of CPU time; load '
            f'average {result["load_average"]["start"][1]:.1f} at the start) on {m["cpu"]} ({m["cores"]} cores, '
            f'{m["threads"]} torch threads, torch {m["torch"]}), commit {result.get("commit")}.</p>'
            f'<h2>Mean ± std over seeds (paired difference to full TKD, same seed; * and red: more than two standard '
            f'errors)</h2>'
            f'<table><tr><th>variant</th>' + "".join(f"<th>{metrics[k][0]}</th>" for k in metrics) +
            f'</tr>{rows}</table><h2>Every seed</h2><div class="grid">{"".join(figs)}</div>')
    return html_page("Does topology help? TKD ablation", body)


# -----------------------------------------------------------------------------
# train.py: report.html, one training run's curves, redrawn at each evaluation

REPORT_CHARTS = (  # (log key, title, log-scale y): one chart each, against the optimizer step
    ("ce", "CE (nats, T=1)", True), ("kl", "KL to the teacher (the run's --kd_mode and T)", True),
    ("loss", "training objective", True), ("top1", "top-1 agreement with the teacher", False),
    ("lr", "learning rate", False), ("alpha", "KD weight alpha", False), ("proof_weight", "proof weight", False))
EVAL_COLUMNS = ("ce", "kl", "top1", "tail_gap", "kl_jump", "kl_reasoning", "kl_response")


def training_page(steps, evals, total, title, facts, phase_of, max_points=1500):
    """One training run's page: REPORT_CHARTS against the step, phase boundaries and evaluations marked, and the
    evaluations as a table. steps, evals: train_log.jsonl's lines; facts: (name, value) pairs; phase_of(step, total)."""
    thin = steps[::max(1, -(-len(steps) // max_points))] + steps[-1:]  # at most ~max_points per line
    bounds = [s for s in range(1, total) if phase_of(s, total) != phase_of(s - 1, total)]
    vlines = [(e["eval_step"], "#94a3b8", f"evaluation at step {e['eval_step']}", "2 3") for e in evals]
    vlines += [(b, "#ea580c", f"curriculum phase {phase_of(b, total)} starts after step {b}", "6 3")
               for b in bounds]  # drawn over the evaluations' lines where both fall on one step
    figs = []
    for key, name, log in REPORT_CHARTS:
        series = []
        pts = [(e["step"], e.get(key)) for e in thin if e.get(key) is not None]
        if pts:
            series.append(dict(x=[p[0] for p in pts], y=[p[1] for p in pts], kind="line", color="#2563eb",
                               label="training step"))
        ev = [(e["eval_step"], e.get(key)) for e in evals if e.get(key) is not None]
        if ev:
            series.append(dict(x=[p[0] for p in ev], y=[p[1] for p in ev], kind="dots", color="#dc2626",
                               label="held-out", tips=[f"step {x}: {fmt_num(y)}" for x, y in ev]))
        if not series:  # e.g. no teacher: no KL, no agreement
            continue
        last = f"{fmt_num(pts[-1][1])} at step {pts[-1][0]}" if pts else ""
        figs.append(f'<figure data-metric="{key}"><figcaption>{html.escape(name)}'
                    f'<span class="note"> {last}</span></figcaption>'
                    f'{svg_chart(series, log=log, vlines=vlines, xlabel="optimizer step", width=530)}</figure>')
    cols = [c for c in EVAL_COLUMNS if any(e.get(c) is not None for e in evals)]
    rows = "".join(f"<tr><td>{e['eval_step']}</td>" + "".join(
        f"<td>{'' if e.get(c) is None else f'{e[c]:.4f}'}</td>" for c in cols) + "</tr>" for e in evals)
    done = steps[-1]["step"] if steps else 0
    head = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    body = (f'<p class="note">{done} of {total} optimizer steps. Orange dashed lines: curriculum phase '
            f'boundaries; grey dotted lines: held-out evaluations (red dots). Hover a dot or a line for its value.</p>'
            f'<table class="facts">{head}</table>'
            f'<div class="grid">{"".join(figs)}</div>'
            f'<h2>Held-out evaluations</h2><table class="evals"><tr><th>step</th>'
            + "".join(f"<th>{c}</th>" for c in cols) + f"</tr>{rows}</table>")
    return html_page(title, body)
