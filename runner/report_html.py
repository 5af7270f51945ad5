"""The run as one web page, ``report.html``, from ``lineage.json`` alone.

It shows the verdict, validation accuracy against training FLOPs for the
growth path and the baseline, the lineage tree and every stage's trials.
Inline CSS and SVG only, no scripts, fonts or links, so the page opens
offline, as an attachment or straight out of object storage. The public
helpers (``esc``, ``fmt``, ``plot``, ``flops_plot``, ``lineage_tree``,
``verdict_box``) also draw the live page of :mod:`runner.dashboard`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from html import escape
from math import ceil, floor, log10

from runner import storage
from runner.errors import RunnerError
from runner.report import load_lineage
from runner.growth.variants import path_curve

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
          "#17becf", "#7f7f7f"]
GROWTH, BASELINE = "#1f77b4", "#ff7f0e"
CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{margin-bottom:4px}h2{margin-top:32px;border-bottom:1px solid #ddd}
small,.muted{color:#666}
.verdict{border:2px solid #2a7;background:#eefaf2;padding:8px 14px;border-radius:6px}
.verdict.none{border-color:#c33;background:#fdf0f0}
table{border-collapse:collapse;font-size:13px}
td,th{padding:3px 8px;border-bottom:1px solid #e4e4e4;text-align:left}
th{white-space:nowrap}
tr.won{background:#e8f6ec;font-weight:600}tr.failed{color:#a33}
.dot{display:inline-block;width:10px;height:10px;border-radius:5px;margin-right:6px}
.path{font:11px monospace;color:#555;word-break:break-all}
.tree ul{list-style:none;margin:0 0 0 10px;padding-left:22px;border-left:1px solid #aaa}
.tree>ul{border:none}.tree li{position:relative;margin:6px 0}
.tree ul ul li::before{content:"";position:absolute;left:-22px;top:14px;width:18px;
border-top:1px solid #aaa}
.node{display:inline-block;border:1px solid #bbb;border-radius:5px;padding:2px 8px;
background:#fafafa;color:#777}
.node.won{border:2px solid #2a7;background:#eefaf2;color:#222}
svg.plot text{font:11px sans-serif;fill:#333}svg .frame{fill:none;stroke:#999}
svg .grid{stroke:#eee}svg .mark{stroke:#999;stroke-dasharray:4 3}
"""


def esc(value) -> str:
    return escape(str(value), quote=True)


def fmt(value, spec: str = ".4f") -> str:
    return "–" if value is None else format(value, spec)


@dataclass
class _Frame:
    """Maps data to pixels inside the plot area of an SVG."""

    left: float
    top: float
    width: float
    height: float
    xmax: float
    ylo: float
    yhi: float

    def x(self, v: float) -> float:
        return round(self.left + self.width * v / self.xmax, 1)

    def y(self, v: float) -> float:
        return round(self.top + self.height * (self.yhi - v) / (self.yhi - self.ylo), 1)


def _ticks(lo: float, hi: float, integer: bool = False) -> list[float]:
    """About five round values (1, 2 or 5 times a power of ten) in [lo, hi]."""
    raw = (hi - lo) / 5 or 1.0
    base = 10 ** floor(log10(raw))
    step = next(base * m for m in (1, 2, 5, 10) if base * m >= raw)
    step = max(step, 1) if integer else step
    first, last = ceil(lo / step - 1e-9), floor(hi / step + 1e-9)
    return [k * step for k in range(first, last + 1)]


