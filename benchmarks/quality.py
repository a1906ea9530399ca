"""Quality and speed of MOSE against the six baselines, measured side by side in one run.

Runs the sequential-editing experiment for every method on the same CounterFact cases, single-sequential (N edits
of one fact) and batch-sequential (T steps of b facts), as Hydra multiruns (``python -m mose_easyedit.experiments
--multirun``: the joblib launcher on this machine, the submitit launcher on a SLURM cluster), then writes

    OUT/single/comparison.md, OUT/batch/comparison.md   Table-1-shaped metrics after the last edit + curves
    OUT/report.md                                       both tables, the numerical-stability and speed table
                                                        (‖W‖_F and κ₂ drift, median seconds per edit by stage,
                                                        target steps per edit, the ratio to MEMIT), EasyEdit's own
                                                        MEMIT and AlphaEdit when EASYEDIT_PATH names a checkout,
                                                        the machine and the command

The rows are the six baselines, MOSE (the paper's output side, ``hparams/MOSE/<model>.yaml``), every other MOSE
configuration shipped for the model (MOSE-input: ``hparams/MOSE-input/<model>.yaml``) and MOSE-OFT. Every run is
resumable: re-running the same command continues unfinished runs and skips finished ones.

    python benchmarks/quality.py --out runs/benchmark                    # defaults: fit 90 min per core on 2 CPUs
    python benchmarks/quality.py --preset long --out runs/long           # 1000 and 10 x 100, curve every 100 edits
    python benchmarks/quality.py --preset paper --model llama3-8b --out runs/llama3   # 4000 and 10 x 500, a GPU
    python benchmarks/quality.py --preset paper --model llama3-8b --launcher slurm --out runs/llama3
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
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))

METHODS = ["ROME", "MEMIT", "RECT", "EMMET", "PRUNE", "AlphaEdit", "MOSE", "MOSE-input", "MOSE-OFT"]
# Launch order (longest runs first, so the last job to start is a short one): the single-sequential run times of
# the published run (docs/benchmarks.md §1).
LONGEST_FIRST = ["MOSE-input", "MOSE", "AlphaEdit", "ROME", "PRUNE", "MEMIT", "RECT", "EMMET", "MOSE-OFT"]
# The default fits 90 minutes per core on 2 CPU cores with evaluation (docs/benchmarks.md §1); "paper" is the
# paper's scale (Tables 1 and 2: 4000 single-sequential edits, 500 steps of 10), for a GPU.
PRESETS = {
    "default": {"single": 100, "batch": "10x10", "general_subset": 40, "curve_points": 5, "curve_facts": 50},
    "paper": {"single": 4000, "batch": "10x500", "general_subset": 100, "curve_points": 8, "curve_facts": 200},
    # the paper's regime at the embedded model's scale (docs/benchmarks.md §7): a curve point every 100 edits
    "long": {"single": 1000, "batch": "10x100", "general_subset": 40, "curve_points": 10, "curve_facts": 100},
}
# the rows of a preset when --methods is not given (default: every method with hyperparameters for the model)
PRESET_METHODS = {"long": ["AlphaEdit", "MEMIT", "MOSE", "MOSE-input"]}
logger = logging.getLogger("benchmarks.quality")


def method_config(label: str, model: str):
    """``(method name, hyperparameter file)`` of a method config of the experiments (``conf/method/<label>``)."""
    from mose_easyedit.experiments.config import CONF_DIR
    from mose_easyedit.experiments.setup import hparams_path

    path = CONF_DIR / "method" / f"{label}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
        raise SystemExit(f"--methods: no method config {label!r}; known: {', '.join(known)}")
    cfg = OmegaConf.create({"model": {"id": model}, "hparams_file": None, "method": OmegaConf.load(path)})
    return str(cfg.method.name), hparams_path(cfg)


def one_fact_at_a_time(label: str, model: str) -> bool:
    from mose_easyedit.methods import METHODS as REGISTERED

    name, _ = method_config(label, model)
    return REGISTERED[name].one_fact_at_a_time if name in REGISTERED else False


def launch(name: str, num_edits: int, batch: int, labels: list[str], args, extra: list[str]) -> int:
    """One Hydra multirun of ``labels`` in one scenario; each run's directory is ``OUT/runs/<label>-<name>``."""
    steps = num_edits // batch
    # curve points: metrics every eval_every edits, norms / κ₂ every stability_every steps
    eval_every = args.eval_every if args.eval_every is not None else max(batch, num_edits // args.curve_points)
    eval_every -= eval_every % batch
    stability_every = max(1, steps // args.stability_points) if args.stability_points else 0
    order = sorted(labels, key=lambda m: LONGEST_FIRST.index(m) if m in LONGEST_FIRST else len(LONGEST_FIRST))
    launcher = [f"hydra/launcher={args.launcher}"]
    if args.launcher == "local":
        launcher.append(f"hydra.launcher.n_jobs={args.jobs}")
    command = [sys.executable, "-m", "mose_easyedit.experiments", "--multirun", *launcher,
               f"method={','.join(order)}", f"model={args.model}", "data=counterfact", f"num_edits={num_edits}",
               f"batch_size={batch}", f"hydra.sweep.dir={args.out / 'runs'}",
               f"hydra.sweep.subdir='${{label}}-{name}'", f"num_threads={args.threads}",
               f"general_subset_size={args.general_subset}", f"eval_every={eval_every}",
               f"general_every={args.general_every}", f"stability_every={stability_every}",
               f"curve_facts={args.curve_facts}", "progress=false", *extra]
    log = args.out / f"{name}.log"
    logger.info("%s: %d run(s) (%s), log in %s: %s", name, len(order), ", ".join(order), log, " ".join(command[1:]))
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT)
    if code:
        logger.error("%s: the multirun exited with status %d; see %s and each run's run.log", name, code, log)
    else:
        logger.info("%s: done in %.1f min", name, (time.perf_counter() - start) / 60)
    return code


def speed(run_dir: Path) -> dict[str, float]:
    """Median over edit calls of each stage's seconds per fact (targets: the target optimisation, or MOSE-OFT's
    training of its rotation), and the target steps per fact (Adam steps, each a forward and a backward pass)."""
    from mose_easyedit.experiments.checkpoint import read_jsonl

    records = [r for r in read_jsonl(run_dir / "results.jsonl") if "seconds" in r and r.get("case_ids")]

    def median(stages: tuple[str, ...]) -> float:
        return statistics.median(sum(r["seconds"].get(s, 0.0) for s in stages) / len(r["case_ids"]) for r in records)

    def steps(record: dict) -> float:
        method = record.get("method") or {}
        value = method.get("target_steps", method.get("steps", 0))
        return float(sum(value) if isinstance(value, list) else value)

    facts = sum(len(r["case_ids"]) for r in records)
    return {"edit": median(("edit",)), "keys": median(("keys",)), "targets": median(("targets", "train")),
            "update": median(("update",)), "steps": sum(steps(r) for r in records) / facts}


def stability_speed_table(summaries: list[dict], speeds: list[dict]) -> str:
    memit = next((sp["edit"] for s, sp in zip(summaries, speeds) if s.get("label", s["method"]) == "MEMIT"), None)
    lines = ["| Method | max rel. ‖W‖_F change | max rel. κ₂ change | max ‖W − W₀‖_F/‖W₀‖_F | median s/edit | "
             "× MEMIT | keys s | targets s | update s | target steps/edit | run wall min |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ratio = (lambda seconds: f"{seconds / memit:.2f}") if memit else (lambda seconds: "–")
    for s, sp in zip(summaries, speeds):
        st = s["stability"]
        lines.append(f"| {s.get('label', s['method'])} | {st['max_relative_norm_change']:.2e} | "
                     f"{st['max_relative_kappa_change']:.2e} | {st['max_relative_distance']:.3f} | "
                     f"{sp['edit']:.2f} | {ratio(sp['edit'])} | {sp['keys']:.2f} | {sp['targets']:.2f} | "
                     f"{sp['update']:.2f} | {sp['steps']:.1f} | {s['time']['wall_seconds'] / 60:.1f} |")
    return "\n".join(lines) + "\n"


def easyedit_table(rows: list[dict]) -> str:
    """EasyEdit's own implementations against ours, both through BaseEditor in one process on the same cases."""
    if not rows:
        return ""
    lines = ["EasyEdit's own implementation against ours through the same `BaseEditor`, one after the other in one "
             "process, on the first cases of the run (`benchmarks/easyedit_speed.py`; median seconds per fact of "
             "the apply call alone):", "", "| EasyEdit | s/edit | ours | s/edit | EasyEdit / ours | edits |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['label']} | {row['median_seconds']:.2f} | {row['ours_label']} | "
                     f"{row['ours_median_seconds']:.2f} | {row['median_seconds'] / row['ours_median_seconds']:.2f} "
                     f"| {row['edits']} |")
    return "\n".join(lines) + "\n\nSettings: " + rows[0]["note"] + ".\n"


def easyedit_rows(args, name: str, num_edits: int, batch: int) -> list[dict]:
    """EasyEdit's own MEMIT and AlphaEdit through BaseEditor on the same cases (``benchmarks/easyedit_speed.py``),
    when ``EASYEDIT_PATH`` names a checkout; the results already measured under ``OUT/easyedit`` otherwise."""
    folder = args.out / "easyedit"
    if os.environ.get("EASYEDIT_PATH") and not args.report_only and args.easyedit_edits:
        count = min(args.easyedit_edits, num_edits) // batch * batch
        for method in ("MEMIT", "AlphaEdit"):
            out = folder / f"{method}-{name}.json"
            if out.exists():
                continue
            command = [sys.executable, str(Path(__file__).with_name("easyedit_speed.py")), "--method", method,
                       "--model", args.model, "--num-edits", str(count), "--batch", str(batch),
                       "--threads", str(args.threads), "--out", str(out)]
            logger.info("EasyEdit's own %s (%s): %s", method, name, " ".join(command[1:]))
            with open(folder.with_suffix(".log"), "a", encoding="utf-8") as handle:
                folder.mkdir(parents=True, exist_ok=True)
                if subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT):
                    logger.error("EasyEdit's %s failed; see %s", method, folder.with_suffix(".log"))
    return [json.loads(p.read_text()) for p in sorted(folder.glob(f"*-{name}.json"))]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Arguments after -- are passed to every experiment as Hydra overrides.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="the scale: default (fits 90 min per core on 2 CPU cores), long (1000 and 10 x 100, "
                             "AlphaEdit, MEMIT, MOSE, MOSE-input) or paper (4000, 10 x 500)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"method configs (default: {' '.join(METHODS)}, those with hyperparameters for --model)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--single", type=int, default=None, help="single-sequential edits (0 = skip)")
    parser.add_argument("--batch", default=None, help="batch-sequential b x T ('0' = skip)")
    parser.add_argument("--general-subset", type=int, default=None, help="examples per general task")
    parser.add_argument("--general-every", type=int, default=0, help="general tasks every N edits (0: before/after)")
    parser.add_argument("--curve-points", type=int, default=None,
                        help="points of the reliability / generalization / locality curves per run")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="curve point every N edits (overrides --curve-points; 0: final only)")
    parser.add_argument("--curve-facts", type=int, default=None, help="facts evaluated at each curve point")
    parser.add_argument("--stability-points", type=int, default=20,
                        help="points of the ‖W‖_F / κ₂ curves per run (0: only before and after)")
    parser.add_argument("--launcher", choices=["local", "slurm"], default="local",
                        help="Hydra launcher: local processes (joblib) or a SLURM cluster, one GPU per run (submitit)")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)), help="local runs in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--easyedit-edits", type=int, default=10,
                        help="edits of EasyEdit's own MEMIT and AlphaEdit per scenario when EASYEDIT_PATH is set "
                             "(0 = skip)")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark"))
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the runs already complete under --out; start nothing")
    args, extra = parser.parse_known_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = [e for e in extra if e.startswith("--") and e != "--"]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, [e for e in extra if e != "--"]


