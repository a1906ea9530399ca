"""MEMIT (Meng et al. 2023): a least-squares update of every layer in the window, spread over the layers.

At each layer of the window (ascending, lower layers already updated) the shared core hands over the keys K
(template means) and the residual Rsd = (z − h) / (layers remaining); the update is

    ΔW = Rsd Kᵀ (λ C + K Kᵀ)⁻¹,    λ = ``mom2_update_weight``                    (docs/methods.md §3)

solved in float64 (:func:`mose_easyedit.rules.memit_delta`). ``C`` is the uncentred key second moment over
generic text, gathered for the whole window in one corpus pass and cached.
"""
from __future__ import annotations

import dataclasses

import torch

from ..cache import cached_per_tensor
from ..editor import EditContext, LayerBatch, Method, Operands, Update
from ..hparams import LocateEditHyperParams
from ..rules import cholesky_factor, memit_delta


@dataclasses.dataclass(kw_only=True)
class MEMITHyperParams(LocateEditHyperParams):
    """MEMIT's hyperparameters: the core's fields; λ is ``mom2_update_weight`` (C is always used)."""

    ALG_NAMES = ("MEMIT", "MEMIT-core")

    def validate(self, source: str = "<hparams>") -> None:
        super().validate(source)
        require_update_weight(self, source)


def require_update_weight(hparams: LocateEditHyperParams, source: str) -> None:
    """λ = ``mom2_update_weight`` must be > 0: λ C keeps MEMIT's solve regular."""
    if not hparams.mom2_update_weight > 0:
        raise ValueError(f"{source}: key 'mom2_update_weight' must be > 0, got {hparams.mom2_update_weight}")


def covariance_operands(ctx: EditContext, layer: int, W: torch.Tensor) -> Operands:
    """C of the layer on the weight's device (cached: the window was gathered in one pass) and its Cholesky
    factor, computed once per statistics tensor and kept in the model's cache (None when C is not positive
    definite: the rules then solve with C directly)."""
    C = ctx.second_moments([layer])[layer].to(W.device)
    factor = cached_per_tensor(ctx.model, ("covariance_cholesky", ctx.module(layer)), C, cholesky_factor)
    return Operands(C=C, C_factor=factor)


def additive_diagnostics(batch: LayerBatch, delta: torch.Tensor, **extra) -> dict:
    """Per-layer diagnostics of an additive update: ‖ΔW‖, ‖ΔW‖/‖W‖ and how much of the residual it delivers
    on the edit keys (``delivered`` = ‖ΔW K‖ / ‖Rsd‖, 1 when the keys' outputs move by exactly Rsd)."""
    residual = batch.residual.to(delta.device)
    moved = delta @ batch.K.to(delta.device)
    residual_norm = float(residual.norm())
    return {
        "update_norm": float(delta.norm()),
        "relative_update": float(delta.norm() / batch.W.norm()),
        "residual_norm": residual_norm,
        "delivered": float(moved.norm()) / residual_norm if residual_norm > 0 else float("nan"),
        "fit_error": float((moved - residual).norm()) / residual_norm if residual_norm > 0 else float("nan"),
        **extra,
    }


def memit_rule(batch: LayerBatch, ops: Operands, state, hp: MEMITHyperParams) -> Update:
    """ΔW = Rsd Kᵀ (λ C + K Kᵀ)⁻¹, W ← W + ΔW."""
    delta = memit_delta(batch.residual.to(ops.C.device), batch.K.to(ops.C.device), ops.C, hp.mom2_update_weight,
                        factor=ops.C_factor)
    return Update(batch.W + delta, state, additive_diagnostics(batch, delta))


class MEMIT(Method):
    name = "MEMIT"
    hparams_class = MEMITHyperParams
    rule = staticmethod(memit_rule)
    operands = staticmethod(covariance_operands)

    def window(self, ctx: EditContext) -> list[int]:
        window = sorted(ctx.hparams.layers)
        ctx.second_moments(window)  # one corpus pass for every layer of the window
        return window


MEMIT_METHOD = MEMIT()


def apply_memit_to_model(model, tok, requests, hparams: MEMITHyperParams, copy: bool = False,
                         return_orig_weights: bool = False, **kwargs):
    """Edit ``model`` in place with MEMIT; EasyEdit's contract: returns ``(model, weights_copy)``.

    All requests of one call are one batch (one solve per layer). Diagnostics of each call are appended to
    ``edit_history(model, "MEMIT")``.
    """
    return MEMIT_METHOD.apply(model, tok, requests, hparams, copy=copy,
                              return_orig_weights=return_orig_weights, **kwargs)
