"""The embedded model as any transformers release the package supports loads it: a tokenizer built from the GGUF
itself, a tied output head, a known completion checked on every load, and a fresh cache converted correctly.

CI runs this file again under the oldest and the newest transformers release the package declares, each from an
empty cache (``.ci/transformers-matrix``).
"""
from __future__ import annotations

import copy
import json
import os
import stat

import pytest
import torch

from mose_easyedit import modeling
from mose_easyedit.gguf_tokenizer import CHECK_PIECES, CHECK_TEXT, build_tokenizer

TEXTS = ["The Eiffel Tower is located in the city of", " Rome", "Danielle Darrieux's mother tongue is French.",
         "<|im_start|>user\nWhat is 12 + 345?<|im_end|>\n", "naïve café — 東京\n\n  two  spaces"]


def test_the_tokenizer_built_from_the_gguf_splits_text_as_the_model_was_trained(tmp_path):
    cache = tmp_path / "tok.json"
    built = build_tokenizer(modeling._packaged_gguf(), cache)
    assert cache.is_file()
    reread = build_tokenizer(modeling._packaged_gguf(), cache)
    assert built.tokenize(CHECK_TEXT) == CHECK_PIECES
    for text in TEXTS:
        ids = built(text)["input_ids"]
        assert reread(text)["input_ids"] == ids
        assert built.decode(ids) == text  # byte-level BPE: every text round-trips
    encoded = built(TEXTS[0])
    assert set(encoded) == {"input_ids", "attention_mask"}  # nothing the model's forward does not take
    assert built.convert_ids_to_tokens(built("<|im_start|>")["input_ids"]) == ["<|im_start|>"]
    assert (built.bos_token, built.eos_token, built.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert "<|im_start|>assistant" in built.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                                add_generation_prompt=True)


def test_a_tokenizer_that_splits_differently_is_refused_in_one_line(tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers

    cache = tmp_path / "tok.json"
    build_tokenizer(modeling._packaged_gguf(), cache)
    spec = json.loads(cache.read_text())
    backend = Tokenizer.from_str(spec["backend"])
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # spaces dropped instead of kept as Ġ
    spec["backend"] = backend.to_str()
    cache.write_text(json.dumps(spec))
    with pytest.raises(ValueError) as error:
        build_tokenizer(modeling._packaged_gguf(), cache)
    message = str(error.value)
    assert str(cache) in message and "ĠTower" in message and "\n" not in message


def test_a_converted_model_with_an_untied_head_is_refused(default_model, tmp_path):
    model, tok = default_model
    modeling.check_default_model(model, tok, tmp_path)  # the real one passes
    broken = copy.deepcopy(model)
    torch.manual_seed(0)
    broken.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    with pytest.raises(ValueError, match="delete that folder"):
        modeling.check_default_model(broken, tok, tmp_path)


def test_a_fresh_cache_converts_the_gguf_into_a_working_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MOSE_EASYEDIT_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    model, tok = modeling.load_default_model()
    folders = [p for p in (tmp_path / "cache" / "models").iterdir() if p.is_dir()]
    assert len(folders) == 1 and modeling.CACHE_FORMAT in folders[0].name
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(folders[0].stat().st_mode) == 0o777 & ~umask  # as the umask allows, not owner-only
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tok.tokenize(CHECK_TEXT) == CHECK_PIECES
    with torch.no_grad():
        ids = tok("The Eiffel Tower is located in the city of", return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:]).startswith(" Paris")
