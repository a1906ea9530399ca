"""MOSE-input: MOSE's input side (docs/methods.md §1.4), W ← W Q with Q ∈ O(p) one plane rotation per edit key.

Each key k turns in a plane span{a, b} (``input_rotation.py``): a the direction of k's part inside the allowed
subspace (AlphaEdit's null space of the generic keys, ``null_c``, or null(W), ``null_w``), b aimed so that the
output moves toward the request as far as the plane can; both ⊥ the keys of earlier edits and of the batch's
earlier requests, so their outputs do not move. Every singular value of W is kept, as on the output side. Layer
selection, protection of earlier edits and undo are MOSE's (``mose_shared.py``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..editor import EditContext, LayerBatch, Operands, Update
from ..input_rotation import (Reader, aimed_null_plane, aimed_plane, key_subspaces, plane_rotate, project_to_reach,
                              protected_basis)
from ..null_space import null_space
from .mose_shared import MOSEBase, MOSESharedHyperParams, MOSEState, PlaneSteps

INPUT_SUBSPACES = ("null_w", "null_c")
INPUT_SPREADS = ("even", "greedy")


@dataclasses.dataclass(kw_only=True)
class MOSEInputHyperParams(MOSESharedHyperParams):
    """The input side's hyperparameters (MOSE's shared fields plus the subspace the keys turn in)."""

    ALG_NAMES = ("MOSE-input",)

    # "null_w": a in null(W) ⊥ earlier edit keys (W a = 0), the reading direction b anywhere ⊥ a; "null_c": a and b
    # in the span of C's eigenvectors with eigenvalue below nullspace_threshold (AlphaEdit's projector), ⊥ earlier
    # edit keys, so protected keys keep their outputs exactly and generic keys nearly so.
    input_subspace: str = "null_w"
    nullspace_threshold: float = 2e-2
    # null_w: None turns the key's whole null(W) part; ε > 0 turns the direction that moves generic keys least per
    # unit of reach, argmax (aᵀk)² / aᵀ(C / c̄ + ε I) a (large ε: the whole part again).
    input_a_ridge: Optional[float] = None
    # null_w: keep b ⊥ earlier edit keys too (their outputs then stay exact, at a cost in reach).
    protect_reading: bool = False
    # Each layer is asked for its even share of z − h ("even", MEMIT) or for all of what is left ("greedy"; a
    # layer that cannot reach it moves as far as it can and the layers above take the rest).
    input_spread: str = "even"

    def validate(self, source: str = "<hparams>") -> None:
        super().validate(source)
        for key, allowed in (("input_subspace", INPUT_SUBSPACES), ("input_spread", INPUT_SPREADS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{source}: key '{key}' must be one of {list(allowed)}, got {getattr(self, key)!r}")
        if self.input_a_ridge is not None and not self.input_a_ridge > 0:
            raise ValueError(f"{source}: key 'input_a_ridge' must be > 0 or null")
        if not self.nullspace_threshold > 0:
            raise ValueError(f"{source}: key 'nullspace_threshold' must be > 0")


def subspaces(W: torch.Tensor, k: torch.Tensor, protected: torch.Tensor, ops: Operands, hp: MOSEInputHyperParams,
              shield: Optional[torch.Tensor] = None):
    """:func:`~mose_easyedit.input_rotation.key_subspaces` for this configuration (``shield``: the basis of
    ``protected`` when it is ``ops.shield``)."""
    if hp.input_subspace == "null_c":
        return key_subspaces(W, k, protected, P=ops.P, shield=shield)
    C = ops.C.to(W.device, torch.float64) if hp.input_a_ridge is not None else None
    return key_subspaces(W, k, protected, C=C, a_ridge=hp.input_a_ridge, protect_reading=hp.protect_reading)


def input_rotation_rule(batch: LayerBatch, ops: Operands, state: MOSEState, hp: MOSEInputHyperParams) -> Update:
    """W ← W Q: one aimed plane rotation per request, each plane ⊥ the keys of earlier edits and of the batch's
    earlier requests."""
    return turn_each_key(batch, ops, state, hp, state.earlier_keys(batch.module, batch.K))


def turn_each_key(batch: LayerBatch, ops: Operands, state: MOSEState, hp: MOSEInputHyperParams,
                  protected: torch.Tensor) -> Update:
    """The input side's update with the planes kept ⊥ ``protected`` (p × m) and ⊥ the batch's earlier keys."""
    W, K, residual = batch.W, batch.K, batch.residual
    if hp.input_spread == "greedy":
        residual = residual * (len(batch.window) - batch.position)
    values = W @ K + residual
    planes, records = [], []
    for j in range(K.shape[1]):
        k = K[:, j]
        direction, _, reading = subspaces(W, k, protected, ops, hp, ops.shield if j == 0 else None)
        norm = float(direction.norm())
        plane = None
        if norm > 1e-12 * float(k.norm()):
            aim = aimed_plane if hp.input_subspace == "null_c" else aimed_null_plane
            plane = aim(W, k, values[:, j] - W @ k, direction / norm, reading)
        rho = float((values[:, j] - W @ k).norm() / (W @ k).norm())
        if plane is None:
            records.append({"rho": rho, "fit_error": 1.0 if rho > 0 else 0.0, "angle": 0.0,
                            "alpha_over_k": norm / float(k.norm()), "reachable": rho == 0})
        else:
            W = plane_rotate(W, plane.a, plane.b, plane.t)
            planes.append((plane.a.cpu(), plane.b.cpu(), plane.t))
            records.append({"rho": rho, "fit_error": plane.fit_error, "angle": plane.t,
                            "alpha_over_k": plane.alpha / float(k.norm()), "reachable": plane.reachable})
        protected = torch.cat([protected, k[:, None]], dim=1)
    diagnostics = {key: [record[key] for record in records] for key in records[0]} if records else {}
    return Update(W, state.after_layer(batch.module, K, PlaneSteps(tuple(planes), K.shape[1])), diagnostics)


class MOSEInput(MOSEBase):
    name = "MOSE-input"
    hparams_class = MOSEInputHyperParams
    rule = staticmethod(input_rotation_rule)

    def operands(self, ctx: EditContext, layer: int, W: torch.Tensor) -> Operands:
        C = ctx.second_moments([layer])[layer].to(W.device)
        if ctx.hparams.input_subspace != "null_c":
            return Operands(C=C)
        module = ctx.module(layer)
        P, rank = null_space(ctx.model, module, C, ctx.hparams.nullspace_threshold)
        earlier = ctx.state.protected_keys.get(module)
        key = ("shield", module, 0 if earlier is None else earlier.shape[1])  # they change only when it is edited
        if key not in ctx.memo:
            ctx.memo[key] = protected_basis(P, self.protected(ctx.state, module, W.T, ctx.hparams))
        return Operands(C=C, P=P, P_rank=rank, shield=ctx.memo[key])

    @staticmethod
    def protected(state: MOSEState, module: str, K: torch.Tensor, hp: MOSEInputHyperParams) -> torch.Tensor:
        """The keys the planes of ``module`` must leave alone (as the rule sees them): every earlier edit's."""
        return state.earlier_keys(module, K)

    def reach(self, ctx: EditContext, window: list[int]):
        """``target_reach: rotation``: the projection of δ onto what the window's planes can deliver, from the keys
        of the model as it is before this edit (first order: the layers' output changes add up)."""
        hp = ctx.hparams
        if hp.target_reach == "free":
            return None
        keys, _, _ = ctx.keys(window)
        readers, radii = [], []
        for layer in window:
            W = ctx.weight(layer)
            K = keys[layer].to(W.device)
            ops = self.operands(ctx, layer, W)
            protected = self.protected(ctx.state, ctx.module(layer), K, hp)
            directions = [subspaces(W, K[:, j], protected, ops, hp, ops.shield) for j in range(K.shape[1])]
            allowed = directions[0][1]
            readers.append(Reader.build(W, allowed if hp.input_subspace == "null_c" else (lambda x: x)))
            radii.append(torch.stack([a.norm() for a, _, _ in directions]))
        radii = torch.stack(radii)
        return lambda delta: project_to_reach(delta.to(radii.device), readers, radii).to(delta.device)


MOSE_INPUT_METHOD = MOSEInput()


def apply_mose_input_to_model(model, tok, requests, hparams: MOSEInputHyperParams, copy: bool = False,
                              return_orig_weights: bool = False, **kwargs):
    """Edit ``model`` in place with MOSE's input side; EasyEdit's contract: returns ``(model, weights_copy)``.

    Diagnostics per call and layer (ρ, fit error, angle, reach α/‖k‖ and whether the request was reachable, per
    request) go to ``edit_history(model, "MOSE-input")``; ``undo_mose_edits`` turns the planes back.
    """
    return MOSE_INPUT_METHOD.apply(model, tok, requests, hparams, copy=copy, return_orig_weights=return_orig_weights,
                                   **kwargs)
