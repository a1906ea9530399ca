"""Every registered method on the shared core.

One contract matrix over ``METHODS`` × architectures (a new method is tested like every other on day one),
then each baseline's own mechanics: AlphaEdit's carried K_pK_pᵀ, PRUNE's restraint, RECT's sparsity, ROME's
rank one, atomic rollback of weights and carried state, the shipped YAML files, and (slow) CounterFact on the
embedded model.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import (FAMILIES, assert_bit_identical, build_tiny_model, load_cases, restore, snapshot,
                      tiny_hparams)

import mose_easyedit as me
from mose_easyedit.editor import EditContext, Update
from mose_easyedit.evaluation import target_nll, token_accuracy
from mose_easyedit.hparams import EASYEDIT_OWN_METHODS
from mose_easyedit.methods import METHODS
from mose_easyedit.methods.alphaedit import ALPHAEDIT_METHOD, AlphaEdit
from mose_easyedit.methods.emmet import EMMET_METHOD
from mose_easyedit.methods.memit import MEMIT, MEMIT_METHOD
from mose_easyedit.methods.prune import PRUNE, PRUNE_METHOD
from mose_easyedit.methods.rect import RECT_METHOD
from mose_easyedit.methods.rome import ROME_METHOD
from mose_easyedit.requests import validate_requests
from mose_easyedit.rules import (alphaedit_delta, alphaedit_inverse, null_space_projector, prune_restrain,
                                 rect_kept_count)
from mose_easyedit.session import EditSession, get_session
from mose_easyedit.stats import second_moments

HPARAMS = Path(__file__).resolve().parents[1] / "hparams"
REQUESTS = [
    {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
     "target_new": "English"},
    {"prompt": "The Eiffel Tower is located in", "subject": "Eiffel Tower", "target_new": "Rome"},
    {"prompt": "Toko Yasuda plays the instrument", "subject": "Toko Yasuda", "target_new": "piano"},
]
BASELINES = {"ROME": ROME_METHOD, "MEMIT": MEMIT_METHOD, "RECT": RECT_METHOD, "EMMET": EMMET_METHOD,
             "PRUNE": PRUNE_METHOD, "AlphaEdit": ALPHAEDIT_METHOD}
# Values for the tiny models where a method's defaults are for real ones (a method without an entry runs on
# its defaults). The tiny models have p = 128 (GPT-2: 256): kᵀC⁻¹k grows with p, so MEMIT's λ must shrink with
# it, and their C has almost no eigenvalue below AlphaEdit's 2e-2. MOSE-OFT: the values of test_mose_oft.py.
TINY = {
    "MOSE-OFT": dict(lr=1e-2, num_steps=12, coft=False),
    "ROME": dict(layers=[2]),
    "MEMIT": dict(mom2_update_weight=1.0),
    "RECT": dict(mom2_update_weight=1.0),
    "PRUNE": dict(mom2_update_weight=1.0),
    "AlphaEdit": dict(nullspace_threshold=0.05, L2=1.0),
    "MOSE-input": dict(layer_selection=False, layers=[1, 2]),
    "MOSE-input-budget": dict(layer_selection=False, layers=[1, 2], protect_rank=1),
    "MOSE-input-room": dict(candidate_layers=[1], neighbours=1, nullspace_threshold=1e3),
    "MOSE-input-procrustes": dict(layer_selection=False, layers=[1, 2]),
}
MODEL_LAYERS = {"llama3-8b": 32, "qwen2.5-7b": 28, "llama2-13b": 40, "smollm2-135m": 30}


def hparams(name: str, family: str, **overrides):
    return tiny_hparams(METHODS[name].hparams_cls, family, **{**TINY.get(name, {}), **overrides})


def nll(model, tok, request: dict) -> float:
    return target_nll(model, tok, [request["prompt"]], [request["target_new"]], progress=False)[0]


def assert_same_state(actual, expected, where: str = "state") -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_same_state(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_state(a, e, f"{where}[{i}]")
    elif dataclasses.is_dataclass(expected):
        for f in dataclasses.fields(expected):
            assert_same_state(getattr(actual, f.name), getattr(expected, f.name), f"{where}.{f.name}")
    else:
        assert actual == expected, where


# the contract runs every registered method on a tiny LLaMA and a tiny GPT-2 (Conv1D weights stored (in, out))
CONTRACT_FAMILIES = ("llama", "gpt2")
MATRIX = [pytest.param(name, family, id=f"{name}-{family}") for name in METHODS for family in CONTRACT_FAMILIES]
# methods that must keep every singular value
ROTATIONS = ("MOSE", "MOSE-input", "MOSE-input-budget", "MOSE-input-room", "MOSE-input-procrustes", "MOSE-OFT")


class SpyWrites:
    """Record every weight the engine writes (``editor.write_weight``) while active; with ``fail_at`` the write of
    that number raises instead."""

    def __init__(self, calls: list, fail_at: int | None = None):
        self.calls, self.fail_at = calls, fail_at

    def __enter__(self):
        import mose_easyedit.editor as editor

        self.editor, self.original = editor, editor.write_weight

        def write(model, module, value):
            self.calls.append(module)
            if self.fail_at is not None and len(self.calls) == self.fail_at:
                raise RuntimeError("injected failure")
            return self.original(model, module, value)

        editor.write_weight = write
        return self

    def __exit__(self, *exc):
        self.editor.write_weight = self.original
        return False


# -------------------------------------------------------------------------------------- the shared contract
@pytest.mark.parametrize("name, family", MATRIX)
def test_edit_weights_copy_and_malformed_request(tokenizer, name, family):
    """An edit raises the target's likelihood; a malformed request is refused before any weight is written and
    changes nothing; ``weights_copy`` restores the model bit for bit and ends the run."""
    spec = METHODS[name]
    model = build_tiny_model(family, len(tokenizer))
    hp = hparams(name, family)
    original = snapshot(model)
    before = nll(model, tokenizer, REQUESTS[0])
    returned, weights_copy = spec.apply(model, tokenizer, [REQUESTS[0]], hp, return_orig_weights=True)
    assert returned is model
    assert nll(model, tokenizer, REQUESTS[0]) < before - 0.2
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, original[n])}
    assert changed and changed <= set(weights_copy)

    edited = snapshot(model)
    session = get_session(model, name)
    state, num_edits, history = session.state, session.num_edits, len(session.history)
    writes = []
    with SpyWrites(writes), pytest.raises(ValueError, match="'subject'"):
        spec.apply(model, tokenizer, [REQUESTS[1], dict(REQUESTS[2], subject="Big Ben")], hp)
    assert writes == []
    assert_bit_identical(model, edited)
    assert get_session(model, name) is session and session.state is state
    assert (session.num_edits, len(session.history)) == (num_edits, history)

    restore(model, weights_copy)
    assert_bit_identical(model, original)
    assert get_session(model, name, create=False) is None


@pytest.mark.parametrize("name, family", MATRIX)
def test_failure_inside_the_update_restores_weights_and_carried_state(tokenizer, name, family):
    """A failure after validation, once a weight has been written, restores every weight bit for bit and leaves
    the session's carried state, edit count and history as they were."""
    spec = METHODS[name]
    model = build_tiny_model(family, len(tokenizer))
    hp = hparams(name, family)
    spec.apply(model, tokenizer, [REQUESTS[0]], hp)
    session = get_session(model, name)
    state, saved = session.state, copy.deepcopy(session.state)
    before = snapshot(model)
    writes = []
    with SpyWrites(writes, fail_at=2), pytest.raises(RuntimeError, match="injected failure"):
        spec.apply(model, tokenizer, REQUESTS[1:], hp)
    assert len(writes) == 2  # the first write went through, the second failed
    assert_bit_identical(model, before)
    assert get_session(model, name) is session and session.num_edits == 1 and len(session.history) == 1
    assert session.state is state
    assert_same_state(session.state, saved)


