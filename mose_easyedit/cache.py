"""The per-model cache: derived data that depends only on the model and the statistics (context templates,
key second moments, spectral norms, null-space projectors, Cholesky factors).

It is stored on the model object itself, so it lives and dies with the model and is never a module global.
Nothing here is carried state of an editing run: that lives in the run's session (``session.py``).
"""
from __future__ import annotations

CACHE_ATTRIBUTE = "_mose_easyedit_cache"


def model_cache(model) -> dict:
    """The model's cache dictionary (created on first use)."""
    cache = model.__dict__.get(CACHE_ATTRIBUTE)
    if cache is None:
        cache = {}
        model.__dict__[CACHE_ATTRIBUTE] = cache
    return cache


def cached_per_tensor(model, key, source, compute):
    """``compute(source)``, computed once per ``source`` tensor and kept under ``key``: a different tensor (another
    corpus, sample count or dtype of the statistics) gets a fresh value."""
    cache = model_cache(model)
    entry = cache.get(key)
    if entry is None or entry[0] is not source:
        entry = cache[key] = (source, compute(source))
    return entry[1]
