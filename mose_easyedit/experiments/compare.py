"""Compare finished runs: a markdown table shaped like the paper's Table 1 plus overlaid curves.

    python -m mose_easyedit.experiments.compare runs/MOSE-... runs/AlphaEdit-... --out runs/compare

writes ``comparison.md`` (and prints it), ``comparison.json`` and ``compare_*.png`` into ``--out``. Columns:
Method | Model | Data | Edits | b | Reliability | Generalization | Locality | one column per general task (after
the last edit) | sec/edit. One "unedited" row per model gives the general tasks before editing.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Mapping, Sequence

from ..logs import setup_logging
from .checkpoint import atomic_write_json, atomic_write_text, read_json, read_jsonl

logger = logging.getLogger(__name__)

TASK_NAMES = {"rte": "RTE", "nq": "NQ", "samsum": "SAMSum", "sst2": "SST-2", "rte_ll": "RTE (LL)",
              "sst2_ll": "SST-2 (LL)", "wikitext_ppl": "WikiText PPL ↓"}


def load_run(run_dir: str | Path) -> tuple[list[dict], dict]:
    """``(records, summary)`` of a complete run; ``ValueError`` for a folder that holds none."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise ValueError(f"{run_dir}: no summary.json (not a run directory, or the run is not complete)")
    summary = read_json(summary_path)
    if not summary.get("complete"):
        raise ValueError(f"{run_dir}: the run is not complete")
    results = run_dir / "results.jsonl"
    records = read_jsonl(results) if results.is_file() else []
    return records, summary


def _number(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def comparison_table(summaries: Sequence[Mapping]) -> str:
    """The markdown table (Table 1 layout: one row per run, grouped by model, then data)."""
    tasks = []
    for summary in summaries:
        for task in ((summary.get("general") or {}).get("before") or {}):
            if task not in tasks:
                tasks.append(task)
    header = (["Method", "Model", "Data", "Edits", "b", "Reliability", "Generalization", "Locality"]
              + [TASK_NAMES.get(t, t) for t in tasks] + ["sec/edit"])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    ordered = sorted(summaries, key=lambda s: (s["model"], s["data"], s["num_edits"], s["batch_size"]))
    shown_before = set()
    for summary in ordered:
        general = summary.get("general") or {}
        before = general.get("before") or {}
        if before and summary["model"] not in shown_before:
            shown_before.add(summary["model"])
            cells = ["(unedited)", summary["model"], "", "0", "", "", "", ""]
            lines.append("| " + " | ".join(cells + [_number(before.get(t)) for t in tasks] + [""]) + " |")
        metrics = summary.get("metrics") or {}
        after = general.get("after") or {}
        method = (summary.get("label") or summary["method"]) + (f" ({summary['ablation']})"
                                                                if summary.get("ablation") else "")
        row = ([method, summary["model"], summary["data"], str(summary["num_edits"]), str(summary["batch_size"]),
                _number(metrics.get("reliability")), _number(metrics.get("generalization")),
                _number(metrics.get("locality"))]
               + [_number(after.get(t)) for t in tasks] + [_number((summary.get("time") or {}).get("sec_per_edit"), 2)])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def compare(run_dirs: Sequence[str | Path], out_dir: str | Path) -> str:
    """Write ``comparison.md``, ``comparison.json`` and the overlaid plots; returns the markdown."""
    from .plots import plot_compare

    runs = [load_run(d) for d in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = [summary for _, summary in runs]
    table = comparison_table(summaries)
    note = ("\nReliability / generalization / locality: EasyEdit token accuracy of every edited fact after the last "
            "edit (retention); locality against the unedited model. General tasks after the last edit. sec/edit: "
            "editing time per fact (keys + targets + update), evaluation excluded.\n")
    markdown = "# Sequential editing: comparison\n\n" + table + note
    atomic_write_text(out_dir / "comparison.md", markdown)
    atomic_write_json(out_dir / "comparison.json", [
        {"run_dir": str(d), **{k: s.get(k) for k in ("method", "label", "model", "data", "num_edits", "batch_size",
                                                     "ablation", "metrics", "general", "time")}}
        for d, s in zip(run_dirs, summaries)])
    plots = plot_compare(runs, out_dir)
    logger.info("comparison of %d run(s) written to %s (%s)", len(runs), out_dir, ", ".join(plots))
    return markdown


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mose_easyedit.experiments.compare",
                                     description="Table 1-style comparison of finished sequential-editing runs.")
    parser.add_argument("run_dirs", nargs="+", help="run directories (each with summary.json)")
    parser.add_argument("--out", required=True, help="folder for comparison.md, comparison.json and the plots")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        markdown = compare(args.run_dirs, args.out)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    sys.stdout.write(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
