"""AlphaEdit (Fang et al. 2025): MEMIT's residual, projected onto the null space of the preserved keys.

Once per layer, from the original C: P = Û Ûᵀ with Û the eigenvectors of C whose eigenvalue is below
``nullspace_threshold`` (absolute). Per batch, at each layer of the window:

    ΔW = Rsd Kᵀ P ((K Kᵀ + K_p K_pᵀ) P + L2·I)⁻¹                                (docs/methods.md §7)

so ΔW (I − P) = 0: generic keys (C's range) keep their outputs. The solve is not repeated per batch: the run
carries A⁻¹ = (K_p K_pᵀ P + L2·I)⁻¹ next to K_p K_pᵀ, so ΔW = Rsd (I + B K)⁻¹ B with B = KᵀP A⁻¹ and the carried
inverse grows by the Woodbury identity, O(p²n) per batch in float64 instead of a p×p product and solve
(:func:`mose_easyedit.rules.alphaedit_carried_delta`, equal to :func:`mose_easyedit.rules.alphaedit_delta`).
K_p K_pᵀ, the keys of earlier batches of this run (recomputed on the edited model after each batch), is
carried in the editing session (:class:`AlphaEditState`, with the carried inverse): it starts at zero with every
new run and grows only after a successful call (EasyEdit keeps it process-global and never resets it, EasyEdit
issue #613). P depends on C alone, so it is cached on the model next to C (``null_space.py``; never in a file in
the working directory).
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from ..editor import EditContext, LayerBatch, Operands, Update
from ..hparams import LocateEditHyperParams
from ..modeling import read_weight
from ..null_space import null_space
from ..rules import alphaedit_carried_delta, alphaedit_grow_inverse, alphaedit_grow_moment, alphaedit_inverse
from .memit import MEMIT, additive_diagnostics


@dataclasses.dataclass(kw_only=True)
class AlphaEditHyperParams(LocateEditHyperParams):
    """The core's fields plus the null-space threshold and L2; ``mom2_update_weight`` is not read."""

    ALG_NAMES = ("AlphaEdit", "AlphaEdit-core")

    # Eigenvalues of C below this (absolute) span the null space the update may use.
    nullspace_threshold: float = 2e-2
    # Ridge of the solve: 10 in the AlphaEdit repository, 1 in EasyEdit's configs.
    L2: float = 10.0

    def validate(self, source: str = "<hparams>") -> None:
        super().validate(source)
        if not self.nullspace_threshold > 0:
            raise ValueError(f"{source}: key 'nullspace_threshold' must be > 0, "
                             f"got {self.nullspace_threshold}")
        if not self.L2 > 0:
            raise ValueError(f"{source}: key 'L2' must be > 0, got {self.L2}")


@dataclasses.dataclass(frozen=True)
class CarriedInverse:
    """(K_p K_pᵀ P + L2·I)⁻¹ (float64) for the projector ``P`` (the cached tensor) and ``l2`` it was built with."""

    P: torch.Tensor
    l2: float
    inverse: torch.Tensor


@dataclasses.dataclass(frozen=True)
class AlphaEditState:
    """An AlphaEdit run's carried state per module: K_p K_pᵀ (p×p, in ``mom2_dtype``) of the earlier batches'
    keys and the carried inverse. The inverses are not pickled (a checkpoint stays small); after a resume they
    are computed directly from K_p K_pᵀ."""

    moments: dict = dataclasses.field(default_factory=dict)
    inverses: dict = dataclasses.field(default_factory=dict)

    def __getstate__(self):
        return {"moments": self.moments, "inverses": {}}

    def __deepcopy__(self, memo):
        return AlphaEditState(copy.deepcopy(self.moments, memo), copy.deepcopy(self.inverses, memo))

    def inverse(self, module: str, P: torch.Tensor, l2: float) -> torch.Tensor:
        """(K_p K_pᵀ P + l2·I)⁻¹: the carried one when it was built for this P and l2, else computed directly
        (a new run, a resumed checkpoint, another projector)."""
        entry = self.inverses.get(module)
        if entry is not None and entry.P is P and entry.l2 == l2:
            return entry.inverse
        prior = self.moments.get(module)
        if prior is None:
            return torch.eye(P.shape[0], dtype=torch.float64, device=P.device) / l2
        return alphaedit_inverse(prior.to(P.device), P, l2)


def alphaedit_rule(batch: LayerBatch, ops: Operands, state: AlphaEditState, hp: AlphaEditHyperParams) -> Update:
    """ΔW = Rsd Kᵀ P ((K Kᵀ + K_p K_pᵀ) P + L2·I)⁻¹ from the carried inverse, W ← W + ΔW. The state grows in
    :meth:`AlphaEdit.finish`, from keys recomputed on the edited model."""
    P = ops.P
    inverse = state.inverse(batch.module, P, float(hp.L2))
    delta = alphaedit_carried_delta(batch.residual.to(P.device), batch.K.to(P.device), P, inverse)
    return Update(batch.W + delta, state, additive_diagnostics(batch, delta, null_space_dim=ops.P_rank))


class AlphaEdit(MEMIT):
    name = "AlphaEdit"
    hparams_class = AlphaEditHyperParams
    state_class = AlphaEditState
    rule = staticmethod(alphaedit_rule)

    def operands(self, ctx: EditContext, layer: int, W: torch.Tensor) -> Operands:
        C = ctx.second_moments([layer])[layer].to(W.device)
        P, rank = null_space(ctx.model, ctx.module(layer), C, ctx.hparams.nullspace_threshold)
        return Operands(C=C, P=P, P_rank=rank)

    def record(self, ctx: EditContext, batch: LayerBatch, diagnostics: dict) -> None:
        super().record(ctx, batch, {**diagnostics, "prior_edits": ctx.session.num_edits})

    def finish(self, ctx: EditContext, state: AlphaEditState) -> AlphaEditState:
        """Recompute the batch's keys on the edited model; K_p K_pᵀ += K Kᵀ and its carried inverse by Woodbury."""
        window = ctx.diagnostics["layers"]
        keys, _, _ = ctx.keys(window)
        moments, inverses = dict(state.moments), dict(state.inverses)
        l2 = float(ctx.hparams.L2)
        for layer in window:
            module = ctx.module(layer)
            ops = self.operands(ctx, layer, read_weight(ctx.model, module))
            C, P = ctx.second_moments([layer])[layer], ops.P
            K = keys[layer].to(C.device)
            prior = state.moments.get(module)
            moments[module] = alphaedit_grow_moment(prior if prior is not None else torch.zeros_like(C), K).to(C.dtype)
            grown = alphaedit_grow_inverse(state.inverse(module, P, l2), K.to(P.device), P)
            inverses[module] = CarriedInverse(P, l2, grown)
        return AlphaEditState(moments, inverses)


ALPHAEDIT_METHOD = AlphaEdit()


def apply_alphaedit_to_model(model, tok, requests, hparams: AlphaEditHyperParams, copy: bool = False,
                             return_orig_weights: bool = False, **kwargs):
    """Edit ``model`` in place with AlphaEdit; EasyEdit's contract: returns ``(model, weights_copy)``.

    All requests of one call are one batch. K_p K_pᵀ is carried from call to call while the model keeps the
    weights this run wrote, and starts again at zero when they are restored (a new run). Diagnostics (‖ΔW‖,
    null-space dimension per layer) go to ``edit_history(model, "AlphaEdit")``.
    """
    return ALPHAEDIT_METHOD.apply(model, tok, requests, hparams, copy=copy,
                                  return_orig_weights=return_orig_weights, **kwargs)
