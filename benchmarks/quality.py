"""Quality and speed of MOSE against the six baselines, measured side by side in one run.

Runs the sequential-editing experiment (``python -m mose_easyedit.experiments``) for every method on the same
CounterFact cases, single-sequential (N edits of one fact) and batch-sequential (T steps of b facts), then writes

    OUT/single/comparison.md, OUT/batch/comparison.md   Table-1-shaped metrics after the last edit + curves
    OUT/report.md                                       both tables, the numerical-stability and speed table
                                                        (‖W‖_F and κ₂ drift, seconds per edit by stage and the
                                                        ratio to MEMIT), the machine and the command

Every run is resumable: re-running the same command continues unfinished runs and skips finished ones.

    python benchmarks/quality.py --out docs/benchmarks/smollm2            # N = 300, 10 x 30, all seven methods
    python benchmarks/quality.py --single 4000 --batch 10x500 --model llama3-8b --jobs 1 --out runs/llama3
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

METHODS = ["ROME", "MEMIT", "RECT", "EMMET", "PRUNE", "AlphaEdit", "MOSE"]
logger = logging.getLogger("benchmarks.quality")


def run_one(method: str, scenario: str, num_edits: int, batch: int, args, extra: list[str]) -> Path:
    run_dir = args.out / "runs" / f"{method}-{scenario}"
    steps = num_edits // batch
    # curve points: metrics every eval_every edits, norms / κ₂ every stability_every steps
    eval_every = args.eval_every if args.eval_every is not None else max(batch, num_edits // args.curve_points)
    stability_every = max(1, steps // args.stability_points) if args.stability_points else 0
    command = [sys.executable, "-m", "mose_easyedit.experiments", f"method={method}", f"model={args.model}",
               "data=counterfact", f"num_edits={num_edits}", f"batch_size={batch}", f"output_dir={run_dir}",
               f"num_threads={args.threads}", f"general_subset_size={args.general_subset}",
               f"eval_every={eval_every}", f"general_every={args.general_every}",
               f"stability_every={stability_every}", f"curve_facts={args.curve_facts}", "progress=false", *extra]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    logger.info("start %s %s: %s", method, scenario, " ".join(command[1:]))
    start = time.perf_counter()
    with open(run_dir.with_suffix(".log"), "a", encoding="utf-8") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise RuntimeError(f"{method} {scenario} failed (exit {code}); see {run_dir.with_suffix('.log')}")
    logger.info("done %s %s in %.0f s", method, scenario, time.perf_counter() - start)
    return run_dir


def one_fact_at_a_time(method: str) -> bool:
    from mose_easyedit.methods import METHODS as REGISTERED

    return REGISTERED[method].one_fact_at_a_time if method in REGISTERED else False


def median_seconds_per_edit(run_dir: Path) -> float:
    """Median over edit calls of the call's seconds divided by the facts it edited."""
    records = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines() if line.strip()]
    per_edit = [r["seconds"]["edit"] / len(r["case_ids"]) for r in records if "seconds" in r and "case_ids" in r]
    return statistics.median(per_edit)