@pytest.mark.parametrize("name, family", MATRIX)
def test_independent_runs_do_not_share_state(tokenizer, name, family):
    """A run on one model does not reach another model, nor a later run on the same model after a restore:
    both give exactly what a fresh model gives."""
    spec = METHODS[name]
    hp = hparams(name, family)
    first = build_tiny_model(family, len(tokenizer))
    original = snapshot(first)
    spec.apply(first, tokenizer, [REQUESTS[0]], hp)          # a live run on `first`
    second = build_tiny_model(family, len(tokenizer))
    spec.apply(second, tokenizer, [REQUESTS[1]], hp)         # meanwhile, a fresh model
    assert len(me.edit_history(first, name)) == 1 and len(me.edit_history(second, name)) == 1
    restore(first, original)                                    # restored: the run on `first` is over
    spec.apply(first, tokenizer, [REQUESTS[1]], hp)
    assert len(me.edit_history(first, name)) == 1
    for parameter_name, value in second.named_parameters():
        assert torch.equal(first.get_parameter(parameter_name), value), parameter_name


@pytest.mark.parametrize("name, family", [p for p in MATRIX if p.values[0] in ROTATIONS])
def test_rotation_methods_keep_every_singular_value(tokenizer, name, family):
    """In float64, two sequential edits leave every singular value of every edited weight unchanged to 1e-9."""
    spec = METHODS[name]
    model = build_tiny_model(family, len(tokenizer)).double()
    hp = hparams(name, family)
    original = snapshot(model)
    for request in REQUESTS[:2]:
        spec.apply(model, tokenizer, [request], hp)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, original[n])]
    assert changed
    for parameter_name in changed:
        torch.testing.assert_close(torch.linalg.svdvals(model.get_parameter(parameter_name).detach()),
                                   torch.linalg.svdvals(original[parameter_name]), rtol=1e-9, atol=0)


