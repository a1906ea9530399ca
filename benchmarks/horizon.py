"""Long-horizon report: how sequential-editing runs evolve edit after edit (docs/benchmarks.md §7).

Reads the run directories of ``python -m mose_easyedit.experiments`` (complete or still running: it reads
``results.jsonl`` as far as it goes) and writes, for each scenario found (single-sequential, batch-sequential):

* the curves every ``eval_every`` edits: strict reliability, strict generalization, locality (on up to
  ``curve_facts`` of the facts edited so far), and the largest relative ‖W‖_F and κ₂ change and ‖W − W₀‖_F/‖W₀‖_F
  over the edited matrices at the nearest stability record;
* where each run crosses the first run (the reference, AlphaEdit in the long preset) on each metric;
* per window of edits: the facts' strict reliability right after their own edit (``immediate``: edits that failed
  when made) and the method's per-layer diagnostics averaged over the window (the input side's reach α/‖k‖, the
  fraction of requests reached and the plane angle; the output side's ‖R − I‖_F and its trust-region fraction);
* ``horizon_<scenario>.png``: the three retention curves, one marker and line style per run.

    python benchmarks/horizon.py runs/long/runs/AlphaEdit-single runs/long/runs/MOSE-single --out runs/long

``quality.py --preset long`` writes this report (``OUT/horizon.md``) after its runs.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Sequence

logger = logging.getLogger("benchmarks.horizon")

CURVE_METRICS = [("strict reliability", "strict_reliability"), ("strict generalization", "strict_generalization"),
                 ("locality", "locality")]
DIAGNOSTICS = [("α/‖k‖", "alpha_over_k"), ("reached", "reachable"), ("angle", "angle"),
               ("‖R − I‖_F", "rotation_distance"), ("trust t", "trust_fraction"), ("fit error", "fit_error")]
STYLES = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--"), ("X", "-.")]


def load(run_dir: Path) -> dict:
    """A run's label, batch size, records and (when complete) summary."""
    from mose_easyedit.experiments.checkpoint import read_json, read_jsonl

    config = {}
    if (run_dir / "config.yaml").is_file():
        import yaml
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    summary = read_json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else None
    records = read_jsonl(run_dir / "results.jsonl") if (run_dir / "results.jsonl").is_file() else []
    label = (summary or {}).get("label") or config.get("label") or run_dir.name
    batch = int((summary or {}).get("batch_size") or config.get("batch_size") or 1)
    return {"dir": run_dir, "label": label, "batch": batch, "records": records, "summary": summary,
            "planned": int(config.get("num_edits") or 0)}


def _drift(run: dict, record: dict) -> dict[str, float]:
    """Largest relative ‖W‖_F and κ₂ change and ‖W − W₀‖/‖W₀‖ at ``record``'s stability measurement, against the
    summary's originals (or, for a run still going, the first measurement: exact for rotations, after one edit
    for additive methods)."""
    stability = record.get("stability") or {}
    original = ((run["summary"] or {}).get("stability") or {}).get("original")
    if not original:
        first = next((r["stability"] for r in run["records"] if r.get("stability")), {})
        original = first
    norm = kappa = moved = 0.0
    for module, after in stability.items():
        before = original.get(module)
        if not before:
            continue
        norm = max(norm, abs(after["frobenius"] / before["frobenius"] - 1))
        kappa = max(kappa, abs(after["kappa"] / before["kappa"] - 1) if math.isfinite(after["kappa"]) else math.inf)
        moved = max(moved, after.get("delta_frobenius", 0.0) / before["frobenius"])
    return {"norm": norm, "kappa": kappa, "moved": moved}


def curve(run: dict) -> list[dict]:
    """One point per curve evaluation: the curve's metrics plus the drift at the latest stability record."""
    points, latest = [], None
    for record in run["records"]:
        if record.get("stability"):
            latest = record
        if record.get("curve"):
            point = {"edits": record["edits"], **record["curve"]}
            if latest is not None:
                point.update(_drift(run, latest))
            points.append(point)
    return points


def windows(run: dict, size: int) -> list[dict]:
    """Per window of ``size`` edits: mean immediate strict reliability and mean per-layer diagnostics."""
    out: dict[int, dict[str, list[float]]] = {}
    for record in run["records"]:
        end = math.ceil(record["edits"] / size) * size
        bucket = out.setdefault(end, {})
        immediate = record.get("immediate")
        if immediate:
            bucket.setdefault("immediate", []).append(immediate["strict_reliability"])
        for values in ((record.get("method") or {}).get("per_layer") or {}).values():
            for _, key in DIAGNOSTICS:
                if key in values:
                    bucket.setdefault(key, []).append(float(values[key]))
    return [{"edits": end, **{k: sum(v) / len(v) for k, v in bucket.items() if v}}
            for end, bucket in sorted(out.items())]


