"""Sequential-editing experiments: config tree, an end-to-end run, resume after SIGKILL, the comparison table."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CORPUS

from mose_easyedit.data import load_counterfact
from mose_easyedit.experiments import ExperimentError, build_hparams, compose_config, load_requests, run
from mose_easyedit.experiments import checkpoint as ckpt
from mose_easyedit.experiments.compare import compare, main as compare_main
from mose_easyedit.experiments.stability import method_layer_diagnostics, summarize_stability, weight_stability
from mose_easyedit.modeling import read_weight

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_overrides(shared_data: Path, output_dir: Path) -> list[str]:
    """2 single-sequential MOSE edits on the embedded model, fast settings (small statistics, few target steps,
    two general tasks on 2 examples each), a curve point and a checkpoint after every edit."""
    if not CORPUS.exists():
        pytest.skip(f"corpus {CORPUS} is absent")
    return [f"data_dir={shared_data}", "method=MOSE", "model=smollm2-135m", "data=counterfact", "num_edits=2",
            "batch_size=1", "eval_every=1", "checkpoint_every=1", "general_tasks=[rte,sst2]",
            "general_subset_size=2", "progress=false", f"+hparams_overrides.mom2_dataset={CORPUS}",
            "+hparams_overrides.mom2_n_samples=20", "+hparams_overrides.v_num_grad_steps=4",
            "+hparams_overrides.candidate_layers=[3,4,5]", f"output_dir={output_dir}"]


def cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "mose_easyedit.experiments", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def comparable(summary: dict) -> dict:
    """A summary without what legitimately differs between two runs of one config (timings, the folder)."""
    return {k: v for k, v in summary.items() if k not in ("time", "output_dir")}


def records_without_timings(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in ckpt.read_jsonl(run_dir / "results.jsonl")]


@pytest.fixture(scope="module")
def reference_run(shared_data, default_model, tmp_path_factory):
    """An uninterrupted tiny run, in process; returns ``(run_dir, summary, seconds)``."""
    run_dir = tmp_path_factory.mktemp("experiments") / "reference"
    start = time.perf_counter()
    summary = run(compose_config(tiny_overrides(shared_data, run_dir)))
    return run_dir, summary, time.perf_counter() - start


# ------------------------------------------------------------------------------------------------- no model
def test_config_overrides_and_hparams(shared_data, tmp_path):
    cfg = compose_config([f"data_dir={shared_data}", "model=llama3-8b", "data=zsre", "num_edits=20",
                          "batch_size=10", "seed=3", "ablation=selected"])
    assert cfg.output_dir == "runs/MOSE-llama3-8b-zsre-n20-b10-s3-ablation_selected"
    assert cfg.model.name == "meta-llama/Meta-Llama-3-8B" and cfg.model.dtype == "bfloat16"
    assert cfg.data.path == f"{shared_data}/zsre/ZsRE-test-all.json" and cfg.data.skip_invalid
    assert compose_config([]).output_dir == "runs/MOSE-smollm2-135m-counterfact-n100-b1-s0"

    base = [f"data_dir={shared_data}", "seed=3", "+hparams_overrides={mose_lambda: 10.0}"]
    hp = build_hparams(compose_config(base))
    assert (hp.mose_lambda, hp.seed, hp.undo_history, hp.layer_selection, hp.neighbours) == (10.0, 3, 0, True, 1)
    hp = build_hparams(compose_config(base + ["ablation=selected"]))
    assert hp.layer_selection and hp.neighbours == 0
    hp = build_hparams(compose_config(base + ["ablation=selected_neighbours"]))
    assert hp.layer_selection and hp.neighbours == 1
    hp = build_hparams(compose_config(base + ["ablation=fixed", "ablation_layer=7"]))
    assert not hp.layer_selection and hp.layers == [7]

    with pytest.raises(ExperimentError, match="no_such_key"):
        build_hparams(compose_config(base + ["+hparams_overrides.no_such_key=1"]))
    with pytest.raises(ExperimentError, match="does not exist"):
        build_hparams(compose_config(base + ["hparams_file=/nonexistent/hparams.yaml"]))
    for bad, message in ((["num_edits=5", "batch_size=2"], "multiple"), (["method.name=NoSuchMethod"], "registered"),
                         (["ablation=sideways"], "ablation")):
        with pytest.raises(ExperimentError, match=message):
            run(compose_config(base + bad + [f"output_dir={tmp_path}/never-written"]))
    assert not (tmp_path / "never-written").exists()  # a bad config creates no run directory


def test_method_variant_and_label_name_the_run_and_its_hyperparameters(shared_data, tmp_path):
    """method=MOSE-input runs the registered MOSE-input with hparams/MOSE-input/<model>.yaml; label=... renames any
    run's row; a model without the method's file fails in one line naming the missing file."""
    from mose_easyedit.experiments.compare import comparison_table
    from mose_easyedit.experiments.setup import hparams_path, method_label
    from mose_easyedit.hparams import HPARAMS_ROOT

    cfg = compose_config([f"data_dir={shared_data}", "method=MOSE-input"])
    assert method_label(cfg) == "MOSE-input" and cfg.output_dir == "runs/MOSE-input-smollm2-135m-counterfact-n100-b1-s0"
    assert hparams_path(cfg) == HPARAMS_ROOT / "MOSE-input" / "smollm2-135m.yaml"
    hp = build_hparams(cfg)
    assert (type(hp).__name__, hp.input_subspace, hp.early_stop_on, hp.undo_history) == (
        "MOSEInputHyperParams", "null_c", "most_probable", 0)
    assert type(build_hparams(compose_config([f"data_dir={shared_data}"]))).__name__ == "MOSEHyperParams"
    renamed = compose_config([f"data_dir={shared_data}", "method=AlphaEdit", "label=AlphaEdit-mp"])
    assert method_label(renamed) == "AlphaEdit-mp" and renamed.output_dir.startswith("runs/AlphaEdit-mp-smollm2")
    with pytest.raises(ExperimentError, match=r"MOSE-input/gpt2-xl\.yaml does not exist"):
        build_hparams(compose_config([f"data_dir={shared_data}", "method=MOSE-input", "model=llama3-8b",
                                      "model.id=gpt2-xl"]))

    summary = {"method": "MOSE", "label": "MOSE-input", "model": "m", "data": "d", "num_edits": 1, "batch_size": 1,
               "metrics": {"reliability": 0.5}, "time": {"sec_per_edit": 1.0}}
    rows = [line for line in comparison_table([summary]).splitlines() if line.startswith("| MOSE")]
    assert rows and rows[0].startswith("| MOSE-input | m | d | 1 | 1 | 0.5000")


def test_statistics_are_warmed_only_for_methods_that_read_them(tokenizer, shared_data, monkeypatch):
    """MOSE-OFT never reads C: its run must not sample a statistics corpus (minutes on a CPU); MEMIT's must."""
    from conftest import build_tiny_model, tiny_hparams
    from mose_easyedit.experiments import setup
    from mose_easyedit.methods import MEMITHyperParams, MOSEOFTHyperParams

    calls = []
    monkeypatch.setattr(setup, "second_moments", lambda model, tok, layers, hp: calls.append(list(layers)) or {})
    for cls, expected in ((MOSEOFTHyperParams, []), (MEMITHyperParams, [[1, 2]])):
        calls.clear()
        originals = setup.warm_caches(build_tiny_model("llama", len(tokenizer)), tokenizer, tiny_hparams(cls, "llama"))
        assert calls == expected, cls.__name__
        assert sorted(originals) == ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]


