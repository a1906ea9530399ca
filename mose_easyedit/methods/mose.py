"""MOSE, the paper's output side (paper §5; docs/methods.md §1.1–1.2): W ← R W with R ∈ O(d) in closed form.

Per edit (or batch) the window is l* (Eq. 21–22, ``mose_shared.py``) and its neighbours, edited with MEMIT's
residual spreading; at each layer

    R = polar(M),   M = W (λ C + γ K_p K_pᵀ) Wᵀ + V (W K)ᵀ        (Eq. 17–20, K_p: keys of earlier edits)

so ‖W‖_F, every singular value and κ₂(W) are unchanged. The preservation moment G = W (λ C + γ K_p K_pᵀ) Wᵀ is
carried from call to call (R G Rᵀ + γ (R W K)(R W K)ᵀ after each rotation) instead of rebuilt. A trust region
(``max_rotation``, ``target_max_angle``; both off by default, which is the paper's rule) caps how far a layer
turns. The input side is the sibling rule in ``mose_input.py``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch

from ..editor import EditContext, LayerBatch, Operands, Update
from ..input_rotation import project_to_spheres
from ..rules import (POLAR_METHODS, preservation_moment, procrustes_diagnostics, procrustes_rotation,
                     propagate_preservation_moment, rotation_trust_region)
from .mose_input import MOSE_INPUT_METHOD, MOSEInputHyperParams
from .mose_shared import MOSEBase, MOSESharedHyperParams, MOSEState, RotationStep

logger = logging.getLogger(__name__)

# keys of the input side (MOSE-input) that a MOSE file with ``rotation_side`` may carry
INPUT_SIDE_KEYS = ("input_subspace", "nullspace_threshold", "input_a_ridge", "protect_reading", "input_spread")
OUTPUT_SIDE_KEYS = ("mose_lambda", "polar_method", "max_rotation", "target_max_angle")


@dataclasses.dataclass(kw_only=True)
class MOSEHyperParams(MOSESharedHyperParams):
    """The output side's hyperparameters. A file with ``rotation_side: input`` (the earlier way to ask for the
    input side) loads as :class:`~mose_easyedit.methods.mose_input.MOSEInputHyperParams`; with
    ``rotation_side: output`` the input side's keys are accepted and ignored."""

    ALG_NAMES = ("MOSE", "MOSE-core")

    # λ weighs preservation of generic keys' outputs (W C Wᵀ) against the edit (V_E (W K_E)ᵀ); it lives in
    # output space, so MEMIT's 15000 does not transfer.
    mose_lambda: float = 30.0
    # Polar factor of M: "svd" (the paper), "eigh" or "newton_schulz" (same R, see benchmarks).
    polar_method: str = "svd"
    # Trust region (null: the paper's rule). max_rotation caps ‖R − I‖_F per layer and edit: a longer rotation
    # is shortened along its geodesic from I (R^t), the rest of the request left undelivered. target_max_angle
    # (radians, with target_reach: rotation) asks no layer to turn W k further than this.
    max_rotation: Optional[float] = None
    target_max_angle: Optional[float] = None

    @classmethod
    def from_dict(cls, config: dict, source: str = "<dict>"):
        if cls is MOSEHyperParams and isinstance(config, dict) and "rotation_side" in config:
            config = dict(config)
            side = config.pop("rotation_side")
            if side == "input":
                for key in ("max_rotation", "target_max_angle"):
                    if config.get(key) is not None:
                        raise ValueError(f"{source}: key '{key}' is a trust region of the output side; "
                                         "rotation_side: input does not read it")
                return MOSEInputHyperParams.from_dict(
                    {**{k: v for k, v in config.items() if k not in OUTPUT_SIDE_KEYS}, "alg_name": "MOSE-input"},
                    source)
            if side != "output":
                raise ValueError(f"{source}: key 'rotation_side' must be one of ['output', 'input'], got {side!r}")
            config = {k: v for k, v in config.items() if k not in INPUT_SIDE_KEYS}
        return super().from_dict(config, source)

    def validate(self, source: str = "<hparams>") -> None:
        super().validate(source)
        if self.mose_lambda <= 0:
            raise ValueError(f"{source}: key 'mose_lambda' must be > 0 (λ = 0 leaves the rotation undetermined)")
        if self.polar_method not in POLAR_METHODS:
            raise ValueError(f"{source}: key 'polar_method' must be one of {list(POLAR_METHODS)}")
        for key in ("max_rotation", "target_max_angle"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"{source}: key '{key}' must be > 0 or null")
        if self.target_max_angle is not None and self.target_reach != "rotation":
            raise ValueError(f"{source}: key 'target_max_angle' needs target_reach: rotation")


