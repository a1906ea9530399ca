"""Registered methods: EasyEdit name -> hyperparameter class and ``apply_X_to_model`` function."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .mose import MOSE_METHOD, MOSEHyperParams, apply_mose_to_model, undo_mose_edits


@dataclass(frozen=True)
class MethodSpec:
    name: str
    hparams_cls: type
    apply: Callable


METHODS: dict[str, MethodSpec] = {
    "MOSE": MethodSpec("MOSE", MOSEHyperParams, apply_mose_to_model),
}

__all__ = ["METHODS", "MethodSpec", "MOSEHyperParams", "apply_mose_to_model", "undo_mose_edits", "MOSE_METHOD"]
