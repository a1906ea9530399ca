"""Registered methods: EasyEdit name -> hyperparameter class and ``apply_X_to_model`` function.

Every method is a :class:`mose_easyedit.editor.Method` on the shared core; only the update rule differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .mose import MOSE_METHOD, MOSEHyperParams, apply_mose_to_model
from .mose_input import MOSE_INPUT_METHOD, MOSEInputHyperParams, apply_mose_input_to_model
from .mose_input_budget import (MOSE_INPUT_BUDGET_METHOD, MOSEInputBudgetHyperParams,
                                apply_mose_input_budget_to_model)
from .mose_input_room import MOSE_INPUT_ROOM_METHOD, MOSEInputRoomHyperParams, apply_mose_input_room_to_model
from .mose_input_procrustes import (MOSE_INPUT_PROCRUSTES_METHOD, MOSEInputProcrustesHyperParams,
                                    apply_mose_input_procrustes_to_model)
from .mose_shared import undo_mose_edits
from ..editor import Method
from .mose_oft import MOSE_OFT_METHOD, MOSEOFTHyperParams, apply_mose_oft_to_model
from .alphaedit import ALPHAEDIT_METHOD, AlphaEditHyperParams, apply_alphaedit_to_model
from .emmet import EMMET_METHOD, EMMETHyperParams, apply_emmet_to_model
from .memit import MEMIT_METHOD, MEMITHyperParams, apply_memit_to_model
from .prune import PRUNE_METHOD, PRUNEHyperParams, apply_prune_to_model
from .rect import RECT_METHOD, RECTHyperParams, apply_rect_to_model
from .rome import ROME_METHOD, ROMEHyperParams, apply_rome_to_model


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its EasyEdit name, hyperparameter class, ``apply_X_to_model`` and its engine object
    (the :class:`~mose_easyedit.editor.Method`: window, operands, rule, carried state, touchable layers,
    ablations), where everything method-specific that the experiment runner needs comes from."""

    name: str
    hparams_cls: type
    apply: Callable
    engine: Method
    # True when the facts of one call are edited one after another (ROME's n rank-one updates in order), so
    # a batch-sequential run of b facts per call makes exactly the edits of the single-sequential run
    one_fact_at_a_time: bool = False


METHODS: dict[str, MethodSpec] = {}


def register_method(engine: Method, apply: Callable, one_fact_at_a_time: bool = False) -> MethodSpec:
    """Register ``engine`` (a :class:`~mose_easyedit.editor.Method`) under its name with its apply function."""
    spec = METHODS[engine.name] = MethodSpec(engine.name, engine.hparams_class, apply, engine, one_fact_at_a_time)
    return spec


register_method(MOSE_METHOD, apply_mose_to_model)
register_method(MOSE_INPUT_METHOD, apply_mose_input_to_model)
register_method(MOSE_INPUT_BUDGET_METHOD, apply_mose_input_budget_to_model)
register_method(MOSE_INPUT_ROOM_METHOD, apply_mose_input_room_to_model)
register_method(MOSE_INPUT_PROCRUSTES_METHOD, apply_mose_input_procrustes_to_model)
register_method(MOSE_OFT_METHOD, apply_mose_oft_to_model)
register_method(ROME_METHOD, apply_rome_to_model, one_fact_at_a_time=True)
register_method(MEMIT_METHOD, apply_memit_to_model)
register_method(RECT_METHOD, apply_rect_to_model)
register_method(EMMET_METHOD, apply_emmet_to_model)
register_method(PRUNE_METHOD, apply_prune_to_model)
register_method(ALPHAEDIT_METHOD, apply_alphaedit_to_model)

__all__ = ["METHODS", "MethodSpec", "register_method", "MOSEHyperParams", "apply_mose_to_model",
           "undo_mose_edits", "MOSE_METHOD", "MOSEInputHyperParams",
           "apply_mose_input_to_model", "MOSE_INPUT_METHOD",
           "MOSEInputBudgetHyperParams", "apply_mose_input_budget_to_model",
           "MOSEInputRoomHyperParams", "apply_mose_input_room_to_model",
           "MOSEInputProcrustesHyperParams", "apply_mose_input_procrustes_to_model", "MOSEOFTHyperParams",
           "apply_mose_oft_to_model",
           "ROMEHyperParams", "apply_rome_to_model", "MEMITHyperParams", "apply_memit_to_model",
           "RECTHyperParams", "apply_rect_to_model", "EMMETHyperParams", "apply_emmet_to_model",
           "PRUNEHyperParams", "apply_prune_to_model", "AlphaEditHyperParams", "apply_alphaedit_to_model"]