def test_requests_from_configured_data(shared_data, tmp_path):
    cfg = compose_config([f"data_dir={shared_data}", "data=zsre", "num_edits=4"])
    requests = load_requests(cfg)
    assert len(requests) == 4 and all(r["subject"] in r["prompt"] for r in requests)
    cfg = compose_config([f"data_dir={shared_data}", "num_edits=2", "data.start=5"])
    assert load_requests(cfg) == load_counterfact(shared_data / "counterfact" / "counterfact-edit.json", 2, 5)

    with pytest.raises(ExperimentError, match=r"data.path=/nonexistent/cf.json: no such file"):
        load_requests(compose_config(["data.path=/nonexistent/cf.json"]))
    broken = tmp_path / "broken.json"
    broken.write_text("[{\"prompt\": ")
    with pytest.raises(ExperimentError, match="not valid JSON"):
        load_requests(compose_config([f"data.path={broken}"]))
    with pytest.raises(ExperimentError, match="CounterFact format"):
        load_requests(compose_config([f"data.path={shared_data}/zsre/ZsRE-test-all.json"]))
    with pytest.raises(ExperimentError, match="only 10000 usable"):
        load_requests(compose_config([f"data_dir={shared_data}", "num_edits=10001"]))
    with pytest.raises(ExperimentError, match="no such file"):
        load_requests(compose_config([f"data_dir={tmp_path}", "data=conceptedit", "num_edits=1"]))


