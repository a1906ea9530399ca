"""The seven-method benchmark command (``benchmarks/quality.py``) end to end, on a tiny setting."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CORPUS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quality_benchmark_runs_reuses_and_reports(shared_data, tmp_path):
    """ROME (one fact at a time) and the MOSE-input variant, 2 single edits and one batch of 2, as Hydra multiruns on
    the joblib launcher: three runs (ROME's batch row is its single run), one report with both scenarios, the speed
    table (stages, target steps), the run-time line; a second invocation starts nothing."""
    if not CORPUS.exists():
        pytest.skip(f"corpus {CORPUS} is absent")
    out = tmp_path / "bench"
    command = [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--methods", "ROME", "MOSE-input",
               "--single", "2", "--batch", "2x1", "--general-subset", "2", "--curve-points", "1",
               "--stability-points", "1", "--curve-facts", "2", "--jobs", "2", "--out", str(out), "--",
               f"data_dir={shared_data}", "general_tasks=[sst2]", f"+hparams_overrides.mom2_dataset={CORPUS}",
               "+hparams_overrides.mom2_n_samples=20", "+hparams_overrides.v_num_grad_steps=4"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    runs = sorted(p.name for p in (out / "runs").iterdir() if p.is_dir())
    assert runs == ["MOSE-input-batch", "MOSE-input-single", "ROME-single"]
    assert "joblib" in (out / "single.log").read_text(encoding="utf-8").lower()  # Hydra's launcher ran them
    hparams = (out / "runs" / "MOSE-input-single" / "hparams.yaml").read_text(encoding="utf-8")
    assert "alg_name: MOSE-input" in hparams and "input_subspace: null_c" in hparams
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "## single-sequential, 2 edits" in report and "## batch-sequential, 1 steps of 2" in report
    batch = report[report.index("## batch-sequential"):]
    assert "ROME edits the facts of a call one after another" in batch
    metrics = batch[:batch.index("Numerical stability")]  # the first of the scenario's two tables
    rows = {line.split("|")[1].strip(): line for line in metrics.splitlines() if line.startswith(("| ROME", "| MOSE"))}
    assert rows["ROME"].split("|")[5].strip() == "1" and rows["MOSE-input"].split("|")[5].strip() == "2"  # b column
    single = report[:report.index("## batch-sequential")]
    speed = single[single.index("Numerical stability"):]
    header = next(line for line in speed.splitlines() if line.startswith("| Method"))
    expected = ["median s/edit", "× MEMIT", "keys s", "targets s", "update s", "target steps/edit"]
    assert [c.strip() for c in header.split("|")[5:11]] == expected
    for name in ("ROME", "MOSE-input"):
        cells = next(line for line in speed.splitlines() if line.startswith(f"| {name} |")).split("|")
        results = (out / "runs" / f"{name}-single" / "results.jsonl").read_text(encoding="utf-8")
        records = [json.loads(line) for line in results.splitlines()]
        steps = sum(sum(r["method"]["target_steps"]) for r in records) / 2
        assert float(cells[10]) == pytest.approx(steps, abs=0.05) and 1 <= steps <= 4  # v_num_grad_steps=4
        assert float(cells[5]) > 0 and float(cells[8]) > 0  # median s/edit, targets s
    walls = [json.loads((out / "runs" / r / "summary.json").read_text())["time"]["wall_seconds"] for r in runs]
    assert f"- runs: 3, {sum(walls) / 60:.1f} min of run wall time in all" in report
    for scenario in ("single", "batch"):
        assert (out / scenario / "compare_metrics.png").read_bytes()[:4] == b"\x89PNG"

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0
    for r, wall in zip(runs, walls):  # complete runs are not run again
        assert json.loads((out / "runs" / r / "summary.json").read_text())["time"]["wall_seconds"] == wall


def _synthetic_run(folder: Path, label: str, strict: list[float], locality: list[float], alpha: float | None):
    """A run directory as the runner writes it: config.yaml and results.jsonl, curve points every 2 edits."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"label: {label}\nbatch_size: 1\nnum_edits: {2 * len(strict)}\n")
    lines = []
    for index in range(2 * len(strict)):
        record = {"step": index + 1, "edits": index + 1, "immediate": {"strict_reliability": float(index % 2)},
                  "method": {"per_layer": {"4": {"alpha_over_k": alpha}} if alpha is not None else {}},
                  "stability": {"m": {"frobenius": 1.0 + 0.1 * index, "kappa": 2.0, "delta_frobenius": 0.1 * index}}}
        if index % 2 == 1:
            point = index // 2
            record["curve"] = {"strict_reliability": strict[point], "strict_generalization": 0.5,
                               "locality": locality[point]}
        lines.append(json.dumps(record))
    (folder / "results.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_horizon_report_tables_crossings_and_windows(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from horizon import horizon_report

    reference = _synthetic_run(tmp_path / "a", "AlphaEdit", [1.0, 0.9, 0.6], [0.8, 0.6, 0.5], None)
    rotation = _synthetic_run(tmp_path / "b", "MOSE-input", [0.9, 0.9, 0.7], [0.9, 0.5, 0.7], 0.4)
    report = horizon_report([reference, rotation], tmp_path / "out", window=2)
    rows = report[report.index("**strict reliability**"):].splitlines()
    assert rows[5] == "| 4 | 0.900 | 0.900 |" and rows[6] == "| 6 | 0.600 | 0.700 |"
    # strict reliability at or above the reference from 4 edits on; locality dips below it at 4, so from 6 on
    assert "strict reliability: at or above from 4 edits on" in report
    assert "locality: at or above from 6 edits on" in report
    norm = report[report.index("**max relative ‖W‖_F change**"):].splitlines()
    assert norm[6] == "| 6 | 0.500 | 0.500 |"  # (1 + 0.1·5) / 1 − 1, against the first measurement
    window = report[report.index("**MOSE-input: per window"):].splitlines()
    assert window[2].startswith("| edits | strict rel. right after the edit | α/‖k‖ |")
    assert window[4] == "| 1–2 | 0.500 | 0.400 |"
    assert (tmp_path / "out" / "horizon_single.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "horizon.md").read_text(encoding="utf-8") == report


def test_key_drift_orders_keys_by_edit_and_averages_per_window():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from key_drift import recorded_order, windowed_drift

    a, b = "model.layers.4.mlp.down_proj", "model.layers.5.mlp.down_proj"
    records = [{"edits": 2, "case_ids": [7, 3], "modules": [a, b]},   # a batch of two
               {"edits": 3, "case_ids": [9], "modules": [b]},
               {"edits": 4, "case_ids": [1], "modules": [a]}]
    assert recorded_order(records, a) == [(7, 1), (3, 2), (1, 4)]
    assert recorded_order(records, b) == [(7, 1), (3, 2), (9, 3)]
    recorded = torch.eye(3)
    now = recorded.clone()
    now[:, 2] *= 1.5                      # the key of edit 4 drifted by half its length, the others not at all
    W = torch.diag(torch.tensor([1.0, 1.0, 2.0]))
    assert windowed_drift(recorded, now, W, [1, 2, 4], 4, 2) == ["0.000 / 0.000", "0.500 / 0.500"]
    assert windowed_drift(recorded, now, W, [1, 2, 4], 4, 1) == ["0.000 / 0.000", "0.000 / 0.000", "–",
                                                                 "0.500 / 0.500"]
