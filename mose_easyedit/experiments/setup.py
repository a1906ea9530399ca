"""Setting a run up: its requests, the method's hyperparameters (file, method defaults, ablation, overrides), the
model, and the per-model caches warmed on the original weights."""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from ..data import DATA_ENV
from ..hparams import HPARAMS_ROOT
from ..keys import context_templates
from ..methods import METHODS, MethodSpec
from ..modeling import load_default_model, num_layers, read_weight
from ..stats import second_moments
from .config import DTYPES, LOADERS, ExperimentError

logger = logging.getLogger("mose_easyedit.experiments.runner")


def load_requests(cfg: DictConfig) -> list[dict]:
    """The first ``num_edits`` requests from ``data.start`` (after dropping malformed ones if
    ``data.skip_invalid``)."""
    path = Path(str(cfg.data.path)).expanduser()
    hint = (f"set data.path=... or data_dir=... (now {cfg.data_dir}) or ${DATA_ENV}; the folder holds "
            f"counterfact/counterfact-edit.json, zsre/ and general_tasks/ as in EasyEdit's data release "
            f"(editing-data/counterfact/), see docs/experiments.md")
    if not path.is_file():
        raise ExperimentError(f"data.path={path}: no such file ({hint})")
    loader = LOADERS[cfg.data.loader]
    limit = None if cfg.data.skip_invalid else cfg.num_edits
    try:
        requests = loader(path, limit=limit, start=cfg.data.start, skip_invalid=cfg.data.skip_invalid)
    except (ValueError, FileNotFoundError) as exc:
        raise ExperimentError(f"data.path={path}: {exc}") from None
    if len(requests) < cfg.num_edits:
        raise ExperimentError(f"data.path={path}: only {len(requests)} usable record(s) from start={cfg.data.start}, "
                              f"num_edits={cfg.num_edits} asked for")
    return requests[:cfg.num_edits]


def hparams_path(cfg: DictConfig) -> Path:
    """``hparams_file``, else the shipped ``<method.name>/<method.hparams>.yaml`` (a variant such as MOSE-input
    names its file there), else ``<method.name>/<model.id>.yaml``."""
    if cfg.hparams_file:
        return Path(str(cfg.hparams_file)).expanduser()
    return HPARAMS_ROOT / cfg.method.name / f"{cfg.method.get('hparams') or cfg.model.id}.yaml"


def method_label(cfg: DictConfig) -> str:
    """The name of the run's row in comparisons: ``label`` (by default the method config's ``label``, as for the
    variant MOSE-input, else the method's name)."""
    return str(cfg.get("label") or cfg.method.get("label") or cfg.method.name)


def _read_yaml_mapping(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}: expected a mapping of hyperparameters")
    return raw