def output_rotation_rule(batch: LayerBatch, ops: Operands, state: MOSEState, hp: MOSEHyperParams) -> Update:
    """R = polar(W (λC + γ K_p K_pᵀ) Wᵀ + V (W K)ᵀ), optionally shortened to the trust region; W ← R W."""
    W, K, V, C, lam = batch.W, batch.K, batch.values, ops.C, hp.mose_lambda
    gamma = hp.protect_weight if hp.protect_edits else 0.0
    setting = (lam, gamma)
    carried = state.preservation.get(batch.module)
    if carried is not None and carried[0] == setting:
        G = carried[1].to(W.device)
    else:
        G = preservation_moment(W, C, lam)
        earlier = state.earlier_keys(batch.module, K)
        if gamma > 0 and earlier.shape[1]:
            outputs = W @ earlier
            G = G + gamma * outputs @ outputs.T
    R = procrustes_rotation(W, C, K, V, lam, method=hp.polar_method, preservation=G)
    diagnostics = {}
    if hp.max_rotation is not None:
        R, diagnostics["trust_fraction"] = rotation_trust_region(R, hp.max_rotation)
    new_weight = R @ W
    diagnostics = {**procrustes_diagnostics(W, K, V, R), **diagnostics}
    state = state.after_layer(batch.module, K, RotationStep(R.float().cpu(), K.shape[1]),
                              (setting, propagate_preservation_moment(G, R, new_weight @ K, gamma)))
    return Update(new_weight, state, diagnostics)


class MOSE(MOSEBase):
    name = "MOSE"
    hparams_class = MOSEHyperParams
    rule = staticmethod(output_rotation_rule)

    def operands(self, ctx: EditContext, layer: int, W: torch.Tensor) -> Operands:
        return Operands(C=ctx.second_moments([layer])[layer].to(W.device))

    def reach(self, ctx: EditContext, window: list[int]):
        """``target_reach: rotation``: the projection of δ onto the spheres ‖W k + r‖ = ‖W k‖ of the window's
        layers (within ``target_max_angle``), from the keys of the model as it is before this edit (first order:
        the layers' output changes add up)."""
        hp = ctx.hparams
        if hp.target_reach == "free":
            return None
        keys, _, _ = ctx.keys(window)
        weights = {layer: ctx.weight(layer) for layer in window}
        outputs = [weights[layer] @ keys[layer].to(weights[layer].device) for layer in window]
        return lambda delta: project_to_spheres(delta, outputs, max_angle=hp.target_max_angle).to(delta.device)

    def apply(self, model, tok, requests, hparams, **kwargs):
        if isinstance(hparams, MOSEInputHyperParams):  # a file with rotation_side: input
            return MOSE_INPUT_METHOD.apply(model, tok, requests, hparams, **kwargs)
        return super().apply(model, tok, requests, hparams, **kwargs)


MOSE_METHOD = MOSE()


def apply_mose_to_model(model, tok, requests, hparams: MOSEHyperParams, copy: bool = False,
                        return_orig_weights: bool = False, **kwargs):
    """Edit ``model`` in place with MOSE; EasyEdit's contract: returns ``(model, weights_copy)``.

    ``requests``: EasyEdit request dicts (``prompt``, ``subject``, ``target_new``; others ignored here). All
    requests of one call are one batch: one layer window, one rotation per layer. Diagnostics of each call
    (selected layers, ρ, fit error, ‖R − I‖, orthogonality error, seconds per stage) are appended to
    ``edit_history(model, "MOSE")``. Hyperparameters from a file with ``rotation_side: input`` edit with the input
    side (:func:`~mose_easyedit.methods.mose_input.apply_mose_input_to_model`).
    """
    return MOSE_METHOD.apply(model, tok, requests, hparams, copy=copy, return_orig_weights=return_orig_weights,
                             **kwargs)
