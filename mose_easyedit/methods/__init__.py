"""Registered methods: EasyEdit name -> hyperparameter class and ``apply_X_to_model`` function.

Every method is a :class:`mose_easyedit.editor.Method` on the shared core; only the update rule differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .mose import MOSE_METHOD, MOSEHyperParams, apply_mose_to_model, undo_mose_edits


@dataclass(frozen=True)
class MethodSpec:
    name: str
    hparams_cls: type
    apply: Callable


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, hparams_cls: type, apply: Callable) -> MethodSpec:
    spec = METHODS[name] = MethodSpec(name, hparams_cls, apply)
    return spec


register_method("MOSE", MOSEHyperParams, apply_mose_to_model)

__all__ = ["METHODS", "MethodSpec", "register_method", "MOSEHyperParams", "apply_mose_to_model",
           "undo_mose_edits", "MOSE_METHOD"]
