"""MOSE-input-procrustes: MOSE's closed form on the input side (docs/methods.md §1.4), W ← W Q with Q ∈ O(p).

The paper's output side solves an orthogonal Procrustes problem in output space; this rule solves the same problem
in key space. Each edit key k gets a target key k* with W k* = v (the layer's requested output) and ‖k*‖ = ‖k‖, so
a rotation can carry k onto it; then, over orthogonal Q,

    minimise  λ ‖Q K₀ − K₀‖² + γ ‖Q K_p − K_p‖² + ‖Q K − K*‖²,     Q = polar(λ C + γ K_p K_pᵀ + K* Kᵀ)

(K₀ generic keys with K₀K₀ᵀ ∝ C, K_p the keys of earlier edits). Protection is soft (weights, not planes kept
orthogonal), so no edit takes a direction away from later ones, as exact protection does on the input side
(docs/benchmarks.md §7.2). Every singular value of W is kept. Layer selection and undo are MOSE's
(``mose_shared.py``); undo keeps one p × p rotation per layer and call (p² · 4 bytes).
"""
from __future__ import annotations

import dataclasses

import torch

from ..editor import EditContext, LayerBatch, Operands, Update
from ..rules import polar_factor
from .mose_shared import KeyRotationStep, MOSEBase, MOSESharedHyperParams, MOSEState


@dataclasses.dataclass(kw_only=True)
class MOSEInputProcrustesHyperParams(MOSESharedHyperParams):
    """MOSE's shared fields plus λ (in key space) and the ridge that shapes the target keys."""

    ALG_NAMES = ("MOSE-input-procrustes",)

    # λ weighs the generic keys (C, a mean over tokens) against the edit's key pairs; γ (protect_weight) the
    # earlier edits' keys, one each.
    mose_lambda: float = 1.0
    # The target key moves by δ with W δ = r and the least δᵀ (C + ε·tr(C)/p·I) δ: small ε puts δ in directions
    # generic keys do not use, large ε makes it the least-norm δ.
    key_ridge: float = 1e-2

    def validate(self, source: str = "<hparams>") -> None:
        super().validate(source)
        if not self.mose_lambda > 0:
            raise ValueError(f"{source}: key 'mose_lambda' must be > 0 (λ = 0 leaves the rotation undetermined)")
        if not self.key_ridge > 0:
            raise ValueError(f"{source}: key 'key_ridge' must be > 0")
        if self.target_reach != "free":
            raise ValueError(f"{source}: key 'target_reach' must be 'free' for MOSE-input-procrustes (its targets "
                             f"are reached through target keys of any direction), got {self.target_reach!r}")


def target_keys(W: torch.Tensor, K: torch.Tensor, residual: torch.Tensor, C: torch.Tensor,
                ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Target keys K* (p × n) for the requests ``W K + residual`` with ‖k*‖ = ‖k‖, and which of them meet their
    request exactly.

    k₁ = k + δ, δ = A⁻¹Wᵀ(W A⁻¹ Wᵀ)⁻¹ r with A = C + ε·tr(C)/p·I, so W k₁ = W k + r. Its part in W's row space is
    kept and its part in null(W) rescaled to bring the norm to ‖k‖ (which leaves W k* unchanged); when the
    row-space part alone is longer than ‖k‖, k* is that part scaled down to ‖k‖ (the request is met in part and the
    layers above take the rest)."""
    p = W.shape[1]
    A = C + ridge * float(torch.trace(C)) / p * torch.eye(p, dtype=C.dtype, device=C.device)
    spread = torch.cholesky_solve(W.T, torch.linalg.cholesky(A))          # A⁻¹ Wᵀ, p × d
    K1 = K + spread @ torch.linalg.solve(W @ spread, residual)
    row = W.T @ torch.linalg.solve(W @ W.T, W @ K1)
    null = K1 - row
    key_norm, row_norm, null_norm = K.norm(dim=0), row.norm(dim=0), null.norm(dim=0)
    exact = (row_norm <= key_norm) & (null_norm > 1e-12 * key_norm)
    null_scale = torch.sqrt((key_norm ** 2 - row_norm ** 2).clamp(min=0)) / null_norm.clamp(min=1e-300)
    row_scale = torch.where(exact, torch.ones_like(row_norm), key_norm / row_norm.clamp(min=1e-300))
    return row * row_scale + null * torch.where(exact, null_scale, torch.zeros_like(null_scale)), exact


def key_procrustes_rule(batch: LayerBatch, ops: Operands, state: MOSEState,
                        hp: MOSEInputProcrustesHyperParams) -> Update:
    """Q = polar(λC + γ K_p K_pᵀ + K* Kᵀ); W ← W Q."""
    W, K, residual = batch.W, batch.K, batch.residual
    C = ops.C.to(W.device, torch.float64)
    K_star, exact = target_keys(W, K, residual, C, hp.key_ridge)
    M = hp.mose_lambda * C + K_star @ K.T
    earlier = state.earlier_keys(batch.module, K)
    if hp.protect_edits and hp.protect_weight > 0 and earlier.shape[1]:
        M = M + hp.protect_weight * earlier @ earlier.T
    Q = polar_factor(M, "svd")
    new_weight = W @ Q
    identity = torch.eye(Q.shape[0], dtype=Q.dtype, device=Q.device)
    diagnostics = {
        "rho": float(residual.norm() / (W @ K).norm()),
        "fit_error": float((new_weight @ K - W @ K - residual).norm() / residual.norm().clamp(min=1e-300)),
        "key_move": float((K_star - K).norm() / K.norm()),
        "rotation_distance": float((Q - identity).norm()),
        "reachable": exact.tolist(),
    }
    return Update(new_weight, state.after_layer(batch.module, K, KeyRotationStep(Q.float().cpu(), K.shape[1])),
                  diagnostics)


class MOSEInputProcrustes(MOSEBase):
    name = "MOSE-input-procrustes"
    hparams_class = MOSEInputProcrustesHyperParams
    rule = staticmethod(key_procrustes_rule)
    summary_diagnostics = ("rho", "fit_error", "key_move", "rotation_distance")

    def operands(self, ctx: EditContext, layer: int, W: torch.Tensor) -> Operands:
        return Operands(C=ctx.second_moments([layer])[layer].to(W.device))


MOSE_INPUT_PROCRUSTES_METHOD = MOSEInputProcrustes()


def apply_mose_input_procrustes_to_model(model, tok, requests, hparams: MOSEInputProcrustesHyperParams,
                                         copy: bool = False, return_orig_weights: bool = False, **kwargs):
    """Edit ``model`` in place with MOSE-input-procrustes; EasyEdit's contract: returns ``(model, weights_copy)``.
    Diagnostics (ρ, fit error, key move ‖K* − K‖/‖K‖, ‖Q − I‖_F per layer) go to
    ``edit_history(model, "MOSE-input-procrustes")``; ``undo_mose_edits(model, method="MOSE-input-procrustes")``
    turns the rotations back."""
    return MOSE_INPUT_PROCRUSTES_METHOD.apply(model, tok, requests, hparams, copy=copy,
                                              return_orig_weights=return_orig_weights, **kwargs)
