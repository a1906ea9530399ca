"""The null space of the generic keys, shared by every rule that edits inside it (AlphaEdit's ΔW, MOSE-input's
planes): P = Û Ûᵀ over the eigenvectors of C whose eigenvalue is below an absolute threshold
(:func:`mose_easyedit.rules.null_space_projector`, docs/methods.md §7)."""
from __future__ import annotations

import torch

from .cache import cached_per_tensor


def null_space(model, module: str, C: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """``(P float32 on C's device, its rank)`` for the module's C; computed once per C tensor and threshold and
    kept in the model's cache (another corpus, sample count or dtype of the statistics gets its own)."""
    from .rules import null_space_projector

    def compute(source: torch.Tensor):
        P = null_space_projector(source, threshold)
        return P.to(torch.float32), int(round(float(P.trace())))

    return cached_per_tensor(model, ("alphaedit_projector", module, float(threshold)), C, compute)
