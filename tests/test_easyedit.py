"""The EasyEdit plugin.

Two parts:
- registration logic against a tiny fake ``easyeditor`` package written to disk (always runs);
- compatibility against a real EasyEdit checkout (``-m easyedit``; skipped unless ``EASYEDIT_PATH`` names one):
  BaseEditor.edit (sequential and not) and batch_edit with MOSE on three CounterFact requests, and EasyEdit's own
  MEMIT / AlphaEdit next to ours on the same requests.

    EASYEDIT_PATH=/path/to/EasyEdit python -m pytest -m easyedit tests/test_easyedit.py
"""
from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import json
import os
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from mose_easyedit import easyedit as bridge
from mose_easyedit.hparams import EASYEDIT_OWN_METHODS
from mose_easyedit.easyedit_stats import easyedit_stats_path, read_easyedit_stats, write_easyedit_stats

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
HPARAMS = REPO / "hparams"
COUNTERFACT = REPO.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json"
WIKITEXT = REPO.parent / "shared" / "data" / "text_corpus" / "wikitext-2-raw.test.raw"
ALL_METHODS = ["MOSE", "ROME", "MEMIT", "RECT", "EMMET", "PRUNE", "AlphaEdit", "MOSE-OFT"]


def _our_methods() -> dict:
    from mose_easyedit.methods import METHODS

    return METHODS


def _someone_elses_method(*args, **kwargs):
    raise AssertionError("never called: it only occupies a name")


# ============================================================================ registration, fake EasyEdit host
_FAKE_BATCH_EDITOR = '''
from enum import Enum


class BatchEditor(Enum):
    MEMIT = "MEMIT"
    ALPHAEDIT = "AlphaEdit"

    @staticmethod
    def is_batchable_method(alg_name: str):
        return alg_name == BatchEditor.MEMIT.value or alg_name == BatchEditor.ALPHAEDIT.value
'''
_FAKE_ALG_DICT = '''
def apply_memit_to_model(*args, **kwargs):
    return "easyedit's memit"


ALG_DICT = {"MEMIT": apply_memit_to_model, "ROME": apply_memit_to_model}
'''


def _write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.fixture
def fake_easyedit(tmp_path, monkeypatch):
    """A minimal on-disk ``easyeditor`` with EasyEdit's layout, imported in isolation from any real one."""
    root = tmp_path / "FakeEasyEdit"
    _write_package(root, {
        "easyeditor/__init__.py": "from .editors import *\nfrom .util import *\n",
        "easyeditor/util/__init__.py": "from .alg_dict import *\n",
        "easyeditor/util/alg_dict.py": _FAKE_ALG_DICT,
        "easyeditor/editors/__init__.py": "from .batch_editor import *\n",
        "easyeditor/editors/batch_editor.py": _FAKE_BATCH_EDITOR,
    })
    for name in [n for n in sys.modules if n == "easyeditor" or n.startswith("easyeditor.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", list(sys.path))
    # start without the import hook that `import mose_easyedit` installs, so each test registers explicitly
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path
                                           if not isinstance(f, bridge._RegisterAfterEasyEditImport)])
    monkeypatch.setenv("EASYEDIT_PATH", str(root))
    return root


def test_autoregister_registers_when_easyedit_is_imported_later(fake_easyedit, monkeypatch):
    from mose_easyedit.methods import METHODS

    monkeypatch.syspath_prepend(str(fake_easyedit))  # as if the checkout were on PYTHONPATH
    bridge.autoregister()  # mose_easyedit first, EasyEdit later
    alg_dict = importlib.import_module("easyeditor").util.alg_dict.ALG_DICT
    assert alg_dict["MOSE"] is METHODS["MOSE"].apply
    assert alg_dict["MEMIT-core"] is METHODS["MEMIT"].apply
    assert alg_dict["MEMIT"].__module__ == "easyeditor.util.alg_dict"


def _host():
    assert bridge.find_easyedit() is not None
    alg_dict = importlib.import_module("easyeditor.util.alg_dict").ALG_DICT
    batch_editor = importlib.import_module("easyeditor.editors.batch_editor").BatchEditor
    return alg_dict, batch_editor


def _spec(name, **extra):
    def apply(model, tok, requests, hparams, **kwargs):
        return model, {}

    apply.__name__ = f"apply_{name}"
    return SimpleNamespace(name=name, hparams_cls=None, apply=apply, **extra)