# -------------------------------------------------------------------------------------------- the baselines
def test_alphaedit_moment_grows_by_batch_keys_and_resets_with_a_new_run(tokenizer):
    model = build_tiny_model("llama", len(tokenizer))
    hp = hparams("AlphaEdit", "llama")
    original = snapshot(model)

    def keys_now(requests):
        """The batch's template-mean keys on the model as it stands, as the engine computes them."""
        ctx = EditContext(model, tokenizer, hp, EditSession("probe"), validate_requests(requests))
        return ctx.keys(hp.layers)[0]

    def moments():
        return get_session(model, "AlphaEdit").state.moments

    def assert_moment(expected):
        for layer in hp.layers:
            actual = moments()[hp.rewrite_module_tmp.format(layer)].double()
            scale = float(expected[layer].abs().max())
            assert torch.allclose(actual, expected[layer], rtol=1e-5, atol=1e-5 * scale)

    ALPHAEDIT_METHOD.apply(model, tokenizer, [REQUESTS[0]], hp)
    first = keys_now([REQUESTS[0]])  # recomputed on the edited model
    assert_moment({layer: first[layer] @ first[layer].T for layer in hp.layers})

    after_first = snapshot(model)
    ALPHAEDIT_METHOD.apply(model, tokenizer, REQUESTS[1:], hp)
    second = keys_now(REQUESTS[1:])
    assert_moment({layer: first[layer] @ first[layer].T + second[layer] @ second[layer].T
                   for layer in hp.layers})
    # the update lies in the null space of the original C: ΔW (I − P) = 0
    C = second_moments(model, tokenizer, hp.layers, hp)
    for layer in hp.layers:
        name = hp.rewrite_module_tmp.format(layer) + ".weight"
        delta = (model.get_parameter(name) - after_first[name]).detach().double()
        P = null_space_projector(C[layer], hp.nullspace_threshold)
        outside = delta @ (torch.eye(P.shape[0], dtype=torch.float64) - P)
        assert float(outside.norm()) < 1e-4 * float(delta.norm())

    restore(model, original)  # a new run starts from zero
    ALPHAEDIT_METHOD.apply(model, tokenizer, [REQUESTS[1]], hp)
    fresh = keys_now([REQUESTS[1]])
    assert get_session(model, "AlphaEdit").num_edits == 1
    assert_moment({layer: fresh[layer] @ fresh[layer].T for layer in hp.layers})


def test_alphaedit_carried_inverse_edits_as_the_direct_solve(tokenizer, monkeypatch):
    """Sequential AlphaEdit with the carried (Woodbury) inverse writes the weights of the p×p solve of every call,
    and the carried inverse stays the inverse of the session's K_p K_pᵀ P + L2·I."""
    model = build_tiny_model("llama", len(tokenizer))
    hp = hparams("AlphaEdit", "llama")
    direct = copy.deepcopy(model)
    for request in REQUESTS:
        ALPHAEDIT_METHOD.apply(model, tokenizer, [request], hp)
    state = get_session(model, "AlphaEdit").state
    for layer in hp.layers:
        module = hp.rewrite_module_tmp.format(layer)
        carried = state.inverses[module]
        # the carried K_p K_pᵀ is rounded to mom2_dtype
        expected = alphaedit_inverse(state.moments[module].double(), carried.P, carried.l2)
        assert float((carried.inverse - expected).norm()) < 1e-5 * float(expected.norm())

    def direct_rule(batch, ops, state, hp):
        prior = state.moments.get(batch.module)
        prior = torch.zeros_like(ops.P) if prior is None else prior
        delta = alphaedit_delta(batch.residual, batch.K, ops.P, prior, hp.L2, compute_dtype=torch.float64)
        return Update(batch.W + delta, state, {})

    monkeypatch.setattr(AlphaEdit, "rule", staticmethod(direct_rule))
    for request in REQUESTS:
        ALPHAEDIT_METHOD.apply(direct, tokenizer, [request], hp)
    for layer in hp.layers:
        name = hp.rewrite_module_tmp.format(layer) + ".weight"
        carried, solved = model.get_parameter(name).detach(), direct.get_parameter(name).detach()
        assert not torch.equal(carried, build_tiny_model("llama", len(tokenizer)).get_parameter(name))
        assert torch.allclose(carried, solved, rtol=1e-5, atol=1e-5 * float(solved.abs().max()))


