"""Behaviour pins: the edited weights of every shipped configuration, bit for bit.

Each case edits a model sequentially and hashes every parameter afterwards. The digests were computed by the
code before the update heads were restructured (commit 2fb4d90) on this project's CI machines; refactors must
keep them. One digest was re-recorded on purpose: ``MOSE/smollm2-135m-input`` (and so
``MOSE-input/smollm2-135m``) when its default ``nullspace_threshold`` went from 2e-2 to 5e-2 (docs/benchmarks.md
§7.3). The last bits depend on the floating-point kernels of the machine and library build, so a digest mismatch
on a different machine is not by itself a behaviour change: re-record there with the old code
(``python tests/test_digests.py --record``) and compare.

* embedded model: the first 10 cases of ``counterfact-edit.json``, one fact per call, with every shipped
  ``hparams/<METHOD>/smollm2-135m*.yaml`` (statistics from the shared WikiText, 200 texts, as the other
  embedded-model tests use; the runs are conftest's ``embedded_runs``, which other tests of the same runs share);
* tiny LLaMA and GPT-2 models: every registered method, two single edits then one call of both facts.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import REQUESTS, EmbeddedRuns, build_tiny_model, model_digest, tiny_hparams

DIGESTS_FILE = Path(__file__).with_name("weight_digests.json")
HPARAMS_DIR = Path(__file__).resolve().parents[1] / "hparams"
EMBEDDED = sorted(f"{path.parent.name}/{path.stem}" for path in HPARAMS_DIR.glob("*/smollm2-135m*.yaml"))
# a configuration shipped after the digests were recorded, and the recorded one it must reproduce
SAME_AS = {"MOSE-input/smollm2-135m": "MOSE/smollm2-135m-input"}
# configurations shipped after the digests were recorded have no digest (except those in SAME_AS)
EMBEDDED = [c for c in EMBEDDED if c in json.loads(DIGESTS_FILE.read_text())["embedded"] or c in SAME_AS] \
    if DIGESTS_FILE.exists() else EMBEDDED
TINY = [(method, family) for method in ("ROME", "MEMIT", "RECT", "EMMET", "PRUNE", "AlphaEdit", "MOSE",
                                        "MOSE-input", "MOSE-OFT") for family in ("llama", "gpt2")]
# tiny-model hyperparameters where a method's defaults are for real models (as in test_methods.py), and the
# class of the methods that are configurations of another one
TINY_CONFIG = {
    "MOSE-input": ("MOSE", dict(rotation_side="input", input_subspace="null_c", target_reach="rotation")),
    "MOSE-OFT": ("MOSE-OFT", dict(lr=1e-2, num_steps=12, coft=False)),
    "ROME": ("ROME", dict(layers=[2])),
    "MEMIT": ("MEMIT", dict(mom2_update_weight=1.0)),
    "RECT": ("RECT", dict(mom2_update_weight=1.0)),
    "PRUNE": ("PRUNE", dict(mom2_update_weight=1.0)),
    "AlphaEdit": ("AlphaEdit", dict(nullspace_threshold=0.05, L2=1.0)),
}


@pytest.fixture(scope="module")
def recording_environment(tokenizer):
    """The digests hold bit for bit only on machines whose floating-point kernels match the recording machine's.
    Two kinds of machine are known from the paper-side digest test (tests/test_mose.py): this checks which one
    runs the tests, by the same edits, and skips the bit-for-bit comparison on the other kind; a digest that
    matches neither is a behaviour change and fails."""
    from test_mose import PAPER_MOSE_DIGESTS

    from mose_easyedit.methods import MOSEHyperParams, apply_mose_to_model

    torch.set_num_threads(1)
    model = build_tiny_model("llama", len(tokenizer))
    hp = tiny_hparams(MOSEHyperParams, "llama", rotation_side="output", target_reach="free")
    for request in REQUESTS:
        apply_mose_to_model(model, tokenizer, [request], hp)
    apply_mose_to_model(model, tokenizer, REQUESTS, hp)
    known = PAPER_MOSE_DIGESTS["llama"]
    digest = model_digest(model)
    assert digest in known, "the paper-side MOSE edit changed: no known machine computes this digest"
    if digest != known[0]:
        pytest.skip("this machine's floating-point kernels differ from the recording machine's (it computes the "
                    "other known paper-side digest); re-record here with the old code to compare bit for bit")


def recorded() -> dict:
    return json.loads(DIGESTS_FILE.read_text()) if DIGESTS_FILE.exists() else {}


def edit_tiny(method: str, family: str, tok) -> str:
    from mose_easyedit.methods import METHODS

    base, overrides = TINY_CONFIG.get(method, (method, {}))
    torch.set_num_threads(1)
    model = build_tiny_model(family, len(tok))
    spec = METHODS[base]
    hp = tiny_hparams(spec.hparams_cls, family, **overrides)
    for request in REQUESTS:
        spec.apply(model, tok, [request], hp)
    spec.apply(model, tok, REQUESTS, hp)
    return model_digest(model)


@pytest.mark.slow
@pytest.mark.parametrize("config", EMBEDDED)
def test_shipped_embedded_configuration_edits_bit_for_bit_as_recorded(recording_environment, embedded_runs, config):
    assert embedded_runs.run(config).digest == recorded()["embedded"][SAME_AS.get(config, config)]


@pytest.mark.parametrize("method,family", TINY)
def test_every_method_edits_a_tiny_model_bit_for_bit_as_recorded(recording_environment, tokenizer, method, family):
    assert edit_tiny(method, family, tokenizer) == recorded()["tiny"][f"{method}/{family}"]


if __name__ == "__main__" and "--record" in sys.argv:
    import time

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import SHARED_DATA
    from mose_easyedit.modeling import load_default_model

    torch.set_num_threads(1)
    model, tok = load_default_model()
    result = {"tiny": {}, "embedded": {}}
    for method, family in TINY:
        result["tiny"][f"{method}/{family}"] = edit_tiny(method, family, tok)
        print(method, family, result["tiny"][f"{method}/{family}"][:12], flush=True)
    runs = EmbeddedRuns(model, tok, SHARED_DATA)
    for config in (c for c in EMBEDDED if c not in SAME_AS):
        start = time.perf_counter()
        result["embedded"][config] = runs.run(config).digest
        print(config, result["embedded"][config][:12], f"{time.perf_counter() - start:.0f} s", flush=True)
    DIGESTS_FILE.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
