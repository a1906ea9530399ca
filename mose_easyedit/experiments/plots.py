"""PNG plots of one run and of several runs overlaid (matplotlib, Agg backend: no display needed).

One run (``plot_run``): ``metrics.png`` (reliability / generalization / locality of the edited facts vs number of
edits, retention after the last edit marked), ``general.png`` (general tasks vs edits, paper Fig. 3),
``stability.png`` (‖W‖_F, κ₂, ‖W − W₀‖_F and σ_min of every edited layer vs edits, paper Fig. 2) and, for methods
that log them, ``diagnostics.png`` (MOSE's ρ and fit error per edit).

Several runs (``plot_compare``): the same curves with one line per run, the stability panels reduced to the worst
edited layer (largest ‖W‖_F / ‖W₀‖_F, κ₂ / κ₂(W₀), ‖W − W₀‖_F / ‖W₀‖_F).
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..general_tasks import PERPLEXITY_TASKS  # noqa: E402

logger = logging.getLogger(__name__)

METRICS = ("reliability", "generalization", "locality")
STABILITY_PANELS = (("frobenius", "‖W‖_F", False), ("kappa", "κ₂(W)", True),
                    ("delta_frobenius", "‖W − W₀‖_F", False), ("sigma_min", "σ_min(W)", False))


# one (marker, line style) per series, so identical curves stay visible under each other
SERIES_STYLES = (("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", (0, (5, 1))), ("P", (0, (3, 1, 1, 1))),
                 ("X", (0, (1, 2))), ("*", (0, (8, 2, 2, 2))), ("h", "-"), ("<", "--"), (">", "-."))


def series_style(index: int) -> dict:
    """Matplotlib keywords of the ``index``-th series: its own marker and line style (open markers, so a marker
    drawn over another shows both)."""
    marker, line = SERIES_STYLES[index % len(SERIES_STYLES)]
    return {"marker": marker, "linestyle": line, "ms": 5, "mfc": "none"}


def _edits_axis(ax) -> None:
    """An x axis that counts edits: whole numbers only (no '1.5 edits' on short runs)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("number of edits")


def layer_label(module: str) -> str:
    numbers = re.findall(r"\d+", module)
    return f"layer {numbers[0]}" if numbers else module


def _layer_order(module: str) -> tuple:
    numbers = re.findall(r"\d+", module)
    return (int(numbers[0]) if numbers else -1, module)


def run_label(summary: Mapping) -> str:
    label = f"{summary.get('label') or summary.get('method')} · {summary.get('model')} · b={summary.get('batch_size')}"
    if summary.get("ablation"):
        label += f" · {summary['ablation']}"
    return label


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def _stability_series(records: Sequence[Mapping], original: Mapping[str, Mapping]) -> dict[str, list]:
    """``{module: [(edits, stats), ...]}`` starting from the original weight at 0 edits."""
    series: dict[str, list] = {}
    previous = 0  # edits at the last tracked record: a layer that first shows up later was still W₀ there
    for record in records:
        for module, stats in (record.get("stability") or {}).items():
            if module not in series:
                base = dict(original.get(module, {}), delta_frobenius=0.0)
                anchors = sorted({0, previous}) if original.get(module) else []
                series[module] = [(edits, base) for edits in anchors]
            series[module].append((record["edits"], stats))
        if record.get("stability"):
            previous = record["edits"]
    return series


def _scale(ax, values: Sequence[float], log: bool) -> None:
    """Log scale for a quantity that spans a decade or more; plain ticks (no 9.98×10⁻¹ labels) for a narrow one."""
    positive = [v for v in values if v > 0]
    if log and positive and max(positive) / min(positive) >= 10:
        ax.set_yscale("log")
    else:
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)


