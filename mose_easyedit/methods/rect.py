"""RECT (Gu et al. 2024): MEMIT's update, sparsified by relative change.

At each layer of the window, ΔW = Rsd Kᵀ (λ C + K Kᵀ)⁻¹ as in MEMIT, then only the ``keep_fraction`` of its
entries with the largest relative change |ΔW_ij| / |W_ij| (against the current W) are kept and the rest are
zeroed (docs/methods.md §4; :func:`mose_easyedit.rules.rect_sparsify`). The spreading of the core hands the
next layer whatever this sparse update left undelivered.
"""
from __future__ import annotations

import dataclasses


from ..editor import LayerBatch, Operands, Update
from ..hparams import LocateEditHyperParams
from ..rules import memit_delta, rect_kept_count, rect_sparsify
from .memit import MEMIT, additive_diagnostics, require_update_weight


@dataclasses.dataclass(kw_only=True)
class RECTHyperParams(LocateEditHyperParams):
    """MEMIT's fields plus ``keep_fraction``."""

    ALG_NAMES = ("RECT", "RECT-core")

    # Share of ΔW's entries kept (largest relative change first): 0.4 with MEMIT as the base editor, as in
    # AlphaEdit's RECT baseline; the RECT paper uses 0.2 with ROME.
    keep_fraction: float = 0.4

    def validate(self, source: str = "<hparams>") -> None:
        super().validate(source)
        require_update_weight(self, source)
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError(f"{source}: key 'keep_fraction' must be in (0, 1], got {self.keep_fraction}")


def rect_rule(batch: LayerBatch, ops: Operands, state, hp: RECTHyperParams) -> Update:
    """MEMIT's ΔW, only its ``keep_fraction`` largest relative changes kept; W ← W + ΔW."""
    dense = memit_delta(batch.residual.to(ops.C.device), batch.K.to(ops.C.device), ops.C, hp.mom2_update_weight,
                        factor=ops.C_factor)
    delta = rect_sparsify(dense, batch.W, hp.keep_fraction)
    dense_norm = float(dense.norm())
    return Update(batch.W + delta, state, additive_diagnostics(
        batch, delta, kept_entries=rect_kept_count(delta.numel(), hp.keep_fraction),
        kept_fraction=float((delta != 0).sum()) / delta.numel(),
        kept_norm_share=float(delta.norm()) / dense_norm if dense_norm > 0 else float("nan")))


class RECT(MEMIT):
    name = "RECT"
    hparams_class = RECTHyperParams
    rule = staticmethod(rect_rule)


RECT_METHOD = RECT()


def apply_rect_to_model(model, tok, requests, hparams: RECTHyperParams, copy: bool = False,
                        return_orig_weights: bool = False, **kwargs):
    """Edit ``model`` in place with RECT (MEMIT base); EasyEdit's contract: returns ``(model, weights_copy)``.

    Diagnostics per call (‖ΔW‖, kept fraction and the share of the dense ‖ΔW‖ kept, per layer) go to
    ``edit_history(model, "RECT")``.
    """
    return RECT_METHOD.apply(model, tok, requests, hparams, copy=copy,
                             return_orig_weights=return_orig_weights, **kwargs)
