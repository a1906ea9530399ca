"""EasyEdit's covariance cache files: read them, write them, name them.

EasyEdit (``models/rome/layer_stats.py``) caches the uncentred second moment of an edited module's input as a
NumPy ``.npz`` written from a ``CombinedStat(mom2=SecondMoment())`` (``util/runningstats.py``). The file holds:

==================  =====================================  ==============================================
key                 value                                  meaning
==================  =====================================  ==============================================
``mom2.mom2``       float array (p, p), ``mom2_dtype``     the *unnormalised* sum  Σ_t k_t k_tᵀ
``mom2.count``      int64 scalar                           the number of tokens t in the sum
``mom2.constructor`` str scalar                            ``"easyeditor.util.runningstats.SecondMoment()"``
``sample_size``     int64 scalar, or the NaN-boxed null    ``mom2_n_samples`` (the texts asked for)
==================  =====================================  ==============================================

EasyEdit divides ``mom2.mom2`` by ``mom2.count`` to get E[k kᵀ], and reloads a file only if its ``sample_size``
equals the ``mom2_n_samples`` being asked for. ``None`` is stored as the NaN whose bits are ``0xfff8000000000002``,
so no pickling is needed. The file sits at
``{stats_dir}/{model tail}/{dataset}_stats/{module}_{mom2_dtype}_mom2_{mom2_n_samples}.npz`` — see
:func:`easyedit_stats_path`.
"""
from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

SECOND_MOMENT_CONSTRUCTOR = "easyeditor.util.runningstats.SecondMoment()"
MOM2_KEY, COUNT_KEY, CONSTRUCTOR_KEY, SAMPLE_SIZE_KEY = "mom2.mom2", "mom2.count", "mom2.constructor", "sample_size"
_NULL_BITS = 0xFFF8000000000002  # EasyEdit's (and JavaScriptCore's) NaN-box for None


def _null() -> np.ndarray:
    return np.array(struct.unpack(">d", struct.pack(">Q", _NULL_BITS))[0], dtype=np.float64)


def _is_null(value: np.ndarray) -> bool:
    return (value.ndim == 0 and value.dtype == np.float64 and bool(np.isnan(value))
            and struct.unpack(">Q", struct.pack(">d", float(value)))[0] == _NULL_BITS)


def easyedit_stats_path(stats_dir: str | os.PathLike, model_name_or_path: str, layer_name: str,
                        dataset: str = "wikipedia", dtype: str = "float32",
                        sample_size: int | None = 100000) -> Path:
    """Where EasyEdit's MEMIT / AlphaEdit / ROME look for the statistics of ``layer_name``.

    ``model_name_or_path`` is the model's ``config._name_or_path`` (for a model EasyEdit loaded, the
    ``model_name`` of the hparams); EasyEdit keeps only the part after the last ``/``. ``sample_size`` is
    ``mom2_n_samples`` (``None``: no suffix, EasyEdit's "all").
    """
    tail = str(model_name_or_path).rsplit("/")[-1]
    suffix = "" if sample_size is None else f"_{sample_size}"
    return Path(stats_dir) / tail / f"{dataset}_stats" / f"{layer_name}_{dtype}_mom2{suffix}.npz"


def read_easyedit_stats(path: str | os.PathLike) -> tuple[torch.Tensor, int]:
    """``(C, n)`` from an EasyEdit statistics file: C = Σ k kᵀ / n in the file's dtype, n the token count."""
    with np.load(path, allow_pickle=False) as data:
        missing = [key for key in (MOM2_KEY, COUNT_KEY) if key not in data.files]
        if missing:
            raise ValueError(f"{path} is not an EasyEdit second-moment file: no {', '.join(missing)} "
                             f"(it holds {', '.join(data.files) or 'nothing'})")
        total = data[MOM2_KEY]
        count = int(data[COUNT_KEY])
    if total.ndim != 2 or total.shape[0] != total.shape[1]:
        raise ValueError(f"{path}: {MOM2_KEY} must be a square matrix, got shape {total.shape}")
    if count <= 0:
        raise ValueError(f"{path}: {COUNT_KEY} must be positive, got {count}")
    total = torch.from_numpy(np.ascontiguousarray(total))
    return (total.double() / count).to(total.dtype), count


def read_easyedit_sample_size(path: str | os.PathLike) -> int | None:
    """The ``sample_size`` a file was written for (``None`` when EasyEdit stored its null)."""
    with np.load(path, allow_pickle=False) as data:
        value = data[SAMPLE_SIZE_KEY]
    return None if _is_null(value) else int(value)


def write_easyedit_stats(path: str | os.PathLike, sum_xxT: torch.Tensor | np.ndarray, count: int,
                         sample_size: int | None) -> Path:
    """Write Σ k kᵀ (unnormalised, (p, p)) and the token count as EasyEdit's ``.npz``; returns the path.

    The array keeps its dtype, which should match the ``{dtype}`` in the file name. ``sample_size`` must equal
    the ``mom2_n_samples`` of the hparams that will read the file, or EasyEdit ignores it and recomputes.
    The file is written to a temporary name and moved into place, so a reader never sees half a file.
    """
    if isinstance(sum_xxT, torch.Tensor):
        sum_xxT = sum_xxT.detach().cpu().numpy()
    total = np.asarray(sum_xxT)
    if total.ndim != 2 or total.shape[0] != total.shape[1]:
        raise ValueError(f"sum_xxT must be a square matrix, got shape {total.shape}")
    if int(count) <= 0:
        raise ValueError(f"count must be positive, got {count}")
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"EasyEdit statistics files end in .npz: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        CONSTRUCTOR_KEY: np.array(SECOND_MOMENT_CONSTRUCTOR),
        COUNT_KEY: np.array(int(count), dtype=np.int64),
        MOM2_KEY: total,
        SAMPLE_SIZE_KEY: _null() if sample_size is None else np.array(int(sample_size), dtype=np.int64),
    }
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
