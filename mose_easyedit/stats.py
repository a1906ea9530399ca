"""Key statistics: the uncentred second moment C = E[k kᵀ] of an edited module's input over generic text.

Computed once per (model, module, corpus, sample count, sample length, dtype) and cached on disk under
``cache_dir()/stats``; every requested layer is collected in a single pass over the corpus.

Corpora (``mom2_dataset``):
- a path to a text / JSONL file (``{"text": ...}`` per line) or a folder of them;
- ``"wikipedia"``: wikimedia/wikipedia through the ``datasets`` package (needs the network), as EasyEdit does;
- ``"generated"``: text sampled from the model itself (seeded, cached), so a fresh offline machine needs no files.
If ``stats_dir`` names an EasyEdit statistics folder holding the matching ``.npz`` file, that file is read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .cache import model_cache
from .modeling import cache_dir, get_module, input_device, model_identity, read_weight
from .nethook import StopForward, TraceDict
from .tokens import pad_id

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def corpus_identity(spec: str) -> str:
    """A cache-key name for a corpus: built-in names as they are, files by name plus a content hash."""
    if spec in ("generated", "wikipedia"):
        return spec
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"mom2_dataset: no such corpus file or folder: {spec}")
    digest = hashlib.sha1()
    for file in _corpus_files(path):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return f"{path.name}-{digest.hexdigest()[:10]}"


def _corpus_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"mom2_dataset: folder {path} holds no files")
    return files


def _read_texts(path: Path):
    for file in _corpus_files(path):
        with open(file, encoding="utf-8", errors="replace") as handle:
            if file.suffix in (".jsonl", ".json"):
                for line_no, line in enumerate(handle, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)["text"]
                        except (ValueError, KeyError, TypeError):
                            raise ValueError(f"{file}:{line_no}: expected a JSON object with a 'text' field")
            else:
                yield handle.read()


def _token_stream(tok, texts, needed: int) -> list[int]:
    stream: list[int] = []
    for text in texts:
        text = text.replace(" <unk>", "").replace("<unk>", "")
        for block in text.split("\n\n"):
            if block.strip():
                stream.extend(tok(block.strip(), add_special_tokens=False)["input_ids"])
                if len(stream) >= needed:
                    return stream[:needed]
    return stream


def _generated_tokens(model, tok, n_samples: int, length: int, seed: int) -> torch.Tensor:
    """``n_samples`` sequences of ``length`` tokens sampled from the model (cached on disk)."""
    path = cache_dir() / "corpora" / f"{model_identity(model)}-generated-s{seed}-{n_samples}x{length}.pt"
    if path.exists():
        return torch.load(path)
    starts = ["The", "In", "A", "It", "This", "He", "She", "They", "One", "When", "After", "Many"]
    device = input_device(model)
    batch, out = 64, []
    logger.info("sampling a key-statistics corpus of %d × %d tokens from the model (once; cached in %s); set "
                "mom2_dataset to a text file to skip this", n_samples, length, path.parent)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        for begin in tqdm(range(0, n_samples, batch), desc="sampling a statistics corpus from the model",
                          disable=None):
            if begin == batch:
                elapsed = time.perf_counter() - started
                logger.info("first %d samples took %.0f s: about %.0f s more", batch, elapsed,
                            elapsed * (n_samples - batch) / batch)
            count = min(batch, n_samples - begin)
            first = [tok(starts[(begin + i) % len(starts)], add_special_tokens=False)["input_ids"][0]
                     for i in range(count)]
            ids = torch.tensor(first, device=device)[:, None]
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=50,
                                 max_new_tokens=length - 1, min_new_tokens=length - 1, pad_token_id=pad_id(tok))
            out.append(gen[:, :length].cpu())
    tokens = torch.cat(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(tokens, tmp)
    os.replace(tmp, path)
    return tokens


def _corpus_tokens(model, tok, spec: str, n_samples: int, length: int, seed: int) -> torch.Tensor:
    if spec == "generated":
        return _generated_tokens(model, tok, n_samples, length, seed)
    if spec == "wikipedia":
        try:
            from datasets import load_dataset
        except ImportError:
            raise ImportError("mom2_dataset 'wikipedia' needs the 'datasets' package (pip install datasets)")
        data = load_dataset("wikimedia/wikipedia", "20231101.en", split="train", streaming=True)
        texts = (row["text"] for row in data)
    else:
        texts = _read_texts(Path(spec))
    stream = _token_stream(tok, texts, n_samples * length)
    usable = len(stream) // length
    if usable == 0:
        raise ValueError(f"mom2_dataset {spec!r} yields fewer than {length} tokens")
    if usable < n_samples:
        logger.warning("corpus %s holds only %d samples of %d tokens (asked for %d)", spec, usable, length, n_samples)
    return torch.tensor(stream[:usable * length]).view(usable, length)


def _cache_path(model, module: str, hparams, corpus_id: str) -> Path:
    name = f"{module}_{hparams.mom2_dtype}_n{hparams.mom2_n_samples}x{hparams.mom2_sample_length}.pt"
    return cache_dir() / "stats" / model_identity(model) / corpus_id / name


def _easyedit_path(model, module: str, hparams) -> Path | None:
    """EasyEdit's statistics file for this module, when ``stats_dir`` is set."""
    if not hparams.stats_dir:
        return None
    from .easyedit_stats import easyedit_stats_path

    name = hparams.model_name or model.config.name_or_path
    dataset = hparams.mom2_dataset if hparams.mom2_dataset in ("wikipedia", "wikitext") else Path(
        hparams.mom2_dataset).name
    return easyedit_stats_path(hparams.stats_dir, name, module, dataset, hparams.mom2_dtype, hparams.mom2_n_samples)