def main(argv=None) -> int:
    args, extra = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.methods is None:
        candidates = PRESET_METHODS.get(args.preset, METHODS)
        args.methods = [m for m in candidates if method_config(m, args.model)[1].is_file()]
        skipped = sorted(set(METHODS) - set(args.methods))
        if skipped:
            logger.info("no hyperparameters for %s on %s: skipped", ", ".join(skipped), args.model)
    scenarios = []
    if args.single:
        scenarios.append(("single", args.single, 1))
    if args.batch != "0":
        b, steps = (int(x) for x in args.batch.lower().split("x"))
        scenarios.append(("batch", b * steps, b))
    # a method that edits the facts of a call one after another makes the same edits in both scenarios: its
    # batch run would repeat its single run, so the single run stands for both
    reused = {m for m in args.methods if one_fact_at_a_time(m, args.model) and len(scenarios) == 2
              and scenarios[1][1] == scenarios[0][1]}
    args.out.mkdir(parents=True, exist_ok=True)
    runs_dir = args.out / "runs"
    started, failed = time.perf_counter(), 0
    if not args.report_only:
        for name, n, b in scenarios:
            labels = [m for m in args.methods if not (name == "batch" and m in reused)]
            failed += launch(name, n, b, labels, args, extra) != 0

    from mose_easyedit.experiments.compare import compare

    sections, walls = [], {}
    for name, n, b in scenarios:
        dirs = [runs_dir / f"{m}-{'single' if (name == 'batch' and m in reused) else name}" for m in args.methods]
        missing = [d.name for d in dirs if not (d / "summary.json").exists()]
        dirs = [d for d in dirs if (d / "summary.json").exists()]
        title = f"single-sequential, {n} edits" if b == 1 else f"batch-sequential, {n // b} steps of {b}"
        if not dirs:
            sections.append(f"## {title}\n\nNo run complete.\n")
            continue
        table = "\n".join(line for line in compare(dirs, args.out / name).splitlines()
                          if not line.startswith("# "))  # compare's own title
        summaries = [json.loads((d / "summary.json").read_text()) for d in dirs]
        walls.update({d.name: s["time"] for d, s in zip(dirs, summaries)})
        note = f"Not complete (not in the tables): {', '.join(missing)}.\n\n" if missing else ""
        same = [m for m in args.methods if m in reused and name == "batch"]
        if same:
            note += (f"{', '.join(same)} edits the facts of a call one after another, so its batch-sequential run "
                     f"makes exactly the edits of its single-sequential run: its row here is that run (b = 1).\n\n")
        ee = easyedit_table(easyedit_rows(args, name, n, b))
        sections.append(f"## {title}\n\n{note}After the last edit (retention), EasyEdit's convention; general "
                        f"tasks on {args.general_subset} examples each.\n\n{table}\n### Numerical stability and "
                        f"speed\n\nSeconds are medians over edit calls, per fact; target steps are Adam steps per "
                        f"fact (MOSE-OFT: steps training its rotation).\n\n"
                        f"{stability_speed_table(summaries, [speed(d) for d in dirs])}\n{ee}\n"
                        f"Curves: `{name}/compare_*.png`.\n")
    import torch

    total = sum(t["wall_seconds"] for t in walls.values())
    slots = args.jobs if args.launcher == "local" else len(walls) or 1
    resumed = sorted(name for name, t in walls.items() if t.get("resumes"))
    compute = (f"- runs: {len(walls)}, {total / 60:.1f} min of run wall time in all "
               f"({total / 60 / slots:.1f} min per parallel slot at {slots} run(s) in parallel)"
               + (f"; resumed after an interruption: {', '.join(resumed)}" if resumed else "") + "\n")
    header = (f"# Benchmark: {', '.join(args.methods)} on {args.model}\n\n"
              f"- command: `python benchmarks/quality.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n"
              f"- machine: {platform.machine()}, {os.cpu_count()} CPU core(s), {platform.platform()}; "
              f"torch {torch.__version__}, {args.threads} thread(s) per run, {slots} run(s) in parallel\n"
              + compute
              + ("- report written from the complete runs (--report-only)\n\n" if args.report_only else
                 f"- wall time of this invocation: {(time.perf_counter() - started) / 60:.1f} min\n\n"))
    report = header + "\n".join(sections)
    if args.preset == "long":  # the curves every 100 edits, crossings and per-window diagnostics
        from horizon import horizon_report

        dirs = [runs_dir / f"{m}-{name}" for name, _, _ in scenarios for m in args.methods]
        horizon_report([d for d in dirs if (d / "results.jsonl").is_file()], args.out)
        report += "\nThe curves every 100 edits, crossings and per-window diagnostics: `horizon.md`.\n"
    (args.out / "report.md").write_text(report, encoding="utf-8")
    print(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
