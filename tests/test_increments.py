"""The Figure 5 analysis: compact increments, the two conditions, the projection-free statistics, end to end."""
from __future__ import annotations

import pytest
import torch
from conftest import REQUESTS, build_tiny_model, snapshot, assert_bit_identical

from mose_easyedit.experiments import increments as inc
from mose_easyedit.modeling import read_weight, write_weight


def test_factorize_is_exact_for_low_rank_and_truncates_a_decaying_spectrum():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(12, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 30, generator=g, dtype=torch.float64)
    f = inc.factorize(low)
    assert f["A"].shape == (12, 2) and f["B"].shape == (30, 2) and f["dropped"] < 1e-6
    torch.testing.assert_close(f["A"].double() @ f["B"].double().T, low, rtol=1e-5, atol=1e-5)
    U, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(30, 12, generator=g, dtype=torch.float64))
    decaying = U @ torch.diag(10.0 ** -torch.arange(12, dtype=torch.float64)) @ V.T
    f = inc.factorize(decaying, tolerance=1e-3)
    assert f["A"].shape[1] == 4 and 0 < f["dropped"] < 1e-3  # 10⁻⁴ and below dropped
    assert inc.factorize(torch.zeros(3, 4))["A"].shape == (3, 0)


def test_the_statistics_tell_identical_clouds_from_moved_ones():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 8, generator=g, dtype=torch.float64)
    same = inc.compare_conditions(x, x.clone(), permutations=200)
    assert same["energy_distance"] == pytest.approx(0.0, abs=1e-12) and same["p_value"] == 1.0
    assert same["mean_cosine_distance"] == pytest.approx(0.0, abs=1e-12)
    moved = inc.compare_conditions(x, x + 1.5, permutations=200)
    assert moved["energy_distance"] > 0.5 and moved["p_value"] <= 1 / 201 + 1e-12
    noisy = inc.compare_conditions(x, x + 0.01 * torch.randn(40, 8, generator=g, dtype=torch.float64), 200)
    assert noisy["p_value"] > 0.05  # a small symmetric perturbation does not separate the clouds


def test_two_conditions_apply_one_increment_then_all_and_restore_the_model(tokenizer):
    model = build_tiny_model("llama", len(tokenizer))
    before = snapshot(model)
    module = "model.layers.1.mlp.down_proj"
    W0 = read_weight(model, module).double()
    g = torch.Generator().manual_seed(2)
    steps = [{module: inc.factorize(0.05 * torch.randn(W0.shape[0], 1, generator=g, dtype=torch.float64)
                                    @ torch.randn(1, W0.shape[1], generator=g, dtype=torch.float64))}
             for _ in range(2)]
    facts = [(r["prompt"], r["subject"]) for r in REQUESTS[:2]]
    single, accumulated = inc.two_conditions(model, tokenizer, facts, steps, [0, 1])
    assert_bit_identical(model, before)
    for index, fact in enumerate(facts):
        delta = steps[index][module]
        write_weight(model, module, W0 + delta["A"].double() @ delta["B"].double().T)
        torch.testing.assert_close(single[index], inc.representations(model, tokenizer, [fact])[0])
    total = sum(s[module]["A"].double() @ s[module]["B"].double().T for s in steps)
    write_weight(model, module, W0 + total)
    torch.testing.assert_close(accumulated, inc.representations(model, tokenizer, facts))
    ids, positions = inc.relation_positions(tokenizer, "The mother tongue of Danielle Darrieux is", "Danielle Darrieux")
    assert positions == [len(ids) - 1]  # " is" follows the subject
