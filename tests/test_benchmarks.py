"""The seven-method benchmark command (``benchmarks/quality.py``) end to end, on a tiny setting."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CORPUS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quality_benchmark_runs_reuses_and_reports(shared_data, tmp_path):
    """ROME (one fact at a time) and MOSE, 2 single edits and one batch of 2: three runs (ROME's batch row is its
    single run), one report with both scenarios, the run-time line; a second invocation starts nothing."""
    if not CORPUS.exists():
        pytest.skip(f"corpus {CORPUS} is absent")
    out = tmp_path / "bench"
    command = [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--methods", "ROME", "MOSE",
               "--single", "2", "--batch", "2x1", "--general-subset", "2", "--curve-points", "1",
               "--stability-points", "1", "--curve-facts", "2", "--jobs", "2", "--out", str(out), "--",
               f"data_dir={shared_data}", "general_tasks=[sst2]", f"+hparams_overrides.mom2_dataset={CORPUS}",
               "+hparams_overrides.mom2_n_samples=20", "+hparams_overrides.v_num_grad_steps=4"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    runs = sorted(p.name for p in (out / "runs").iterdir() if p.is_dir())
    assert runs == ["MOSE-batch", "MOSE-single", "ROME-single"]
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "## single-sequential, 2 edits" in report and "## batch-sequential, 1 steps of 2" in report
    batch = report[report.index("## batch-sequential"):]
    assert "ROME edits the facts of a call one after another" in batch
    metrics = batch[:batch.index("Numerical stability")]  # the first of the scenario's two tables
    rows = {line.split("|")[1].strip(): line for line in metrics.splitlines() if line.startswith(("| ROME", "| MOSE"))}
    assert rows["ROME"].split("|")[5].strip() == "1" and rows["MOSE"].split("|")[5].strip() == "2"  # b column
    walls = [json.loads((out / "runs" / r / "summary.json").read_text())["time"]["wall_seconds"] for r in runs]
    assert f"- runs: 3, {sum(walls) / 60:.1f} min of run wall time in all" in report
    for scenario in ("single", "batch"):
        assert (out / scenario / "compare_metrics.png").read_bytes()[:4] == b"\x89PNG"

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0
    for r, wall in zip(runs, walls):  # complete runs are not run again
        assert json.loads((out / "runs" / r / "summary.json").read_text())["time"]["wall_seconds"] == wall