def test_prune_model_holds_restrained_change_and_edits_continue_from_raw(tokenizer, monkeypatch):
    model = build_tiny_model("llama", len(tokenizer))
    hp = hparams("PRUNE", "llama")
    original = snapshot(model)
    PRUNE_METHOD.apply(model, tokenizer, [REQUESTS[0]], hp)
    raw_first = {module: entry.raw.clone() for module, entry in get_session(model, "PRUNE").state.tracked.items()}
    seen = {}
    memit_rule = MEMIT.rule

    def spying_rule(batch, ops, state, hp):
        seen[batch.module] = batch.W.clone()
        return memit_rule(batch, ops, state, hp)

    monkeypatch.setattr(PRUNE, "rule", staticmethod(spying_rule))
    PRUNE_METHOD.apply(model, tokenizer, [REQUESTS[1]], hp)
    assert set(seen) == set(raw_first)
    for module, W in seen.items():  # the second edit started from the unrestrained weights
        assert torch.equal(W, raw_first[module].double())

    tracked = get_session(model, "PRUNE").state.tracked
    report = me.edit_history(model, "PRUNE")[-1]["restraint"]
    for layer in hp.layers:
        module = hp.rewrite_module_tmp.format(layer)
        w0 = original[module + ".weight"].double()
        raw = tracked[module].raw.double()
        sigma = float(torch.linalg.matrix_norm(w0, ord=2))
        assert tracked[module].sigma_max == pytest.approx(sigma, rel=1e-12)
        assert torch.equal(tracked[module].original, original[module + ".weight"])
        expected = w0 + prune_restrain(raw - w0, sigma)
        held = model.get_parameter(module + ".weight").detach().double()
        assert torch.allclose(held, expected, rtol=0, atol=1e-6 * float(w0.abs().max()))
        assert report[layer]["restrained"] > 0  # λ = 1 on the tiny model: the change outgrows σ_max(W₀)
        assert float((held - raw).norm()) > 1e-3 * float((raw - w0).norm())


def test_rect_update_has_the_configured_sparsity(tokenizer):
    model = build_tiny_model("qwen2", len(tokenizer))
    hp = hparams("RECT", "qwen2", keep_fraction=0.25)
    before = snapshot(model)
    RECT_METHOD.apply(model, tokenizer, [REQUESTS[0]], hp)
    (entry,) = me.edit_history(model, "RECT")
    for layer in hp.layers:
        name = hp.rewrite_module_tmp.format(layer) + ".weight"
        delta = model.get_parameter(name).detach() - before[name]
        kept = rect_kept_count(delta.numel(), 0.25)
        assert entry["per_layer"][layer]["kept_entries"] == kept
        assert entry["per_layer"][layer]["kept_fraction"] == pytest.approx(0.25, abs=1.0 / delta.numel())
        # float32 may round a tiny change away, never add one
        assert 0.95 * kept <= int((delta != 0).sum()) <= kept


