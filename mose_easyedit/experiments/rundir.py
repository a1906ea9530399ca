"""The run folder: its file names, digests, JSON conversion, the locality reference and partial final results kept
there, progress notes and clean-up. Writes are atomic (``checkpoint.py``), so a crash never leaves a torn file."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..evaluation import OriginalOutputs, cache_locality_reference
from . import checkpoint as ckpt
from .config import ExperimentError

logger = logging.getLogger("mose_easyedit.experiments.runner")

CONFIG_FILE, HPARAMS_FILE, RESULTS_FILE, SUMMARY_FILE = "config.yaml", "hparams.yaml", "results.jsonl", "summary.json"
CHECKPOINT_FILE, PROGRESS_FILE, LOG_FILE = "checkpoint.pt", "progress.json", "run.log"
REFERENCE_FILE, FINAL_PARTIAL_FILE = "locality_reference.json", "final_partial.json"


def requests_digest(requests: Sequence[dict]) -> str:
    return hashlib.sha1(json.dumps(list(requests), sort_keys=True).encode()).hexdigest()


def weights_digest(model) -> str:
    """A digest of every parameter's value (float64 sum and norm, accumulated without copying the weights)."""
    digest = hashlib.sha1()
    with torch.no_grad():
        for name, p in model.named_parameters():
            summary = (name, tuple(p.shape), float(p.sum(dtype=torch.float64)),
                       float(torch.linalg.vector_norm(p, dtype=torch.float64)))
            digest.update(repr(summary).encode())
    return digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:16]


def jsonable(value: Any) -> Any:
    """``value`` with tensors and NumPy scalars turned into Python numbers/lists; other objects dropped (None)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else (value.tolist() if value.numel() <= 4096 else None)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            converted = jsonable(v)
            if converted is not None or v is None:
                out[str(k)] = converted
        return out
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return None


def holds_edits(folder: Path) -> bool:
    """Whether the run folder holds anything computed by an edit (results, a checkpoint, a summary)."""
    results = folder / RESULTS_FILE
    return ((results.exists() and results.stat().st_size > 0) or (folder / CHECKPOINT_FILE).exists()
            or (folder / SUMMARY_FILE).exists())


def completed_summary(folder: Path) -> dict | None:
    """The summary of a complete run in ``folder`` (its per-edit results checked), else None."""
    path = folder / SUMMARY_FILE
    if not path.exists():
        return None
    summary = ckpt.read_json_if_valid(path)
    if not summary or not summary.get("complete"):
        return None
    results = folder / RESULTS_FILE
    try:
        records = ckpt.read_jsonl(results) if results.exists() else []
    except ckpt.CorruptFileError as exc:
        raise ExperimentError(f"{exc}: the run is complete but its per-edit results are damaged; restore the "
                              f"line or delete {folder} to run it again") from None
    if len(records) != summary.get("steps"):
        raise ExperimentError(f"{results}: {len(records)} complete line(s) for the {summary.get('steps')} "
                              f"step(s) of the complete run; restore it or delete {folder} to run it again")
    logger.info("run %s is already complete (%s); nothing to do", folder, path)
    return summary


def locality_reference(folder: Path, model, tok, requests: Sequence[dict], batch_size: int,
                       progress: bool) -> OriginalOutputs:
    """The original model's locality outputs for every request: computed once, kept in the run folder."""
    path = folder / REFERENCE_FILE
    digest = requests_digest(requests)
    if path.exists():
        saved = ckpt.read_json_if_valid(path) or {}
        if saved.get("digest") == digest:
            return OriginalOutputs({text: (tuple(pair[0]), tuple(pair[1]))
                                    for text, pair in saved["predictions"].items()})
    reference = cache_locality_reference(model, tok, requests, batch_size, progress)
    ckpt.atomic_write_json(path, {"digest": digest, "predictions": {
        text: [list(labels), list(argmax)] for text, (labels, argmax) in reference.predictions.items()}})
    return reference


def final_partial(folder: Path, digest: str) -> dict:
    """The final evaluation done so far (facts evaluated after the last edit, general abilities), if any."""
    path = folder / FINAL_PARTIAL_FILE
    if path.exists():
        saved = ckpt.read_json_if_valid(path) or {}
        if saved.get("digest") == digest:
            return saved
    return {"digest": digest, "facts": [], "general": None, "seconds": 0.0}


def write_progress(folder: Path, state: Mapping, num_edits: int, phase: str | None = None) -> None:
    ckpt.atomic_write_json(folder / PROGRESS_FILE, {
        "phase": phase or state["phase"], "edits_done": state["edits_done"], "steps_done": state["steps_done"],
        "num_edits": num_edits, "checkpoint_edits": state.get("checkpoint_edits", 0), "time": time.time()})


def clean_up(folder: Path, final: bool, keep_checkpoint: bool) -> None:
    """Remove the files only a running run needs (on completion; the checkpoint unless it is to be kept)."""
    names = [FINAL_PARTIAL_FILE, REFERENCE_FILE] if final else []
    if final and not keep_checkpoint:
        names.append(CHECKPOINT_FILE)
    for name in names:
        path = folder / name
        if path.exists():
            path.unlink()
