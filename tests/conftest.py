"""Shared fixtures: the shared data folder beside the repository and the embedded default model."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository; tests that need it are skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (it sits beside the repository in the workspace)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def default_model():
    """``(model, tok)``: SmolLM2-135M-Instruct, float32, CPU, loaded once per session."""
    torch.set_num_threads(1)
    from mose_easyedit.modeling import load_default_model

    return load_default_model()


CORPUS = SHARED_DATA / "text_corpus" / "wikitext-2-raw.test.raw"
COUNTERFACT = SHARED_DATA / "counterfact" / "counterfact-edit.json"

# module templates per architecture family, as in EasyEdit's hparams
TEMPLATES = {
    "llama": dict(rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
                  mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn",
                  ln_f_module="model.norm", lm_head_module="lm_head"),
    "gpt2": dict(rewrite_module_tmp="transformer.h.{}.mlp.c_proj", layer_module_tmp="transformer.h.{}",
                 mlp_module_tmp="transformer.h.{}.mlp", attn_module_tmp="transformer.h.{}.attn",
                 ln_f_module="transformer.ln_f", lm_head_module="lm_head"),
}
TEMPLATES["qwen2"] = TEMPLATES["llama"]
FAMILIES = ("llama", "qwen2", "gpt2")
TINY_INIT = 0.1  # larger than the default 0.02 so that random logits are not flat


@pytest.fixture(scope="session")
def tokenizer(default_model):
    return default_model[1]


def build_tiny_model(family: str, vocab_size: int, seed: int = 0):
    """A small random causal LM of the given family (4 layers, width 64), float32, eval mode."""
    from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config)

    torch.manual_seed(seed)
    if family == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             initializer_range=TINY_INIT, tie_word_embeddings=True)
    elif family == "qwen2":
        config = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             initializer_range=TINY_INIT, tie_word_embeddings=False)
    elif family == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=4, n_head=4, n_positions=256,
                            initializer_range=TINY_INIT)
    else:
        raise ValueError(family)
    config.name_or_path = f"tiny-{family}-seed{seed}"
    model = AutoModelForCausalLM.from_config(config).eval()
    return model


@pytest.fixture
def tiny_model(tokenizer, request):
    return build_tiny_model(request.param, len(tokenizer))


def tiny_hparams(cls, family: str, **overrides):
    """Hyperparameters of ``cls`` for a tiny model of ``family`` (statistics from the shared corpus)."""
    if not CORPUS.exists():
        pytest.skip(f"corpus {CORPUS} is absent")
    config = dict(alg_name=cls.ALG_NAMES[0], model_name=f"tiny-{family}", device="cpu", layers=[1, 2],
                  mom2_dataset=str(CORPUS), mom2_n_samples=24, mom2_sample_length=64, v_num_grad_steps=20,
                  **TEMPLATES[family])
    if "candidate_layers" in {f.name for f in dataclasses.fields(cls)}:
        config["candidate_layers"] = [0, 1]
    config.update(overrides)
    return cls.from_dict(config, f"tiny-{family}")


class OneProjection(torch.nn.Module):
    """A model of one down projection at the embedded model's shape (576 × 1536)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.down_proj = torch.nn.Linear(1536, 576, bias=False, dtype=dtype)


@contextlib.contextmanager
def session_on_one_projection(threads: int, method: str = "MOSE"):
    """Yields ``(model, session)``: a seeded :class:`OneProjection` whose ``method`` session carries state and has
    recorded its weight with torch on ``threads`` threads; torch's thread count is restored on exit."""
    from mose_easyedit.session import get_session

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = OneProjection()
        session = get_session(model, method)
        session.state = "carried"
        session.record_weights(model, ["down_proj"])
        yield model, session
    finally:
        torch.set_num_threads(before)


def load_cases(n: int, start: int = 0) -> list[dict]:
    import json

    if not COUNTERFACT.exists():
        pytest.skip(f"{COUNTERFACT} is absent")
    with open(COUNTERFACT, encoding="utf-8") as handle:
        return json.load(handle)[start:start + n]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_bit_identical(model, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), f"parameter {name} changed"