def _axes(fr: _Frame, xlabel: str, ylabel: str, integer_x: bool) -> list[str]:
    out = [f'<rect class="frame" x="{fr.left}" y="{fr.top}" width="{fr.width}" '
           f'height="{fr.height}"/>']
    bottom = fr.top + fr.height
    for t in _ticks(0, fr.xmax, integer_x):
        out.append(f'<line class="grid" x1="{fr.x(t)}" x2="{fr.x(t)}" y1="{fr.top}" '
                   f'y2="{bottom}"/><text x="{fr.x(t)}" y="{bottom + 14}" '
                   f'text-anchor="middle">{round(t, 6):g}</text>')
    for t in _ticks(fr.ylo, fr.yhi):
        out.append(f'<line class="grid" x1="{fr.left}" x2="{fr.left + fr.width}" '
                   f'y1="{fr.y(t)}" y2="{fr.y(t)}"/><text x="{fr.left - 5}" '
                   f'y="{fr.y(t) + 4}" text-anchor="end">{round(t, 6):g}</text>')
    mid_y = fr.top + fr.height / 2
    return out + [
        f'<text x="{fr.left + fr.width / 2}" y="{bottom + 32}" text-anchor="middle">'
        f'{esc(xlabel)}</text>',
        f'<text transform="translate(14 {mid_y}) rotate(-90)" text-anchor="middle">'
        f'{esc(ylabel)}</text>']


def _lines(fr: _Frame, label: str, color: str, points: list) -> list[str]:
    xy = " ".join(f"{fr.x(x)},{fr.y(y)}" for x, y in points)
    out = [f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{xy}">'
           f'<title>{esc(label)}</title></polyline>']
    return out + [f'<circle cx="{fr.x(x)}" cy="{fr.y(y)}" r="3" fill="{color}">'
                  f'<title>{esc(label)}: {y:.4f} at {x:g}</title></circle>'
                  for x, y in points]


def plot(series: list, xlabel: str, ylabel: str, marks=(), legend: bool = True,
          width: int = 760, height: int = 320, integer_x: bool = False) -> str:
    """An SVG line plot of ``series``, each (label, colour, [(x, y)]), with
    ``marks`` as labelled vertical guides at (x, label)."""
    series = [s for s in series if s[2]]
    if not series:
        return '<p class="muted">no epochs reported yet</p>'
    xs = [x for s in series for x, _ in s[2]] + [x for x, _ in marks]
    ys = [y for s in series for _, y in s[2]]
    ylo = floor(min(ys) * 10) / 10
    fr = _Frame(56, 14, width - 56 - (190 if legend else 16), height - 14 - 44,
                max(xs) * 1.03 or 1.0, ylo, max(ceil(max(ys) * 10) / 10, ylo + 0.1))
    out = _axes(fr, xlabel, ylabel, integer_x)
    for x, label in marks:
        out.append(f'<line class="mark" x1="{fr.x(x)}" x2="{fr.x(x)}" y1="{fr.top}" '
                   f'y2="{fr.top + fr.height}"/><text x="{fr.x(x) + 3}" '
                   f'y="{fr.top + 12}">{esc(label)}</text>')
    for i, (label, color, points) in enumerate(series):
        out += _lines(fr, label, color, points)
        if legend:
            lx, ly = fr.left + fr.width + 14, fr.top + 10 + 18 * i
            out.append(f'<line x1="{lx}" x2="{lx + 20}" y1="{ly}" y2="{ly}" '
                       f'stroke="{color}" stroke-width="2"/>'
                       f'<text x="{lx + 26}" y="{ly + 4}">{esc(label)}</text>')
    return (f'<svg class="plot" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">{"".join(out)}</svg>')


def _winner_trial(stage: dict) -> dict:
    return next((t for t in stage["trials"] if t["name"] == stage.get("winner")), {})


def flops_plot(lineage: dict) -> str:
    stages, base = lineage.get("stages", []), lineage.get("baseline")
    curve = path_curve(stages)
    base_epochs = _winner_trial(base).get("epochs", []) if base else []
    most = max([p["flops"] for p in curve] + [e["flops"] for e in base_epochs] + [0])
    unit, name = (1e12, "TFLOP") if most >= 1e12 else (1e9, "GFLOP")
    # Each stage starts where its ancestors' winners stopped spending.
    starts = [0.0] + [s["path_compute"]["flops"] for s in stages[:-1]]
    series = [("growth path", GROWTH, [(p["flops"] / unit, p["val_acc"])
                                       for p in curve]),
              ("baseline (from scratch)", BASELINE,
               [(e["flops"] / unit, e["val_acc"]) for e in base_epochs])]
    marks = [(x / unit, s["name"]) for x, s in zip(starts, stages)]
    return plot(series, f"cumulative training FLOPs ({name})",
                 "validation accuracy", marks)