def stability_speed_table(summaries: list[dict], medians: list[float]) -> str:
    memit = next((m for s, m in zip(summaries, medians) if s["method"] == "MEMIT"), None)
    lines = ["| Method | max rel. ‖W‖_F change | max rel. κ₂ change | max ‖W − W₀‖_F/‖W₀‖_F | median s/edit | "
             "× MEMIT | keys s | targets s | update s | run wall min |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s, median in zip(summaries, medians):
        st, t = s["stability"], s["time"]
        ratio = f"{median / memit:.2f}" if memit else "–"
        lines.append(f"| {s['method']} | {st['max_relative_norm_change']:.2e} | "
                     f"{st['max_relative_kappa_change']:.2e} | {st['max_relative_distance']:.3f} | "
                     f"{median:.2f} | {ratio} | {t['keys_per_edit']:.2f} | {t['targets_per_edit']:.2f} | "
                     f"{t['update_per_edit']:.2f} | {t['wall_seconds'] / 60:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Arguments after -- are passed to every experiment as Hydra overrides.")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--single", type=int, default=300, help="single-sequential edits (0 = skip)")
    parser.add_argument("--batch", default="10x30", help="batch-sequential b x T ('0' = skip)")
    parser.add_argument("--general-subset", type=int, default=40, help="examples per general task")
    parser.add_argument("--general-every", type=int, default=0, help="general tasks every N edits (0: before/after)")
    parser.add_argument("--curve-points", type=int, default=6,
                        help="points of the reliability / generalization / locality curves per run")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="curve point every N edits (overrides --curve-points; 0: final only)")
    parser.add_argument("--curve-facts", type=int, default=60, help="facts evaluated at each curve point")
    parser.add_argument("--stability-points", type=int, default=30,
                        help="points of the ‖W‖_F / κ₂ curves per run (0: only before and after)")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)), help="runs in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark"))
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the runs already complete under --out; start nothing")
    args, extra = parser.parse_known_args(argv)
    extra = [e for e in extra if e != "--"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    scenarios = []
    if args.single:
        scenarios.append(("single", args.single, 1))
    if args.batch != "0":
        b, steps = (int(x) for x in args.batch.lower().split("x"))
        scenarios.append(("batch", b * steps, b))
    started = time.perf_counter()
    jobs = [(m, name, n, b) for name, n, b in scenarios for m in args.methods]
    # a method that edits the facts of a call one after another makes the same edits in both scenarios: its
    # batch run would repeat its single run, so the single run stands for both
    reused = {(m, "batch"): args.out / "runs" / f"{m}-single" for m in args.methods
              if one_fact_at_a_time(m) and args.single and len(scenarios) == 2 and scenarios[1][1] == args.single}
    runs = [job for job in jobs if job[:2] not in reused]
    if args.report_only:
        done = {job[:2]: args.out / "runs" / f"{job[0]}-{job[1]}" for job in runs}
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {job[:2]: pool.submit(run_one, *job, args, extra) for job in runs}
            done = {key: future.result() for key, future in futures.items()}
    run_dirs = [done.get(job[:2]) or reused[job[:2]] for job in jobs]
    wall = time.perf_counter() - started

    from mose_easyedit.experiments.compare import compare

    sections = []
    for name, n, b in scenarios:
        dirs = [d for d, (_, s, _, _) in zip(run_dirs, jobs) if s == name]
        missing = [d.name for d in dirs if not (d / "summary.json").exists()]
        dirs = [d for d in dirs if (d / "summary.json").exists()]
        title = f"single-sequential, {n} edits" if b == 1 else f"batch-sequential, {n // b} steps of {b}"
        if not dirs:
            sections.append(f"## {title}\n\nNo run complete.\n")
            continue
        table = "\n".join(line for line in compare(dirs, args.out / name).splitlines()
                          if not line.startswith("# "))  # compare's own title
        summaries = [json.loads((d / "summary.json").read_text()) for d in dirs]
        medians = [median_seconds_per_edit(d) for d in dirs]
        note = f"Not complete (not in the tables): {', '.join(missing)}.\n\n" if missing else ""
        same = [m for (m, s), _ in reused.items() if s == name]
        if same:
            note += (f"{', '.join(same)} edits the facts of a call one after another, so its batch-sequential run "
                     f"makes exactly the edits of its single-sequential run: its row here is that run (b = 1).\n\n")
        sections.append(f"## {title}\n\n{note}After the last edit (retention), EasyEdit's convention; general "
                        f"tasks on {args.general_subset} examples each.\n\n{table}\n### Numerical stability and "
                        f"speed\n\n{stability_speed_table(summaries, medians)}\nCurves: `{name}/compare_*.png`.\n")
    import torch

    walls = {d.name: json.loads((d / "summary.json").read_text())["time"] for d in set(done.values())
             if (d / "summary.json").exists()}
    total = sum(t["wall_seconds"] for t in walls.values())
    resumed = sorted(name for name, t in walls.items() if t.get("resumes"))
    compute = (f"- runs: {len(walls)}, {total / 60:.1f} min of run wall time in all "
               f"({total / 60 / args.jobs:.1f} min per parallel slot at {args.jobs} run(s) in parallel)"
               + (f"; resumed after an interruption: {', '.join(resumed)}" if resumed else "") + "\n")
    header = (f"# Benchmark: {', '.join(args.methods)} on {args.model}\n\n"
              f"- command: `python benchmarks/quality.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n"
              f"- machine: {platform.machine()}, {os.cpu_count()} CPU core(s), {platform.platform()}; "
              f"torch {torch.__version__}, {args.threads} thread(s) per run, {args.jobs} run(s) in parallel\n"
              + compute
              + ("- report written from the complete runs (--report-only)\n\n" if args.report_only else
                 f"- wall time of this invocation: {wall / 60:.1f} min\n\n"))
    report = header + "\n".join(sections)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(report, encoding="utf-8")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
