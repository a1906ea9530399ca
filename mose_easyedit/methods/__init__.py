"""Registered methods: EasyEdit name -> hyperparameter class and ``apply_X_to_model`` function.

Every method is a :class:`mose_easyedit.editor.Method` on the shared core; only the update rule differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .mose import MOSE_METHOD, MOSEHyperParams, apply_mose_to_model, undo_mose_edits
from .mose_oft import MOSEOFTHyperParams, apply_mose_oft_to_model
from .alphaedit import AlphaEditHyperParams, apply_alphaedit_to_model
from .emmet import EMMETHyperParams, apply_emmet_to_model
from .memit import MEMITHyperParams, apply_memit_to_model
from .prune import PRUNEHyperParams, apply_prune_to_model
from .rect import RECTHyperParams, apply_rect_to_model
from .rome import ROMEHyperParams, apply_rome_to_model


@dataclass(frozen=True)
class MethodSpec:
    name: str
    hparams_cls: type
    apply: Callable
    # True when the facts of one call are edited one after another (ROME's n rank-one updates in order), so
    # a batch-sequential run of b facts per call makes exactly the edits of the single-sequential run
    one_fact_at_a_time: bool = False


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, hparams_cls: type, apply: Callable, one_fact_at_a_time: bool = False) -> MethodSpec:
    spec = METHODS[name] = MethodSpec(name, hparams_cls, apply, one_fact_at_a_time)
    return spec


register_method("MOSE", MOSEHyperParams, apply_mose_to_model)
register_method("MOSE-OFT", MOSEOFTHyperParams, apply_mose_oft_to_model)
register_method("ROME", ROMEHyperParams, apply_rome_to_model, one_fact_at_a_time=True)
register_method("MEMIT", MEMITHyperParams, apply_memit_to_model)
register_method("RECT", RECTHyperParams, apply_rect_to_model)
register_method("EMMET", EMMETHyperParams, apply_emmet_to_model)
register_method("PRUNE", PRUNEHyperParams, apply_prune_to_model)
register_method("AlphaEdit", AlphaEditHyperParams, apply_alphaedit_to_model)

__all__ = ["METHODS", "MethodSpec", "register_method", "MOSEHyperParams", "apply_mose_to_model",
           "undo_mose_edits", "MOSE_METHOD", "MOSEOFTHyperParams", "apply_mose_oft_to_model",
           "ROMEHyperParams", "apply_rome_to_model", "MEMITHyperParams", "apply_memit_to_model",
           "RECTHyperParams", "apply_rect_to_model", "EMMETHyperParams", "apply_emmet_to_model",
           "PRUNEHyperParams", "apply_prune_to_model", "AlphaEditHyperParams", "apply_alphaedit_to_model"]