def _layer_order(model, names: Sequence[str]) -> str:
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return max(names, key=lambda n: order[n])


def second_moments(model, tok, layers: Sequence[int], hparams) -> dict[int, torch.Tensor]:
    """C for the rewrite module of each layer, as ``{layer: (p, p)}`` in ``mom2_dtype`` on the weight's device.

    Missing layers are computed together in one pass over the corpus; results are cached in memory (on the
    model) and on disk.
    """
    dtype = _DTYPES[hparams.mom2_dtype]
    memory = model_cache(model)

    def memory_key(module: str) -> tuple:
        return ("mom2", module, hparams.mom2_dataset, hparams.seed, hparams.mom2_n_samples,
                hparams.mom2_sample_length, hparams.mom2_dtype)

    result: dict[int, torch.Tensor] = {}
    pending = []
    for layer in dict.fromkeys(layers):
        module = hparams.rewrite_module_tmp.format(layer)
        if memory_key(module) in memory:
            result[layer] = memory[memory_key(module)]
        else:
            pending.append(layer)
    if not pending:  # the usual case on every edit after the first: no file is touched
        return result
    corpus_id = corpus_identity(hparams.mom2_dataset)
    if corpus_id == "generated":  # the sampled text depends on the seed
        corpus_id = f"generated-s{hparams.seed}"
    missing: list[int] = []
    for layer in pending:
        module = hparams.rewrite_module_tmp.format(layer)
        device = read_weight(model, module).device
        easyedit = _easyedit_path(model, module, hparams)
        disk = _cache_path(model, module, hparams, corpus_id)
        if easyedit is not None and easyedit.exists():
            from .easyedit_stats import read_easyedit_stats

            mean, _count = read_easyedit_stats(easyedit)
            logger.info("read EasyEdit statistics %s", easyedit)
            value = torch.as_tensor(mean).to(device=device, dtype=dtype)
        elif disk.exists():
            value = torch.load(disk, map_location=device)["mean"].to(dtype)
        else:
            missing.append(layer)
            continue
        memory[memory_key(module)] = result[layer] = value
    if missing:
        computed = _compute(model, tok, missing, hparams)
        for layer, (mean, count) in computed.items():
            module = hparams.rewrite_module_tmp.format(layer)
            disk = _cache_path(model, module, hparams, corpus_id)
            disk.parent.mkdir(parents=True, exist_ok=True)
            tmp = disk.with_suffix(".tmp")
            torch.save({"mean": mean.cpu(), "count": count, "corpus": hparams.mom2_dataset}, tmp)
            os.replace(tmp, disk)
            value = mean.to(device=read_weight(model, module).device, dtype=dtype)
            memory[memory_key(module)] = result[layer] = value
    return result


@torch.no_grad()
def _compute(model, tok, layers: Sequence[int], hparams) -> dict[int, tuple[torch.Tensor, int]]:
    tokens = _corpus_tokens(model, tok, hparams.mom2_dataset, hparams.mom2_n_samples,
                            hparams.mom2_sample_length, hparams.seed)
    names = [hparams.rewrite_module_tmp.format(layer) for layer in layers]
    for name in names:
        get_module(model, name)
    sums = {name: None for name in names}
    count = 0
    device = input_device(model)
    batch = max(1, 4096 // hparams.mom2_sample_length)
    training = model.training
    model.eval()
    logger.info("key statistics for layers %s over %d tokens (once; cached)", list(layers), tokens.numel())
    try:
        for start in tqdm(range(0, len(tokens), batch), desc=f"key statistics for layers {list(layers)}",
                          disable=None):
            ids = tokens[start:start + batch].to(device)
            with TraceDict(model, names, retain_input=True, stop_at=_layer_order(model, names)) as traces:
                try:
                    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
                except StopForward:
                    pass
            for name in names:
                x = traces[name].input.reshape(-1, traces[name].input.shape[-1]).float()
                xtx = (x.T @ x).double()  # fp32 per batch, accumulated in fp64
                sums[name] = xtx if sums[name] is None else sums[name] + xtx
            count += ids.numel()
    finally:
        model.train(training)
    return {layer: (sums[name] / count, count) for layer, name in zip(layers, names)}
