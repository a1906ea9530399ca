"""PRUNE (Ma et al. 2025): unrestrained MEMIT edits, with the accumulated change restrained by its spectrum.

The run keeps, per edited layer, W₀ (the weight before the run first touched it), σ̄ = σ_max(W₀) and W_raw
(the weight the base editor has produced so far). After every call the model holds

    W = W₀ + U diag(F(σ)) Vᵀ,   W_raw − W₀ = U diag(σ) Vᵀ,   F(σ) = log σ − log σ̄ + σ̄ if σ ≥ σ̄ else σ

(docs/methods.md §6; :func:`mose_easyedit.rules.prune_restrain`), so the model is restrained whenever it is
evaluated, while the next call first puts W_raw back (inside the atomic call) and continues editing from the
unrestrained weights. A failed call leaves both the model and the carried state as they were.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..editor import EditContext
from ..hparams import LocateEditHyperParams
from ..modeling import get_module, is_conv1d, read_weight
from ..rules import gram_spectrum, prune_restrain
from .memit import MEMIT, require_update_weight

LOGARITHMS = {"ln": math.log, "log2": math.log2, "log10": math.log10}


@dataclasses.dataclass(kw_only=True)
class PRUNEHyperParams(LocateEditHyperParams):
    """MEMIT's fields (the base editor) plus the logarithm of the restraint function."""

    ALG_NAMES = ("PRUNE", "PRUNE-core")

    # F(σ) = log σ − log σ̄ + σ̄ above σ̄ = σ_max(W₀): "ln" (the paper's default), "log2" or "log10".
    restraint_log: str = "ln"

    def validate(self, source: str = "<hparams>") -> None:
        super().validate(source)
        require_update_weight(self, source)
        if self.restraint_log not in LOGARITHMS:
            raise ValueError(f"{source}: key 'restraint_log' must be one of {list(LOGARITHMS)}, "
                             f"got {self.restraint_log!r}")


@dataclasses.dataclass(frozen=True)
class TrackedLayer:
    """One layer of a PRUNE run: W₀ and W_raw in the weight's dtype, (out, in) orientation."""

    layer: int
    original: torch.Tensor
    sigma_max: float
    raw: torch.Tensor


@dataclasses.dataclass(frozen=True)
class PRUNEState:
    """A PRUNE run's carried state: ``{module: TrackedLayer}`` for every layer the run has edited."""

    tracked: dict = dataclasses.field(default_factory=dict)


class PRUNE(MEMIT):
    name = "PRUNE"
    hparams_class = PRUNEHyperParams
    state_class = PRUNEState

    def edit(self, ctx: EditContext) -> None:
        for entry in ctx.state.tracked.values():
            ctx.write(entry.layer, entry.raw)  # continue from the unrestrained weights
        super().edit(ctx)

    def finish(self, ctx: EditContext, state: PRUNEState) -> PRUNEState:
        """Restrain W_raw − W₀ of every layer of the run; carry W_raw (and W₀ of new layers)."""
        hp = ctx.hparams
        tracked = state.tracked
        window = {ctx.module(layer): layer for layer in hp.layers}
        updated, report = {}, {}
        for module, before in ctx.backup.items():
            entry = tracked.get(module)
            if entry is None:  # first touch in this run: the weight before this call is W₀
                original = before.T if is_conv1d(get_module(ctx.model, module)) else before
                sigma_max = float(torch.linalg.matrix_norm(original.double(), ord=2))
                entry = TrackedLayer(window[module], original, sigma_max, original)
            raw = read_weight(ctx.model, module).clone()
            change = raw.double() - entry.original.double()
            sigmas = gram_spectrum(change)[0]
            restrained = int((sigmas >= entry.sigma_max).sum())
            if restrained:
                ctx.write(entry.layer, entry.original.double()
                          + prune_restrain(change, entry.sigma_max, LOGARITHMS[hp.restraint_log]))
            updated[module] = dataclasses.replace(entry, raw=raw)
            report[entry.layer] = {"sigma_max_original": entry.sigma_max,
                                   "sigma_max_change": float(sigmas.max()), "restrained": restrained}
        ctx.diagnostics["restraint"] = report
        return PRUNEState({**tracked, **updated})


PRUNE_METHOD = PRUNE()


def apply_prune_to_model(model, tok, requests, hparams: PRUNEHyperParams, copy: bool = False,
                         return_orig_weights: bool = False, **kwargs):
    """Edit ``model`` in place with PRUNE (MEMIT base); EasyEdit's contract: ``(model, weights_copy)``.

    ``weights_copy`` holds the weights before this call (restrained ones in a sequential run), so restoring it
    undoes the call; that also ends the run (W₀ and W_raw are forgotten). Diagnostics (MEMIT's per layer plus
    ``restraint``: σ̄, σ_max of the accumulated change and how many singular values were restrained) go to
    ``edit_history(model, "PRUNE")``.
    """
    return PRUNE_METHOD.apply(model, tok, requests, hparams, copy=copy,
                              return_orig_weights=return_orig_weights, **kwargs)