REQUESTS = [
    {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux", "target_new": "English"},
    {"prompt": "The Eiffel Tower is located in", "subject": "Eiffel Tower", "target_new": "Rome"},
]


def target_logprob(model, tok, prompt: str, target: str) -> float:
    """log P(target | prompt), teacher-forced, tokenised as one string as the core does."""
    from mose_easyedit.tokens import encode, join_target

    text, cut = join_target(prompt, target)
    enc = encode(tok, text, None, cut)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([enc.ids])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[t - 1, enc.ids[t]] for t in range(enc.target_start, len(enc.ids))))


def embedded_hparams(cls, shared_data: Path, name: str = "smollm2-135m"):
    """The shipped SmolLM2 hyperparameters ``name`` of ``cls``, with statistics from the shared WikiText (fast)."""
    hp = cls.from_hparams(name)
    hp.mom2_dataset = str(shared_data / "text_corpus" / "wikitext-2-raw.test.raw")
    hp.mom2_n_samples = 200
    return hp


def model_digest(model) -> str:
    """sha256 over every parameter and buffer of ``model`` (names and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(p.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def restore(model, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in weights.items():
            model.get_parameter(name).copy_(value)


@dataclasses.dataclass
class EmbeddedRun:
    """The embedded model after a shipped configuration's 10 sequential edits: the parameters the run changed,
    the sessions it left on the model, and the digest of every parameter."""

    edited: dict
    sessions: dict
    digest: str


class EmbeddedRuns:
    """The first 10 CounterFact cases of the edit split, one per call, with ``hparams/<METHOD>/<name>.yaml``
    (statistics from the shared WikiText, as :func:`embedded_hparams`): each configuration is edited once per
    test session and shared by the tests that check that run (its digest, MOSE's spectrum, accuracy and undo).
    The model is restored bit for bit after each run."""

    def __init__(self, model, tok, shared_data: Path):
        self.model, self.tok, self.shared_data = model, tok, shared_data
        self.runs: dict[tuple, EmbeddedRun] = {}

    def run(self, config: str) -> EmbeddedRun:
        """The run of ``config`` (``"<METHOD>/<file stem>"``). Two files that load to the same hyperparameters of
        the same class (an earlier form of a file and its successor) make the same edits: they share one run."""
        import copy

        import mose_easyedit as me
        from mose_easyedit.methods import METHODS
        from mose_easyedit.session import SESSIONS_ATTRIBUTE

        method, name = config.split("/")
        spec = METHODS[method]
        hp = embedded_hparams(spec.hparams_cls, self.shared_data, name)
        key = (type(hp).__qualname__, repr(sorted(hp.to_dict().items())))
        if key not in self.runs:
            torch.set_num_threads(1)
            original = snapshot(self.model)
            me.reset_session(self.model)
            try:
                for case in load_cases(10):
                    spec.apply(self.model, self.tok, [case], hp)
                edited = {n: p.detach().clone() for n, p in self.model.named_parameters()
                          if not torch.equal(p, original[n])}
                sessions = copy.deepcopy(self.model.__dict__.get(SESSIONS_ATTRIBUTE, {}))
                self.runs[key] = EmbeddedRun(edited, sessions, model_digest(self.model))
            finally:
                restore(self.model, original)
                me.reset_session(self.model)
        return self.runs[key]

    @contextlib.contextmanager
    def applied(self, config: str):
        """``(model, tok, original)``: the model as the run left it (weights and live sessions) inside the block, and
        a copy of its parameters before; restored after the block."""
        import copy

        import mose_easyedit as me
        from mose_easyedit.session import SESSIONS_ATTRIBUTE

        run = self.run(config)
        original = snapshot(self.model)
        try:
            restore(self.model, run.edited)
            self.model.__dict__[SESSIONS_ATTRIBUTE] = copy.deepcopy(run.sessions)
            yield self.model, self.tok, original
        finally:
            restore(self.model, original)
            me.reset_session(self.model)


@pytest.fixture(scope="session")
def embedded_runs(default_model, shared_data) -> EmbeddedRuns:
    return EmbeddedRuns(*default_model, shared_data)
