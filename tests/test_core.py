"""The shared core without editing: hooks, subject location, requests, hyperparameters, statistics."""
from __future__ import annotations

import pytest
import torch
from conftest import CORPUS, FAMILIES, build_tiny_model, tiny_hparams

from mose_easyedit.keys import bare_rows, context_templates, encode_rows, family_mean, trace_at_subject
from mose_easyedit.methods.mose import MOSEHyperParams
from mose_easyedit.methods.mose_shared import layer_window
from mose_easyedit.modeling import get_module
from mose_easyedit.nethook import StopForward, Trace, TraceDict
from mose_easyedit.requests import validate_requests
from mose_easyedit.stats import second_moments
from mose_easyedit.tokens import encode_prompt, find_subject

REQUEST = {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
           "target_new": "English"}


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_after_exception(tokenizer):
    model = build_tiny_model("llama", len(tokenizer))
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(RuntimeError, match="boom"):
        with TraceDict(model, ["model.layers.0.mlp.down_proj", "model.layers.1"], retain_input=True):
            raise RuntimeError("boom")
    assert _hook_count(model) == 0

    def explode(_):
        raise ValueError("inside the hook")

    with pytest.raises(ValueError, match="inside the hook"):
        with Trace(model, "model.layers.1", edit_output=explode):
            model(input_ids=ids)
    assert _hook_count(model) == 0
    # a hook that stops the forward early is swallowed by the context manager and removed too
    with TraceDict(model, ["model.layers.0.mlp.down_proj"], retain_input=True, stop_at="model.layers.0") as tr:
        model(input_ids=ids)
    assert tr["model.layers.0.mlp.down_proj"].input.shape[-1] == 128
    assert _hook_count(model) == 0
    assert StopForward  # exported for callers that run the forward themselves
    with pytest.raises(ValueError, match="not found"):
        Trace(model, "model.layers.99")


def test_trace_edit_output_changes_forward(tokenizer):
    model = build_tiny_model("llama", len(tokenizer))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with Trace(model, "model.layers.1", edit_output=lambda h: h + 1.0):
            edited = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert not torch.allclose(base, edited)
    assert torch.equal(base, again)


@pytest.mark.parametrize("subject", ["Danielle Darrieux", " Danielle Darrieux", "Danielle Darrieux "])
def test_subject_last_token(tokenizer, subject):
    enc = encode_prompt(tokenizer, REQUEST["prompt"], subject, prefix="Because of this. ", target="English")
    pieces = [tokenizer.decode([i]) for i in enc.ids]
    assert pieces[enc.subject_last].strip() == "ux"
    assert tokenizer.decode(list(enc.target_ids)).strip() == "English"
    assert pieces[enc.subject_last + 1].strip() == "is"


def test_subject_missing_is_an_error():
    with pytest.raises(ValueError, match="does not occur"):
        find_subject("The capital of France is", "Germany")


@pytest.mark.parametrize("side", ["left", "right"])
def test_keys_do_not_depend_on_padding_side(tokenizer, side):
    model = build_tiny_model("llama", len(tokenizer))
    requests = validate_requests([REQUEST, {"prompt": "Paris is the capital of", "subject": "Paris",
                                            "target_new": "Italy"}])
    families = context_templates(model, tokenizer, [[6, 2]])
    rows, index = encode_rows(tokenizer, requests, families)
    reference = trace_at_subject(model, tokenizer, rows, ["model.layers.1.mlp.down_proj"])
    tokenizer.padding_side = side
    try:
        traced = trace_at_subject(model, tokenizer, rows, ["model.layers.1.mlp.down_proj"])
    finally:
        tokenizer.padding_side = "right"
    key = ("input", "model.layers.1.mlp.down_proj")
    assert torch.equal(traced[key], reference[key])
    # each row's key equals the key computed for that text alone (padding never leaks in)
    for r in (0, len(rows) - 1):
        alone = trace_at_subject(model, tokenizer, [rows[r]], ["model.layers.1.mlp.down_proj"])[key]
        torch.testing.assert_close(alone[0], traced[key][r], atol=1e-5, rtol=1e-5)
    keys = family_mean(traced[key], index)
    assert keys.shape == (128, 2)
    assert len(bare_rows(index)) == 2


