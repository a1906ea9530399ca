"""The end of a run: every edited fact evaluated after the last edit (resumable, chunk by chunk), general abilities
at the end, and ``summary.json``: metrics, curves, stability, the method's diagnostics and time per edit."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..evaluation import OriginalOutputs, evaluate_requests, summarize
from ..modeling import num_layers
from . import checkpoint as ckpt
from .config import general_enabled
from .measure import general
from .rundir import FINAL_PARTIAL_FILE, jsonable
from .setup import method_label
from .stability import summarize_stability

logger = logging.getLogger("mose_easyedit.experiments.runner")


def final_evaluation(folder: Path, model, tok, requests: Sequence[dict], reference: OriginalOutputs,
                     state: Mapping, partial: dict, cfg: DictConfig) -> dict:
    """Evaluate every fact after the last edit, then the general abilities (unless the last step measured them),
    saving ``partial`` after each chunk so a killed run continues where it stopped."""
    path = folder / FINAL_PARTIAL_FILE
    total, chunk = len(requests), cfg.final_eval_chunk
    with logging_redirect_tqdm(), tqdm(total=total, initial=len(partial["facts"]), unit="fact",
                                       desc="retention after the last edit", disable=not cfg.progress,
                                       dynamic_ncols=True) as bar:
        for begin in range(len(partial["facts"]), total, chunk):
            start = time.perf_counter()
            facts = evaluate_requests(model, tok, requests[begin:begin + chunk], reference, cfg.eval_batch_size,
                                      progress=False)
            partial["facts"].extend(facts)
            partial["seconds"] += time.perf_counter() - start
            ckpt.atomic_write_json(path, partial)
            bar.update(len(facts))
    if general_enabled(cfg) and partial["general"] is None:
        last = state["records"][-1] if state["records"] else {}
        if "general" in last and last["edits"] == cfg.num_edits:
            partial["general"] = last["general"]
        else:
            start = time.perf_counter()
            partial["general"] = general(model, tok, cfg)
            partial["seconds"] += time.perf_counter() - start
        ckpt.atomic_write_json(path, partial)
    return partial


def layer_counts(records: Sequence[dict]) -> dict[str, int]:
    """How often each layer was edited (from the method's reported ``layers``)."""
    counts: dict[str, int] = {}
    for record in records:
        for layer in record["method"].get("layers") or []:
            counts[str(layer)] = counts.get(str(layer), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0])))


def method_diagnostics(records: Sequence[dict], names: Sequence[str]) -> dict:
    """Mean and maximum over the run of each per-layer diagnostic in ``names`` (the method's
    ``summary_diagnostics``), and how often each layer was edited."""
    out = {}
    for name in names:
        values = [v[name] for r in records for v in r["method"].get("per_layer", {}).values() if name in v]
        out[f"{name}_mean"] = float(np.mean(values)) if values else None
        out[f"{name}_max"] = float(np.max(values)) if values else None
    out["layer_counts"] = layer_counts(records)
    return out


def build_summary(cfg: DictConfig, state: Mapping, partial: Mapping, hparams, model, folder: Path,
                  diagnostic_names: Sequence[str]) -> dict:
    records, n = state["records"], cfg.num_edits

    def per_edit(key: str) -> float:
        return sum(r["seconds"].get(key, 0.0) for r in records) / n

    template = getattr(hparams, "rewrite_module_tmp", None)
    module_layers = {template.format(layer): layer for layer in range(num_layers(model))} if template else {}
    final_stability = records[-1].get("stability", {}) if records else {}
    original = {m: state["stability_original"][m] for m in final_stability}
    general_curve = [{"edits": 0, **state["general_before"]}] if state.get("general_before") else []
    general_curve += [{"edits": r["edits"], **r["general"]} for r in records if "general" in r]
    if partial.get("general") and (not general_curve or general_curve[-1]["edits"] != n):
        general_curve.append({"edits": n, **partial["general"]})
    return {
        "complete": True,
        "method": cfg.method.name,
        "label": method_label(cfg),
        "model": cfg.model.id,
        "data": cfg.data.name,
        "num_edits": n,
        "batch_size": cfg.batch_size,
        "steps": len(records),
        "seed": cfg.seed,
        "ablation": cfg.ablation,
        "metrics": summarize(partial["facts"]),
        "general": {"before": state.get("general_before"), "after": partial.get("general"), "curve": general_curve},
        "curve": [r["curve"] for r in records if "curve" in r],
        "stability": {
            "layers": {m: module_layers.get(m) for m in final_stability},
            "original": original,
            "final": final_stability,
            **summarize_stability(original, final_stability),
        },
        "method_diagnostics": method_diagnostics(records, diagnostic_names),
        "time": {
            "sec_per_edit": per_edit("edit"),
            "keys_per_edit": per_edit("keys"),
            "reach_per_edit": per_edit("reach"),
            "targets_per_edit": per_edit("targets"),
            "update_per_edit": per_edit("update"),
            "stability_per_edit": per_edit("stability"),
            "evaluation_per_edit": per_edit("evaluation"),
            "final_evaluation_seconds": partial.get("seconds", 0.0),
            "wall_seconds": state["wall_seconds"],
            "resumes": state.get("resumes", 0),
        },
        "hparams": jsonable(hparams.to_dict()),
        "output_dir": str(folder),
    }
