"""MEMIT (Meng et al. 2023): a least-squares update of every layer in the window, spread over the layers.

At each layer of the window (ascending, lower layers already updated) the shared core hands over the keys K
(template means) and the residual R = (z − h) / (layers remaining); the update is

    ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹,    λ = ``mom2_update_weight``                    (docs/methods.md §3)

solved in float64 (:func:`mose_easyedit.rules.memit_delta`). ``C`` is the uncentred key second moment over
generic text, gathered for the whole window in one corpus pass and cached.
"""
from __future__ import annotations

import dataclasses

import torch

from ..editor import EditContext, LayerBatch, Method
from ..hparams import LocateEditHyperParams
from ..keys import model_cache
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


def covariance(ctx: EditContext, batch: LayerBatch) -> torch.Tensor:
    """C of the batch's layer, on the weight's device (cached: the window was gathered in one pass)."""
    return ctx.second_moments([batch.layer])[batch.layer].to(batch.W.device)


def covariance_factor(ctx: EditContext, batch: LayerBatch, C: torch.Tensor) -> torch.Tensor | None:
    """C's Cholesky factor, computed once per statistics tensor and kept in the model's cache (None when C is
    not positive definite: the rules then solve with C directly)."""
    cache = model_cache(ctx.model)
    key = ("covariance_cholesky", batch.module)
    hit = cache.get(key)
    if hit is None or hit[0] is not C:
        hit = cache[key] = (C, cholesky_factor(C))
    return hit[1]


def record_update(ctx: EditContext, batch: LayerBatch, delta: torch.Tensor, **extra) -> None:
    """Per-layer diagnostics of an additive update: ‖ΔW‖, ‖ΔW‖/‖W‖ and how much of the residual it delivers
    on the edit keys (``delivered`` = ‖ΔW K‖ / ‖R‖, 1 when the keys' outputs move by exactly R)."""
    residual = batch.residual.to(delta.device)
    moved = delta @ batch.K.to(delta.device)
    residual_norm = float(residual.norm())
    entry = {
        "update_norm": float(delta.norm()),
        "relative_update": float(delta.norm() / batch.W.norm()),
        "residual_norm": residual_norm,
        "delivered": float(moved.norm()) / residual_norm if residual_norm > 0 else float("nan"),
        "fit_error": float((moved - residual).norm()) / residual_norm if residual_norm > 0 else float("nan"),
    }
    entry.update(extra)
    ctx.diagnostics.setdefault("per_layer", {})[batch.layer] = entry


class MEMIT(Method):
    name = "MEMIT"
    hparams_class = MEMITHyperParams

    def window(self, ctx: EditContext) -> list[int]:
        window = sorted(ctx.hparams.layers)
        ctx.second_moments(window)  # one corpus pass for every layer of the window
        return window

    def rule(self, ctx: EditContext, batch: LayerBatch) -> torch.Tensor:
        C = covariance(ctx, batch)
        lam = ctx.hparams.mom2_update_weight
        delta = memit_delta(batch.residual.to(C.device), batch.K.to(C.device), C, lam,
                            factor=covariance_factor(ctx, batch, C))
        record_update(ctx, batch, delta)
        return batch.W + delta


MEMIT_METHOD = MEMIT()


def apply_memit_to_model(model, tok, requests, hparams: MEMITHyperParams, copy: bool = False,
                         return_orig_weights: bool = False, keep_original_weight: bool = False, **kwargs):
    """Edit ``model`` in place with MEMIT; EasyEdit's contract: returns ``(model, weights_copy)``.

    All requests of one call are one batch (one solve per layer). Diagnostics of each call are appended to
    ``edit_history(model, "MEMIT")``.
    """
    return MEMIT_METHOD.apply(model, tok, requests, hparams, copy=copy,
                              return_orig_weights=return_orig_weights,
                              keep_original_weight=keep_original_weight, **kwargs)
