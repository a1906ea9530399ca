"""The embedded model's tokenizer, built from the GGUF file's own vocabulary and merges.

transformers converts a GGUF tokenizer differently from one release to the next (one release turns this model's
byte-level BPE into a tokenizer that maps every space to ``<|endoftext|>``), so the package does not rely on that
conversion: it builds the byte-level BPE itself with the ``tokenizers`` library every transformers release ships,
and checks a known sentence before the tokenizer is used.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

# GGUF token types (llama.cpp's convention): 1 normal, 3 control (the chat and code markers, ids 0-16 here)
_CONTROL = 3
# the known sentence and the pieces the model was trained with (byte-level BPE, Ġ = a leading space)
CHECK_TEXT = "The Eiffel Tower is located in"
CHECK_PIECES = ["The", "ĠE", "iffel", "ĠTower", "Ġis", "Ġlocated", "Ġin"]


def _field(reader, key: str):
    if key not in reader.fields:
        raise ValueError(f"the GGUF file has no '{key}' entry")
    return reader.fields[key]


def _strings(reader, key: str) -> list[str]:
    field = _field(reader, key)
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def _integers(reader, key: str) -> list[int]:
    field = _field(reader, key)
    return [int(field.parts[i][0]) for i in field.data]


def build_tokenizer(gguf_path: str | Path, cache_file: str | Path | None = None):
    """A ``PreTrainedTokenizerFast`` for the GGUF's byte-level BPE (``tokenizer.ggml.model = gpt2``): its tokens,
    merges and control tokens, its BOS / EOS / unknown / padding tokens, no special tokens added around a text, and
    the chat template. Reading the GGUF takes seconds, so with ``cache_file`` the result is kept there (in the
    ``tokenizers`` library's own JSON, which does not depend on the transformers release) and read back next time.
    The known sentence is checked either way."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    cache = Path(cache_file) if cache_file is not None else None
    if cache is not None and cache.is_file():
        spec = json.loads(cache.read_text(encoding="utf-8"))
    else:
        spec = _read_gguf(gguf_path)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_name(f".{cache.name}.{os.getpid()}")
            partial.write_text(json.dumps(spec), encoding="utf-8")
            os.replace(partial, cache)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(spec["backend"]), **spec["special"],
                                  model_input_names=["input_ids", "attention_mask"])
    if spec.get("chat_template"):
        tok.chat_template = spec["chat_template"]
    check_tokenizer(tok, str(cache if cache is not None and cache.is_file() else gguf_path))
    return tok


def _read_gguf(gguf_path: str | Path) -> dict:
    """The tokenizer's parts from the GGUF: the ``tokenizers`` backend as JSON, the special tokens and the chat
    template."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    reader = gguf.GGUFReader(str(gguf_path))
    kind = _strings(reader, "tokenizer.ggml.model")[0]
    if kind != "gpt2":
        raise ValueError(f"{gguf_path}: tokenizer model {kind!r}, only byte-level BPE ('gpt2') is supported")
    tokens = _strings(reader, "tokenizer.ggml.tokens")
    kinds = _integers(reader, "tokenizer.ggml.token_type")
    merges = [tuple(merge.split(" ")) for merge in _strings(reader, "tokenizer.ggml.merges")]
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges,
                                   fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                for token, kind in zip(tokens, kinds) if kind == _CONTROL])
    special = {name: tokens[_integers(reader, f"tokenizer.ggml.{key}_token_id")[0]]
               for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                                 ("pad_token", "padding"))}
    template = (_strings(reader, "tokenizer.chat_template")[0] if "tokenizer.chat_template" in reader.fields
                else None)
    return {"backend": backend.to_str(), "special": special, "chat_template": template}


def check_tokenizer(tok, where: str) -> None:
    """``ValueError`` (one line) unless ``tok`` splits the known sentence into the model's pieces with nothing
    added around it."""
    pieces = tok.convert_ids_to_tokens(tok(CHECK_TEXT)["input_ids"])
    if pieces != CHECK_PIECES:
        raise ValueError(f"{where}: the tokenizer splits {CHECK_TEXT!r} into {pieces} instead of {CHECK_PIECES}")