def test_default_data_dir_for_a_checkout_and_an_installed_package(tmp_path, monkeypatch):
    from mose_easyedit.experiments import config as runner

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOSE_EASYEDIT_DATA", "/somewhere/data")
    assert runner.default_data_dir() == "/somewhere/data"
    monkeypatch.delenv("MOSE_EASYEDIT_DATA")
    checkout = tmp_path / "checkout" / "repo"
    (checkout.parent.parent / "checkout" / "shared" / "data").mkdir(parents=True)
    (checkout).mkdir()
    (checkout / "pyproject.toml").write_text("")
    monkeypatch.setattr(runner, "REPO_ROOT", checkout)
    monkeypatch.setattr(runner, "DEFAULT_DATA_DIR", checkout.parent / "shared" / "data")
    assert runner.default_data_dir() == str(checkout.parent / "shared" / "data")  # a checkout: the shared folder
    (tmp_path / "data").mkdir()
    assert runner.default_data_dir() == "data"  # ./data wins when it exists
    (tmp_path / "data").rmdir()
    installed = tmp_path / "lib" / "python3.11"  # site-packages' parents: no pyproject.toml, no shared/data
    installed.mkdir(parents=True)
    monkeypatch.setattr(runner, "REPO_ROOT", installed)
    monkeypatch.setattr(runner, "DEFAULT_DATA_DIR", installed.parent / "shared" / "data")
    assert runner.default_data_dir() == "data"
    cfg = runner.compose_config(["num_edits=1"])
    assert cfg.data_dir == "data"
    with pytest.raises(runner.ExperimentError, match="counterfact-edit.json.*no such file.*EasyEdit's data release"):
        load_requests(cfg)


