"""Resumable runs: atomic files and checkpoints of the edited weights, the editing sessions and the RNG states.

Every file is written to ``<name>.tmp`` and moved into place with ``os.replace``, so a run killed at any moment
leaves either the previous or the new version, never a torn one.

A checkpoint holds what an edit step changes and nothing that can be recomputed from the original model:

* ``weights``: every parameter the method has written so far (a copy on the CPU);
* ``sessions``: the model's editing sessions (``model.__dict__["_mose_easyedit_sessions"]``: carried state,
  history, fingerprints). They are restored *after* the weights, with their fingerprints taken anew from them,
  so the next edit continues the same run;
* ``cache``: the small entries of the per-model cache (context templates, spectral norms of the original
  weights, ...), so values a method caches lazily on first use are the ones an uninterrupted run would use;
  the large key statistics are not stored (they come back from the on-disk statistics cache);
* ``rng``: the Python, NumPy and torch (CPU and CUDA) generator states;
* ``state``: the runner's progress and partial results.

Checkpoints are unpickled with ``weights_only=False`` (sessions are Python objects): load only files you wrote.
"""
from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..cache import model_cache
from ..data import json_lines
from ..session import SESSIONS_ATTRIBUTE

logger = logging.getLogger(__name__)

#: Cache entries up to this many tensor elements are stored in checkpoints; larger ones are recomputed.
SMALL_TENSOR_ELEMENTS = 1 << 16


# ------------------------------------------------------------------------------------------------ atomic files
def _replace(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    _replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, records) -> None:
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in records))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    _replace(tmp, path)


class CorruptFileError(ValueError):
    """A run file that cannot be read back (truncated by a kill or a full disk, or edited by hand)."""


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``; :class:`CorruptFileError` (one line naming the file and the remedy) if it is
    not valid JSON."""
    try:
        return _load_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path} is truncated or corrupt ({exc}); delete it and re-run") from None


def _load_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_json_if_valid(path: str | os.PathLike) -> Any | None:
    """Like :func:`read_json` for a file the caller recomputes: None (with a warning saying so) when it is
    corrupt."""
    try:
        return _load_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        logger.warning("%s is truncated or corrupt (%s); it is recomputed and rewritten", path, exc)
        return None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The complete lines of a JSON-lines file (a torn last line, from a kill mid-append, is dropped);
    :class:`CorruptFileError` naming the file and the line when a complete line is not a JSON object."""
    try:
        return [record for _, record in json_lines(path, complete_only=True)]
    except ValueError as exc:
        raise CorruptFileError(str(exc)) from None


# ------------------------------------------------------------------------------------------------------ RNG
def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------- model cache
def _is_small(value: Any) -> bool:
    """True for values cheap to store: no tensor (recursively) larger than ``SMALL_TENSOR_ELEMENTS``."""
    if isinstance(value, torch.Tensor):
        return value.numel() <= SMALL_TENSOR_ELEMENTS
    if isinstance(value, Mapping):
        return all(_is_small(v) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return all(_is_small(v) for v in value)
    return True


def small_cache_entries(model) -> dict:
    return {key: value for key, value in model_cache(model).items() if _is_small(value)}


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | os.PathLike, model, parameter_names, state: Mapping) -> None:
    """Write a checkpoint of ``model`` (the named parameters, sessions, small cache entries) plus the RNG states
    and the runner's ``state``, atomically."""
    weights = {name: model.get_parameter(name).detach().cpu().clone() for name in sorted(parameter_names)}
    payload = {
        "format": 1,
        "weights": weights,
        "sessions": dict(model.__dict__.get(SESSIONS_ATTRIBUTE, {})),
        "cache": small_cache_entries(model),
        "rng": rng_state(),
        "state": dict(state),
    }
    atomic_torch_save(payload, path)
    logger.debug("checkpoint written: %s (%d weight(s))", path, len(weights))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint; tensors return to the devices they were saved from (resume on the same kind of
    machine)."""
    try:
        payload = torch.load(path, weights_only=False)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a torn file
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "cuda" in text.lower() or "device" in text.lower():
            raise CorruptFileError(f"{path}: cannot load the checkpoint on this machine ({text}); resume it on the "
                                   "kind of machine that wrote it, or delete it and re-run") from None
        raise CorruptFileError(f"{path} is truncated or corrupt ({text}); delete it and re-run (the run starts "
                               "again from its last good state: the edits since then are redone)") from None
    if not isinstance(payload, dict) or payload.get("format") != 1:
        raise ValueError(f"{path}: not a checkpoint of this runner")
    return payload


def restore_checkpoint(model, payload: Mapping) -> None:
    """Put a checkpoint back into a freshly loaded model: cache entries, then weights (bit for bit: the model must
    hold them in the dtype they were saved in), then the sessions, then the RNG states.

    The sessions' weight fingerprints are recomputed from the restored weights, which are the checkpoint's own:
    a checkpoint written before the fingerprints became exact integer digests still resumes."""
    for name, value in payload["weights"].items():
        parameter = model.get_parameter(name)
        if parameter.dtype != value.dtype:
            raise ValueError(f"checkpoint: {name} was saved as {value.dtype} but the model holds "
                             f"{parameter.dtype}; load the model in the run's dtype")
    model_cache(model).update(payload["cache"])
    with torch.no_grad():
        for name, value in payload["weights"].items():
            parameter = model.get_parameter(name)
            parameter.copy_(value.to(device=parameter.device))
    sessions = model.__dict__.setdefault(SESSIONS_ATTRIBUTE, {})
    sessions.clear()
    for method, session in payload["sessions"].items():
        session.record_weights(model, list(session.fingerprints))
        sessions[method] = session
    set_rng_state(payload["rng"])
