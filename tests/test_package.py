"""The package as a user meets it: shipped hyperparameters found from any directory, every method importable from
the top level."""
from __future__ import annotations

import pytest
import yaml

import mose_easyedit as me
from mose_easyedit.methods import METHODS


@pytest.mark.parametrize("name", ["smollm2-135m", "MOSE/llama3-8b", "hparams/MOSE/qwen2.5-7b",
                                  "MOSE/llama2-13b.yaml"])
def test_shipped_hparams_resolve_from_any_directory(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    hp = me.MOSEHyperParams.from_hparams(name)
    assert hp.alg_name == "MOSE"


def test_an_explicit_path_still_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = me.MOSEHyperParams.from_hparams("smollm2-135m")
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({**shipped.to_dict(), "mose_lambda": 7.5}))
    assert me.MOSEHyperParams.from_hparams("mine").mose_lambda == 7.5
    assert me.MOSEHyperParams.from_hparams(tmp_path / "mine.yaml").mose_lambda == 7.5


def test_a_missing_name_lists_each_place_once_and_what_is_shipped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        me.MEMITHyperParams.from_hparams("hparams/MEMIT/nope")
    message = str(error.value)
    assert "hparams/MEMIT/hparams" not in message and message.count("nope.yaml") == 2
    assert "MEMIT/llama3-8b" in message and "MOSE/" not in message


def test_every_method_is_importable_from_the_top_level():
    for name, spec in METHODS.items():
        stem = spec.hparams_cls.__name__[:-len("HyperParams")]
        assert stem.lower() == name.replace("-", "").lower()
        assert getattr(me, f"{stem}HyperParams") is spec.hparams_cls
        assert getattr(me, f"apply_{name.lower().replace('-', '_')}_to_model") is spec.apply
        assert f"{stem}HyperParams" in me.__all__


def test_cache_identity_follows_the_weights_not_the_path(tokenizer):
    import torch
    from conftest import build_tiny_model

    from mose_easyedit.modeling import model_identity

    first = build_tiny_model("llama", len(tokenizer))
    renamed = build_tiny_model("llama", len(tokenizer))
    renamed.config.name_or_path = "/somewhere/else/copy-of-the-model"
    assert model_identity(renamed) == model_identity(first)
    assert model_identity(build_tiny_model("llama", len(tokenizer), seed=1)) != model_identity(first)
    edited = build_tiny_model("llama", len(tokenizer))
    with torch.no_grad():  # an edit of an MLP projection keeps the model's caches
        edited.model.layers[1].mlp.down_proj.weight.mul_(-1)
    assert model_identity(edited) == model_identity(first)


# ------------------------------------------------------------------------------------------------- structure
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(n for n in METHODS if n != "MOSE-OFT"))
def test_every_update_rule_is_a_pure_function_of_its_operands(name):
    """A rule sees the layer batch, its cached operands, the carried state and the hyperparameters, never the
    model or the call's context (MOSE-OFT trains instead of solving and has no rule)."""
    import inspect

    from mose_easyedit.editor import EditContext, NoState

    engine = METHODS[name].engine
    parameters = list(inspect.signature(engine.rule).parameters)
    assert parameters == ["batch", "ops", "state", "hp"], parameters
    assert EditContext not in inspect.get_annotations(engine.rule, eval_str=True).values()
    state = engine.state_class()
    assert __import__("dataclasses").is_dataclass(state) and type(state).__dataclass_params__.frozen
    assert isinstance(state, NoState) == (name in ("ROME", "MEMIT", "RECT", "EMMET"))


def test_the_runner_is_the_loop_alone():
    lines = (REPO / "mose_easyedit" / "experiments" / "runner.py").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300


def test_every_reference_to_the_methods_document_names_a_section_it_has():
    """``docs/methods.md §N`` (or ``§N.M``) anywhere in the package, docs or README points at a heading there."""
    import re

    headings = set(re.findall(r"^#+ (\d+(?:\.\d+)?)\.? ", (REPO / "docs" / "methods.md").read_text(encoding="utf-8"),
                              flags=re.M))
    files = [*(REPO / "mose_easyedit").rglob("*.py"), *(REPO / "docs").glob("*.md"), REPO / "README.md"]
    cited = set()
    for path in files:
        for match in re.finditer(r"methods\.md[`)]? ?§(\d+(?:\.\d+)?)(?:[–-](?:§)?(\d+(?:\.\d+)?))?",
                                 path.read_text(encoding="utf-8")):
            cited.update(section for section in match.groups() if section)
    assert cited and cited <= headings, sorted(cited - headings)
