"""MOSE-input-budget: the input side with a bounded protection budget (docs/methods.md §1.4).

The input side keeps every plane exactly ⊥ the keys of all earlier edits, so each edit takes one more direction out
of the subspace the keys may turn in: on the embedded model the reach α/‖k‖ falls from 0.76 to 0.57 over 500 edits
and the edits stop landing (docs/benchmarks.md §7.2). This rule keeps the planes ⊥ only the ``protect_rank``
principal directions of the earlier keys of each layer (the left singular vectors of K_p with the largest
singular values), so the free dimension never falls below (allowed dimension − protect_rank − batch size), and the
earlier keys' outputs move only through their energy outside those directions. Everything else is the input side's
rule (``mose_input.py``).
"""
from __future__ import annotations

import dataclasses

import torch

from ..editor import LayerBatch, Operands, Update
from .mose_input import MOSEInput, MOSEInputHyperParams, turn_each_key
from .mose_shared import MOSEState


@dataclasses.dataclass(kw_only=True)
class MOSEInputBudgetHyperParams(MOSEInputHyperParams):
    """The input side's fields plus ``protect_rank``."""

    ALG_NAMES = ("MOSE-input-budget",)

    # how many principal directions of each layer's earlier edit keys the planes must avoid
    protect_rank: int = 64

    def validate(self, source: str = "<hparams>") -> None:
        super().validate(source)
        if self.protect_rank < 0:
            raise ValueError(f"{source}: key 'protect_rank' must be >= 0, got {self.protect_rank}")


def principal_keys(keys: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` leading left singular vectors of ``keys`` (p × m), scaled by their singular values (all of
    ``keys`` when it has no more than ``rank`` columns)."""
    if keys.shape[1] <= rank:
        return keys
    U, S, _ = torch.linalg.svd(keys, full_matrices=False)
    return U[:, :rank] * S[:rank]


def budget_rule(batch: LayerBatch, ops: Operands, state: MOSEState, hp: MOSEInputBudgetHyperParams) -> Update:
    """The input side's planes, ⊥ the ``protect_rank`` principal directions of the earlier keys."""
    return turn_each_key(batch, ops, state, hp, principal_keys(state.earlier_keys(batch.module, batch.K),
                                                               hp.protect_rank))


class MOSEInputBudget(MOSEInput):
    name = "MOSE-input-budget"
    hparams_class = MOSEInputBudgetHyperParams
    rule = staticmethod(budget_rule)

    @staticmethod
    def protected(state: MOSEState, module: str, K: torch.Tensor, hp: MOSEInputBudgetHyperParams) -> torch.Tensor:
        return principal_keys(state.earlier_keys(module, K), hp.protect_rank)


MOSE_INPUT_BUDGET_METHOD = MOSEInputBudget()


def apply_mose_input_budget_to_model(model, tok, requests, hparams: MOSEInputBudgetHyperParams, copy: bool = False,
                                     return_orig_weights: bool = False, **kwargs):
    """Edit ``model`` in place with MOSE-input-budget; EasyEdit's contract: returns ``(model, weights_copy)``.
    Diagnostics go to ``edit_history(model, "MOSE-input-budget")``."""
    return MOSE_INPUT_BUDGET_METHOD.apply(model, tok, requests, hparams, copy=copy,
                                          return_orig_weights=return_orig_weights, **kwargs)
