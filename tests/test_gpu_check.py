"""``benchmarks/gpu_check.py`` at reduced width on the CPU (CI has no GPU): the LLaMA3-8B shape, every method's
shipped LLaMA3-8B hyperparameters editing it, the memory plan, the update rules, and the model left as it was."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_bit_identical, snapshot

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_full_shape_and_memory_plan_are_llama3_8b():
    gpu_check = load_script()
    shape = gpu_check.model_shape(1.0)
    assert (shape["num_hidden_layers"], shape["hidden_size"], shape["intermediate_size"]) == (32, 4096, 14336)
    assert (shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]) == (32, 8, 128)
    plan = {row["tensor"]: row for row in gpu_check.memory_plan(shape, 128256, torch.bfloat16)}
    weights = plan["model weights"]
    assert weights["shape"] == "8.03 B parameters" and weights["GB"] == pytest.approx(16.06, abs=0.01)
    solve = next(row for name, row in plan.items() if name.startswith("MEMIT"))
    assert solve["dtype"] == "float64" and solve["GB"] == pytest.approx(14336 ** 2 * 8 / 1e9)  # 1.64 GB per layer
    reduced = gpu_check.model_shape(1 / 16)
    assert (reduced["hidden_size"], reduced["intermediate_size"], reduced["num_hidden_layers"]) == (256, 896, 32)
    assert reduced["num_attention_heads"] == 4 * reduced["num_key_value_heads"]  # GQA 4:1 as LLaMA3-8B


def test_an_edit_run_leaves_the_model_and_sessions_as_they_were(tokenizer, tmp_path):
    from mose_easyedit.session import get_session

    gpu_check = load_script()
    model = gpu_check.build_model(gpu_check.model_shape(1 / 32), len(tokenizer), torch.float32, torch.device("cpu"), 0)
    before = snapshot(model)
    corpus = gpu_check.random_corpus(tokenizer, 8 * 64, tmp_path, 0)
    args = SimpleNamespace(edits=2, samples=8, sample_length=64)
    row = gpu_check.edit_with("AlphaEdit", model, tokenizer, args, torch.device("cpu"), corpus)
    assert row["edits"] == 2 and row["median_seconds"] > 0 and row["target_steps_mean"] >= 1
    assert_bit_identical(model, before)
    assert get_session(model, "AlphaEdit", create=False) is None


@pytest.mark.slow
def test_reduced_width_run_reports_every_method(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--edits", "1", "--rule-repeats", "2", "--out",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text(encoding="utf-8"))
    shape = result["shape"]
    assert (shape["num_hidden_layers"], shape["hidden_size"], shape["intermediate_size"]) == (32, 256, 896)
    assert result["dtype"] == "float32" and result["vocab"] >= 49152
    gpu_check = load_script()
    assert [row["method"] for row in result["methods"]] == gpu_check.METHODS
    for row in result["methods"]:
        assert row["median_seconds"] > 0 and row["target_steps_mean"] >= 1, row
        assert row["peak_GB"] is None  # measured on CUDA only
    assert [(r["d"], r["p"], r["n"]) for r in result["rules"]] == [(256, 896, 1), (256, 896, 10)]
    assert all(r["deviation"]["eigh"] < 1e-8 for r in result["rules"])
    report = (tmp_path / "gpu_check.md").read_text(encoding="utf-8")
    assert all(f"| {name} |" in report for name in gpu_check.METHODS) and "Memory plan" in report
