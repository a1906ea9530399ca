"""MOSE: Multiplicative Orthogonal Sequential Editing (paper §5).

Per edit (or batch): choose l* = argmin_l ‖[(v_j − W^l k_j) / (‖W^l‖₂ ‖k_j^l‖)]_j‖ over the candidate layers
(Eq. 21–22; with the MEMIT-style residual the numerator is the same at every layer, so the score is driven by
‖W^l‖₂ ‖k^l‖), edit l* and its neighbours with MEMIT's residual spreading, and at each layer replace W by R W with

    R = polar(M),   M = W (λ C + γ Σ_earlier K_p K_pᵀ) Wᵀ + V_E (W K_E)ᵀ        (Eq. 17–20)

so ‖W‖_F, every singular value and κ₂(W) are unchanged. γ > 0 (``protect_edits``) also preserves the outputs of
keys edited earlier in the run. Rotations are logged so the last edits can be undone (W ← Rᵀ W, exact up to one
rounding to the weight's dtype).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch

from ..editor import EditContext, LayerBatch, Method
from ..hparams import LocateEditHyperParams
from ..input_rotation import (Reader, aimed_null_plane, aimed_plane, low_variance_direction, minus_span,
                              orthonormal_columns, plane_rotate, project_to_reach, project_to_spheres)
from ..keys import model_cache
from ..modeling import num_layers, read_weight, write_weight
from ..rules import (POLAR_METHODS, preservation_moment, procrustes_diagnostics, procrustes_rotation,
                     propagate_preservation_moment, rotation_trust_region)
from ..session import get_session
from .alphaedit import null_space

logger = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class MOSEHyperParams(LocateEditHyperParams):
    """MOSE's hyperparameters; ``layers`` is the fixed window used when ``layer_selection`` is false."""

    ALG_NAMES = ("MOSE", "MOSE-core")

    # λ weighs preservation of generic keys' outputs (W C Wᵀ) against the edit (V_E (W K_E)ᵀ); it lives in
    # output space, so MEMIT's 15000 does not transfer.
    mose_lambda: float = 30.0
    # Eq. 21–22: pick l* per edit from candidate_layers; edit l* and `neighbours` layers on each side.
    layer_selection: bool = True
    candidate_layers: list[int] = dataclasses.field(default_factory=list)
    neighbours: int = 1
    # Preserve the outputs of keys edited earlier in the run (weight γ on their accumulated K Kᵀ).
    protect_edits: bool = True
    protect_weight: float = 1.0
    # Polar factor of M: "svd" (the paper), "eigh" or "newton_schulz" (same R, see benchmarks).
    polar_method: str = "svd"
    # How many edit calls can be undone (each keeps a float32 d×d rotation, or the input side's planes, per
    # edited layer on the CPU).
    undo_history: int = 32
    # "output": W ← R W, R ∈ O(d) by Procrustes (the paper). "input": W ← W Q, Q ∈ O(p) a plane rotation per
    # edit key (mose_easyedit/input_rotation.py); both keep every singular value of W.
    rotation_side: str = "output"
    # Input side: the subspace the key turns in. "null_w": a in null(W) ⊥ earlier edit keys (W a = 0), the
    # reading direction b anywhere ⊥ a; "null_c": a and b in the span of C's eigenvectors with eigenvalue
    # below nullspace_threshold (AlphaEdit's projector), ⊥ earlier edit keys, so protected keys keep their
    # outputs exactly and generic keys nearly so.
    input_subspace: str = "null_w"
    nullspace_threshold: float = 2e-2
    # Input side, null_w: None turns the key's whole null(W) part; ε > 0 turns the direction that moves generic
    # keys least per unit of reach, argmax (aᵀk)² / aᵀ(C / c̄ + ε I) a (large ε: the whole part again).
    input_a_ridge: Optional[float] = None
    # Input side, null_w: keep b ⊥ earlier edit keys too (their outputs then stay exact, at a cost in reach).
    protect_reading: bool = False
    # Input side: each layer is asked for its even share of z − h ("even", MEMIT) or for all of what is left
    # ("greedy"; a layer that cannot reach it moves as far as it can and the layers above take the rest).
    input_spread: str = "even"
    # Target optimisation: "free" (MEMIT's δ) or "rotation" (δ projected at every step onto what the window's
    # rotations can deliver: the output side's share keeps ‖W k + r‖ = ‖W k‖, the input side's stays within
    # the planes' reach).
    target_reach: str = "free"
    # Output side, trust region (null: the paper's rule). max_rotation caps ‖R − I‖_F per layer and edit: a
    # longer rotation is shortened along its geodesic from I (R^t), the rest of the request left undelivered.
    # target_max_angle (radians, with target_reach: rotation) asks no layer to turn W k further than this.
    max_rotation: Optional[float] = None
    target_max_angle: Optional[float] = None

    def validate(self, source: str = "<hparams>") -> None:
        super().validate(source)
        if self.mose_lambda <= 0:
            raise ValueError(f"{source}: key 'mose_lambda' must be > 0 (λ = 0 leaves the rotation undetermined)")
        if self.layer_selection and not self.candidate_layers:
            raise ValueError(f"{source}: key 'candidate_layers' must list layers when layer_selection is true")
        if self.neighbours < 0:
            raise ValueError(f"{source}: key 'neighbours' must be >= 0")
        if self.protect_weight < 0:
            raise ValueError(f"{source}: key 'protect_weight' must be >= 0")
        if self.polar_method not in POLAR_METHODS:
            raise ValueError(f"{source}: key 'polar_method' must be one of {list(POLAR_METHODS)}")
        if self.undo_history < 0:
            raise ValueError(f"{source}: key 'undo_history' must be >= 0")
        choices = {"rotation_side": ("output", "input"), "input_subspace": ("null_w", "null_c"),
                   "input_spread": ("even", "greedy"),
                   "target_reach": ("free", "rotation")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{source}: key '{key}' must be one of {list(allowed)}, got {getattr(self, key)!r}")
        if self.input_a_ridge is not None and not self.input_a_ridge > 0:
            raise ValueError(f"{source}: key 'input_a_ridge' must be > 0 or null")
        if not self.nullspace_threshold > 0:
            raise ValueError(f"{source}: key 'nullspace_threshold' must be > 0")
        for key in ("max_rotation", "target_max_angle"):
            value = getattr(self, key)
            if value is not None and not (value > 0 and self.rotation_side == "output"):
                raise ValueError(f"{source}: key '{key}' must be > 0 or null, and needs rotation_side: output")
        if self.target_max_angle is not None and self.target_reach != "rotation":
            raise ValueError(f"{source}: key 'target_max_angle' needs target_reach: rotation")

    def layer_fields(self) -> tuple[str, ...]:
        return ("layers", "candidate_layers") if self.layer_selection else ("layers",)


def layer_window(center: int, neighbours: int, total: int) -> list[int]:
    """``center`` and ``neighbours`` layers on each side, shifted inward at the model's ends."""
    size = min(2 * neighbours + 1, total)
    start = min(max(center - neighbours, 0), total - size)
    return list(range(start, start + size))


def spectral_norm(model, module: str) -> float:
    """σ_max of the module's weight, cached per model on first use (MOSE never changes it)."""
    cache = model_cache(model)
    key = ("sigma_max", module)
    if key not in cache:
        cache[key] = float(torch.linalg.matrix_norm(read_weight(model, module).float(), ord=2))
    return cache[key]


class MOSE(Method):
    name = "MOSE"
    hparams_class = MOSEHyperParams

    def window(self, ctx: EditContext) -> list[int]:
        hp = ctx.hparams
        total = num_layers(ctx.model)
        if not hp.layer_selection:
            window = sorted(hp.layers)
            ctx.second_moments(window)
            ctx.diagnostics["layer_scores"] = None
            return window
        # every layer a window can reach, so statistics are gathered in one corpus pass
        reachable = sorted({layer for c in hp.candidate_layers for layer in layer_window(c, hp.neighbours, total)})
        ctx.second_moments(reachable)
        keys, _, _ = ctx.keys(hp.candidate_layers)
        scores = {}
        for layer in hp.candidate_layers:
            key_norms = keys[layer].norm(dim=0)
            sigma = spectral_norm(ctx.model, ctx.module(layer))
            # common residual across layers (MEMIT spreading): score² = Σ_j 1 / (σ² ‖k_j‖²)
            scores[layer] = float(torch.sqrt((1.0 / (sigma * key_norms) ** 2).sum()))
        best = min(scores, key=scores.get)
        ctx.diagnostics["layer_scores"] = scores
        ctx.diagnostics["selected_layer"] = best
        return layer_window(best, hp.neighbours, total)

    def rule(self, ctx: EditContext, batch: LayerBatch) -> torch.Tensor:
        if ctx.hparams.rotation_side == "input":
            return self.input_rule(ctx, batch)
        return self.output_rule(ctx, batch)

    def output_rule(self, ctx: EditContext, batch: LayerBatch) -> torch.Tensor:
        hp = ctx.hparams
        W, K, values = batch.W, batch.K, batch.values
        gamma = hp.protect_weight if hp.protect_edits else 0.0
        setting = (hp.mose_lambda, gamma)
        # G = W (λC + γ K_p K_pᵀ) Wᵀ is carried across edits (R G Rᵀ after each rotation) instead of rebuilt
        cached = ctx.session.state.setdefault("preservation", {}).get(batch.module)
        if cached is not None and cached[0] == setting:
            G = cached[1].to(W.device)
        else:
            C = ctx.second_moments([batch.layer])[batch.layer].to(W.device)
            G = preservation_moment(W, C, hp.mose_lambda)
            earlier = ctx.session.state.setdefault("protected_keys", {}).get(batch.module)
            if gamma > 0 and earlier is not None and earlier.shape[1]:
                outputs = W @ earlier.to(W.device, torch.float64)
                G = G + gamma * outputs @ outputs.T
        R = procrustes_rotation(W, None, K, values, hp.mose_lambda, method=hp.polar_method, preservation=G)
        fraction = 1.0
        if hp.max_rotation is not None:
            R, fraction = rotation_trust_region(R, hp.max_rotation)
        new_weight = R @ W
        diagnostics = procrustes_diagnostics(W, K, values, R)
        if hp.max_rotation is not None:
            diagnostics["trust_fraction"] = fraction
        ctx.diagnostics.setdefault("per_layer", {})[batch.layer] = diagnostics
        carried = propagate_preservation_moment(G, R, new_weight @ K, gamma)
        ctx.diagnostics.setdefault("_staged", {})[batch.module] = (R.float().cpu(), K.float().cpu(), setting,
                                                                   carried)
        return new_weight

    def input_rule(self, ctx: EditContext, batch: LayerBatch) -> torch.Tensor:
        """W ← W Q: one aimed plane rotation per request (input_rotation.py), each plane ⊥ the keys of earlier
        edits and of the batch's earlier requests, so their outputs do not move."""
        hp = ctx.hparams
        W, K = batch.W, batch.K
        residual = batch.residual
        if hp.input_spread == "greedy":
            residual = residual * (len(batch.window) - batch.position)
        values = W @ K + residual
        earlier = ctx.session.state.get("protected_keys", {}).get(batch.module)
        protected = earlier.to(W.device, torch.float64) if earlier is not None else K[:, :0]
        planes, records = [], []
        for j in range(K.shape[1]):
            k = K[:, j]
            direction, _, reading = self.key_subspaces(ctx, batch.layer, W, k, protected)
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
        ctx.diagnostics.setdefault("per_layer", {})[batch.layer] = {
            key: [record[key] for record in records] for key in records[0]} if records else {}
        ctx.diagnostics.setdefault("_staged", {})[batch.module] = (planes, K.float().cpu(), None, None)
        return W

    def key_subspaces(self, ctx: EditContext, layer: int, W: torch.Tensor, k: torch.Tensor,
                      protected: torch.Tensor):
        """``(a, allowed, reading)`` of the input side for key ``k``: the unnormalised turning direction a (its
        length is the reach α = âᵀk), the projector ``allowed`` onto the subspace a comes from, and the projector
        ``reading`` onto the subspace the reading direction b may use."""
        hp = ctx.hparams
        if hp.input_subspace == "null_c":
            P = null_space(ctx, layer, W.device)[0].double()
            base = P.__matmul__
        else:
            gram = W @ W.T
            base = lambda x: x - W.T @ torch.linalg.solve(gram, W @ x)  # noqa: E731  (onto null(W))
        shield = orthonormal_columns(base(protected))
        allowed = minus_span(base, shield)
        a = allowed(k)
        if hp.input_subspace == "null_w" and hp.input_a_ridge is not None:
            C = ctx.second_moments([layer])[layer].to(W.device, torch.float64)
            a = low_variance_direction(W, k, C, shield, hp.input_a_ridge)
        if hp.input_subspace == "null_c":
            return a, allowed, minus_span(base, orthonormal_columns(torch.cat([shield, a[:, None]], dim=1)))
        avoid = torch.cat([protected, a[:, None]], dim=1) if hp.protect_reading else a[:, None]
        return a, allowed, minus_span(lambda x: x, orthonormal_columns(avoid))

    def reach(self, ctx: EditContext, window: list[int]):
        """``target_reach: rotation``: the projection of δ onto what the window's rotations can deliver, from the
        keys of the model as it is before this edit (first order: the layers' output changes add up)."""
        hp = ctx.hparams
        if hp.target_reach == "free":
            return None
        keys, _, _ = ctx.keys(window)
        if hp.rotation_side == "output":
            weights = {layer: ctx.weight(layer) for layer in window}
            outputs = [weights[layer] @ keys[layer].to(weights[layer].device) for layer in window]
            return lambda delta: project_to_spheres(delta, outputs, max_angle=hp.target_max_angle).to(delta.device)
        readers, radii = [], []
        for layer in window:
            W = ctx.weight(layer)
            K = keys[layer].to(W.device)
            earlier = ctx.session.state.get("protected_keys", {}).get(ctx.module(layer))
            protected = earlier.to(W.device, torch.float64) if earlier is not None else K[:, :0]
            directions = [self.key_subspaces(ctx, layer, W, K[:, j], protected) for j in range(K.shape[1])]
            allowed = directions[0][1]
            readers.append(Reader.build(W, allowed if hp.input_subspace == "null_c" else (lambda x: x)))
            radii.append(torch.stack([a.norm() for a, _, _ in directions]))
        radii = torch.stack(radii)
        return lambda delta: project_to_reach(delta.to(radii.device), readers, radii).to(delta.device)

    def finish(self, ctx: EditContext) -> None:
        hp = ctx.hparams
        staged = ctx.diagnostics.pop("_staged", {})

        def commit():
            state = ctx.session.state
            keys, preservation = state.setdefault("protected_keys", {}), state.setdefault("preservation", {})
            log = state.setdefault("undo_log", [])
            for module, (_, K, setting, carried) in staged.items():
                keys[module] = torch.cat([keys[module], K], dim=1) if module in keys else K
                if carried is not None:
                    preservation[module] = (setting, carried)
            log.append({module: (R, K.shape[1]) for module, (R, K, _, _) in staged.items()})
            del log[:max(0, len(log) - hp.undo_history)]

        ctx.commits.append(commit)


MOSE_METHOD = MOSE()


def apply_mose_to_model(model, tok, requests, hparams: MOSEHyperParams, copy: bool = False,
                        return_orig_weights: bool = False, keep_original_weight: bool = False, **kwargs):
    """Edit ``model`` in place with MOSE; EasyEdit's contract: returns ``(model, weights_copy)``.

    ``requests``: EasyEdit request dicts (``prompt``, ``subject``, ``target_new``; others ignored here). All
    requests of one call are one batch: one layer window, one rotation per layer. Diagnostics of each call
    (selected layers, ρ, fit error, ‖R − I‖, orthogonality error, seconds per stage) are appended to
    ``edit_history(model, "MOSE")``.
    """
    return MOSE_METHOD.apply(model, tok, requests, hparams, copy=copy, return_orig_weights=return_orig_weights,
                             keep_original_weight=keep_original_weight, **kwargs)


def undo_mose_edits(model, steps: int = 1) -> int:
    """Undo the last ``steps`` MOSE edit calls (W ← Rᵀ W, newest first); returns how many were undone.

    The inverse is exact in float64; writing it back rounds once to the weight's dtype, so an undone weight equals
    the original up to that rounding (float32: ~1e-8 relative; bf16: ~1e-3), not bit for bit.

    Raises ``ValueError`` if fewer than ``steps`` are logged (see ``undo_history``).
    """
    session = get_session(model, MOSE.name, create=False)
    log = session.state.get("undo_log", []) if session is not None else []
    if steps < 0 or steps > len(log):
        raise ValueError(f"cannot undo {steps} MOSE edit(s): {len(log)} can be undone on this model")
    for _ in range(steps):
        entry = log.pop()
        for module, (R, count) in entry.items():
            weight = read_weight(model, module)
            if isinstance(R, list):  # input side: the planes in reverse order, each turned back
                restored = weight.double()
                for a, b, t in reversed(R):
                    restored = plane_rotate(restored, a.to(weight.device), b.to(weight.device), -t)
                write_weight(model, module, restored)
            else:
                write_weight(model, module, R.to(weight.device, torch.float64).T @ weight.double())
            keys = session.state["protected_keys"]
            keys[module] = keys[module][:, :keys[module].shape[1] - count]
            session.state["preservation"].pop(module, None)  # rebuilt from the remaining keys when next needed
        session.num_edits -= session.history.pop().get("num_requests", 1)
        session.record_weights(model, entry)
    return steps
