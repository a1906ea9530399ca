"""EasyEdit's covariance-cache layout: write, read back, and the exact keys EasyEdit's loader expects."""
import struct

import numpy as np
import pytest
import torch

from mose_easyedit.easyedit_stats import (
    easyedit_stats_path,
    read_easyedit_sample_size,
    read_easyedit_stats,
    write_easyedit_stats,
)

torch.set_num_threads(1)


def _keys(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    return features.T @ features, features.shape[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_gives_the_mean_and_count(tmp_path, dtype):
    features = torch.randn(300, 12, generator=torch.Generator().manual_seed(0), dtype=dtype)
    total, count = _keys(features)
    path = write_easyedit_stats(tmp_path / "stats.npz", total, count, sample_size=1000)

    mean, n = read_easyedit_stats(path)

    assert n == 300
    assert mean.dtype == dtype and mean.shape == (12, 12)
    torch.testing.assert_close(mean, total / count)
    assert read_easyedit_sample_size(path) == 1000


def test_file_holds_exactly_easyedits_keys(tmp_path):
    """The layout EasyEdit's ``save_cached_state(CombinedStat(mom2=SecondMoment()), {"sample_size": n})`` writes."""
    total = np.eye(4, dtype=np.float32) * 3
    path = write_easyedit_stats(tmp_path / "s.npz", total, 3, sample_size=7)

    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == ["mom2.constructor", "mom2.count", "mom2.mom2", "sample_size"]
        assert str(data["mom2.constructor"]) == "easyeditor.util.runningstats.SecondMoment()"
        assert data["mom2.count"].dtype == np.int64 and int(data["mom2.count"]) == 3
        assert data["mom2.mom2"].dtype == np.float32
        np.testing.assert_array_equal(data["mom2.mom2"], total)  # unnormalised sum, as EasyEdit stores it
        assert data["sample_size"].dtype == np.int64 and int(data["sample_size"]) == 7


def test_none_sample_size_is_easyedits_nan_box(tmp_path):
    path = write_easyedit_stats(tmp_path / "s.npz", torch.eye(3), 5, sample_size=None)

    with np.load(path) as data:
        value = data["sample_size"]
    assert value.dtype == np.float64 and np.isnan(value)
    assert struct.unpack(">Q", struct.pack(">d", float(value)))[0] == 0xFFF8000000000002
    assert read_easyedit_sample_size(path) is None


def test_reads_a_file_written_by_plain_numpy(tmp_path):
    """A cache made elsewhere (e.g. by EasyEdit itself) is read the same way."""
    features = torch.randn(40, 5, generator=torch.Generator().manual_seed(1))
    total, count = _keys(features)
    np.savez(tmp_path / "ee.npz", **{"mom2.constructor": np.array("easyeditor.util.runningstats.SecondMoment()"),
                                     "mom2.count": np.array(count), "mom2.mom2": total.numpy(),
                                     "sample_size": np.array(100000)})

    mean, n = read_easyedit_stats(tmp_path / "ee.npz")

    assert n == count
    torch.testing.assert_close(mean, total / count)


def test_rejects_files_that_are_not_second_moments(tmp_path):
    np.savez(tmp_path / "mean.npz", **{"mean.mean": np.zeros(3), "mean.count": np.array(3)})
    with pytest.raises(ValueError, match="mom2.mom2"):
        read_easyedit_stats(tmp_path / "mean.npz")
    with pytest.raises(ValueError, match="square"):
        write_easyedit_stats(tmp_path / "bad.npz", torch.zeros(2, 3), 1, 10)
    with pytest.raises(ValueError, match="positive"):
        write_easyedit_stats(tmp_path / "bad.npz", torch.zeros(2, 2), 0, 10)


def test_write_creates_folders_and_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "a" / "b" / "s.npz"
    write_easyedit_stats(target, torch.eye(2), 1, 1)
    assert [p.name for p in target.parent.iterdir()] == ["s.npz"]


def test_path_follows_easyedits_layer_stats_naming(tmp_path):
    path = easyedit_stats_path(tmp_path, "/models/hub/llama-2-7b", "model.layers.4.mlp.down_proj",
                               dataset="wikipedia", dtype="float32", sample_size=100000)
    assert path == tmp_path / "llama-2-7b" / "wikipedia_stats" / "model.layers.4.mlp.down_proj_float32_mom2_100000.npz"
    assert easyedit_stats_path(tmp_path, "gpt2-xl", "transformer.h.17.mlp.c_proj", sample_size=None).name == \
        "transformer.h.17.mlp.c_proj_float32_mom2.npz"