def test_import_puts_the_easyedit_path_checkout_on_sys_path_so_easyeditor_imports_next(fake_easyedit):
    import importlib as loader

    assert str(fake_easyedit) not in sys.path
    loader.reload(loader.import_module("mose_easyedit"))  # what `import mose_easyedit` does
    assert sys.path[0] == str(fake_easyedit)
    module = loader.import_module("easyeditor")  # the README's next line, with no PYTHONPATH set
    assert Path(module.__file__).parent == fake_easyedit / "easyeditor"
    assert module.util.alg_dict.ALG_DICT["MOSE"].__module__ == "mose_easyedit.methods.mose"


def test_find_easyedit_honours_easyedit_path(fake_easyedit):
    module = bridge.find_easyedit()
    assert module is not None and Path(module.__file__).parent == fake_easyedit / "easyeditor"


def test_find_easyedit_returns_none_when_absent(monkeypatch):
    monkeypatch.delenv("EASYEDIT_PATH", raising=False)
    monkeypatch.setitem(sys.modules, "easyeditor", None)  # makes `import easyeditor` fail as if not installed
    assert bridge.find_easyedit() is None
    with pytest.raises(RuntimeError, match="EASYEDIT_PATH"):
        bridge.register([_spec("MOSE")])


def test_find_easyedit_survives_a_broken_checkout(fake_easyedit, caplog):
    (fake_easyedit / "easyeditor" / "__init__.py").write_text("raise OSError('no GPU found')\n")
    assert bridge.find_easyedit() is None
    assert "no GPU found" in caplog.text
    (fake_easyedit / "easyeditor" / "__init__.py").write_text("import timm_is_not_installed\n")
    assert bridge.find_easyedit() is None
    assert "timm_is_not_installed" in caplog.text


def test_register_keeps_easyedits_own_methods(fake_easyedit):
    mose, memit = _spec("MOSE"), _spec("MEMIT")

    chosen = bridge.register([mose, memit])

    alg_dict, batch_editor = _host()
    assert chosen == {"MOSE": "MOSE", "MEMIT": "MEMIT-core"}
    assert alg_dict["MOSE"] is mose.apply and alg_dict["MOSE-core"] is mose.apply
    assert alg_dict["MEMIT-core"] is memit.apply
    assert alg_dict["MEMIT"].__module__ == "easyeditor.util.alg_dict"  # EasyEdit's, untouched
    for name in ("MOSE", "MOSE-core", "MEMIT-core", "MEMIT", "AlphaEdit"):
        assert batch_editor.is_batchable_method(name), name
    assert not batch_editor.is_batchable_method("ROME")
    assert set(bridge.registered_names()) == {"MOSE", "MOSE-core", "MEMIT-core"}


def test_register_is_idempotent(fake_easyedit):
    specs = [_spec("MOSE"), _spec("MEMIT")]
    first = bridge.register(specs)
    alg_dict, batch_editor = _host()
    entries, check = dict(alg_dict), batch_editor.is_batchable_method

    assert bridge.register(specs) == first
    assert alg_dict == entries
    assert batch_editor.is_batchable_method is check  # the whitelist is patched once, not wrapped again
    # a new spec object for the same name (e.g. a reloaded module) takes over its own names
    again = _spec("MOSE")
    assert bridge.register([again]) == {"MOSE": "MOSE"}
    assert alg_dict["MOSE"] is again.apply


def test_replace_true_takes_the_name_and_unregister_gives_it_back(fake_easyedit):
    alg_dict, batch_editor = _host()
    theirs = alg_dict["MEMIT"]
    memit = _spec("MEMIT")

    assert bridge.register([memit], replace=True) == {"MEMIT": "MEMIT"}
    assert alg_dict["MEMIT"] is memit.apply and alg_dict["MEMIT-core"] is memit.apply
    assert bridge.register([memit]) == {"MEMIT": "MEMIT"}  # still ours: a later plain register keeps it

    assert sorted(bridge.unregister()) == ["MEMIT", "MEMIT-core"]
    assert alg_dict["MEMIT"] is theirs and "MEMIT-core" not in alg_dict
    assert batch_editor.is_batchable_method("MEMIT") and not batch_editor.is_batchable_method("MEMIT-core")
    assert bridge.registered_names() == {}


