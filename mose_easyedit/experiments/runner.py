"""One sequential-editing run: edit T steps of b facts, measure, checkpoint, and write the run directory.

    load data and model → warm the per-model caches on the ORIGINAL model (context templates, key statistics of
    every layer the method can touch) → cache the original model's locality outputs → general abilities before
    editing → for each step: ``METHODS[method].apply`` → stability of the edited layers → (every ``eval_every`` /
    ``general_every`` edits) curves → checkpoint → after the last edit: reliability / generalization / locality of
    EVERY edited fact (retention), general abilities → ``results.jsonl``, ``summary.json``, plots.

This module is the loop; configuration (``config.py``), setup (``setup.py``), measurement (``measure.py``), the run
folder's files (``rundir.py``) and the summary (``summary.py``) live beside it. The run directory (``output_dir``)
holds ``config.yaml`` and ``hparams.yaml`` (the resolved settings), ``results.jsonl`` (one line per edit step: case
ids, layers, seconds per stage, stability of every edited layer, the method's per-layer diagnostics, curve / general
evaluations when due, and once complete the retention of the step's facts after the last edit), ``summary.json``
(final metrics, general abilities before / after, curves, stability, time per edit), the plots and ``run.log``;
while running also ``progress.json``, ``checkpoint.pt``, ``locality_reference.json`` and ``final_partial.json``.

A killed run restarted with the same command continues from its last checkpoint and produces the same results
as an uninterrupted run (see :mod:`.checkpoint`); a complete run re-invoked returns at once.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .. import edit_history
from ..evaluation import OriginalOutputs
from ..modeling import read_weight
from . import checkpoint as ckpt
from . import measure
from .config import ExperimentError, check_config, check_general_data, compare_configs, general_enabled
from .measure import crossed, curve_every
from .plots import plot_run
from .rundir import (CHECKPOINT_FILE, CONFIG_FILE, FINAL_PARTIAL_FILE, HPARAMS_FILE, LOG_FILE, RESULTS_FILE,
                     SUMMARY_FILE, clean_up, completed_summary, final_partial, holds_edits, jsonable,
                     locality_reference, requests_digest, write_progress)
from .setup import build_hparams, hparams_path, load_model, load_requests, method_label, spec_for, warm_caches
from .stability import method_layer_diagnostics, weight_stability
from .summary import build_summary, final_evaluation

logger = logging.getLogger(__name__)


class SequentialRun:
    """A sequential-editing run described by a resolved experiment config (see ``conf/config.yaml``)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.dir = Path(str(cfg.output_dir))
        self.spec = None
        self.model = self.tok = self.hparams = None
        self.requests: list[dict] = []
        self.state: dict = {}
        self.originals: dict[str, torch.Tensor] = {}
        self.reference: OriginalOutputs | None = None
        self._mark = time.perf_counter()

    # -------------------------------------------------------------------------------------------- entry point
    def execute(self) -> dict:
        check_config(self.cfg)
        self.dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.dir / LOG_FILE, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package_logger = logging.getLogger("mose_easyedit")
        previous_level = package_logger.level
        package_logger.setLevel(str(self.cfg.log_level).upper())
        package_logger.addHandler(handler)
        try:
            return self._execute()
        finally:
            package_logger.removeHandler(handler)
            package_logger.setLevel(previous_level)
            handler.close()

    def _execute(self) -> dict:
        cfg = self.cfg
        resolved = OmegaConf.to_container(cfg, resolve=True)
        config_path = self.dir / CONFIG_FILE
        if config_path.exists() and not holds_edits(self.dir):
            # a run that stopped before its first edit (a bad layer, say) left only its settings: start afresh
            logger.info("%s holds no edit yet: its earlier settings are replaced", self.dir)
            for name in (CONFIG_FILE, HPARAMS_FILE):
                (self.dir / name).unlink(missing_ok=True)
        if config_path.exists():
            compare_configs(OmegaConf.to_container(OmegaConf.load(config_path), resolve=True), resolved, self.dir)
        summary = completed_summary(self.dir)
        if summary is not None:
            clean_up(self.dir, True, cfg.keep_checkpoint)
            return summary
        check_general_data(cfg)
        self.requests = load_requests(cfg)
        self.hparams = build_hparams(cfg)
        self.spec = spec_for(self.hparams)
        hparams_dict = jsonable(self.hparams.to_dict())
        hp_path = self.dir / HPARAMS_FILE
        if hp_path.exists():
            compare_configs(yaml.safe_load(hp_path.read_text(encoding="utf-8")), hparams_dict, hp_path)
        if not config_path.exists():
            ckpt.atomic_write_text(config_path, OmegaConf.to_yaml(cfg, resolve=True))
        ckpt.atomic_write_text(hp_path, yaml.safe_dump(hparams_dict, sort_keys=False))
        logger.info("run %s: %s on %s, %s, %d edit(s) in steps of %d", self.dir, method_label(cfg), cfg.model.id,
                    cfg.data.name, cfg.num_edits, cfg.batch_size)

        torch.set_num_threads(cfg.num_threads)
        ckpt.set_seed(cfg.seed)
        self.model, self.tok = load_model(cfg.model)
        try:
            self.hparams.check_model(self.model)
        except ValueError as exc:
            raise ExperimentError(f"{hparams_path(cfg)}: {exc}") from None
        self.originals = warm_caches(self.model, self.tok, self.hparams)
        self.reference = locality_reference(self.dir, self.model, self.tok, self.requests, cfg.eval_batch_size,
                                            cfg.progress)
        self._restore_or_start()
        self._edit_loop()
        return self._finish()

    def _restore_or_start(self) -> None:
        path = self.dir / CHECKPOINT_FILE
        digest = requests_digest(self.requests)
        if path.exists():
            payload = ckpt.load_checkpoint(path)
            state = payload["state"]
            if state.get("digest") != digest:
                raise ExperimentError(f"{path} was written for other requests; remove the run directory")
            for module in state["touched"]:  # W₀ of modules outside the touchable layers, before restoring
                if module not in self.originals:
                    self.originals[module] = read_weight(self.model, module).detach().to("cpu", copy=True)
            ckpt.restore_checkpoint(self.model, payload)
            self.state = state
            self.state["resumes"] = state.get("resumes", 0) + 1
            ckpt.atomic_write_jsonl(self.dir / RESULTS_FILE, self.state["records"])
            logger.info("resumed %s at %d/%d edit(s) (phase %s)", self.dir, state["edits_done"],
                        self.cfg.num_edits, state["phase"])
            return
        self.state = {
            "digest": digest, "phase": "edit", "steps_done": 0, "edits_done": 0, "records": [],
            "touched": [], "parameters": [], "stale": [], "stability": {}, "general_before": None,
            "stability_original": {}, "wall_seconds": 0.0, "resumes": 0,
        }
        for module, weight in self.originals.items():
            self.state["stability_original"][module] = weight_stability(weight, None, self.cfg.stability_dtype)
        if general_enabled(self.cfg):
            start = time.perf_counter()
            self.state["general_before"] = measure.general_before(self.model, self.tok, self.cfg)
            logger.info("general abilities before editing: %s (%.1f s)", self.state["general_before"],
                        time.perf_counter() - start)
        for stale in (RESULTS_FILE, FINAL_PARTIAL_FILE):  # left by an attempt killed before its first checkpoint
            if (self.dir / stale).exists():
                (self.dir / stale).unlink()
        self._checkpoint()

    # ------------------------------------------------------------------------------------------- edit loop
    def _edit_loop(self) -> None:
        cfg, state = self.cfg, self.state
        steps = cfg.num_edits // cfg.batch_size
        if state["steps_done"] >= steps:
            return
        with logging_redirect_tqdm(), tqdm(total=steps, initial=state["steps_done"], unit="step",
                                           desc=f"{cfg.method.name} edits (b={cfg.batch_size})",
                                           disable=not cfg.progress, dynamic_ncols=True) as bar:
            for step in range(state["steps_done"], steps):
                record = self._edit_step(step, steps)
                bar.update(1)
                curve = record.get("curve")
                if curve:
                    bar.set_postfix(rel=f"{curve.get('reliability', math.nan):.3f}",
                                    loc=f"{curve.get('locality', math.nan):.3f}")

    def _edit_step(self, step: int, steps: int) -> dict:
        cfg, state, model = self.cfg, self.state, self.model
        b = cfg.batch_size
        batch = self.requests[step * b:(step + 1) * b]
        calls_before = len(edit_history(model, self.spec.name))
        start = time.perf_counter()
        _, weights_copy = self.spec.apply(model, self.tok, batch, self.hparams, return_orig_weights=True)
        edit_seconds = time.perf_counter() - start
        written = self._note_written(weights_copy)
        increments = measure.record_increments(model, self.dir, step + 1, weights_copy) if cfg.record_increments \
            else None
        del weights_copy
        history = edit_history(model, self.spec.name)
        entry = history[-1] if len(history) > calls_before else {}
        edits = (step + 1) * b
        record: dict[str, Any] = {"step": step + 1, "edits": edits,
                                  "case_ids": [r.get("case_id", step * b + i) for i, r in enumerate(batch)],
                                  "modules": written}
        diagnostics = jsonable({k: v for k, v in entry.items() if k not in ("seconds", "per_layer")})
        per_layer = method_layer_diagnostics(entry)
        if per_layer:
            diagnostics["per_layer"] = {str(k): v for k, v in per_layer.items()}
        record["method"] = diagnostics
        if increments is not None:
            record["increments"] = increments
        begin = time.perf_counter()
        record["immediate"] = measure.immediate(model, self.tok, batch, cfg.eval_batch_size)
        immediate_seconds = time.perf_counter() - begin
        stages = {stage: float(value) for stage, value in entry.get("seconds", {}).items() if stage != "total"}
        seconds = {"keys": 0.0, "targets": 0.0, "update": 0.0, **stages, "edit": edit_seconds,
                   "immediate": immediate_seconds}
        last = step + 1 == steps
        if last or (cfg.stability_every and (step + 1) % cfg.stability_every == 0):
            begin = time.perf_counter()
            record["stability"] = measure.stability(model, state, self.originals, cfg.stability_dtype)
            seconds["stability"] = time.perf_counter() - begin
        evaluated = False
        begin = time.perf_counter()
        if crossed(edits, b, curve_every(cfg)):
            record["curve"] = measure.curve_point(model, self.tok, self.requests, self.reference, edits, cfg)
            evaluated = True
        if general_enabled(cfg) and crossed(edits, b, cfg.general_every):
            record["general"] = measure.general(model, self.tok, cfg)
            evaluated = True
        seconds["evaluation"] = time.perf_counter() - begin if evaluated else 0.0
        record["seconds"] = seconds
        state["records"].append(record)
        state["steps_done"], state["edits_done"] = step + 1, edits
        with open(self.dir / RESULTS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        logger.debug("step %d/%d: %s", step + 1, steps, record)
        if last or evaluated or crossed(edits, b, cfg.checkpoint_every):
            if last:
                state["phase"] = "final"
            self._checkpoint()
            logger.info("%d/%d edit(s) done, %.2f s/edit so far%s", edits, cfg.num_edits,
                        sum(r["seconds"]["edit"] for r in state["records"]) / edits,
                        f"; curve {record['curve']}" if "curve" in record else "")
        else:
            write_progress(self.dir, state, cfg.num_edits)
        return record

    def _note_written(self, weights_copy: Mapping[str, torch.Tensor]) -> list[str]:
        """Record which parameters the step wrote; W₀ of a module first written outside the touchable layers is
        its pre-edit copy from ``weights_copy``."""
        state, written = self.state, []
        for name, (module, previous) in measure.pre_edit_weights(self.model, weights_copy).items():
            if name not in state["parameters"]:
                state["parameters"].append(name)
            if module not in self.originals:
                self.originals[module] = previous.to("cpu", copy=True)
                state["stability_original"][module] = weight_stability(self.originals[module], None,
                                                                       self.cfg.stability_dtype)
            for key in ("touched", "stale"):
                if module not in state[key]:
                    state[key].append(module)
            written.append(module)
        return written

    def _checkpoint(self) -> None:
        self._clock()
        self.state["checkpoint_edits"] = self.state["edits_done"]
        ckpt.save_checkpoint(self.dir / CHECKPOINT_FILE, self.model, self.state["parameters"], self.state)
        write_progress(self.dir, self.state, self.cfg.num_edits)

    def _clock(self) -> None:
        now = time.perf_counter()
        self.state["wall_seconds"] += now - self._mark
        self._mark = now

    # ---------------------------------------------------------------------------------------- final phase
    def _finish(self) -> dict:
        cfg, state = self.cfg, self.state
        write_progress(self.dir, state, cfg.num_edits, "final")
        partial = final_evaluation(self.dir, self.model, self.tok, self.requests, self.reference, state,
                                   final_partial(self.dir, state["digest"]), cfg)
        self._clock()
        for record in state["records"]:
            first = (record["step"] - 1) * cfg.batch_size
            record["retention"] = partial["facts"][first:first + cfg.batch_size]
        ckpt.atomic_write_jsonl(self.dir / RESULTS_FILE, state["records"])
        summary = build_summary(cfg, state, partial, self.hparams, self.model, self.dir,
                                self.spec.engine.summary_diagnostics)
        try:
            summary["plots"] = plot_run(self.dir, state["records"], summary)
        except Exception:  # plots can be redrawn from results.jsonl; never lose a finished run to them
            logger.exception("plotting failed; results are kept")
            summary["plots"] = []
        ckpt.atomic_write_json(self.dir / SUMMARY_FILE, summary)
        write_progress(self.dir, state, cfg.num_edits, "complete")
        clean_up(self.dir, True, cfg.keep_checkpoint)
        logger.info("run complete: %s — reliability %.4f, generalization %.4f, locality %.4f, %.2f s/edit",
                    self.dir, summary["metrics"].get("reliability", math.nan),
                    summary["metrics"].get("generalization", math.nan), summary["metrics"].get("locality", math.nan),
                    summary["time"]["sec_per_edit"])
        return summary


def run(cfg: DictConfig) -> dict:
    """Run (or resume, or just report) the experiment ``cfg``; returns its summary."""
    return SequentialRun(cfg).execute()
