"""AlphaEdit (Fang et al. 2025): MEMIT's residual, projected onto the null space of the preserved keys.

Once per layer, from the original C: P = Û Ûᵀ with Û the eigenvectors of C whose eigenvalue is below
``nullspace_threshold`` (absolute). Per batch, at each layer of the window:

    ΔW = R Kᵀ P ((K Kᵀ + K_p K_pᵀ) P + L2·I)⁻¹                                (docs/methods.md §7)

so ΔW (I − P) = 0: generic keys (C's range) keep their outputs. The solve is not repeated per batch: the run
carries A⁻¹ = (K_p K_pᵀ P + L2·I)⁻¹ next to K_p K_pᵀ, so ΔW = R (I + B K)⁻¹ B with B = KᵀP A⁻¹ and the carried
inverse grows by the Woodbury identity, O(p²n) per batch in float64 instead of a p×p product and solve
(:func:`mose_easyedit.rules.alphaedit_carried_delta`, equal to :func:`mose_easyedit.rules.alphaedit_delta`).
K_p K_pᵀ, the keys of earlier batches of this run (recomputed on the edited model after each batch), is
carried in the editing session: it starts at zero with every new run and grows only after a successful call
(EasyEdit keeps it process-global and never resets it, EasyEdit issue #613). P depends on C alone, so it is
cached on the model next to C (never in a file in the working directory); so is the carried inverse, which
is recomputed directly whenever it does not belong to the session's K_p K_pᵀ (a new run, a resumed checkpoint).
"""
from __future__ import annotations

import dataclasses

import torch

from ..editor import EditContext, LayerBatch
from ..hparams import LocateEditHyperParams
from ..keys import model_cache
from ..modeling import read_weight
from ..rules import (alphaedit_carried_delta, alphaedit_grow_inverse, alphaedit_grow_moment, alphaedit_inverse,
                     null_space_projector)
from .memit import MEMIT, record_update

MOMENT_STATE = "prior_moment"  # session.state[MOMENT_STATE][module] = K_p K_pᵀ (p×p, in mom2_dtype)
# model cache[(INVERSE_CACHE, module)] = (the K_p K_pᵀ tensor, P, L2, (K_p K_pᵀ P + L2·I)⁻¹ in float64)
INVERSE_CACHE = "alphaedit_inverse"


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


def null_space(ctx: EditContext, layer: int, device) -> tuple[torch.Tensor, int]:
    """``(P, dimension of the null space)`` for ``layer``, from the cached C (on ``device``); computed once per C.

    The cache entry keeps the C it was computed from, so a different C (another corpus, sample count, dtype)
    gets its own projector.
    """
    C = ctx.second_moments([layer])[layer].to(device)
    threshold = float(ctx.hparams.nullspace_threshold)
    cache = model_cache(ctx.model)
    key = ("alphaedit_projector", ctx.module(layer), threshold)
    entry = cache.get(key)
    if entry is None or entry[0] is not C:
        P = null_space_projector(C, threshold)
        entry = cache[key] = (C, P.to(torch.float32), int(round(float(P.trace()))))
    return entry[1], entry[2]


class AlphaEdit(MEMIT):
    name = "AlphaEdit"
    hparams_class = AlphaEditHyperParams

    def rule(self, ctx: EditContext, batch: LayerBatch) -> torch.Tensor:
        P, dimension = null_space(ctx, batch.layer, batch.W.device)
        inverse = carried_inverse(ctx, batch.module, P)
        delta = alphaedit_carried_delta(batch.residual.to(P.device), batch.K.to(P.device), P, inverse)
        record_update(ctx, batch, delta, null_space_dim=dimension, prior_edits=ctx.session.num_edits)
        return batch.W + delta

    def finish(self, ctx: EditContext) -> None:
        """Recompute the batch's keys on the edited model; K_p K_pᵀ += K Kᵀ (and its carried inverse) once the
        call has succeeded."""
        window = ctx.diagnostics["layers"]
        keys, _, _ = ctx.keys(window)
        moments = ctx.session.state.get(MOMENT_STATE, {})
        grown = {}
        for layer in window:
            module = ctx.module(layer)
            C = ctx.second_moments([layer])[layer]
            P = null_space(ctx, layer, read_weight(ctx.model, module).device)[0]
            K = keys[layer].to(C.device)
            prior = moments.get(module)
            moment = alphaedit_grow_moment(prior if prior is not None else torch.zeros_like(C), K).to(C.dtype)
            inverse = alphaedit_grow_inverse(carried_inverse(ctx, module, P), K.to(P.device), P)
            grown[module] = (moment, (moment, P, float(ctx.hparams.L2), inverse))
        state, cache = ctx.session.state, model_cache(ctx.model)

        def commit():
            for module, (moment, entry) in grown.items():
                state.setdefault(MOMENT_STATE, {})[module] = moment
                cache[(INVERSE_CACHE, module)] = entry

        ctx.commits.append(commit)


def carried_inverse(ctx: EditContext, module: str, P: torch.Tensor) -> torch.Tensor:
    """(K_p K_pᵀ P + L2·I)⁻¹ for the session's current K_p K_pᵀ: the carried one when it belongs to exactly that
    moment, P and L2, else computed directly (a new run, a resumed checkpoint, another projector)."""
    prior = ctx.session.state.get(MOMENT_STATE, {}).get(module)
    l2 = float(ctx.hparams.L2)
    entry = model_cache(ctx.model).get((INVERSE_CACHE, module))
    if entry is not None and entry[0] is prior and entry[1] is P and entry[2] == l2:
        return entry[3]
    if prior is None:
        return torch.eye(P.shape[0], dtype=torch.float64, device=P.device) / l2
    return alphaedit_inverse(prior.to(P.device), P, l2)


ALPHAEDIT_METHOD = AlphaEdit()


def apply_alphaedit_to_model(model, tok, requests, hparams: AlphaEditHyperParams, copy: bool = False,
                             return_orig_weights: bool = False, keep_original_weight: bool = False, **kwargs):
    """Edit ``model`` in place with AlphaEdit; EasyEdit's contract: returns ``(model, weights_copy)``.

    All requests of one call are one batch. K_p K_pᵀ is carried from call to call while the model keeps the
    weights this run wrote, and starts again at zero when they are restored (a new run). Diagnostics (‖ΔW‖,
    null-space dimension per layer) go to ``edit_history(model, "AlphaEdit")``.
    """
    return ALPHAEDIT_METHOD.apply(model, tok, requests, hparams, copy=copy,
                                  return_orig_weights=return_orig_weights,
                                  keep_original_weight=keep_original_weight, **kwargs)