def test_unbatchable_methods_stay_off_the_whitelist(fake_easyedit):
    bridge.register([_spec("ROME", batchable=False)])
    alg_dict, batch_editor = _host()
    assert "ROME-core" in alg_dict and not batch_editor.is_batchable_method("ROME-core")


def test_a_foreign_core_name_is_an_error(fake_easyedit):
    alg_dict, _ = _host()
    alg_dict["MEMIT-core"] = _someone_elses_method
    with pytest.raises(RuntimeError, match="MEMIT-core"):
        bridge.register([_spec("MEMIT")])


def test_autoregister_before_easyedit_is_imported(fake_easyedit, monkeypatch):
    """``import mose_easyedit`` first, ``import easyeditor`` later: the import hook registers."""
    monkeypatch.syspath_prepend(str(fake_easyedit))
    spec = _spec("MOSE")
    monkeypatch.setattr(bridge, "_method_specs", lambda methods: [spec])

    bridge.autoregister()
    bridge.autoregister()  # one hook, not two
    assert sum(isinstance(f, bridge._RegisterAfterEasyEditImport) for f in sys.meta_path) == 1
    import easyeditor  # noqa: F401

    alg_dict, batch_editor = _host()
    assert alg_dict["MOSE"] is spec.apply and batch_editor.is_batchable_method("MOSE")
    assert not any(isinstance(f, bridge._RegisterAfterEasyEditImport) for f in sys.meta_path)


def test_autoregister_after_easyedit_is_imported(fake_easyedit, monkeypatch):
    spec = _spec("MOSE")
    monkeypatch.setattr(bridge, "_method_specs", lambda methods: [spec])
    assert bridge.find_easyedit() is not None

    bridge.autoregister()

    assert _host()[0]["MOSE"] is spec.apply


@pytest.mark.parametrize("name", ALL_METHODS)
def test_hparams_accept_the_core_name(name, tmp_path):
    """The YAML side of the naming rule: ``alg_name: X-core`` loads and is kept for BaseEditor; a bare name that
    EasyEdit has a method of its own for is read as ``X-core``, so BaseEditor never runs EasyEdit's instead."""
    methods = _our_methods()
    if name not in methods:
        pytest.skip(f"{name} is not in mose_easyedit.methods.METHODS yet")
    files = sorted((HPARAMS / name).glob("*.yaml"))
    config = yaml.safe_load(files[0].read_text()) if files else {"layers": [4]}
    for alg_name in bridge.accepted_alg_names(name):
        config["alg_name"] = alg_name
        path = tmp_path / f"{alg_name}.yaml"
        path.write_text(yaml.safe_dump(config))
        expected = name + bridge.CORE_SUFFIX if name in EASYEDIT_OWN_METHODS else alg_name
        assert methods[name].hparams_cls.from_hparams(str(path)).alg_name == expected


# ============================================================================ a real EasyEdit checkout
def _checkout() -> Path | None:
    path = os.environ.get("EASYEDIT_PATH")
    if path and (Path(path) / "easyeditor" / "__init__.py").is_file():
        return Path(path)
    return None


easyedit_checkout = pytest.mark.skipif(
    _checkout() is None, reason="set EASYEDIT_PATH to an EasyEdit checkout (the folder holding easyeditor/)")


@pytest.fixture(scope="module")
def easyeditor():
    """The real EasyEdit, imported with timm / torchvision stubbed when absent (only its multimodal trainers use
    them, and installing them replaces a CPU torch with a CUDA build)."""
    from mose_easyedit.vision_stubs import vision_stubs

    with vision_stubs():
        module, why = bridge._import_easyeditor()
        if module is None:
            pytest.fail(f"EASYEDIT_PATH={os.environ['EASYEDIT_PATH']} does not import: {why}")
        yield module


