"""Sweep of MOSE configurations against AlphaEdit: single-sequential edits on the embedded model, retention after
the last edit (docs/benchmarks.md §5).

Each configuration is ``NAME=METHOD[,key=value,...]`` (hyperparameter overrides of the method's shipped YAML for
the embedded model, values parsed as YAML). Every configuration edits the same CounterFact cases, from a fresh
model, one fact per call; after the last edit it reports reliability, generalization and locality (token
accuracy, EasyEdit's convention), their strict versions (the fraction of facts whose every target token is the
argmax; also right after each fact's own edit), the drift of ‖W‖_F and κ₂ and the largest ‖W − W₀‖_F / ‖W₀‖_F
over the edited matrices, target steps per edit and median seconds per edit. One JSON file per configuration goes
to ``--out`` (a configuration whose file exists is not run again); ``--report`` writes the table (``sweep.md``)
and the plot of strict reliability against locality (``tradeoff.png``) from the files there.

    python benchmarks/rotation_sweep.py --out runs/sweep --start 1000 --n 100 \\
        AlphaEdit=AlphaEdit MOSE=MOSE \
        'in-null_w=MOSE-input,input_subspace=null_w,layer_selection=false,layers=[4,5,6,7,8]'
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _embedded import DEFAULT_DATA, REPO  # noqa: E402

logger = logging.getLogger("rotation_sweep")


def parse_config(text: str) -> tuple[str, str, dict]:
    """``NAME=METHOD[,key=value,...]`` → (name, method, overrides); a value may be a YAML list with commas."""
    name, _, rest = text.partition("=")
    if not name or not rest:
        raise SystemExit(f"configuration {text!r}: expected NAME=METHOD[,key=value,...]")
    method, *pairs = _split_top_level(rest)
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"configuration {name}: {pair!r} is not key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, method, overrides


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def run_config(name: str, method: str, overrides: dict, cases: list[dict], args) -> dict:
    import mose_easyedit as me
    from mose_easyedit.experiments.stability import weight_stability
    from mose_easyedit.evaluation import cache_locality_reference, evaluate_requests, summarize, token_accuracy
    from mose_easyedit.methods import METHODS
    from mose_easyedit.modeling import read_weight

    spec = METHODS[method]
    base = spec.hparams_cls.from_hparams(REPO / "hparams" / method / "smollm2-135m.yaml")
    hp = spec.hparams_cls.from_dict({**base.to_dict(), **overrides}, source=f"configuration {name}")
    model, tok = me.load_default_model()
    reference = cache_locality_reference(model, tok, cases, progress=False)
    originals: dict[str, torch.Tensor] = {}
    seconds, steps, immediate = [], [], []
    session = None
    for index, case in enumerate(cases):
        start = time.perf_counter()
        _, weights_copy = spec.apply(model, tok, [case], hp, return_orig_weights=True)
        seconds.append(time.perf_counter() - start)
        for key, value in weights_copy.items():
            originals.setdefault(key[:-len(".weight")], value.detach().double().cpu())
        immediate.append(token_accuracy(model, tok, [case["prompt"]], [case["target_new"]], progress=False)[0])
        session = me.edit_history(model, method)
        steps.extend(session[-1].get("target_steps", []))
        if (index + 1) % 10 == 0:
            logger.info("%s: %d/%d edits, %.2f s/edit", name, index + 1, len(cases), statistics.median(seconds))
    records = evaluate_requests(model, tok, cases, reference, progress=False)
    summary = summarize(records)
    drift_norm = drift_kappa = moved = 0.0
    for module, w0 in originals.items():
        before = weight_stability(w0)
        after = weight_stability(read_weight(model, module).cpu(), w0)
        drift_norm = max(drift_norm, abs(after["frobenius"] / before["frobenius"] - 1))
        drift_kappa = max(drift_kappa, abs(after["kappa"] / before["kappa"] - 1))
        moved = max(moved, after["delta_frobenius"] / before["frobenius"])
    per_layer = [layer for entry in session for layer in entry.get("per_layer", {}).values()]
    fit, angle, rho, alpha, reachable = ([value for layer in per_layer for value in _as_list(layer.get(key))]
                                         for key in ("fit_error", "angle", "rho", "alpha_over_k", "reachable"))
    row = {
        "name": name, "method": method, "overrides": overrides, "n": len(cases), "start": args.start,
        "reliability": summary.get("reliability"), "generalization": summary.get("generalization"),
        "locality": summary.get("locality"),
        "strict_reliability": statistics.mean(r["reliability"] == 1.0 for r in records),
        "strict_reliability_when_edited": statistics.mean(score == 1.0 for score in immediate),
        "strict_generalization": statistics.mean(r.get("generalization", 0.0) == 1.0 for r in records),
        "norm_drift": drift_norm, "kappa_drift": drift_kappa, "max_moved": moved,
        "steps_per_edit": statistics.mean(steps) if steps else None,
        "seconds_per_edit": statistics.median(seconds),
        "median_fit_error": statistics.median(fit) if fit else None,
        "median_angle": statistics.median(angle) if angle else None,
        "median_rho": statistics.median(rho) if rho else None,
        "median_alpha_over_k": statistics.median(alpha) if alpha else None,
        "reachable_fraction": statistics.mean(reachable) if reachable else None,
    }
    logger.info("%s: %s", name, json.dumps(row))
    return row


def _as_list(value) -> list[float]:
    if value is None:
        return []
    return [float(v) for v in value] if isinstance(value, list) else [float(value)]


COLUMNS = [("strict rel", "strict_reliability"), ("… when edited", "strict_reliability_when_edited"),
           ("strict gen", "strict_generalization"),
           ("rel", "reliability"), ("gen", "generalization"), ("loc", "locality"),
           ("max ‖W−W₀‖/‖W₀‖", "max_moved"), ("‖W‖_F drift", "norm_drift"), ("κ₂ drift", "kappa_drift"),
           ("steps/edit", "steps_per_edit"), ("s/edit", "seconds_per_edit"), ("fit err", "median_fit_error"),
           ("ρ", "median_rho"), ("angle", "median_angle"), ("α/‖k‖", "median_alpha_over_k"),
           ("reached", "reachable_fraction")]


def _cell(value) -> str:
    if value is None:
        return "–"
    if abs(value) and abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def report(out: Path) -> None:
    rows = [json.loads(path.read_text()) for path in sorted(out.glob("*.json"))]
    if not rows:
        raise SystemExit(f"{out}: no configuration results to report")
    lines = ["| configuration | " + " | ".join(c for c, _ in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for row in sorted(rows, key=lambda r: (r["n"], r["name"])):
        lines.append(f"| {row['name']} (n={row['n']}) | " + " | ".join(_cell(row.get(k)) for _, k in COLUMNS) + " |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(7, 5))
    for row in rows:
        marker = "*" if row["method"] == "AlphaEdit" else "o"
        axes.scatter(row["locality"], row["strict_reliability"], marker=marker, s=120 if marker == "*" else 40)
        axes.annotate(f"{row['name']} ({row['n']})", (row["locality"], row["strict_reliability"]), fontsize=7,
                      xytext=(3, 3), textcoords="offset points")
    axes.set_xlabel("locality (agreement with the unedited model)")
    axes.set_ylabel("strict reliability (every target token the argmax)")
    axes.set_title("Retention after the last single-sequential edit")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "tradeoff.png", dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", help="NAME=METHOD[,key=value,...]")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--start", type=int, default=1000, help="first case (index into counterfact-edit.json)")
    parser.add_argument("--n", type=int, default=60, help="facts edited, one per call")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="only write the table and plot from --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        from mose_easyedit.data import load_counterfact
        cases = load_counterfact(args.data_dir / "counterfact" / "counterfact-edit.json", limit=args.n,
                                 start=args.start)
        for text in args.configs:
            name, method, overrides = parse_config(text)
            path = args.out / f"{name}-n{args.n}.json"
            if path.exists():
                logger.info("%s: already measured (%s)", name, path)
                continue
            row = run_config(name, method, overrides, cases, args)
            row["command"] = " ".join(sys.argv)
            path.write_text(json.dumps(row, indent=1))
    report(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
