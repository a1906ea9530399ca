"""What a run measures as it goes: when curve points fall due, the curve's facts, general abilities (the unedited
model's cached per machine), the stability of the edited layers, the step's own facts right after their edit,
and the step's weight increments (Figure 5)."""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Mapping

import numpy as np
import torch
from omegaconf import DictConfig

from ..evaluation import OriginalOutputs, evaluate_requests, summarize, token_accuracy
from ..general_tasks import PROTOCOL, evaluate_general, task_file
from ..modeling import cache_dir, get_module, is_conv1d, model_identity, read_weight
from . import checkpoint as ckpt
from .config import ExperimentError
from .rundir import file_digest, weights_digest
from .stability import weight_stability

logger = logging.getLogger("mose_easyedit.experiments.runner")


def crossed(edits: int, batch: int, every: int) -> bool:
    """True when the step that brought the count to ``edits`` crossed a multiple of ``every``."""
    return every > 0 and edits // every > (edits - batch) // every


def curve_every(cfg: DictConfig) -> int:
    """Edits between two curve points: ``eval_every``, or for ``auto`` the multiple of ``batch_size`` that gives
    about five points (the last one after the last edit)."""
    if cfg.eval_every != "auto":
        return int(cfg.eval_every)
    steps = cfg.num_edits // cfg.batch_size
    return max(1, -(-steps // 5)) * cfg.batch_size


def curve_indices(edited: int, count: int) -> list[int]:
    """At most ``count`` indices evenly spread over ``range(edited)`` (oldest and newest included)."""
    if edited <= count:
        return list(range(edited))
    return sorted(set(np.linspace(0, edited - 1, count).round().astype(int).tolist()))


def curve_point(model, tok, requests, reference: OriginalOutputs, edits: int, cfg: DictConfig) -> dict:
    """Reliability, generalization and locality of up to ``curve_facts`` of the facts edited so far."""
    chosen = [requests[i] for i in curve_indices(edits, cfg.curve_facts)]
    results = evaluate_requests(model, tok, chosen, reference, cfg.eval_batch_size, progress=False)
    return {"edits": edits, **summarize(results)}


def immediate(model, tok, batch, batch_size: int) -> dict:
    """The step's own facts right after their edit (one forward pass): set against the curve's retention, it tells
    edits that failed when made from edits lost to later ones."""
    accuracy = token_accuracy(model, tok, [r["prompt"] for r in batch], [r["target_new"] for r in batch],
                              batch_size, progress=False)
    return {"reliability": sum(accuracy) / len(accuracy),
            "strict_reliability": sum(a == 1.0 for a in accuracy) / len(accuracy)}


def general(model, tok, cfg: DictConfig) -> dict[str, float]:
    try:
        return evaluate_general(model, tok, list(cfg.general_tasks), cfg.general_subset_size, cfg.general_seed,
                                cfg.data_dir, cfg.general_batch_size, progress=cfg.progress)
    except (ValueError, FileNotFoundError) as exc:
        raise ExperimentError(f"general tasks (data_dir={cfg.data_dir}): {exc}") from None


def general_before(model, tok, cfg: DictConfig) -> dict[str, float]:
    """The unedited model's general-task scores; with ``general_cache`` they are computed once per weights, tasks,
    subset and data files and shared by every run on this machine (``$MOSE_EASYEDIT_CACHE/general``)."""
    if not cfg.general_cache:
        return general(model, tok, cfg)
    key = {"model": model_identity(model), "weights": weights_digest(model), "protocol": PROTOCOL,
           "tasks": list(cfg.general_tasks), "subset": cfg.general_subset_size, "seed": cfg.general_seed,
           "batch": cfg.general_batch_size,
           "files": {task: file_digest(task_file(task, cfg.data_dir)) for task in cfg.general_tasks}}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "general" / f"{key['model']}-{digest}.json"
    saved = ckpt.read_json_if_valid(path) if path.exists() else None
    if saved and "scores" in saved:
        logger.info("general abilities before editing read from %s", path)
        return saved["scores"]
    scores = general(model, tok, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_json(path, {"key": key, "scores": scores})
    return scores


def stability(model, state: dict, originals: Mapping[str, torch.Tensor], dtype: str) -> dict[str, dict]:
    """Stability of every module touched so far; only the ones written since the last measurement (``stale``) are
    recomputed."""
    for module in state["stale"]:
        state["stability"][module] = weight_stability(read_weight(model, module), originals[module], dtype)
    state["stale"] = []
    return {module: dict(state["stability"][module]) for module in state["touched"]}


def pre_edit_weights(model, weights_copy: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, torch.Tensor]]:
    """``{parameter name: (module, its pre-edit weight in (out, in) orientation)}`` of a step's ``weights_copy``
    (GPT-2's Conv1D stores (in, out))."""
    out = {}
    for name, previous in weights_copy.items():
        module = name[:-len(".weight")] if name.endswith(".weight") else name
        value = previous.detach()
        out[name] = (module, value.T if is_conv1d(get_module(model, module)) else value)
    return out


def record_increments(model, folder, step: int, weights_copy: Mapping[str, torch.Tensor]) -> dict:
    """The step's ΔW of every module it wrote, as low-rank factors under ``increments/`` (Figure 5)."""
    from .increments import record_step  # here, so `python -m ...increments` finds it unimported

    deltas = {module: read_weight(model, module).double().cpu() - before.double().cpu()
              for module, before in pre_edit_weights(model, weights_copy).values()}
    increments = record_step(folder, step, deltas)
    return {module: {"rank": rank, "dropped": dropped} for module, (rank, dropped) in increments.items()}
