"""The studies' PNG plots: bars with error bars, lines with error bars, a scatter.

matplotlib draws them when it is installed (requirements.txt); where it is not (a bare GPU image)
a plain PIL rendering of the same chart is written instead, so a study never fails on its plots.
Every chart takes an optional noise floor (mean, std), drawn as a grey band.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from patch_forcing import pictures

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")


def _pyplot():
    try:
        import matplotlib  # optional: plots fall back to PIL without it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional: as above

        return plt
    except ImportError:
        return None


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def bars(path, labels, means, stds, *, title: str, ylabel: str, floor=None, backend: str = "auto") -> None:
    """One bar per label with its std as an error bar."""
    means, stds = [_num(m) for m in means], [_num(s) if s is not None else 0.0 for s in stds]
    plt = _pyplot() if backend == "auto" else None
    if plt is None:
        return _pil(path, title, ylabel, "", [(labels, means, stds, "bar")], floor)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(labels) + 2), 4))
    ax.bar(range(len(labels)), means, yerr=stds, capsize=4, color=[COLORS[i % len(COLORS)] for i in range(len(labels))])
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    _finish(plt, fig, ax, path, title, ylabel, "", floor)


def lines(path, series: dict, *, title: str, xlabel: str, ylabel: str, floor=None, logx: bool = False,
          backend: str = "auto") -> None:
    """series: label -> (xs, means, stds); one line with error bars per label."""
    plt = _pyplot() if backend == "auto" else None
    if plt is None:
        data = [(list(xs), [_num(m) for m in ms], [_num(s) if s is not None else 0.0 for s in ss], label)
                for label, (xs, ms, ss) in series.items()]
        return _pil(path, title, ylabel, xlabel, data, floor)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, (xs, ms, ss)) in enumerate(series.items()):
        ax.errorbar(xs, [_num(m) for m in ms], yerr=[_num(s) if s is not None else 0.0 for s in ss], label=label,
                    marker="o", capsize=3, color=COLORS[i % len(COLORS)])
    if logx:
        ax.set_xscale("log", base=2)
        xs_all = sorted({x for xs, _, _ in series.values() for x in xs})
        ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
    ax.legend(fontsize=8)
    _finish(plt, fig, ax, path, title, ylabel, xlabel, floor)


def scatter(path, x, y, *, title: str, xlabel: str, ylabel: str, backend: str = "auto") -> None:
    """A log-log scatter of positive values (e.g. predicted variance against squared error)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = (x > 0) & (y > 0)
    x, y = x[keep], y[keep]
    plt = _pyplot() if backend == "auto" else None
    if plt is None:
        return _pil(path, title, f"log10 {ylabel}", f"log10 {xlabel}",
                    [(list(np.log10(x)), list(np.log10(y)), None, "points")], None)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.scatter(x, y, s=3, alpha=0.3, color=COLORS[0], rasterized=True)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _finish(plt, fig, ax, path, title, ylabel, xlabel, None)


def _finish(plt, fig, ax, path, title, ylabel, xlabel, floor) -> None:
    if floor is not None and floor[0] is not None:
        m, s = floor[0], floor[1] or 0.0
        ax.axhspan(m - s, m + s, color="0.85", zorder=0)
        ax.axhline(m, color="0.4", ls="--", lw=1, label="noise floor (real held-out)")
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- PIL fallback
W, H, LEFT, RIGHT, TOP, BOTTOM = 640, 420, 70, 20, 30, 90


def _pil(path, title, ylabel, xlabel, data, floor) -> None:
    """data: [(xs or labels, ys, stds or None, kind)], kind 'bar', 'points' or a line label."""
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    ys = [v for _, y, s, _ in data for v, e in zip(y, s or [0] * len(y)) for v in (v - e, v + e) if math.isfinite(v)]
    if floor is not None and floor[0] is not None:
        ys += [floor[0] - (floor[1] or 0), floor[0] + (floor[1] or 0)]
    lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if data and data[0][3] == "bar":
        lo = min(lo, 0.0)
    hi = hi + (0.05 * (hi - lo) or 1.0)
    bar = data and data[0][3] == "bar"
    xs = list(range(len(data[0][0]))) if bar else [float(v) for d in data for v in d[0]]
    x_lo, x_hi = (-0.6, len(xs) - 0.4) if bar else (min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1)
    sx = lambda v: LEFT + (v - x_lo) / (x_hi - x_lo) * (W - LEFT - RIGHT)  # noqa: E731
    sy = lambda v: H - BOTTOM - (v - lo) / (hi - lo) * (H - TOP - BOTTOM)  # noqa: E731
    if floor is not None and floor[0] is not None:
        m, s = floor[0], floor[1] or 0.0
        draw.rectangle([LEFT, sy(m + s), W - RIGHT, sy(m - s)], fill=(220, 220, 220))
        draw.line([LEFT, sy(m), W - RIGHT, sy(m)], fill=(100, 100, 100))
    draw.rectangle([LEFT, TOP, W - RIGHT, H - BOTTOM], outline="black")
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        draw.text((4, sy(v) - 5), f"{v:.3g}", fill="black")
    for i, (xv, y, s, kind) in enumerate(data):
        color = COLORS[i % len(COLORS)]
        if kind == "bar":
            for j, (label, m, e) in enumerate(zip(xv, y, s)):
                if math.isfinite(m):
                    draw.rectangle([sx(j - 0.35), sy(m), sx(j + 0.35), sy(max(lo, 0.0))], fill=COLORS[j % len(COLORS)])
                    draw.line([sx(j), sy(m - e), sx(j), sy(m + e)], fill="black", width=2)
                draw.text((sx(j) - 3 * len(str(label)), H - BOTTOM + 6 + 12 * (j % 2)), str(label), fill="black")
        elif kind == "points":
            for a, b in zip(xv, y):
                draw.point((sx(a), sy(b)), fill=color)
        else:
            pts = [(sx(a), sy(b)) for a, b in zip(xv, y) if math.isfinite(b)]
            if len(pts) > 1:
                draw.line(pts, fill=color, width=2)
            for (a, b), e in zip(zip(xv, y), s):
                if math.isfinite(b):
                    draw.line([sx(a), sy(b - e), sx(a), sy(b + e)], fill=color)
            draw.text((LEFT + 8, TOP + 6 + 12 * i), str(kind), fill=color)
    if not bar:
        for v in sorted(set(xs)):
            draw.text((sx(v) - 6, H - BOTTOM + 6), f"{v:.3g}", fill="black")
    draw.text((LEFT, 8), title, fill="black")
    draw.text((LEFT, H - 30), f"x: {xlabel}   y: {ylabel}" if xlabel else f"y: {ylabel}", fill="black")
    pictures.save_png(path, np.asarray(img))