def fixed_ablation_layer(cfg: DictConfig, raw: Mapping) -> int:
    """``ablation_layer``, else the layer ROME edits on this model (paper §6.4), else the middle of ``layers``."""
    if cfg.ablation_layer is not None:
        return int(cfg.ablation_layer)
    rome = HPARAMS_ROOT / "ROME" / f"{cfg.model.id}.yaml"
    if rome.is_file():
        layers = _read_yaml_mapping(rome).get("layers") or []
        if layers:
            logger.info("ablation=fixed: ROME's layer %d from %s", layers[0], rome)
            return int(layers[0])
    layers = list(raw.get("layers") or [])
    if not layers:
        raise ExperimentError("ablation=fixed: set ablation_layer=... (no ROME hparams and no 'layers' to use)")
    layer = int(layers[len(layers) // 2])
    logger.info("ablation=fixed: no %s; using the middle of the method's layers, %d", rome, layer)
    return layer


def _mapping(node: Any, key: str) -> dict:
    if node is None:
        return {}
    value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    if not isinstance(value, dict):
        raise ExperimentError(f"{key} must be a mapping, got {value!r}")
    return value


def build_hparams(cfg: DictConfig):
    """The method's hyperparameters: the YAML file, then ``method.hparams_defaults``, the ablation switch,
    ``hparams_overrides``; ``seed`` and ``batch_size`` follow the run unless overridden."""
    spec = METHODS[cfg.method.name]
    path = hparams_path(cfg)
    if not path.is_file():
        raise ExperimentError(f"no hyperparameters for {cfg.method.name} on {cfg.model.id}: {path} does not exist "
                              "(write it, or pass hparams_file=...)")
    raw = _read_yaml_mapping(path)
    defaults = _mapping(cfg.method.get("hparams_defaults"), "method.hparams_defaults")
    overrides = _mapping(cfg.get("hparams_overrides"), "hparams_overrides")
    raw.update(defaults)
    fields = {f.name for f in dataclasses.fields(spec.hparams_cls)}
    if cfg.ablation is not None:
        if not spec.engine.ablations:
            raise ExperimentError(f"ablation={cfg.ablation}: {cfg.method.name} has no layer selection to ablate")
        fixed = fixed_ablation_layer(cfg, raw) if cfg.ablation == "fixed" else None
        raw.update(spec.engine.ablation(cfg.ablation, fixed))
    raw.update(overrides)
    if "seed" in fields and "seed" not in overrides:
        raw["seed"] = cfg.seed
    if "batch_size" in fields and "batch_size" not in overrides:
        raw["batch_size"] = cfg.batch_size
    source = f"{path} (+ run overrides)"
    try:
        return spec.hparams_cls.from_dict(raw, source)
    except ValueError as exc:
        raise ExperimentError(str(exc)) from None


def spec_for(hparams) -> MethodSpec:
    """The registered method whose hyperparameter class ``hparams`` is (a MOSE file with ``rotation_side: input``
    loads as MOSE-input's)."""
    return next(spec for spec in METHODS.values() if type(hparams) is spec.hparams_cls)


def touchable_layers(hparams, total: int) -> list[int]:
    """Every layer the method may edit (its registry entry knows: ``layers``, or every candidate's window)."""
    return spec_for(hparams).engine.touchable_layers(hparams, total)


def warm_caches(model, tok, hparams) -> dict[str, torch.Tensor]:
    """Context templates and key statistics on the original model, so no edit pays for them and a resumed run sees
    exactly what an uninterrupted one does; returns W₀ (CPU copies) of every touchable layer."""
    layers = touchable_layers(hparams, num_layers(model))
    start = time.perf_counter()
    if hasattr(hparams, "context_template_length_params"):
        context_templates(model, tok, hparams.context_template_length_params, hparams.seed)
    if getattr(hparams, "USES_KEY_STATISTICS", False) and layers:
        second_moments(model, tok, layers, hparams)
    modules = [hparams.rewrite_module_tmp.format(layer) for layer in layers]
    originals = {m: read_weight(model, m).detach().to("cpu", copy=True) for m in modules}
    logger.info("caches warmed on the original model for layers %s in %.1f s", layers, time.perf_counter() - start)
    return originals


def load_model(model_cfg: DictConfig):
    """``(model, tok)``: the embedded SmolLM2 (``name: embedded``) or a Hugging Face model in ``dtype`` on
    ``device`` (``model_parallel``: ``device_map="auto"`` over every visible GPU)."""
    dtype = DTYPES[model_cfg.dtype]
    device = str(model_cfg.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExperimentError(f"model.device={device} but CUDA is not available (pass model.device=cpu)")
    if model_cfg.name == "embedded":
        return load_default_model(device=device, dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device_map = "auto" if model_cfg.model_parallel else {"": device}
    logger.info("loading %s (%s, device_map=%s)", model_cfg.name, model_cfg.dtype, device_map)
    tok = AutoTokenizer.from_pretrained(str(model_cfg.name))
    model = AutoModelForCausalLM.from_pretrained(str(model_cfg.name), dtype=dtype, device_map=device_map)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return model, tok