def _node(stage: dict, trial: dict) -> str:
    won = trial["name"] == stage.get("winner")
    best = trial.get("best") or {}
    bits = [trial.get("variant", {}).get("op", "?"), f"val {fmt(best.get('val_acc'))}"]
    if won:
        bits.append(f"test {fmt((stage.get('test') or {}).get('accuracy'))}")
    tip = stage.get("checkpoint") if won else best.get("checkpoint", trial.get("error"))
    path = f'<div class="path">{esc(stage.get("checkpoint"))}</div>' if won else ""
    return (f'<span class="node{" won" if won else ""}" title="{esc(tip or "")}">'
            f'<b>{esc(stage["name"])}</b> {esc(trial["name"])}<br>'
            f'<small>{esc(" · ".join(bits))}</small>{path}</span>')


def _items(stage: dict, below: str) -> str:
    won = stage.get("winner")
    return "".join(f"<li>{_node(stage, t)}{below if t['name'] == won else ''}</li>"
                   for t in stage["trials"])


def lineage_tree(lineage: dict) -> str:
    """Nested lists: each stage's trials hang under the winner they grew from;
    the baseline is a root of its own."""
    stages, base = lineage.get("stages", []), lineage.get("baseline")
    below = ""
    for stage in reversed(stages[1:]):
        below = f"<ul>{_items(stage, below)}</ul>"
    roots = (_items(stages[0], below) if stages else "") + \
        (_items(base, "") if base else "")
    return f'<div class="tree"><ul>{roots}</ul></div>' if roots else ""


def _row(stage: dict, trial: dict, color: str) -> str:
    best, c = trial.get("best") or {}, trial.get("compute") or {}
    t = trial.get("transfer") or {}
    drift = "" if t.get("acc_child") is None else (
        f"{fmt(t.get('acc_parent'), '.3f')} → {fmt(t['acc_child'], '.3f')}, "
        f"max |Δlogit| {fmt(t.get('max_abs_logit_diff'), '.3g')}")
    status = trial.get("status", "")
    if trial.get("error"):
        status += f": {trial['error']}"
    cells = [trial.get("variant", {}).get("op"), trial.get("lr"),
             f"{fmt(best['val_acc'])} (epoch {best['epoch']})" if best else "–",
             len(trial.get("epochs") or []), status,
             fmt(c.get("flops") and c["flops"] / 1e9, ",.1f"),
             fmt(c.get("cpu_s"), ".0f"), fmt(c.get("wall_s"), ".0f"), drift]
    cls = "won" if trial["name"] == stage.get("winner") else (
        "" if trial.get("epochs") else "failed")
    return (f'<tr class="{cls}"><td><span class="dot" style="background:{color}">'
            f'</span>{esc(trial["name"])}</td>'
            + "".join(f"<td>{esc(v)}</td>" for v in cells) + "</tr>")


def _summary(stage: dict) -> str:
    parent = stage.get("parent")
    origin = f"from {parent['stage']}/{parent['trial']}" if parent else "from scratch"
    if stage.get("budget_flops"):
        origin += f", budget {stage['budget_flops'] / 1e12:.2f} TFLOP"
    test, path = stage.get("test") or {}, stage.get("path_compute") or {}
    per_class = ", ".join(f"{k} {v:.3f}" for k, v in test.get("per_class", {}).items())
    return (f'<h2>stage {esc(stage.get("index", ""))} {esc(stage["name"])} '
            f'<small>{esc(origin)}</small></h2><p>winner <b>{esc(stage.get("winner"))}'
            f'</b>: val_acc {fmt(stage.get("val_acc"))}, test accuracy '
            f'{fmt(test.get("accuracy"))} on {esc(test.get("images", "–"))} images '
            f'({esc(per_class)}); path compute so far '
            f'{fmt(path.get("flops", 0) / 1e12, ".2f")} TFLOP, '
            f'{fmt(path.get("cpu_s"), ".0f")} cpu-s, '
            f'{fmt(path.get("wall_s"), ".0f")} s</p>')


