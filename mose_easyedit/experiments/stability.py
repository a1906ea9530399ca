"""Numerical stability of the edited weights (paper Fig. 2): norms and condition numbers after every step.

For each edited (out, in) weight W with original W₀:

    ‖W‖_F,   σ_max(W),   σ_min(W) (the smallest of its min(d, p) singular values),
    κ₂(W) = σ_max / σ_min,   ‖W − W₀‖_F

An orthogonal left factor (MOSE: W ← R W) leaves the first four unchanged; additive updates move all of them.
Per-layer method diagnostics (MOSE's ρ and fit error, ...) are read from the session history.
"""
from __future__ import annotations

import logging
import math
from typing import Mapping

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def weight_stability(weight: torch.Tensor, original: torch.Tensor | None = None,
                     dtype: str = "float64") -> dict[str, float]:
    """``frobenius``, ``sigma_max``, ``sigma_min``, ``kappa`` (κ₂, inf when σ_min = 0) of ``weight`` and, with
    ``original``, ``delta_frobenius`` = ‖W − W₀‖_F. Computed on the weight's device in ``dtype``."""
    if dtype not in _DTYPES:
        raise ValueError(f"stability dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().to(_DTYPES[dtype])
    singular = torch.linalg.svdvals(w)
    sigma_max, sigma_min = float(singular[0]), float(singular[-1])
    stats = {
        "frobenius": float(torch.linalg.matrix_norm(w)),
        "sigma_max": sigma_max,
        "sigma_min": sigma_min,
        "kappa": sigma_max / sigma_min if sigma_min > 0 else math.inf,
    }
    if original is not None:
        if original.shape != weight.shape:
            raise ValueError(f"original weight {tuple(original.shape)} does not match {tuple(weight.shape)}")
        stats["delta_frobenius"] = float(torch.linalg.matrix_norm(w - original.to(w.device, w.dtype)))
    return stats


def method_layer_diagnostics(entry: Mapping) -> dict[int, dict[str, float]]:
    """The per-layer numbers of one session-history entry (``entry["per_layer"]``: MOSE's ``rho``,
    ``fit_error``, ``rotation_distance``, ...), as ``{layer: {name: float}}``; empty when the method logs none.
    A value logged per request (a list, as the input side logs its planes) is given as its mean over the call's
    requests (for flags such as ``reachable``: the fraction that is true)."""
    per_layer = entry.get("per_layer") or {}
    out: dict[int, dict[str, float]] = {}
    for layer, values in per_layer.items():
        if not isinstance(values, Mapping):
            continue
        numbers = {}
        for key, value in values.items():
            if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
                numbers[key] = sum(float(v) for v in value) / len(value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                numbers[key] = float(value)
        if numbers:
            out[int(layer)] = numbers
    return out


def summarize_stability(original: Mapping[str, Mapping[str, float]],
                        final: Mapping[str, Mapping[str, float]]) -> dict:
    """Worst-case changes over the edited modules (both mappings keyed by module): the largest relative change
    of ‖W‖_F and of κ₂, and the largest ‖W − W₀‖_F / ‖W₀‖_F."""
    rel_norm, rel_kappa, rel_delta = [], [], []
    for key, after in final.items():
        before = original.get(key)
        if not before:
            continue
        rel_norm.append(abs(after["frobenius"] / before["frobenius"] - 1.0))
        rel_kappa.append(abs(after["kappa"] / before["kappa"] - 1.0) if math.isfinite(after["kappa"]) else math.inf)
        rel_delta.append(after.get("delta_frobenius", 0.0) / before["frobenius"])
    return {
        "modules": list(final),
        "max_relative_norm_change": max(rel_norm, default=0.0),
        "max_relative_kappa_change": max(rel_kappa, default=0.0),
        "max_relative_distance": max(rel_delta, default=0.0),
    }