# ------------------------------------------------------------------------------------------------------ one run
def plot_run(run_dir: str | Path, records: Sequence[Mapping], summary: Mapping) -> list[str]:
    """Write the run's plots into ``run_dir``; returns the file names written."""
    run_dir = Path(run_dir)
    written = []
    title = f"{run_label(summary)} · {summary.get('data')}"
    n = summary.get("num_edits")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    curve = summary.get("curve") or []
    for index, metric in enumerate(METRICS):
        points = [(c["edits"], c[metric]) for c in curve if metric in c]
        line = None
        if points:
            line, = ax.plot(*zip(*points), **series_style(index), label=f"{metric} (edited so far)")
        final = (summary.get("metrics") or {}).get(metric)
        if final is not None:
            ax.plot([n], [final], marker="*", ms=12, ls="none", color=line.get_color() if line else None,
                    label=f"{metric} after the last edit: {final:.3f}")
    ax.set(ylabel="score", ylim=(-0.02, 1.02), title=title)
    _edits_axis(ax)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    written.append(_save(fig, run_dir / "metrics.png"))

    general = (summary.get("general") or {}).get("curve") or []
    if general:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        tasks = [k for k in general[0] if k != "edits"]
        twin = ax.twinx() if any(t in PERPLEXITY_TASKS for t in tasks) else None
        for index, task in enumerate(tasks):
            points = [(g["edits"], g[task]) for g in general if task in g]
            target = twin if task in PERPLEXITY_TASKS else ax
            target.plot(*zip(*points), **series_style(index), color=f"C{index}",
                        label=f"{task} (right axis, lower is better)" if target is twin else task)
        ax.set(ylabel="score", ylim=(-0.02, 1.02), title=f"general abilities · {title}")
        if twin is not None:
            twin.set_ylabel("perplexity")
        _edits_axis(ax)
        handles = [h for a in (ax, twin) if a is not None for h in a.get_legend_handles_labels()[0]]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=8)
        ax.grid(alpha=0.3)
        written.append(_save(fig, run_dir / "general.png"))

    series = _stability_series(records, (summary.get("stability") or {}).get("original") or {})
    if series:
        fig, axes = plt.subplots(2, 2, figsize=(10, 7))
        for ax, (key, name, log) in zip(axes.flat, STABILITY_PANELS):
            shown = []
            for index, (module, points) in enumerate(sorted(series.items(), key=lambda kv: _layer_order(kv[0]))):
                xs = [e for e, s in points if key in s and math.isfinite(s[key])]
                ys = [s[key] for e, s in points if key in s and math.isfinite(s[key])]
                ax.plot(xs, ys, lw=1.2, **dict(series_style(index), ms=3), label=layer_label(module))
                shown += ys
            ax.set(ylabel=name)
            _edits_axis(ax)
            _scale(ax, shown, log)
            ax.grid(alpha=0.3)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=7)  # below the panels
        fig.suptitle(f"numerical stability of the edited layers · {title}", fontsize=10)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        written.append(_save(fig, run_dir / "stability.png"))

    diagnostics = [(r["edits"], layer, values) for r in records
                   for layer, values in ((r.get("method") or {}).get("per_layer") or {}).items()]
    if any("rho" in v for _, _, v in diagnostics):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, key in zip(axes, ("rho", "fit_error")):
            for layer in sorted({l for _, l, _ in diagnostics}, key=int):
                points = [(e, v[key]) for e, l, v in diagnostics if l == layer and key in v]
                if points:
                    ax.scatter(*zip(*points), s=8, label=f"layer {layer}")
            ax.set(ylabel=key)
            _edits_axis(ax)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7, ncol=2)
        fig.suptitle(f"per-edit diagnostics · {title}", fontsize=10)
        written.append(_save(fig, run_dir / "diagnostics.png"))
    logger.info("plots written to %s: %s", run_dir, ", ".join(written))
    return written