def _stage(stage: dict) -> str:
    """Summary, trial table and val_acc per epoch; a trial's colour is the same
    in its table row and its line."""
    colors = [COLORS[i % len(COLORS)] for i in range(len(stage["trials"]))]
    head = "".join(f"<th>{esc(h)}</th>" for h in (
        "trial", "op", "lr", "best val_acc", "epochs", "status", "GFLOP", "cpu-s",
        "wall-s", "transfer: val acc parent → child, drift"))
    rows = "".join(_row(stage, t, c) for t, c in zip(stage["trials"], colors))
    series = [(t["name"], c, [(e["epoch"], e["val_acc"]) for e in t.get("epochs", [])])
              for t, c in zip(stage["trials"], colors)]
    return (_summary(stage) + f"<table><tr>{head}</tr>{rows}</table>"
            + plot(series, "epoch", "validation accuracy", legend=False, width=520,
                    height=240, integer_x=True))


def _header(lineage: dict) -> str:
    data = lineage.get("data") or {}
    counts = "; ".join(
        f"{split} {sum(c.values())} ({', '.join(f'{k} {v}' for k, v in c.items())})"
        for split, c in data.get("counts", {}).items())
    state = "finished" if lineage.get("finished") else "unfinished"
    return (f'<h1>run {esc(lineage.get("run", "?"))}</h1><p>storage '
            f'<span class="path">{esc(lineage.get("storage", "?"))}</span> · '
            f'<b>{state}</b><br>data: {esc(counts or "–")}; '
            f'{esc(data.get("skipped", 0))} files skipped</p>')


def verdict_box(v: dict | None) -> str:
    if not v:
        return '<p class="muted">no baseline in this run (yet), so no verdict</p>'
    frac = v.get("fraction")
    share = "never matched" if frac is None else \
        f"{100 * frac:.0f}% of the baseline's FLOPs"
    return (f'<div class="verdict{" none" if frac is None else ""}"><p><b>verdict:</b> '
            f'{esc(v.get("text", ""))}</p><p>growth needed {esc(share)}; baseline best '
            f'val_acc {fmt(v.get("baseline_best_val_acc"))}, growth best val_acc '
            f'{fmt(v.get("growth_best_val_acc"))}</p></div>')


def render_html(lineage: dict) -> str:
    """The whole page for one run's lineage, as a string."""
    stages = lineage.get("stages", []) + (
        [lineage["baseline"]] if lineage.get("baseline") else [])
    body = [_header(lineage), verdict_box(lineage.get("verdict")),
            "<h2>validation accuracy vs cumulative training FLOPs</h2>",
            flops_plot(lineage), "<h2>lineage</h2>", lineage_tree(lineage),
            *map(_stage, stages)]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<title>run {esc(lineage.get("run", "?"))}</title><style>{CSS}</style>'
            f'</head><body>{"".join(body)}</body></html>\n')


def write_html(run: str, out: str | None = None) -> str:
    """Render ``<run>/lineage.json`` to ``out`` (default ``<run>/report.html``);
    return the path or URI written."""
    root = storage.resolve(run)
    page = render_html(load_lineage(run))
    target = storage.resolve(out) if out else root.join("report.html")
    try:
        storage.write_bytes(target, page.encode("utf-8"))
    except OSError as err:  # no permission, a folder or a file in the way
        reason = os.strerror(err.errno) if err.errno else str(err).strip()
        raise RunnerError(f"cannot write the report page {out or target.uri}: "
                          f"{reason}") from err
    return target.uri
