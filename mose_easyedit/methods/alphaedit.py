"""AlphaEdit (Fang et al. 2025): MEMIT's residual, projected onto the null space of the preserved keys.

Once per layer, from the original C: P = Û Ûᵀ with Û the eigenvectors of C whose eigenvalue is below
``nullspace_threshold`` (absolute). Per batch, at each layer of the window:

    ΔW = R Kᵀ P ((K Kᵀ + K_p K_pᵀ) P + L2·I)⁻¹                                (docs/methods.md §7)

in float32 (:func:`mose_easyedit.rules.alphaedit_delta`), so ΔW (I − P) = 0: generic keys (C's range) keep
their outputs. K_p K_pᵀ, the keys of earlier batches of this run (recomputed on the edited model after each
batch), is carried in the editing session: it starts at zero with every new run and grows only after a
successful call (EasyEdit keeps it process-global and never resets it, EasyEdit issue #613). P depends on C
alone, so it is cached on the model next to C (never in a file in the working directory).
"""
from __future__ import annotations

import dataclasses

import torch

from ..editor import EditContext, LayerBatch
from ..hparams import LocateEditHyperParams
from ..keys import model_cache
from ..rules import alphaedit_delta, alphaedit_grow_moment, null_space_projector
from .memit import MEMIT, covariance, record_update

MOMENT_STATE = "prior_moment"  # session.state[MOMENT_STATE][module] = K_p K_pᵀ (p×p, in mom2_dtype)


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


def null_space(ctx: EditContext, batch: LayerBatch) -> tuple[torch.Tensor, int]:
    """``(P, dimension of the null space)`` for the batch's layer, from the cached C; computed once per C.

    The cache entry keeps the C it was computed from, so a different C (another corpus, sample count, dtype)
    gets its own projector.
    """
    C = covariance(ctx, batch)
    threshold = float(ctx.hparams.nullspace_threshold)
    cache = model_cache(ctx.model)
    key = ("alphaedit_projector", batch.module, threshold)
    entry = cache.get(key)
    if entry is None or entry[0] is not C:
        P = null_space_projector(C, threshold)
        entry = cache[key] = (C, P.to(torch.float32), int(round(float(P.trace()))))
    return entry[1], entry[2]


class AlphaEdit(MEMIT):
    name = "AlphaEdit"
    hparams_class = AlphaEditHyperParams

    def rule(self, ctx: EditContext, batch: LayerBatch) -> torch.Tensor:
        P, dimension = null_space(ctx, batch)
        prior = ctx.session.state.get(MOMENT_STATE, {}).get(batch.module)
        prior = torch.zeros_like(P) if prior is None else prior.to(P.device)
        delta = alphaedit_delta(batch.residual.to(P.device), batch.K.to(P.device), P, prior, ctx.hparams.L2)
        record_update(ctx, batch, delta, null_space_dim=dimension, prior_edits=ctx.session.num_edits)
        return batch.W + delta

    def finish(self, ctx: EditContext) -> None:
        """Recompute the batch's keys on the edited model; K_p K_pᵀ += K Kᵀ once the call has succeeded."""
        window = ctx.diagnostics["layers"]
        keys, _, _ = ctx.keys(window)
        grown = {}
        for layer in window:
            C = ctx.second_moments([layer])[layer]
            grown[ctx.module(layer)] = (keys[layer].to(C.device), C)
        state = ctx.session.state

        def commit():
            moments = state.setdefault(MOMENT_STATE, {})
            for module, (K, C) in grown.items():
                prior = moments.get(module)
                moments[module] = alphaedit_grow_moment(prior if prior is not None else torch.zeros_like(C), K
                                                        ).to(C.dtype)

        ctx.commits.append(commit)


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
