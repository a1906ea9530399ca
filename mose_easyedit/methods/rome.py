"""ROME (Meng et al. 2022): a rank-one update of one layer per fact.

For each request: optimise the target at the edited layer with the clamp relative to the edited module's
output (ROME's v*), read the bare-prompt key k* and the template-mean key k̄, and set

    ΔW = (v* − W k*) uᵀ / (uᵀ k*),   u = C⁻¹ k̄ (``mom2_adjustment``) else k̄,   v* = W k* + (z − h)

(docs/methods.md §2; :func:`mose_easyedit.rules.rome_delta`), so that (W + ΔW) k* = v* exactly. A call with
n requests applies n rank-one edits in sequence, each on the weights left by the previous one, as one atomic
call. The k̄ / k* asymmetry is ROME's own (the known cause of its collapse in long sequential runs); it is
logged as ``key_gap`` = ‖k* − k̄‖ / ‖k*‖.
"""
from __future__ import annotations

import dataclasses

import torch

from ..editor import EditContext, LayerBatch, Method, Operands, Update, spread_update
from ..hparams import LocateEditHyperParams
from ..rules import rome_delta


@dataclasses.dataclass(kw_only=True)
class ROMEHyperParams(LocateEditHyperParams):
    """The core's fields; ``layers`` names exactly one layer, ``mom2_adjustment`` chooses u = C⁻¹ k̄ or k̄."""

    ALG_NAMES = ("ROME", "ROME-core")

    def validate(self, source: str = "<hparams>") -> None:
        super().validate(source)
        if len(self.layers) != 1:
            raise ValueError(f"{source}: key 'layers' must name exactly one layer for ROME, "
                             f"got {self.layers}")


def rome_rule(batch: LayerBatch, ops: Operands, state, hp: ROMEHyperParams) -> Update:
    """ΔW = (v* − W k*) uᵀ / (uᵀ k*), u = C⁻¹ k̄ (or k̄ without C), v* = W k* + residual; W ← W + ΔW."""
    W = batch.W
    k_star = batch.K_bare[:, 0].to(W.device)
    k_mean = batch.K[:, 0].to(W.device)
    v_star = W @ k_star + batch.residual[:, 0].to(W.device)
    delta = rome_delta(W, k_star, k_mean, v_star, ops.C)
    return Update(W + delta, state, {
        "update_norm": float(delta.norm()),
        "relative_update": float(delta.norm() / W.norm()),
        "residual_norm": float(batch.residual.norm()),
        "key_gap": float((k_star - k_mean).norm() / k_star.norm()),
    })


class ROME(Method):
    name = "ROME"
    hparams_class = ROMEHyperParams
    clamp_reference = "module_output"

    def window(self, ctx: EditContext) -> list[int]:
        layer = ctx.hparams.layers[0]
        if ctx.hparams.mom2_adjustment:
            ctx.second_moments([layer])
        return [layer]

    rule = staticmethod(rome_rule)

    def operands(self, ctx: EditContext, layer: int, W: torch.Tensor) -> Operands:
        if not ctx.hparams.mom2_adjustment:
            return Operands()
        return Operands(C=ctx.second_moments([layer])[layer].to(W.device))

    def record(self, ctx: EditContext, batch: LayerBatch, diagnostics: dict) -> None:
        ctx.diagnostics.setdefault("per_request", []).append(diagnostics)

    def edit(self, ctx: EditContext) -> None:
        (layer,) = self.checked_window(ctx)
        ctx.diagnostics.update(layers=[layer], target_loss=[], target_steps=[], delta_norm=[])
        for request in ctx.requests:
            # a view of the same call (shared backup, timings, diagnostics) holding one request; ROME carries no
            # state, so nothing needs to flow back from the view
            single = dataclasses.replace(ctx, requests=[request])
            target = single.targets(layer, self.clamp_reference)
            ctx.diagnostics["target_loss"] += target.losses
            ctx.diagnostics["target_steps"] += target.steps
            ctx.diagnostics["delta_norm"] += target.delta.norm(dim=0).tolist()
            spread_update(single, [layer], self, target)


ROME_METHOD = ROME()


def apply_rome_to_model(model, tok, requests, hparams: ROMEHyperParams, copy: bool = False,
                        return_orig_weights: bool = False, **kwargs):
    """Edit ``model`` in place with ROME; EasyEdit's contract: returns ``(model, weights_copy)``.

    n requests are n rank-one edits of the same layer, applied in order within one atomic call. Diagnostics
    (‖ΔW‖ and the k*/k̄ gap per request) go to ``edit_history(model, "ROME")``.
    """
    return ROME_METHOD.apply(model, tok, requests, hparams, copy=copy,
                             return_orig_weights=return_orig_weights, **kwargs)
