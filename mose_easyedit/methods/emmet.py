"""EMMET (Gupta et al. 2024): MEMIT's objective with the edit as an equality constraint.

At each layer of the window: min tr(ΔW C ΔWᵀ) subject to (W + ΔW) K = W K + Rsd, relaxed by a ridge,

    ΔW = Rsd (Kᵀ C⁻¹ K + ridge·I)⁻¹ Kᵀ C⁻¹                                     (docs/methods.md §5)

(:func:`mose_easyedit.rules.emmet_delta`, float64 solves). EMMET's two constants, the scale λ_m of C
(``mom2_update_weight`` in its configs) and λ_e, only enter as their product ridge = λ_m·λ_e, so this class
has that one knob, ``emmet_ridge``, and ignores ``mom2_update_weight``. The smaller the ridge, the more
exactly each layer delivers its share of the residual on the edit keys.
"""
from __future__ import annotations

import dataclasses


from ..editor import LayerBatch, Operands, Update
from ..hparams import LocateEditHyperParams
from ..rules import emmet_delta
from .memit import MEMIT, additive_diagnostics


@dataclasses.dataclass(kw_only=True)
class EMMETHyperParams(LocateEditHyperParams):
    """The core's fields plus ``emmet_ridge``; ``mom2_update_weight`` is not read (see the module doc)."""

    ALG_NAMES = ("EMMET", "EMMET-core")

    # ridge = λ_m·λ_e relative to the normalised C = E[k kᵀ]: 0.1 in the EMMET authors' configs (λ_m = 1),
    # 1e4 in EasyEdit's (λ_m = 1e5, λ_e = 0.1).
    emmet_ridge: float = 0.1

    def validate(self, source: str = "<hparams>") -> None:
        super().validate(source)
        if not self.emmet_ridge >= 0:
            raise ValueError(f"{source}: key 'emmet_ridge' must be >= 0, got {self.emmet_ridge}")


def emmet_rule(batch: LayerBatch, ops: Operands, state, hp: EMMETHyperParams) -> Update:
    """ΔW = Rsd (Kᵀ C⁻¹ K + ridge·I)⁻¹ Kᵀ C⁻¹, W ← W + ΔW."""
    delta = emmet_delta(batch.residual.to(ops.C.device), batch.K.to(ops.C.device), ops.C, hp.emmet_ridge,
                        factor=ops.C_factor)
    return Update(batch.W + delta, state, additive_diagnostics(batch, delta))


class EMMET(MEMIT):
    name = "EMMET"
    hparams_class = EMMETHyperParams
    rule = staticmethod(emmet_rule)


EMMET_METHOD = EMMET()


def apply_emmet_to_model(model, tok, requests, hparams: EMMETHyperParams, copy: bool = False,
                         return_orig_weights: bool = False, **kwargs):
    """Edit ``model`` in place with EMMET; EasyEdit's contract: returns ``(model, weights_copy)``.

    Unlike EasyEdit's EMMET, ``weights_copy`` holds the original weights whenever ``return_orig_weights`` is
    true, so a non-sequential EasyEdit run restores them. Diagnostics go to ``edit_history(model, "EMMET")``.
    """
    return EMMET_METHOD.apply(model, tok, requests, hparams, copy=copy,
                              return_orig_weights=return_orig_weights, **kwargs)
