"""MOSE-OFT (the authors' released variant): tiny random Llama / Qwen2 / GPT-2 models and the embedded SmolLM2."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import (FAMILIES, REQUESTS, assert_bit_identical, build_tiny_model, load_cases, snapshot,
                      target_logprob, tiny_hparams)

import mose_easyedit as me
from mose_easyedit.evaluation import token_accuracy
from mose_easyedit.methods import METHODS
from mose_easyedit.methods import mose_oft
from mose_easyedit.methods.mose_oft import MOSEOFT, MOSEOFTHyperParams, apply_mose_oft_to_model
from mose_easyedit.modeling import read_weight
from mose_easyedit.session import get_session

# tiny widths (p = 128 or 256) make the authors' COFT radius (1e-5 · block²) nearly zero; train unconstrained
TINY = dict(lr=1e-2, num_steps=12, coft=False)


def oft_hparams(family: str, **overrides) -> MOSEOFTHyperParams:
    return tiny_hparams(MOSEOFTHyperParams, family, **{**TINY, **overrides})


def assert_plain_model(model, reference_types: dict[str, str]) -> None:
    """No peft module or parameter anywhere: the same module types as before the edit."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert {name: type(m).__name__ for name, m in model.named_modules()} == reference_types
    assert not any("oft_" in n or "hra_" in n or "base_layer" in n for n, _ in model.named_parameters())


def module_types(model) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules()}


@pytest.mark.parametrize("tuner", ["oft", "hra"])
@pytest.mark.parametrize("family", FAMILIES)
def test_edit_rotates_inputs_keeps_spectrum_and_restores(tokenizer, family, tuner):
    model = build_tiny_model(family, len(tokenizer))
    hp = oft_hparams(family, tuner=tuner)
    types, original = module_types(model), snapshot(model)
    modules = [hp.rewrite_module_tmp.format(layer) for layer in range(4)]
    spectra = {m: torch.linalg.svdvals(read_weight(model, m).double()) for m in modules}
    before = target_logprob(model, tokenizer, REQUESTS[0]["prompt"], "English")

    _, weights_copy = apply_mose_oft_to_model(model, tokenizer, [REQUESTS[0]], hp, return_orig_weights=True)

    assert target_logprob(model, tokenizer, REQUESTS[0]["prompt"], "English") > before + 0.5
    assert_plain_model(model, types)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, original[name])}
    assert changed == set(weights_copy) == {f"{hp.rewrite_module_tmp.format(layer)}.weight" for layer in hp.layers}
    for module in modules:  # W Qᵀ with Q orthogonal: every singular value, so ‖W‖_F and κ₂, unchanged
        s0, s1 = spectra[module], torch.linalg.svdvals(read_weight(model, module).double())
        assert torch.allclose(s1, s0, rtol=1e-5, atol=0)
        assert float(s1.norm()) == pytest.approx(float(s0.norm()), rel=1e-5)
        assert float(s1[0] / s1[-1]) == pytest.approx(float(s0[0] / s0[-1]), rel=1e-5)
    (entry,) = me.edit_history(model, "MOSE-OFT")
    assert entry["layers"] == hp.layers and entry["tuner"] == tuner and entry["steps"] >= 1
    assert entry["loss_final"] < entry["loss_start"]
    for diag in entry["per_layer"].values():
        assert diag["orthogonality_error"] < 1e-10 and diag["rotation_distance"] > 0
    # the update really is W M on the input side: the output norms of W's rows are kept, the columns' are not
    W0 = original[next(iter(weights_copy))].double()
    W1 = model.get_parameter(next(iter(weights_copy))).detach().double()
    if family == "gpt2":  # Conv1D stores (in, out)
        W0, W1 = W0.T, W1.T
    assert torch.allclose(W1.norm(dim=1), W0.norm(dim=1), rtol=1e-5)
    assert not torch.allclose(W1.norm(dim=0), W0.norm(dim=0), rtol=1e-5)
    # EasyEdit's restore: copy weights_copy back -> bit-identical, and the next call starts a new run
    with torch.no_grad():
        for name, value in weights_copy.items():
            model.get_parameter(name).copy_(value)
    assert_bit_identical(model, original)
    assert get_session(model, MOSEOFT.name, create=False) is None


