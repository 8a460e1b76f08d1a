"""Report figures: matplotlib (Agg, never pyplot's global state) rendered to base64 PNG for inline <img> tags."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

COLORS = ("#3b6fb6", "#e07b39", "#4c9a5b", "#b5485d", "#7d5ba6", "#8c6d46", "#d17fb5", "#6d6d6d")


def short(name: str, width: int = 26) -> str:
    """A display label: the last component of a path, cut to `width` characters."""
    label = Path(name).name if "/" in name else name
    return label if len(label) <= width else label[: width - 1] + "…"


def labels(names: Sequence[str]) -> list[str]:
    """Short labels, made unique by their position when two would read the same."""
    out = [short(n) for n in names]
    return [f"{i + 1}:{label}" if out.count(label) > 1 else label for i, label in enumerate(out)]


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def to_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def win_rates(section: dict) -> str:
    """Left: matrix of row-over-column win rates. Right: each pair (in listing order) with its 95% interval."""
    names = section["versions"]
    lab = labels(names)
    k = len(names)
    fig = _figure(11, max(3.2, 0.9 + 0.55 * k))
    heat, forest = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.3]})
    m = np.array([[np.nan if v is None else v for v in row] for row in section["matrix"]], dtype=float)
    heat.imshow(m, cmap="RdBu", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if not np.isnan(m[i, j]):
                heat.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=10)
    heat.set_xticks(range(k), lab, rotation=30, ha="right", fontsize=8)
    heat.set_yticks(range(k), lab, fontsize=8)
    heat.set_title("win rate of row over column", fontsize=10)
    order = {n: i for i, n in enumerate(names)}
    pairs = [p for p in section["pairs"] if order[p["a"]] < order[p["b"]]]
    y = np.arange(len(pairs))[::-1]
    for yi, p in zip(y, pairs):
        forest.errorbar(p["win_rate"], yi, xerr=[[p["win_rate"] - p["low"]], [p["high"] - p["win_rate"]]], fmt="o",
                        color=COLORS[0], capsize=4)
    forest.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    forest.set_yticks(y, [f"{short(p['a'], 18)} vs {short(p['b'], 18)}" for p in pairs], fontsize=8)
    forest.set(xlim=(0, 1), xlabel="win rate (ties count half), 95% bootstrap interval over prompts")
    forest.set_title("pairwise win rates", fontsize=10)
    return to_data_uri(fig)


def ranking(section: dict) -> str:
    names = section["versions"]
    order = np.argsort(section["scores"])
    fig = _figure(7, max(2.2, 0.6 + 0.45 * len(names)))
    ax = fig.subplots()
    s, lo, hi = (np.array(section[k])[order] for k in ("scores", "low", "high"))
    ax.errorbar(s, range(len(names)), xerr=[s - lo, hi - s], fmt="o", color=COLORS[1], capsize=4)
    ax.set_yticks(range(len(names)), [labels(names)[i] for i in order], fontsize=8)
    ax.axvline(0, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="Bradley–Terry log-strength (mean 0), 95% bootstrap interval")
    return to_data_uri(fig)


def per_family(section: dict, title: str) -> str:
    """Grouped bars: mean score per task family, one bar per version."""
    names = list(section)
    families = sorted({f for v in section.values() for f in v["per_family"]})
    fig = _figure(11, 3.6)
    ax = fig.subplots()
    width = 0.8 / max(1, len(names))
    x = np.arange(len(families))
    for i, (name, label) in enumerate(zip(names, labels(names))):
        values = [section[name]["per_family"].get(f, np.nan) for f in families]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=label, color=COLORS[i % len(COLORS)])
    ax.set_xticks(x, families, fontsize=9)
    ax.set(ylabel=title)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(4, len(names)), frameon=False)
    return to_data_uri(fig)


def lengths(section: dict) -> str:
    names = list(section)
    fig = _figure(7, 3.2)
    ax = fig.subplots()
    top = max([max(v["values"], default=0) for v in section.values()] + [1])
    bins = np.linspace(0, top + 1, min(30, top + 2))
    for i, (name, label) in enumerate(zip(names, labels(names))):
        ax.hist(section[name]["values"], bins=bins, histtype="step", linewidth=2, label=label,
                color=COLORS[i % len(COLORS)])
    ax.set(xlabel="response length (tokens)", ylabel="responses")
    ax.legend(fontsize=8)
    return to_data_uri(fig)


def kl(section: dict) -> str:
    per = section["per_version"]
    names = list(per)
    fig = _figure(7, max(2.2, 0.6 + 0.45 * len(names)))
    ax = fig.subplots()
    v = np.array([per[n]["kl"] for n in names])
    lo, hi = np.array([per[n]["low"] for n in names]), np.array([per[n]["high"] for n in names])
    ax.barh(range(len(names)), v, xerr=[v - lo, hi - v], color=COLORS[2], capsize=4)
    ax.set_yticks(range(len(names)), labels(names), fontsize=8)
    ax.axvline(0, color="grey", linewidth=1)
    ax.set(xlabel=f"KL to {short(section['reference'])} (nats per response)")
    return to_data_uri(fig)


def curves(section: dict) -> str:
    """One panel per metric (up to 8), one line per version."""
    keys: list[str] = []
    for per in section.values():
        keys += [k for k in per if k not in keys]
    keys = keys[:8]
    cols = min(4, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig = _figure(11, 2.6 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, key in zip(axes, keys):
        for i, (name, per) in enumerate(section.items()):
            if key in per:
                xs, ys = zip(*per[key])
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, color=COLORS[i % len(COLORS)],
                        label=short(name))
            if key == "loss" and per.get("eval_loss"):  # held-out beside training loss: the overfitting picture
                xs, ys = zip(*per["eval_loss"])
                ax.plot(xs, ys, linestyle="--", marker="x", color=COLORS[i % len(COLORS)],
                        label=f"{short(name)} (eval)")
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes[len(keys):]:
        ax.set_axis_off()
    if len(section) > 1 or any(per.get("eval_loss") for per in section.values()):
        axes[0].legend(fontsize=7)
    return to_data_uri(fig)


def log_weights(section: dict) -> Optional[str]:
    names = [n for n in section if "log_hist" in section[n]]
    if not names:
        return None
    fig = _figure(7, 3)
    ax = fig.subplots()
    for i, name in enumerate(names):
        hist = section[name]["log_hist"]
        ax.stairs(hist["counts"], hist["edges"], label=short(name), color=COLORS[i % len(COLORS)], linewidth=2)
    ax.set(xlabel="log w (mean-1 scale, before truncation)", ylabel="pairs", title="importance log-weights")
    ax.legend(fontsize=8)
    return to_data_uri(fig)


def monitor_keys(evaluations: list[dict]) -> list[str]:
    """The monitor plot's series: the overall ones. Gold by task family ("gold/<family>") would bury them, and its
    fall is a flag of its own."""
    return [k for k in dict.fromkeys(k for e in evaluations for k in e) if k != "step" and "/" not in k]


def monitor(evaluations: list[dict]) -> str:
    """Proxy reward against the gold-type rewards at each evaluation: diverging lines are the hacking signal."""
    fig = _figure(7, 3)
    ax = fig.subplots()
    for i, key in enumerate(monitor_keys(evaluations)):
        points = [(e["step"], e[key]) for e in evaluations if isinstance(e.get(key), (int, float))]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=key, color=COLORS[i % len(COLORS)])
    ax.set(xlabel="step", ylabel="reward", title="proxy vs gold at each evaluation")
    ax.legend(fontsize=8)
    return to_data_uri(fig)