def test_a_folder_without_edits_takes_a_corrected_configuration(tmp_path):
    """A run that failed before its first edit left its settings; the corrected command into the same folder runs
    (here it stops at the next problem, the missing data file, not at 'a different configuration')."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("num_edits: 3\nmethod:\n  name: MEMIT\n")
    (out / "hparams.yaml").write_text("layers: [99]\n")
    (out / "run.log").write_text("failed\n")
    overrides = [f"data_dir={tmp_path / 'nodata'}", "num_edits=2", f"output_dir={out}", "progress=false",
                 "general_tasks=[]"]
    with pytest.raises(ExperimentError, match="no such file"):
        run(compose_config(overrides))
    assert not (out / "config.yaml").exists() and (out / "run.log").exists()
    (out / "config.yaml").write_text("num_edits: 3\nmethod:\n  name: MEMIT\n")
    (out / "results.jsonl").write_text('{"step": 1}\n')  # a folder holding an edit keeps refusing
    with pytest.raises(ExperimentError, match="different configuration"):
        run(compose_config(overrides))


def test_malformed_data_path_on_the_command_line(tmp_path):
    out = tmp_path / "run"
    proc = cli(["data.path=/nonexistent/counterfact.json", "num_edits=2", f"output_dir={out}"])
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, output
    assert "data.path=/nonexistent/counterfact.json: no such file" in output
    assert "Traceback" not in output


def test_an_unknown_method_model_or_data_fails_in_one_line_listing_the_known_ones():
    for args, expected in ((["method=NOPE"], "method=NOPE: no such method; known: AlphaEdit, EMMET, MEMIT, MOSE"),
                           (["-m", "method=MOSE,NOPE"], "method=NOPE: no such method"),
                           (["model=tiny"], "model=tiny: no such model; known: llama2-13b")):
        proc = cli(args)
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 2 and expected in output and len(output.strip().splitlines()) == 1, output


def test_stability_metrics(default_model):
    model, _ = default_model
    W = read_weight(model, "model.layers.4.mlp.down_proj").double()
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(W.shape[0], W.shape[0], generator=gen, dtype=torch.float64))
    before, rotated = weight_stability(W), weight_stability(Q @ W, W)
    for key in ("frobenius", "sigma_max", "sigma_min", "kappa"):
        assert rotated[key] == pytest.approx(before[key], rel=1e-9)
    assert rotated["delta_frobenius"] == pytest.approx(float(torch.linalg.norm(Q @ W - W)), rel=1e-12)
    u = torch.randn(W.shape[0], 1, generator=gen, dtype=torch.float64)
    v = torch.randn(1, W.shape[1], generator=gen, dtype=torch.float64)
    added = weight_stability(W + 5 * u @ v, W)
    assert added["frobenius"] > before["frobenius"] and added["kappa"] != pytest.approx(before["kappa"])
    worst = summarize_stability({"m": before}, {"m": added})
    assert worst["max_relative_norm_change"] > 0 and worst["modules"] == ["m"]
    assert weight_stability(torch.eye(3), dtype="float32")["kappa"] == pytest.approx(1.0)


def test_layer_diagnostics_logged_per_request_are_averaged_over_the_call():
    entry = {"per_layer": {4: {"rho": 0.5, "alpha_over_k": [0.2, 0.4], "reachable": [True, False, False, False],
                               "angle": [], "note": "x"}, 5: "not a mapping"}}
    assert method_layer_diagnostics(entry) == {4: {"rho": 0.5, "alpha_over_k": pytest.approx(0.3),
                                                   "reachable": 0.25}}


def test_checkpoint_files(tmp_path):
    ckpt.atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert ckpt.read_json(tmp_path / "a.json") == {"x": 1} and not (tmp_path / "a.json.tmp").exists()
    (tmp_path / "r.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"ste')  # killed mid-append
    assert ckpt.read_jsonl(tmp_path / "r.jsonl") == [{"step": 1}, {"step": 2}]
    ckpt.set_seed(5)
    state = ckpt.rng_state()
    first = torch.rand(3)
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(3), first)


def test_curve_points_by_default_and_stability_lines_that_start_where_a_layer_was_first_edited(shared_data):
    from mose_easyedit.experiments.plots import _stability_series
    from mose_easyedit.experiments.measure import curve_every

    def every(*overrides):
        return curve_every(compose_config([f"data_dir={shared_data}", *overrides]))

    assert compose_config([]).eval_every == "auto"
    assert every("num_edits=5") == 1 and every("num_edits=100") == 20 and every("eval_every=7") == 7
    assert every("num_edits=300", "batch_size=10") == 60  # 30 steps: a point every 6 steps of 10
    original = {"a": {"frobenius": 1.0}, "b": {"frobenius": 2.0}}
    records = [{"edits": 10, "stability": {"a": {"delta_frobenius": 0.1}}},
               {"edits": 20, "stability": {"a": {"delta_frobenius": 0.2}}},
               {"edits": 30, "stability": {"a": {"delta_frobenius": 0.3}, "b": {"delta_frobenius": 0.5}}}]
    series = _stability_series(records, original)
    assert [(e, s["delta_frobenius"]) for e, s in series["a"]] == [(0, 0.0), (10, 0.1), (20, 0.2), (30, 0.3)]
    # layer b was untouched until after edit 20: flat at zero until there, not a ramp from edit 0
    assert [(e, s["delta_frobenius"]) for e, s in series["b"]] == [(0, 0.0), (20, 0.0), (30, 0.5)]


def test_corrupt_run_files_fail_in_one_line_naming_the_file_and_the_remedy(tmp_path):
    (tmp_path / "summary.json").write_text('{"complete": true, "metr')
    with pytest.raises(ckpt.CorruptFileError) as error:
        ckpt.read_json(tmp_path / "summary.json")
    message = str(error.value)
    assert "summary.json" in message and "delete it and re-run" in message and "\n" not in message
    assert ckpt.read_json_if_valid(tmp_path / "summary.json") is None
    torch.save({"format": 1, "state": {}}, tmp_path / "checkpoint.pt")
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(ckpt.CorruptFileError) as error:
        ckpt.load_checkpoint(tmp_path / "checkpoint.pt")
    message = str(error.value)
    assert "checkpoint.pt" in message and "delete it and re-run" in message and "\n" not in message
    assert "another device" not in message
    (tmp_path / "results.jsonl").write_text('{"step": 1}\n{"step": 2,, }\n{"step": 3}\n{"step": 4')
    with pytest.raises(ckpt.CorruptFileError, match=r"results.jsonl, line 2: not valid JSON"):
        ckpt.read_jsonl(tmp_path / "results.jsonl")
    (tmp_path / "results.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3')  # a torn last line is dropped
    assert ckpt.read_jsonl(tmp_path / "results.jsonl") == [{"step": 1}, {"step": 2}]
    from mose_easyedit.experiments.compare import load_run
    with pytest.raises(ValueError, match="summary.json is truncated or corrupt"):
        load_run(tmp_path)


# ------------------------------------------------------------------------------------------------ with model
@pytest.mark.slow
def test_a_corrupt_summary_of_a_complete_run_is_run_again(reference_run, shared_data, tmp_path, caplog):
    import shutil

    run_dir, summary, _ = reference_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    text = (copy / "summary.json").read_text()
    (copy / "summary.json").write_text(text[:len(text) // 2])
    with caplog.at_level(logging.WARNING):
        again = run(compose_config(tiny_overrides(shared_data, copy)))
    assert again["complete"] and ckpt.read_json(copy / "summary.json") == again
    assert again["metrics"] == summary["metrics"]
    warning = next(r.getMessage() for r in caplog.records if "summary.json" in r.getMessage())
    assert "it is recomputed" in warning and "delete it" not in warning


@pytest.mark.slow
def test_a_corrupt_results_file_of_a_complete_run_is_named_on_resume_and_in_compare(
        reference_run, shared_data, tmp_path):
    import shutil

    run_dir, _, _ = reference_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    lines = (copy / "results.jsonl").read_text().splitlines(keepends=True)
    (copy / "results.jsonl").write_text(lines[0][:-3] + "\n" + "".join(lines[1:]))
    with pytest.raises(ExperimentError, match=r"results.jsonl, line 1: not valid JSON.*complete"):
        run(compose_config(tiny_overrides(shared_data, copy)))
    assert compare_main([str(copy), "--out", str(tmp_path / "compare")]) == 2


@pytest.mark.slow
def test_hydra_run_dir_names_the_run_directory_and_a_multirun_fans_out_on_joblib(reference_run, shared_data,
                                                                                 tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    _, reference, _ = reference_run
    args = [a for a in tiny_overrides(shared_data, tmp_path) if not a.startswith("output_dir=")]
    proc = cli([*args, f"hydra.run.dir={tmp_path / 'by-hydra'}"])
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output
    summary = ckpt.read_json(tmp_path / "by-hydra" / "summary.json")
    assert comparable(summary) == comparable(reference)
    sweep = tmp_path / "sweep"
    jobs = [a for a in args if not a.startswith(("num_edits=", "general_tasks=", "eval_every="))]
    proc = cli(["-m", "hydra/launcher=local", f"hydra.sweep.dir={sweep}", *jobs, "num_edits=1", "general_tasks=[]",
                "seed=0,1"])
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output
    runs = sorted(p.parent.name for p in sweep.glob("*/summary.json"))
    assert runs == ["MOSE-smollm2-135m-counterfact-n1-b1-s0-j0", "MOSE-smollm2-135m-counterfact-n1-b1-s1-j1"]
    assert "joblib" in output.lower() or "Joblib" in output


@pytest.mark.slow
def test_end_to_end_run_outputs(reference_run, shared_data):
    run_dir, summary, _ = reference_run
    for name in ("config.yaml", "hparams.yaml", "results.jsonl", "summary.json", "run.log", "metrics.png",
                 "general.png", "stability.png", "diagnostics.png"):
        assert (run_dir / name).is_file(), name
    for name in ("metrics.png", "general.png", "stability.png"):
        assert (run_dir / name).read_bytes()[:8] == PNG_MAGIC
    assert not (run_dir / "checkpoint.pt").exists()  # removed once complete (keep_checkpoint=false)
    assert ckpt.read_json(run_dir / "progress.json")["phase"] == "complete"
    config = (run_dir / "config.yaml").read_text()
    assert "num_edits: 2" in config and "v_num_grad_steps: 4" in config

    records = ckpt.read_jsonl(run_dir / "results.jsonl")
    assert [r["step"] for r in records] == [1, 2] and [r["edits"] for r in records] == [1, 2]
    for record in records:
        assert set(record["seconds"]) >= {"keys", "reach", "targets", "update", "edit", "evaluation", "stability"}
        assert record["seconds"]["targets"] > 0 and record["seconds"]["edit"] >= record["seconds"]["update"]
        assert set(record["modules"]) <= set(record["stability"])
        assert len(record["retention"]) == 1 and record["retention"][0]["case_id"] == record["case_ids"][0]
        assert record["curve"]["count"] == record["edits"]
        assert record["method"]["per_layer"] and all("rho" in v and "fit_error" in v
                                                     for v in record["method"]["per_layer"].values())
        assert len(record["method"]["layers"]) == 3
        immediate = record["immediate"]
        assert immediate["strict_reliability"] == float(immediate["reliability"] == 1.0)
    # no edit follows the last one, so its fact scores right after its edit what it scores in the retention
    assert records[-1]["immediate"]["reliability"] == pytest.approx(records[-1]["retention"][0]["reliability"])

    assert summary == ckpt.read_json(run_dir / "summary.json")
    assert summary["complete"] and summary["num_edits"] == 2 and summary["steps"] == 2
    metrics = summary["metrics"]
    assert metrics["count"] == 2
    for key in ("reliability", "generalization", "locality"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["locality"] > 0.5
    general = summary["general"]
    assert set(general["before"]) == set(general["after"]) == {"rte", "sst2"}
    assert [g["edits"] for g in general["curve"]] == [0, 2]
    assert [c["edits"] for c in summary["curve"]] == [1, 2]
    stability = summary["stability"]
    assert stability["final"] and set(stability["final"]) == set(stability["original"])
    assert stability["max_relative_norm_change"] < 1e-6  # MOSE rotates: ‖W‖_F and κ₂ stay put
    assert stability["max_relative_kappa_change"] < 1e-5
    assert stability["max_relative_distance"] > 0
    assert summary["method_diagnostics"]["rho_mean"] > 0
    timing = summary["time"]
    assert timing["sec_per_edit"] == pytest.approx(sum(r["seconds"]["edit"] for r in records) / 2)
    assert timing["sec_per_edit"] >= timing["keys_per_edit"] + timing["targets_per_edit"]

    written = {name: (run_dir / name).stat().st_mtime_ns for name in ("results.jsonl", "summary.json")}
    log = run_dir / "run.log"
    complete = log.read_text(encoding="utf-8").count("is already complete")
    again = run(compose_config(tiny_overrides(shared_data, run_dir)))  # a complete run re-invoked: nothing re-run
    assert again == summary
    assert {name: (run_dir / name).stat().st_mtime_ns for name in written} == written
    assert log.read_text(encoding="utf-8").count("is already complete") == complete + 1


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted(reference_run, shared_data, tmp_path):
    reference_dir, reference, _ = reference_run
    run_dir = tmp_path / "killed"
    args = tiny_overrides(shared_data, run_dir)
    proc = cli(args)
    progress = run_dir / "progress.json"
    deadline = time.time() + 420
    while time.time() < deadline:
        if progress.exists() and ckpt.read_json(progress)["checkpoint_edits"] >= 1:
            break
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("no checkpoint with an edit appeared in time")
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "summary.json").exists()

    resumed = cli(args)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    assert "resumed" in output
    summary = ckpt.read_json(run_dir / "summary.json")
    assert summary["time"]["resumes"] == 1
    assert comparable(summary)["metrics"] == comparable(reference)["metrics"]
    assert comparable(summary) == comparable(reference)
    assert records_without_timings(run_dir) == records_without_timings(reference_dir)


@pytest.mark.slow
def test_compare_writes_table_and_plots(reference_run, tmp_path):
    run_dir, summary, _ = reference_run
    out = tmp_path / "compare"
    markdown = compare([run_dir], out)
    assert (out / "comparison.md").read_text() == markdown
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert lines[0].split("|")[1:6] == [" Method ", " Model ", " Data ", " Edits ", " b "]
    assert "Reliability" in lines[0] and "RTE" in lines[0] and "sec/edit" in lines[0]
    assert lines[2].startswith("| (unedited) | smollm2-135m")
    row = lines[3].split("|")
    assert row[1].strip() == "MOSE" and float(row[6]) == pytest.approx(summary["metrics"]["reliability"], abs=1e-4)
    assert json.loads((out / "comparison.json").read_text())[0]["method"] == "MOSE"
    for name in ("compare_metrics.png", "compare_general.png", "compare_stability.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert compare_main([str(run_dir), "--out", str(tmp_path / "cli")]) == 0
    assert compare_main([str(tmp_path), "--out", str(tmp_path / "bad")]) == 2


def test_general_scores_before_editing_are_shared_between_runs(reference_run, shared_data, tmp_path, monkeypatch):
    """A second run on the same unedited weights, tasks and subset reads the "before" scores from the cache and
    evaluates the general tasks only after editing; changing one weight changes the cache key."""
    from mose_easyedit.experiments import measure as runner

    _, reference, _ = reference_run
    calls = []
    real = runner.evaluate_general
    monkeypatch.setattr(runner, "evaluate_general", lambda *a, **k: calls.append(1) or real(*a, **k))
    summary = run(compose_config(tiny_overrides(shared_data, tmp_path / "again")))
    assert len(calls) == 1  # after the last edit only
    assert summary["general"]["before"] == reference["general"]["before"]

    model = torch.nn.Linear(3, 2)
    before = runner.weights_digest(model)
    with torch.no_grad():
        model.weight[0, 0] += 1e-3
    assert runner.weights_digest(model) != before


def _synthetic_summary(label: str, edits: int, score: float) -> tuple[list[dict], dict]:
    original = {"m.4": {"frobenius": 10.0, "kappa": 5.0, "sigma_min": 1.0, "sigma_max": 5.0}}
    records = [{"edits": e, "stability": {"m.4": {"frobenius": 10.0, "kappa": 5.0 * (1 + 1e-3 * e),
                                                  "sigma_min": 1.0, "delta_frobenius": 0.1 * e}}}
               for e in range(1, edits + 1)]
    summary = {"label": label, "method": label, "model": "m", "data": "d", "batch_size": 1, "num_edits": edits,
               "curve": [{"edits": e, "reliability": score, "generalization": score, "locality": score}
                         for e in range(1, edits + 1)],
               "metrics": {"reliability": score - 0.5, "generalization": score, "locality": score},
               "general": {"curve": [{"edits": 0, "sst2": 0.5, "rte": 0.5}, {"edits": edits, "sst2": 0.5, "rte": 0.5}]},
               "stability": {"original": original}}
    return records, summary


def test_plots_count_whole_edits_keep_identical_curves_visible_and_mark_the_final_retention(tmp_path, monkeypatch):
    from mose_easyedit.experiments import plots

    figures = {}

    def keep(fig, path):
        figures[path.name] = fig
        return path.name

    monkeypatch.setattr(plots, "_save", keep)
    runs = [_synthetic_summary("AlphaEdit", 2, 0.9), _synthetic_summary("MOSE", 2, 0.9)]  # identical curves
    plots.plot_compare(runs, tmp_path)
    plots.plot_run(tmp_path, *runs[0])
    for name, fig in figures.items():
        for ax in fig.axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), (name, ticks)  # no "1.5 edits"
    reliability = figures["compare_metrics.png"].axes[0]
    curves = [line for line in reliability.get_lines() if len(line.get_xdata()) > 1]
    assert len(curves) == 2 and len({(c.get_marker(), str(c.get_linestyle())) for c in curves}) == 2
    finals = [line for line in reliability.get_lines() if len(line.get_xdata()) == 1]
    assert [(f.get_marker(), f.get_linestyle(), list(f.get_ydata())) for f in finals] == [("*", "None", [0.4])] * 2
    assert all(list(c.get_xdata()) == [1, 2] for c in curves)  # the final retention is not a curve point
    general = figures["compare_general.png"].axes
    assert [ax.get_title() for ax in general] == ["sst2", "rte"]  # the table's order, not sorted
    kappa = figures["compare_stability.png"].axes[1]
    assert kappa.get_yscale() == "linear"  # a 0.2 % change is not drawn on a log axis with 9.98×10⁻¹ labels
    stability = figures["stability.png"]
    assert stability.legends and not any(ax.get_legend() for ax in stability.axes)  # the legend sits below
    run_lines = [line for line in figures["general.png"].axes[0].get_lines()]
    assert len({(line.get_marker(), str(line.get_linestyle())) for line in run_lines}) == len(run_lines)
    records, summary = _synthetic_summary("MOSE", 2, 0.9)
    for point in summary["general"]["curve"]:
        point["wikitext_ppl"] = 60.0
    plots.plot_run(tmp_path, records, summary)
    accuracy, perplexity = figures["general.png"].axes  # perplexity on its own (right) axis, not cut at 1
    assert [line.get_label() for line in accuracy.get_lines()] == ["sst2", "rte"]
    assert list(perplexity.get_lines()[0].get_ydata()) == [60.0, 60.0] and perplexity.get_ylim()[1] > 60


@pytest.mark.slow
def test_recorded_increments_rebuild_the_edited_weights_and_feed_the_figure5_analysis(shared_data, tmp_path):
    from mose_easyedit.experiments import increments

    out = tmp_path / "run"
    summary = run(compose_config(tiny_overrides(shared_data, out) + ["record_increments=true", "general_tasks=[]",
                                                                     "keep_checkpoint=true"]))
    steps = increments.load_increments(out)
    assert len(steps) == summary["steps"] == 2
    records = ckpt.read_jsonl(out / "results.jsonl")
    assert all(set(r["increments"]) == set(r["modules"]) for r in records)
    model, _ = load_model_for(out)
    final = ckpt.load_checkpoint(out / "checkpoint.pt")["weights"]
    for module in {m for step in steps for m in step}:
        w0 = read_weight(model, module).double()
        rebuilt = w0 + sum(s[module]["A"].double() @ s[module]["B"].double().T for s in steps if module in s)
        edited = final[f"{module}.weight"].double()
        # W₀ + Σ ΔW is the edited weight up to the dropped tails and float32 factors
        assert float(torch.linalg.norm(rebuilt - edited)) <= 2e-3 * float(torch.linalg.norm(edited - w0)) + 1e-6
    numbers = increments.analyse(out, permutations=20)
    assert numbers["facts"] == 2 and 0 < numbers["p_value"] <= 1 and numbers["mean_cosine_distance"] >= 0
    assert (out / "figure5.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "figure5.json").read_text())["energy_distance"] == numbers["energy_distance"]


def load_model_for(run_dir: Path):
    from omegaconf import OmegaConf

    from mose_easyedit.experiments.setup import load_model

    return load_model(OmegaConf.load(run_dir / "config.yaml").model)


def test_a_checkpoint_resumes_under_another_thread_count_and_refuses_another_dtype(tmp_path):
    from conftest import OneProjection, session_on_one_projection

    from mose_easyedit.session import get_session

    with session_on_one_projection(threads=1) as (model, session):
        with torch.no_grad():
            model.down_proj.weight.mul_(1.5)
        session.record_weights(model, ["down_proj"])
        ckpt.save_checkpoint(tmp_path / "checkpoint.pt", model, ["down_proj.weight"], {"edits_done": 1})
        torch.set_num_threads(2)
        resumed = OneProjection()
        ckpt.restore_checkpoint(resumed, ckpt.load_checkpoint(tmp_path / "checkpoint.pt"))
        assert torch.equal(resumed.down_proj.weight, model.down_proj.weight)
        assert get_session(resumed, "MOSE").state == "carried"  # the same editing run, not a new one
        wrong = OneProjection(torch.float64)
        before = wrong.down_proj.weight.clone()
        with pytest.raises(ValueError, match=r"down_proj.weight was saved as torch.float32 .* torch.float64"):
            ckpt.restore_checkpoint(wrong, ckpt.load_checkpoint(tmp_path / "checkpoint.pt"))
        assert torch.equal(wrong.down_proj.weight, before)