# ------------------------------------------------------------------------------------------------- comparison
def _worst_stability(records: Sequence[Mapping], original: Mapping[str, Mapping]) -> list[tuple[int, dict]]:
    """Per stability record: the largest ratio to the original over the edited modules."""
    out = [(0, {"norm": 1.0, "kappa": 1.0, "distance": 0.0})]
    for record in records:
        stats = record.get("stability") or {}
        ratios = {"norm": [], "kappa": [], "distance": []}
        for module, s in stats.items():
            base = original.get(module)
            if not base:
                continue
            ratios["norm"].append(s["frobenius"] / base["frobenius"])
            ratios["kappa"].append(s["kappa"] / base["kappa"])
            ratios["distance"].append(s.get("delta_frobenius", 0.0) / base["frobenius"])
        if ratios["norm"]:
            out.append((record["edits"], {k: max(v) for k, v in ratios.items()}))
    return out


def plot_compare(runs: Sequence[tuple[Sequence[Mapping], Mapping]], out_dir: str | Path) -> list[str]:
    """Overlaid curves of several runs (``(records, summary)`` pairs) into ``out_dir``."""
    out_dir = Path(out_dir)
    written = []
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for index, (records, summary) in enumerate(runs):
        curve = summary.get("curve") or []
        for ax, metric in zip(axes, METRICS):
            points = [(c["edits"], c[metric]) for c in curve if metric in c]
            line = None
            if points:
                line, = ax.plot(*zip(*points), **series_style(index), label=run_label(summary))
            final = (summary.get("metrics") or {}).get(metric)
            if final is not None:  # retention over every edited fact: a mark of its own, not a curve point
                ax.plot([summary["num_edits"]], [final], marker="*", ms=11, ls="none",
                        color=line.get_color() if line else None,
                        label=None if line else f"{run_label(summary)} (after the last edit)")
    for ax, metric in zip(axes, METRICS):
        ax.set(title=f"{metric} (★ all facts after the last edit)", ylim=(-0.02, 1.02))
        _edits_axis(ax)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score")
    axes[0].legend(fontsize=7)
    written.append(_save(fig, out_dir / "compare_metrics.png"))

    tasks = []  # in the comparison table's order: first seen, run by run
    for _, summary in runs:
        for point in ((summary.get("general") or {}).get("curve") or []):
            tasks += [k for k in point if k != "edits" and k not in tasks]
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.6), squeeze=False)
        for index, (records, summary) in enumerate(runs):
            curve = (summary.get("general") or {}).get("curve") or []
            for ax, task in zip(axes[0], tasks):
                points = [(g["edits"], g[task]) for g in curve if task in g]
                if points:
                    ax.plot(*zip(*points), **series_style(index), label=run_label(summary))
        for ax, task in zip(axes[0], tasks):
            if task in PERPLEXITY_TASKS:
                ax.set(title=f"{task} (lower is better)")
            else:
                ax.set(title=task, ylim=(-0.02, 1.02))
            _edits_axis(ax)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        written.append(_save(fig, out_dir / "compare_general.png"))

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("norm", "max ‖W‖_F / ‖W₀‖_F", False), ("kappa", "max κ₂(W) / κ₂(W₀)", True),
              ("distance", "max ‖W − W₀‖_F / ‖W₀‖_F", False))
    shown: dict[str, list[float]] = {key: [] for key, _, _ in panels}
    for index, (records, summary) in enumerate(runs):
        points = _worst_stability(records, (summary.get("stability") or {}).get("original") or {})
        for ax, (key, _, _) in zip(axes, panels):
            ys = [s[key] for _, s in points]
            ax.plot([e for e, _ in points], ys, lw=1.2, **dict(series_style(index), ms=3), label=run_label(summary))
            shown[key] += [y for y in ys if math.isfinite(y)]
    for ax, (key, name, log) in zip(axes, panels):
        ax.set(title=name)
        _edits_axis(ax)
        _scale(ax, shown[key], log)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    written.append(_save(fig, out_dir / "compare_stability.png"))
    return written
