"""Editing sessions: the state one editing run carries between calls, scoped to one model and one method.

A session lives on the model object (never in a module global) and holds the method's carried state (one frozen
dataclass: AlphaEdit's K_pK_pᵀ and its carried inverse, PRUNE's W₀ and W_raw, MOSE's protected keys, preservation
moment and undo log; replaced whole after each successful call), the per-edit diagnostics and a
fingerprint of every weight it wrote. When those weights no longer match the fingerprints — EasyEdit restored them
after a non-sequential edit, or the user reloaded them — the run is over and the next call starts a new session,
so state never leaks between independent runs.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from .modeling import read_weight

logger = logging.getLogger(__name__)

SESSIONS_ATTRIBUTE = "_mose_easyedit_sessions"


_WORD = {1: torch.int8, 2: torch.int16}  # wider elements are read as 32-bit words


def weight_fingerprint(weight: torch.Tensor) -> tuple:
    """Exact summary of a weight: shape, dtype and a digest of the integer row and column sums of its bits.

    The bits are read as integer words (16-bit for bf16/fp16, 32-bit for fp32 and wider) and summed in int64, which
    cannot overflow at any weight size a model has, so the sums are exact: the same on every device and every thread
    count (float sums are not: their last bits follow the reduction order). Any change of a bit changes a row sum;
    two elements swapping places change a column sum or a row sum."""
    w = weight.detach().contiguous()
    rows = w.reshape(w.shape[0] if w.dim() else 1, -1)
    words = rows.view(_WORD.get(rows.element_size(), torch.int32)).to(torch.int64)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(words.sum(dim=1).cpu().numpy().tobytes())
    digest.update(words.sum(dim=0).cpu().numpy().tobytes())
    return tuple(weight.shape), str(weight.dtype), digest.hexdigest()


@dataclass
class EditSession:
    """One editing run of one method on one model."""

    method: str
    state: Any = None  # the method's carried state, one frozen dataclass (None: nothing carried yet)
    history: list[dict] = field(default_factory=list)
    fingerprints: dict[str, tuple] = field(default_factory=dict)
    num_edits: int = 0

    def matches(self, model) -> bool:
        """True while every weight this session wrote still holds what it wrote."""
        for module, expected in self.fingerprints.items():
            if weight_fingerprint(read_weight(model, module)) != expected:
                return False
        return True

    def record_weights(self, model, modules) -> None:
        for module in modules:
            self.fingerprints[module] = weight_fingerprint(read_weight(model, module))


def _sessions(model) -> dict[str, EditSession]:
    sessions = model.__dict__.get(SESSIONS_ATTRIBUTE)
    if sessions is None:
        sessions = {}
        model.__dict__[SESSIONS_ATTRIBUTE] = sessions
    return sessions


def get_session(model, method: str, create: bool = True) -> EditSession | None:
    """The live session of ``method`` on ``model``; a new one if there is none or the old one's weights were
    changed from outside (restored, reloaded)."""
    sessions = _sessions(model)
    session = sessions.get(method)
    if session is not None and not session.matches(model):
        logger.info("%s: edited weights changed outside the session (restored?); starting a new editing run",
                    method)
        session = None
        del sessions[method]
    if session is None and create:
        session = sessions[method] = EditSession(method)
    return session


def reset_session(model, method: str | None = None) -> None:
    """Forget the carried state of ``method`` (or of every method) on ``model``; weights are untouched."""
    sessions = _sessions(model)
    if method is None:
        sessions.clear()
    else:
        sessions.pop(method, None)