def test_rome_applies_one_rank_one_update_per_request(tokenizer):
    model = build_tiny_model("llama", len(tokenizer))
    hp = hparams("ROME", "llama")
    name = hp.rewrite_module_tmp.format(hp.layers[0]) + ".weight"
    before = snapshot(model)
    ROME_METHOD.apply(model, tokenizer, [REQUESTS[0]], hp)
    after_one = snapshot(model)
    assert {n for n in before if not torch.equal(before[n], after_one[n])} == {name}
    singular = torch.linalg.svdvals((after_one[name] - before[name]).double())
    assert singular[1] < 1e-4 * singular[0]

    ROME_METHOD.apply(model, tokenizer, REQUESTS[1:], hp)  # two requests: two rank-one edits, one call
    singular = torch.linalg.svdvals((model.get_parameter(name).detach() - after_one[name]).double())
    assert singular[1] > 1e-3 * singular[0] and singular[2] < 1e-4 * singular[0]
    entry = me.edit_history(model, "ROME")[-1]
    assert entry["num_requests"] == 2 and len(entry["per_request"]) == 2 and len(entry["target_loss"]) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_spreading_key_passes_start_at_the_last_edited_block(tokenizer, monkeypatch, family):
    """MEMIT's per-layer key passes start at the previous layer's block (LLaMA, Qwen2; GPT-2 runs whole passes)
    and give the bit-identical edit of whole passes, over several row chunks."""
    import mose_easyedit.keys as keys_module

    hp = hparams("MEMIT", family, layers=[0, 1, 2], chunk_size=4,  # 2 requests × 3 templates: 2 chunks
                 context_template_length_params=[[6, 2]])
    runs = {}
    for mode in ("resume", "whole"):
        model = build_tiny_model(family, len(tokenizer))
        if mode == "whole":
            monkeypatch.setattr(keys_module, "decoder_blocks", lambda model: None)
        calls = []
        handle = model.get_input_embeddings().register_forward_hook(lambda *a: calls.append(1))
        try:
            MEMIT_METHOD.apply(model, tokenizer, REQUESTS[:2], hp)
        finally:
            handle.remove()
        runs[mode] = (snapshot(model), len(calls))
    (resumed, resumed_calls), (whole, whole_calls) = runs["resume"], runs["whole"]
    assert resumed.keys() == whole.keys()
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name
    # three key passes of two chunks each; resumed, only the first one starts at the embeddings
    expected_saving = 2 * 2 if family != "gpt2" else 0
    assert whole_calls - resumed_calls == expected_saving, (whole_calls, resumed_calls)


# ------------------------------------------------------------------------------------------ hyperparameters
@pytest.mark.parametrize("name", list(BASELINES))
@pytest.mark.parametrize("model_file", list(MODEL_LAYERS))
def test_shipped_yaml_files_load(name, model_file):
    cls = METHODS[name].hparams_cls
    hp = cls.from_hparams(HPARAMS / name / f"{model_file}.yaml")
    assert hp.alg_name == (f"{name}-core" if name in EASYEDIT_OWN_METHODS else name)
    assert max(hp.layers) < MODEL_LAYERS[model_file] - 1
    assert hp.v_loss_layer in (None, MODEL_LAYERS[model_file] - 1)
    assert hp.device == ("cpu" if model_file == "smollm2-135m" else 0)
    assert cls.from_dict({**hp.to_dict(), "alg_name": f"{name}-core"}).alg_name == f"{name}-core"


@pytest.mark.parametrize("name, overrides, message", [
    ("ROME", dict(layers=[1, 2]), "exactly one layer"),
    ("MEMIT", dict(mom2_update_weight=0.0), "mom2_update_weight"),
    ("RECT", dict(keep_fraction=0.0), "keep_fraction"),
    ("EMMET", dict(emmet_ridge=-1.0), "emmet_ridge"),
    ("PRUNE", dict(restraint_log="log3"), "restraint_log"),
    ("AlphaEdit", dict(L2=0.0), "L2"),
    ("AlphaEdit", dict(nullspace_threshold=0.0), "nullspace_threshold"),
])
def test_invalid_hparams_name_the_key(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        hparams(name, "llama", **overrides)


# --------------------------------------------------------------------------------------- the embedded model
@pytest.mark.slow
@pytest.mark.parametrize("name", list(BASELINES))
def test_embedded_model_counterfact_sequential(embedded_runs, name):
    """Done-means of each baseline with its shipped yaml: after the first 10 CounterFact cases, edited one per call
    (the run whose digest tests/test_digests.py pins), at least 8 of the 10 targets are still reproduced (token
    accuracy 1; every baseline keeps 10 here) and only the YAML's layers changed. (Batches of several facts per
    call run in the contract matrix above and in the digests' two-fact call.)"""
    hp = METHODS[name].hparams_cls.from_hparams("smollm2-135m")
    cases = load_cases(10)
    with embedded_runs.applied(f"{name}/smollm2-135m") as (model, tok, original):
        accuracy = token_accuracy(model, tok, [c["prompt"] for c in cases], [c["target_new"] for c in cases],
                                  progress=False)
        print(f"{name}: {sum(a == 1.0 for a in accuracy)}/{len(cases)} kept after the 10th edit")
        assert sum(a == 1.0 for a in accuracy) >= 8, (name, accuracy)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, original[n])}
        assert changed and changed <= {f"{hp.rewrite_module_tmp.format(layer)}.weight" for layer in hp.layers}