def test_failure_while_training_leaves_plain_identical_model(tokenizer, monkeypatch):
    model = build_tiny_model("gpt2", len(tokenizer))
    hp = oft_hparams("gpt2")
    apply_mose_oft_to_model(model, tokenizer, [REQUESTS[0]], hp)
    types, before, history = module_types(model), snapshot(model), me.edit_history(model, "MOSE-OFT")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    calls = {"n": 0}
    original_nll = mose_oft.weighted_nll

    def failing_nll(model_, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # adapters injected and trained for two steps
            raise RuntimeError("out of memory")
        return original_nll(model_, batch)

    monkeypatch.setattr(mose_oft, "weighted_nll", failing_nll)
    with pytest.raises(RuntimeError, match="out of memory"):
        apply_mose_oft_to_model(model, tokenizer, [REQUESTS[1]], hp)
    assert calls["n"] == 3
    assert_plain_model(model, types)
    assert_bit_identical(model, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not model.training
    assert me.edit_history(model, "MOSE-OFT") == history


def test_unsupported_module_and_bad_blocks_raise_clearly(tokenizer):
    model = build_tiny_model("llama", len(tokenizer))
    types, before = module_types(model), snapshot(model)
    hp = oft_hparams("llama", rewrite_module_tmp="model.layers.{}.input_layernorm")
    with pytest.raises(TypeError, match="nn.Linear or GPT-2 Conv1D"):
        apply_mose_oft_to_model(model, tokenizer, [REQUESTS[0]], hp)
    with pytest.raises(ValueError, match="'num_blocks' = 3 does not tile"):
        apply_mose_oft_to_model(model, tokenizer, [REQUESTS[0]], oft_hparams("llama", num_blocks=3))
    assert_plain_model(model, types)
    assert_bit_identical(model, before)
    with pytest.raises(ValueError, match="exactly one of the keys 'num_blocks' and 'block_size'"):
        oft_hparams("llama", block_size=32)
    with pytest.raises(ValueError, match="'tuner'"):
        oft_hparams("llama", tuner="boft")


def test_batch_sequence_and_padding_side(tokenizer):
    """Two requests in one call, then a second call: the spectrum is still the original one; the tokenizer's
    padding side changes nothing (rows are padded explicitly)."""
    model = build_tiny_model("qwen2", len(tokenizer))
    hp = oft_hparams("qwen2", block_size=32, num_blocks=0, coft=True, coft_eps=1e-2)
    module = hp.rewrite_module_tmp.format(2)
    s0 = torch.linalg.svdvals(read_weight(model, module).double())
    twin = copy.deepcopy(model)
    side = tokenizer.padding_side
    try:
        for padding_side, m in (("right", model), ("left", twin)):
            tokenizer.padding_side = padding_side
            apply_mose_oft_to_model(m, tokenizer, REQUESTS, hp)
    finally:
        tokenizer.padding_side = side
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    apply_mose_oft_to_model(model, tokenizer, [dict(REQUESTS[0], target_new="German")], hp)
    history = me.edit_history(model, "MOSE-OFT")
    assert [h["num_requests"] for h in history] == [2, 1]
    s2 = torch.linalg.svdvals(read_weight(model, module).double())
    assert torch.allclose(s2, s0, rtol=1e-5, atol=0)


def test_registered_and_yaml_files_load(default_model):
    assert METHODS["MOSE-OFT"].apply is apply_mose_oft_to_model
    assert METHODS["MOSE-OFT"].hparams_cls is MOSEOFTHyperParams
    authors = {"llama3-8b": [19, 20, 21], "llama2-13b": [19, 20, 21], "qwen2.5-7b": [4, 5, 6]}
    for name, layers in authors.items():
        hp = MOSEOFTHyperParams.from_hparams(name)
        assert hp.layers == layers and hp.tuner == "oft" and hp.num_blocks == 4 and hp.lr == 5e-4
    hp = MOSEOFTHyperParams.from_hparams("smollm2-135m")
    hp.check_model(default_model[0])
    assert hp.blocks(1536) == (24, 64) and hp.stop_loss > 0


@pytest.mark.slow
def test_embedded_model_counterfact_edits(default_model):
    """The default yaml edits three CounterFact cases on SmolLM2 (each restored through weights_copy)."""
    model, tok = default_model
    hp = MOSEOFTHyperParams.from_hparams("smollm2-135m")
    cases = load_cases(3)
    original = snapshot(model)
    types = module_types(model)
    try:
        accuracy = []
        for case in cases:
            _, weights_copy = apply_mose_oft_to_model(model, tok, [case], hp, return_orig_weights=True)
            accuracy += token_accuracy(model, tok, [case["prompt"]], [case["target_new"]], progress=False)
            assert_plain_model(model, types)
            with torch.no_grad():
                for name, value in weights_copy.items():
                    model.get_parameter(name).copy_(value)
            assert_bit_identical(model, original)
        assert sum(a == 1.0 for a in accuracy) >= 3, accuracy
    finally:
        with torch.no_grad():
            for name, value in original.items():
                model.get_parameter(name).copy_(value)
        me.reset_session(model)