def test_context_templates_are_generated_once(tokenizer):
    model = build_tiny_model("llama", len(tokenizer))
    first = context_templates(model, tokenizer, [[5, 3]])
    assert context_templates(model, tokenizer, [[5, 3]]) is first
    assert first[0] == [""] and len(first[1]) == 3 and all(t.endswith(". ") for t in first[1])


@pytest.mark.parametrize("bad, field", [
    ({"prompt": "The capital of France is", "subject": "Germany", "target_new": "Rome"}, "subject"),
    ({"prompt": "The capital of France is", "subject": "France", "target_new": ""}, "target_new"),
    ({"prompt": "The capital of France is", "subject": "France", "target_new": 7}, "target_new"),
    ({"prompt": "The capital of France is", "subject": "France"}, "target_new"),
    ({"subject": "France", "target_new": "Rome"}, "prompt"),
])
def test_malformed_requests_name_the_field(bad, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        validate_requests([REQUEST, bad])


def test_request_placeholder_prompt():
    (request,) = validate_requests([{"prompt": "{} is located in", "subject": "Paris", "target_new": {"str": "Rome"}}])
    assert request.prompt == "Paris is located in" and request.target == "Rome"


def test_hparams_from_yaml(tmp_path):
    hp = MOSEHyperParams.from_hparams("smollm2-135m")  # bare name, resolved in hparams/MOSE
    assert hp.alg_name == "MOSE" and isinstance(hp.v_weight_decay, float)
    path = tmp_path / "h.yaml"
    path.write_text("alg_name: MOSE\nlayers: [1]\ncandidate_layers: [1, 2]\nv_weight_decay: 1e-3\n"
                    "mose_lambda: 5e1\n")
    hp = MOSEHyperParams.from_hparams(str(tmp_path / "h"))  # without .yaml
    assert hp.v_weight_decay == 1e-3 and hp.mose_lambda == 50.0


@pytest.mark.parametrize("text, message", [
    ("alg_name: MEMIT\nlayers: [1]\ncandidate_layers: [1]\n", "alg_name"),
    ("alg_name: MOSE\nlayers: [1]\ncandidate_layers: [1]\nmose_lamda: 3\n", "mose_lamda"),
    ("alg_name: MOSE\ncandidate_layers: [1]\n", "'layers'"),
    ("alg_name: MOSE\nlayers: [1]\ncandidate_layers: [1]\nv_lr: fast\n", "'v_lr'"),
    ("alg_name: MOSE\nlayers: one\ncandidate_layers: [1]\n", "'layers'"),
    ("alg_name: MOSE\nlayers: [1]\ncandidate_layers: [1]\nmose_lambda: 0\n", "mose_lambda"),
    ("alg_name: MOSE\nlayers: [1]\ncandidate_layers: [1]\nlayer_selection: maybe\n", "layer_selection"),
])
def test_hparams_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        MOSEHyperParams.from_hparams(path)


def test_hparams_layers_outside_model(tokenizer):
    model = build_tiny_model("llama", len(tokenizer))
    hp = tiny_hparams(MOSEHyperParams, "llama", candidate_layers=[1, 7])
    with pytest.raises(ValueError, match="candidate_layers.*layer 7"):
        hp.check_model(model)


def test_layer_window_shifts_inward():
    assert layer_window(5, 1, 30) == [4, 5, 6]
    assert layer_window(0, 1, 30) == [0, 1, 2]
    assert layer_window(29, 1, 30) == [27, 28, 29]
    assert layer_window(3, 0, 30) == [3]


def test_second_moments_cached_and_consistent(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("MOSE_EASYEDIT_CACHE", str(tmp_path))
    model = build_tiny_model("llama", len(tokenizer))
    hp = tiny_hparams(MOSEHyperParams, "llama", mom2_n_samples=8)
    stats = second_moments(model, tokenizer, [1, 2], hp)
    C = stats[1].double()
    assert C.shape == (128, 128)
    assert torch.allclose(C, C.T) and torch.linalg.eigvalsh(C).min() > -1e-6
    files = sorted(p.name for p in (tmp_path / "stats").rglob("*.pt"))
    assert len(files) == 2 and all("n8x64" in f for f in files)
    # a fresh model object with the same identity reads the disk cache (same values, no recomputation)
    other = build_tiny_model("llama", len(tokenizer))
    monkeypatch.setattr("mose_easyedit.stats._compute", lambda *a, **k: pytest.fail("recomputed"))
    assert torch.equal(second_moments(other, tokenizer, [1], hp)[1], stats[1])
    assert CORPUS.exists()


def test_generated_corpus_needs_no_files(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("MOSE_EASYEDIT_CACHE", str(tmp_path))
    model = build_tiny_model("llama", len(tokenizer))
    hp = tiny_hparams(MOSEHyperParams, "llama", mom2_dataset="generated", mom2_n_samples=4,
                      mom2_sample_length=16)
    C = second_moments(model, tokenizer, [2], hp)[2]
    assert C.shape == (128, 128) and torch.isfinite(C).all()
    assert list((tmp_path / "corpora").glob("*.pt"))


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_and_layer_skip_give_the_same_targets(tokenizer, family):
    """The fast path (prefix cache; on LLaMA/Qwen2 also starting each step above the edited block) optimises the
    same δ as full forwards of every row."""
    from mose_easyedit.targets import optimize_targets

    model = build_tiny_model(family, len(tokenizer))
    hp = tiny_hparams(MOSEHyperParams, family, v_num_grad_steps=5)
    requests = validate_requests([REQUEST, {"prompt": "Paris is the capital of", "subject": "Paris",
                                            "target_new": "Italy"}])
    families = context_templates(model, tokenizer, [[6, 2]])
    calls = []
    with torch.no_grad():
        handle = get_module(model, hp.layer_module_tmp.format(0)).register_forward_hook(lambda *a: calls.append(1))
    try:
        fast = optimize_targets(model, tokenizer, requests, 1, hp, families)
    finally:
        handle.remove()
    full = optimize_targets(model, tokenizer, requests, 1, hp, families, use_prefix_cache=False,
                            skip_lower_layers=False)
    torch.testing.assert_close(fast.init, full.init, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.z, full.z, rtol=1e-4, atol=1e-4)
    assert fast.steps == full.steps and float(fast.delta.norm()) > 0
    # block 0 runs for the prefix cache and the δ = 0 pass (the first step's forward) only, then never again
    # (LLaMA, Qwen2); GPT-2 adds position embeddings to its input, so it runs every block at every later step
    assert len(calls) == (2 if family != "gpt2" else 2 + max(fast.steps))


def test_finished_requests_leave_the_batch_with_unchanged_targets(tokenizer):
    """A request that meets the early stop leaves the batch; every request gets the δ it gets when optimised
    alone (with early_stop_on='nll' the requests finish at different steps)."""
    from mose_easyedit.targets import optimize_targets

    model = build_tiny_model("llama", len(tokenizer))
    # the random tiny model's target NLL starts near ln(vocab) ≈ 10.8 and falls slowly: a threshold of 9.2 is
    # met after a few steps by two requests and never by the third
    hp = tiny_hparams(MOSEHyperParams, "llama", v_num_grad_steps=25, v_lr=0.5, early_stop_on="nll",
                      target_early_stop=9.2)
    requests = validate_requests([REQUEST, {"prompt": "Paris is the capital of", "subject": "Paris",
                                            "target_new": "Italy"},
                                  {"prompt": "Apples are mostly", "subject": "Apples", "target_new": "blue"}])
    families = context_templates(model, tokenizer, [[6, 2]])
    batch = optimize_targets(model, tokenizer, requests, 1, hp, families)
    assert len(set(batch.steps)) == 3, batch.steps  # they do finish at different steps
    for j, request in enumerate(requests):
        alone = optimize_targets(model, tokenizer, [request], 1, hp, families)
        assert alone.steps == [batch.steps[j]]
        torch.testing.assert_close(alone.z[:, 0], batch.z[:, j], rtol=1e-4, atol=1e-4)


def test_early_stop_on_nll_stops_earlier_than_on_the_whole_loss(tokenizer):
    from mose_easyedit.targets import optimize_targets

    model = build_tiny_model("llama", len(tokenizer))
    families = context_templates(model, tokenizer, [[6, 2]])
    requests = validate_requests([{"prompt": "Paris is the capital of", "subject": "Paris", "target_new": "Italy"}])
    steps = {}
    for criterion in ("loss", "nll"):  # the KL term keeps the whole loss above the threshold longer
        hp = tiny_hparams(MOSEHyperParams, "llama", v_num_grad_steps=25, v_lr=0.5, kl_factor=5.0,
                          target_early_stop=9.5, early_stop_on=criterion)
        result = optimize_targets(model, tokenizer, requests, 1, hp, families)
        steps[criterion] = result.steps[0]
    assert steps["nll"] < steps["loss"], steps
    with pytest.raises(ValueError, match="early_stop_on"):
        tiny_hparams(MOSEHyperParams, "llama", early_stop_on="kl")


def test_most_probable_criterion_asks_every_target_token_to_lead_by_the_margin():
    from mose_easyedit.targets import _Layout

    # two requests, two rewriting rows each (one target token per row), then one KL row per request
    row_owner = [0, 0, 1, 1, 0, 1]
    loss_entries = [(0, 0, 3), (1, 0, 3), (2, 0, 1), (3, 0, 1)]
    kl_entries = [(4, 0), (5, 0)]
    layout = _Layout([0, 1], row_owner, loss_entries, kl_entries, [1, 1, 1, 1, 1, 1], torch.device("cpu"))
    logits = torch.zeros(6, 5)
    logits[0, 3] = logits[1, 3] = 2.0        # request 0: its token leads in both prompts
    logits[2, 1] = 2.0                        # request 1: leads in one prompt ...
    logits[3, 1], logits[3, 4] = 1.0, 1.5    # ... and is second in the other
    assert layout.most_probable(logits).tolist() == [True, False]
    probs = torch.softmax(logits[0], -1)
    lead = float(probs[3] - probs[:3].max())
    assert layout.most_probable(logits, margin=lead - 1e-3).tolist() == [True, False]
    assert layout.most_probable(logits, margin=lead + 1e-3).tolist() == [False, False]


@pytest.mark.slow
def test_most_probable_stop_ends_before_a_tight_nll_stop_on_the_embedded_model(default_model):
    from mose_easyedit.targets import optimize_targets

    model, tok = default_model
    base = MOSEHyperParams.from_hparams("smollm2-135m")
    families = context_templates(model, tok, base.context_template_length_params)
    requests = validate_requests([{"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower",
                                   "target_new": "Rome"}])
    steps = {}
    for criterion, margin in (("nll", 0.0), ("most_probable", 0.0), ("most_probable", 0.5)):
        hp = MOSEHyperParams.from_dict({**base.to_dict(), "early_stop_on": criterion, "target_early_stop": 1e-3,
                                        "target_margin": margin})
        steps[(criterion, margin)] = optimize_targets(model, tok, requests, 8, hp, families).steps[0]
    assert steps[("most_probable", 0.0)] < steps[("nll", 0.0)], steps
    assert steps[("most_probable", 0.0)] <= steps[("most_probable", 0.5)], steps
    with pytest.raises(ValueError, match="target_margin"):
        tiny_hparams(MOSEHyperParams, "llama", target_margin=1.5)