@pytest.fixture(scope="module")
def registered(easyeditor):
    methods = _our_methods()
    chosen = bridge.register(methods)
    yield chosen
    bridge.unregister(methods)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The embedded model saved where BaseEditor can load it by name (a string model_name must name a family)."""
    from mose_easyedit import load_default_model

    model, tok = load_default_model()
    path = tmp_path_factory.mktemp("models") / "smollm2-135m-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


EE_LAYERS = [4, 5, 6]
EE_SAMPLES = 1000


@pytest.fixture(scope="module")
def stats_dir(model_dir, tmp_path_factory):
    """EasyEdit's covariance cache, pre-seeded for every layer from WikiText-2 so that EasyEdit never downloads
    Wikipedia; our methods are pointed at the same files (``stats_dir``), so both sides use one C."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(WIKITEXT.read_text(encoding="utf-8")[:100_000], return_tensors="pt").input_ids[0]
    chunks = ids[: (len(ids) // 128) * 128].view(-1, 128)[:32]  # 4,096 tokens > 1,536 key dimensions
    modules = [f"model.layers.{layer}.mlp.down_proj" for layer in range(model.config.num_hidden_layers)]
    sums = {name: 0 for name in modules}

    def hook(name):
        def record(module, inputs):
            keys = inputs[0].reshape(-1, inputs[0].shape[-1])
            sums[name] = sums[name] + keys.T @ keys

        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in modules]
    try:
        with torch.no_grad():
            for batch in chunks.split(8):
                model(input_ids=batch)
    finally:
        for handle in handles:
            handle.remove()
    root = tmp_path_factory.mktemp("stats")
    for name in modules:
        path = easyedit_stats_path(root, str(model_dir), name, dataset="wikipedia", dtype="float32",
                                   sample_size=EE_SAMPLES)
        write_easyedit_stats(path, sums[name], chunks.numel(), EE_SAMPLES)
    return root


@pytest.fixture(scope="module")
def counterfact():
    return json.loads(COUNTERFACT.read_text())[:3]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """EasyEdit writes logs/run.log and AlphaEdit's null_space_project.pt into the working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _edit_inputs(records) -> dict:
    return dict(
        prompts=[r["prompt"] for r in records],
        target_new=[r["target_new"] for r in records],
        ground_truth=[r["ground_truth"] for r in records],
        rephrase_prompts=[r["rephrase_prompt"] for r in records],
        subject=[r["subject"] for r in records],
        locality_inputs={"neighborhood": {"prompt": [r["locality_prompt"] for r in records],
                                          "ground_truth": [r["locality_ground_truth"] for r in records]}},
    )


def _rewrite(metrics, stage: str) -> list[float]:
    return [sum(m[stage]["rewrite_acc"]) / len(m[stage]["rewrite_acc"]) for m in metrics]


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _changed(model, snapshot) -> list[str]:
    return [name for name, p in model.named_parameters() if not torch.equal(p, snapshot[name])]


def _assert_edits_succeeded(metrics, label: str) -> None:
    pre, post = _rewrite(metrics, "pre"), _rewrite(metrics, "post")
    rounded = {stage: [round(float(x), 2) for x in values] for stage, values in (("pre", pre), ("post", post))}
    print(f"\n{label}: rewrite_acc pre {rounded['pre']} -> post {rounded['post']}")
    assert sum(post) / len(post) >= 0.9, f"{label}: post-edit rewrite_acc {post} (pre {pre})"
    assert sum(post) > sum(pre), f"{label}: editing did not raise rewrite_acc ({pre} -> {post})"


def _settings(name: str, model_dir: Path, stats_dir: Path) -> dict:
    """One set of MEMIT-family settings for SmolLM2, given to EasyEdit's implementation and to ours alike.

    EasyEdit's 8B YAMLs do not transfer as they are: ``v_lr`` 0.1 (AlphaEdit) leaves a 135M model's target far
    from reached after 25 steps (CounterFact case 4: p(Manila) 0.003), so both methods use 0.5.
    """
    settings = dict(
        model_name=str(model_dir), device="cpu", model_parallel=False, max_length=40, batch_size=1,
        layers=EE_LAYERS, fact_token="subject_last", v_num_grad_steps=25, v_lr=0.5, v_loss_layer=29,
        kl_factor=0.0625, mom2_adjustment=True, mom2_update_weight=15000.0,
        rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
        mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn",
        ln_f_module="model.norm", lm_head_module="lm_head",
        stats_dir=str(stats_dir), mom2_dataset="wikipedia", mom2_n_samples=EE_SAMPLES, mom2_dtype="float32",
    )
    if name == "AlphaEdit":
        settings.update(v_weight_decay=0.5, clamp_norm_factor=0.75, nullspace_threshold=2e-2, L2=1.0)
    else:
        settings.update(v_weight_decay=1e-3, clamp_norm_factor=4.0)
    return settings


def _our_hparams_cls(name: str):
    methods = _our_methods()
    if name not in methods:
        pytest.skip(f"{name} is not in mose_easyedit.methods.METHODS yet")
    return methods[name].hparams_cls


def _ours_with_settings(name: str, registered: dict, model_dir: Path, stats_dir: Path):
    cls = _our_hparams_cls(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    config = {k: v for k, v in _settings(name, model_dir, stats_dir).items() if k in fields}
    return cls.from_dict({**config, "alg_name": registered[name]}, f"{name} test settings")


def _our_hparams(name: str, registered: dict, model_dir: Path, stats_dir: Path):
    """Ours from ``hparams/<name>/smollm2-135m.yaml`` when there is one, else from :func:`_settings`; always on
    the pre-seeded EasyEdit statistics (so our covariance code is shown reading EasyEdit's cache)."""
    path = HPARAMS / name / "smollm2-135m.yaml"
    if not path.is_file():
        return _ours_with_settings(name, registered, model_dir, stats_dir)
    hparams = _our_hparams_cls(name).from_hparams(str(path))
    return dataclasses.replace(hparams, alg_name=registered[name], model_name=str(model_dir), device="cpu",
                               stats_dir=str(stats_dir), mom2_dataset="wikipedia", mom2_n_samples=EE_SAMPLES)


def _editor(hparams):
    from easyeditor import BaseEditor

    return BaseEditor.from_hparams(hparams)


@pytest.mark.easyedit
@easyedit_checkout
def test_stats_files_read_by_easyedits_own_loader(easyeditor, tmp_path):
    from easyeditor.util.runningstats import CombinedStat, SecondMoment, load_cached_state, save_cached_state

    keys = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    ours = write_easyedit_stats(tmp_path / "ours.npz", keys.T @ keys, 64, sample_size=1000)
    state = load_cached_state(str(ours), {"sample_size": 1000}, quiet=True)
    assert state is not None, "EasyEdit rejected our file"
    stat = CombinedStat(mom2=SecondMoment())
    stat.load_state_dict(state)
    assert stat.mom2.count == 64
    torch.testing.assert_close(stat.mom2.moment(), keys.T @ keys / 64)

    theirs = CombinedStat(mom2=SecondMoment())
    theirs.add(keys)
    save_cached_state(str(tmp_path / "theirs.npz"), theirs, {"sample_size": 1000})
    mean, count = read_easyedit_stats(tmp_path / "theirs.npz")
    assert count == 64
    torch.testing.assert_close(mean, keys.T @ keys / 64)


@pytest.mark.easyedit
@easyedit_checkout
def test_registered_in_easyedit(registered):
    from easyeditor.editors.batch_editor import BatchEditor
    from easyeditor.util.alg_dict import ALG_DICT

    methods = _our_methods()
    for name, alg_name in registered.items():
        assert ALG_DICT[alg_name] is methods[name].apply
        assert ALG_DICT[name + "-core"] is methods[name].apply
        assert BatchEditor.is_batchable_method(alg_name)
    for theirs in ("ROME", "MEMIT", "EMMET", "AlphaEdit"):
        assert not getattr(ALG_DICT[theirs], "__module__", "").startswith("mose_easyedit"), theirs
        if theirs in registered:
            assert registered[theirs] == theirs + "-core"
    assert registered.get("MOSE") == "MOSE"


@pytest.mark.easyedit
@easyedit_checkout
def test_mose_sequential_edit(registered, model_dir, stats_dir, counterfact, workdir):
    editor = _editor(_our_hparams("MOSE", registered, model_dir, stats_dir))
    assert editor.tok.padding_side == "left"  # what BaseEditor gives names it does not know
    before = _snapshot(editor.model)

    metrics, model, _ = editor.edit(**_edit_inputs(counterfact), sequential_edit=True, verbose=False)

    _assert_edits_succeeded(metrics, "MOSE edit(sequential_edit=True)")
    assert model is editor.model and _changed(editor.model, before), "sequential edits must stay in the model"


@pytest.mark.easyedit
@easyedit_checkout
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_mose_non_sequential_edit_restores_the_model(registered, model_dir, stats_dir, counterfact, workdir,
                                                     padding_side):
    editor = _editor(_our_hparams("MOSE", registered, model_dir, stats_dir))
    editor.tok.padding_side = padding_side  # right: what BaseEditor gives MEMIT/ROME/... on llama models
    before = _snapshot(editor.model)

    metrics, _, weights_copy = editor.edit(**_edit_inputs(counterfact), sequential_edit=False, verbose=False)

    _assert_edits_succeeded(metrics, f"MOSE edit(sequential_edit=False), {padding_side} padding")
    assert weights_copy, "EasyEdit restores from weights_copy; it must name the edited weights"
    assert _changed(editor.model, before) == [], "sequential_edit=False must leave the model as it was"
    assert editor.tok.padding_side == padding_side


@pytest.mark.easyedit
@easyedit_checkout
def test_mose_batch_edit(registered, model_dir, stats_dir, counterfact, workdir):
    editor = _editor(_our_hparams("MOSE", registered, model_dir, stats_dir))
    editor.hparams.batch_size = len(counterfact)
    before = _snapshot(editor.model)

    metrics, _, _ = editor.batch_edit(**_edit_inputs(counterfact), verbose=False)

    _assert_edits_succeeded(metrics, "MOSE batch_edit")
    assert _changed(editor.model, before) == []


@pytest.mark.easyedit
@easyedit_checkout
@pytest.mark.parametrize("name", [m for m in ALL_METHODS if m != "MOSE"])
def test_each_of_our_methods_through_base_editor(name, registered, model_dir, stats_dir, counterfact, workdir):
    editor = _editor(_our_hparams(name, registered, model_dir, stats_dir))
    before = _snapshot(editor.model)

    metrics, _, _ = editor.edit(**_edit_inputs(counterfact), sequential_edit=True, verbose=False)

    _assert_edits_succeeded(metrics, f"ours {registered[name]} edit(sequential_edit=True)")
    assert _changed(editor.model, before)


def _easyedit_hparams(name: str, model_dir: Path, stats_dir: Path):
    settings = _settings(name, model_dir, stats_dir)
    # SmolLM2 ties lm_head to the embeddings, so EasyEdit's MEMIT finds no "lm_head.weight" parameter;
    # EasyEdit's own YAML for llama3.2 (also tied) names the embedding instead.
    settings.update(alg_name=name, layer_selection="all", lm_head_module="model.embed_tokens")
    if name == "MEMIT":
        from easyeditor import MEMITHyperParams

        return MEMITHyperParams(**settings)
    from easyeditor import AlphaEditHyperParams

    return AlphaEditHyperParams(**settings, P_loc="./null_space_project.pt")


@pytest.mark.easyedit
@easyedit_checkout
@pytest.mark.parametrize("name", ["MEMIT", "AlphaEdit"])
@pytest.mark.parametrize("implementation", ["easyedit", "ours"])
def test_easyedits_method_and_ours_on_the_same_requests(name, implementation, registered, model_dir, stats_dir,
                                                        counterfact, workdir):
    if implementation == "ours":
        hparams = _ours_with_settings(name, registered, model_dir, stats_dir)
        label = f"ours ({hparams.alg_name})"
    else:
        hparams = _easyedit_hparams(name, model_dir, stats_dir)
        label = f"EasyEdit's {name}"
    editor = _editor(hparams)
    before = _snapshot(editor.model)

    metrics, _, _ = editor.edit(**_edit_inputs(counterfact), sequential_edit=True, verbose=False)

    _assert_edits_succeeded(metrics, label)
    assert _changed(editor.model, before)


@pytest.mark.easyedit
@easyedit_checkout
def test_easyedit_speed_script_times_both_implementations(tmp_path):
    """``benchmarks/easyedit_speed.py`` (what ``quality.py`` runs with EASYEDIT_PATH set): EasyEdit's MEMIT and ours
    through the same BaseEditor on the same two cases, one timing per fact each."""
    import subprocess

    out = tmp_path / "MEMIT.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "easyedit_speed.py"), "--method", "MEMIT",
                           "--num-edits", "2", "--out", str(out)], capture_output=True, text=True, timeout=1200,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert (result["label"], result["ours_label"]) == ("EasyEdit's MEMIT", "ours (MEMIT-core)")
    assert len(result["seconds"]) == len(result["ours_seconds"]) == 2 and result["edits"] == 2
    assert result["median_seconds"] > 0 and result["ours_median_seconds"] > 0