def _cell(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if value != 0 and abs(value) < 10 ** -digits:
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def crossings(runs: Sequence[dict], curves: Sequence[list[dict]]) -> list[str]:
    """For every run after the first: from which curve point on it is at or above the first run on each metric
    (and stays there), or 'never'."""
    lines = []
    reference, base = runs[0]["label"], {p["edits"]: p for p in curves[0]}
    for run, points in zip(runs[1:], curves[1:]):
        parts = []
        for title, key in CURVE_METRICS:
            shared = [(p["edits"], p.get(key), base[p["edits"]].get(key)) for p in points if p["edits"] in base]
            shared = [(e, a, b) for e, a, b in shared if a is not None and b is not None]
            if not shared:
                parts.append(f"{title}: no common curve point")
                continue
            from_here = None
            for index in range(len(shared)):
                if all(a >= b for _, a, b in shared[index:]):
                    from_here = shared[index][0]
                    break
            parts.append(f"{title}: " + (f"at or above from {from_here} edits on" if from_here is not None
                                         else "never at or above at the last point"
                                         if shared[-1][1] < shared[-1][2] else "not throughout"))
        lines.append(f"- {run['label']} against {reference}: " + "; ".join(parts))
    return lines


def scenario_report(runs: Sequence[dict], out: Path, name: str, window: int) -> str:
    curves = [curve(run) for run in runs]
    edits = sorted({p["edits"] for points in curves for p in points})
    lines = []
    for title, key in CURVE_METRICS + [("max relative ‖W‖_F change", "norm"), ("max relative κ₂ change", "kappa"),
                                       ("max ‖W − W₀‖_F/‖W₀‖_F", "moved")]:
        lines += [f"**{title}**", "", "| edits | " + " | ".join(r["label"] for r in runs) + " |",
                  "|---|" + "---|" * len(runs)]
        for e in edits:
            cells = []
            for points in curves:
                point = next((p for p in points if p["edits"] == e), None)
                cells.append(_cell(point.get(key) if point else None))
            lines.append(f"| {e} | " + " | ".join(cells) + " |")
        lines.append("")
    if len(runs) > 1:
        lines += ["**Crossings** (curve points shared with the first run)", ""] + crossings(runs, curves) + [""]
    for run in runs:
        rows = windows(run, window)
        keys = [(t, k) for t, k in [("strict rel. right after the edit", "immediate")] + DIAGNOSTICS
                if any(k in row for row in rows)]
        if not keys:
            continue
        lines += [f"**{run['label']}: per window of {window} edits** (diagnostics averaged over the window's edited "
                  f"layers)", "", "| edits | " + " | ".join(t for t, _ in keys) + " |", "|---|" + "---|" * len(keys)]
        lines += [f"| {row['edits'] - window + 1}–{row['edits']} | " + " | ".join(_cell(row.get(k)) for _, k in keys)
                  + " |" for row in rows]
        lines.append("")
    status = [f"{r['label']}: {r['records'][-1]['edits'] if r['records'] else 0}/{r['planned'] or '?'} edits"
              + ("" if r["summary"] else " (running or stopped)") for r in runs]
    plot(runs, curves, out / f"horizon_{name}.png")
    return "Runs: " + "; ".join(status) + ".\n\n" + "\n".join(lines) + f"\nCurves: `horizon_{name}.png`.\n"


def plot(runs: Sequence[dict], curves: Sequence[list[dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(5 * len(CURVE_METRICS), 4), sharex=True)
    for index, (run, points) in enumerate(zip(runs, curves)):
        marker, line = STYLES[index % len(STYLES)]
        for axis, (title, key) in zip(axes, CURVE_METRICS):
            shown = [(p["edits"], p[key]) for p in points if p.get(key) is not None]
            if shown:
                axis.plot(*zip(*shown), marker=marker, linestyle=line, label=run["label"], alpha=0.85)
    for axis, (title, _) in zip(axes, CURVE_METRICS):
        axis.set_title(title)
        axis.set_xlabel("edits")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def horizon_report(run_dirs: Sequence[Path], out: Path, window: int = 100) -> str:
    """The markdown report of ``run_dirs`` (grouped by batch size, in the order given); also written to
    ``out/horizon.md``."""
    runs = [load(Path(d)) for d in run_dirs]
    runs = [r for r in runs if r["records"]]
    if not runs:
        raise SystemExit("no run with any edit among the given directories")
    sections = []
    for batch in sorted({r["batch"] for r in runs}):
        group = [r for r in runs if r["batch"] == batch]
        name = "single" if batch == 1 else f"batch{batch}"
        title = "single-sequential" if batch == 1 else f"batch-sequential, {batch} facts per edit"
        sections.append(f"## {title}\n\n" + scenario_report(group, out, name, max(window, batch)))
    report = ("# Long-horizon report\n\nStrict metrics: the fraction of facts whose every target token is the "
              "argmax (EasyEdit's token accuracy = 1). Curve points evaluate up to `curve_facts` facts edited so "
              "far, evenly spaced.\n\n" + "\n".join(sections))
    out.mkdir(parents=True, exist_ok=True)
    (out / "horizon.md").write_text(report, encoding="utf-8")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories; the first is the reference")
    parser.add_argument("--out", type=Path, required=True, help="folder for horizon.md and horizon_*.png")
    parser.add_argument("--window", type=int, default=100, help="edits per window of the per-window tables")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.stdout.write(horizon_report(args.run_dirs, args.out, args.window))
    return 0


if __name__ == "__main__":
    sys.exit(main())
