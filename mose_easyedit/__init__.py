"""MOSE (Multiplicative Orthogonal Sequential Editing) and six locate-then-edit baselines on one shared core."""
from .easyedit import autoregister, register, unregister
from .methods import (METHODS, AlphaEditHyperParams, EMMETHyperParams, MEMITHyperParams, MOSEHyperParams,
                      MOSEInputHyperParams, apply_mose_input_to_model, MOSEInputBudgetHyperParams,
                      apply_mose_input_budget_to_model, MOSEInputRoomHyperParams, apply_mose_input_room_to_model,
                      MOSEInputProcrustesHyperParams, apply_mose_input_procrustes_to_model, MOSEOFTHyperParams,
                      PRUNEHyperParams, RECTHyperParams, ROMEHyperParams, apply_alphaedit_to_model,
                      apply_emmet_to_model, apply_memit_to_model, apply_mose_oft_to_model, apply_mose_to_model,
                      apply_prune_to_model, apply_rect_to_model, apply_rome_to_model, undo_mose_edits)
from .modeling import load_default_model
from .session import get_session, reset_session

__version__ = "0.1.0"


def edit_history(model, method: str = "MOSE") -> list[dict]:
    """Per-call diagnostics recorded by ``method``'s live session on ``model`` (empty if none)."""
    session = get_session(model, method, create=False)
    return list(session.history) if session is not None else []


__all__ = ["METHODS", "MOSEHyperParams", "apply_mose_to_model", "MOSEInputHyperParams", "apply_mose_input_to_model",
           "MOSEInputBudgetHyperParams", "apply_mose_input_budget_to_model", "MOSEInputRoomHyperParams",
           "apply_mose_input_room_to_model", "MOSEInputProcrustesHyperParams", "apply_mose_input_procrustes_to_model",
           "undo_mose_edits", "MOSEOFTHyperParams",
           "apply_mose_oft_to_model", "ROMEHyperParams", "apply_rome_to_model", "MEMITHyperParams",
           "apply_memit_to_model", "RECTHyperParams", "apply_rect_to_model", "EMMETHyperParams", "apply_emmet_to_model",
           "PRUNEHyperParams", "apply_prune_to_model", "AlphaEditHyperParams", "apply_alphaedit_to_model",
           "load_default_model", "edit_history", "get_session", "reset_session", "register", "unregister",
           "__version__"]

# Register our methods with EasyEdit as soon as it is imported (now, if it already is); never imports it.
autoregister()
