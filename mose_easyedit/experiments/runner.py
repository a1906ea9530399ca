"""One sequential-editing run: edit T steps of b facts, measure, checkpoint, and write the run directory.

    load data and model → warm the per-model caches on the ORIGINAL model (context templates, key statistics of
    every layer the method can touch) → cache the original model's locality outputs → general abilities before
    editing → for each step: ``METHODS[method].apply`` → stability of the edited layers → (every ``eval_every`` /
    ``general_every`` edits) curves → checkpoint → after the last edit: reliability / generalization / locality of
    EVERY edited fact (retention), general abilities → ``results.jsonl``, ``summary.json``, plots.

The run directory (``output_dir``) holds:

* ``config.yaml`` (the resolved configuration) and ``hparams.yaml`` (the method's resolved hyperparameters);
* ``results.jsonl``: one line per edit step (case ids, layers, seconds per stage, stability of every edited layer,
  the method's per-layer diagnostics, curve / general evaluations when due) and, once complete, the retention
  metrics of the step's facts after the last edit;
* ``summary.json``: final metrics, general abilities before / after, curves, stability, time per edit;
* ``metrics.png``, ``general.png``, ``stability.png`` (and ``diagnostics.png`` for methods that log ρ);
* ``run.log``; while running also ``progress.json``, ``checkpoint.pt``, ``locality_reference.json`` and
  ``final_partial.json``.

A killed run restarted with the same command continues from its last checkpoint and produces the same results
as an uninterrupted run (see :mod:`.checkpoint`); a complete run re-invoked returns at once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..data import DATA_ENV, load_conceptedit, load_counterfact, load_dataset, load_zsre
from ..evaluation import OriginalOutputs, cache_locality_reference, evaluate_requests, summarize, token_accuracy
from ..general_tasks import PROTOCOL, TASKS, evaluate_general, task_file
from ..hparams import HPARAMS_ROOT
from ..keys import context_templates
from ..methods import METHODS
from ..methods.mose import layer_window
from ..modeling import (cache_dir, get_module, is_conv1d, load_default_model, model_identity, num_layers,
                        read_weight)
from ..session import SESSIONS_ATTRIBUTE
from ..stats import second_moments
from . import checkpoint as ckpt
from .plots import plot_run
from .stability import method_layer_diagnostics, summarize_stability, weight_stability

logger = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent / "conf"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"

ABLATIONS = ("fixed", "selected", "selected_neighbours")
LOADERS = {"counterfact": load_counterfact, "zsre": load_zsre, "conceptedit": load_conceptedit,
           "auto": load_dataset}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Keys that may change between a run and its resumption without changing its results.
RUNTIME_KEYS = ("num_threads", "general_cache", "checkpoint_every", "keep_checkpoint", "progress", "log_level",
                "output_dir", "run_name", "label", "method.label", "data_dir", "data.path", "hparams_file")

CONFIG_FILE, HPARAMS_FILE, RESULTS_FILE, SUMMARY_FILE = "config.yaml", "hparams.yaml", "results.jsonl", "summary.json"
CHECKPOINT_FILE, PROGRESS_FILE, LOG_FILE = "checkpoint.pt", "progress.json", "run.log"
REFERENCE_FILE, FINAL_PARTIAL_FILE = "locality_reference.json", "final_partial.json"


class ExperimentError(ValueError):
    """A configuration or data problem, reported as one clear message (the CLI exits with status 2)."""


# ------------------------------------------------------------------------------------------------ configuration
def default_data_dir() -> str:
    """``$MOSE_EASYEDIT_DATA`` if set, else ``./data`` if it exists, else ``../shared/data`` beside a checkout of
    this repository if it exists, else ``./data`` (absent: the data loader then names it and says what goes there).
    An installed package has no checkout around it, so its default is the current directory's ``data``."""
    if os.environ.get(DATA_ENV):
        return os.environ[DATA_ENV]
    local = Path("data")
    if not local.is_dir() and (REPO_ROOT / "pyproject.toml").is_file() and DEFAULT_DATA_DIR.is_dir():
        return str(DEFAULT_DATA_DIR)
    return str(local)


def ablation_tag(value: Any) -> str:
    return "" if value in (None, "", "null") else f"-ablation_{value}"


def register_resolvers() -> None:
    """OmegaConf resolvers the config tree uses (idempotent)."""
    OmegaConf.register_new_resolver("mose_data_dir", default_data_dir, replace=True)
    OmegaConf.register_new_resolver("mose_ablation_tag", ablation_tag, replace=True)


register_resolvers()


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The experiment configuration with command-line style ``overrides`` (for notebooks and tests)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None, job_name="experiment"):
        return compose(config_name="config", overrides=list(overrides))


def check_config(cfg: DictConfig) -> None:
    def positive(key: str, minimum: int = 1) -> None:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ExperimentError(f"{key}={value!r}: must be an integer >= {minimum}")

    for key in ("num_edits", "batch_size", "checkpoint_every", "curve_facts", "final_eval_chunk",
                "eval_batch_size", "general_batch_size", "num_threads"):
        positive(key)
    for key in ("general_every", "stability_every", "general_subset_size"):
        positive(key, 0)
    if cfg.eval_every != "auto":
        positive("eval_every", 0)
    if cfg.num_edits % cfg.batch_size:
        raise ExperimentError(f"num_edits={cfg.num_edits} is not a multiple of batch_size={cfg.batch_size} "
                              "(a run is T steps of batch_size facts)")
    if cfg.method.name not in METHODS:
        raise ExperimentError(f"method={cfg.method.name!r} is not registered; known: {sorted(METHODS)}")
    if cfg.ablation is not None and cfg.ablation not in ABLATIONS:
        raise ExperimentError(f"ablation={cfg.ablation!r}: must be null or one of {list(ABLATIONS)}")
    unknown = [t for t in cfg.general_tasks if t not in TASKS]
    if unknown:
        raise ExperimentError(f"general_tasks: unknown task(s) {unknown}; known: {list(TASKS)}")
    if cfg.stability_dtype not in ("float32", "float64"):
        raise ExperimentError(f"stability_dtype={cfg.stability_dtype!r}: must be float32 or float64")
    if cfg.data.loader not in LOADERS:
        raise ExperimentError(f"data.loader={cfg.data.loader!r}: must be one of {list(LOADERS)}")
    if cfg.model.dtype not in DTYPES:
        raise ExperimentError(f"model.dtype={cfg.model.dtype!r}: must be one of {list(DTYPES)}")


def general_enabled(cfg: DictConfig) -> bool:
    return bool(cfg.general_tasks) and cfg.general_subset_size > 0


def check_general_data(cfg: DictConfig) -> None:
    if not general_enabled(cfg):
        return
    for task in cfg.general_tasks:
        try:
            task_file(task, cfg.data_dir)
        except (ValueError, FileNotFoundError) as exc:
            raise ExperimentError(f"general task {task} (data_dir={cfg.data_dir}): {exc}; set data_dir=... or "
                                  "general_tasks=[] to skip general abilities") from None


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping) and tree:
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def compare_configs(saved: Mapping, current: Mapping, where: Path) -> None:
    """Refuse to continue a run directory written with different result-affecting settings."""
    old, new = _flatten(saved), _flatten(current)
    # a setting added after the run was written, at its default (off), changes nothing the run computed
    added_off = {k for k in set(new) - set(old) if new[k] in (None, False, 0, "", [], {})}
    changed = sorted(k for k in (set(old) | set(new)) - added_off if old.get(k) != new.get(k))
    runtime = [k for k in changed if k in RUNTIME_KEYS]
    fatal = [k for k in changed if k not in RUNTIME_KEYS]
    if fatal:
        details = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in fatal[:8])
        raise ExperimentError(f"{where} holds a run with a different configuration ({details}); "
                              "pass another output_dir=... or remove that folder")
    if "num_threads" in runtime:
        logger.warning("resuming with num_threads %s instead of %s: results may differ in the last bits",
                       new.get("num_threads"), old.get("num_threads"))
    for key in runtime:
        logger.info("run setting %s changed: %r -> %r", key, old.get(key), new.get(key))


# ---------------------------------------------------------------------------------------------- data, hparams
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


def requests_digest(requests: Sequence[dict]) -> str:
    return hashlib.sha1(json.dumps(list(requests), sort_keys=True).encode()).hexdigest()


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
        if not {"layer_selection", "neighbours"} <= fields:
            raise ExperimentError(f"ablation={cfg.ablation}: {cfg.method.name} has no layer selection to ablate")
        if cfg.ablation == "fixed":
            raw.update(layer_selection=False, layers=[fixed_ablation_layer(cfg, raw)])
        else:
            raw.update(layer_selection=True, neighbours=0 if cfg.ablation == "selected" else 1)
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


def touchable_layers(hparams, total: int) -> list[int]:
    """Every layer the method may edit: its ``layers`` and, with layer selection, each candidate's window."""
    layers = set(getattr(hparams, "layers", None) or [])
    if getattr(hparams, "layer_selection", False):
        for candidate in getattr(hparams, "candidate_layers", None) or []:
            layers.update(layer_window(candidate, getattr(hparams, "neighbours", 0), total))
    return sorted(layer for layer in layers if 0 <= layer < total)


# ------------------------------------------------------------------------------------------------------- model
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


def weights_digest(model) -> str:
    """A digest of every parameter's value (float64 sum and norm, accumulated without copying the weights)."""
    digest = hashlib.sha1()
    with torch.no_grad():
        for name, p in model.named_parameters():
            summary = (name, tuple(p.shape), float(p.sum(dtype=torch.float64)),
                       float(torch.linalg.vector_norm(p, dtype=torch.float64)))
            digest.update(repr(summary).encode())
    return digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ JSON helpers
def jsonable(value: Any) -> Any:
    """``value`` with tensors and NumPy scalars turned into Python numbers/lists; other objects dropped (None)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else (value.tolist() if value.numel() <= 4096 else None)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            converted = jsonable(v)
            if converted is not None or v is None:
                out[str(k)] = converted
        return out
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return None


def crossed(edits: int, batch: int, every: int) -> bool:
    """True when the step that brought the count to ``edits`` crossed a multiple of ``every``."""
    return every > 0 and edits // every > (edits - batch) // every


def curve_every(cfg: DictConfig) -> int:
    """Edits between two curve points: ``eval_every``, or for ``auto`` the multiple of ``batch_size`` that gives
    about five points (the last one after the last edit)."""
    if cfg.eval_every != "auto":
        return int(cfg.eval_every)
    steps = cfg.num_edits // cfg.batch_size
    return max(1, -(-steps // 5)) * cfg.batch_size


def curve_indices(edited: int, count: int) -> list[int]:
    """At most ``count`` indices evenly spread over ``range(edited)`` (oldest and newest included)."""
    if edited <= count:
        return list(range(edited))
    return sorted(set(np.linspace(0, edited - 1, count).round().astype(int).tolist()))


# ------------------------------------------------------------------------------------------------------ the run
class SequentialRun:
    """A sequential-editing run described by a resolved experiment config (see ``conf/config.yaml``)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.dir = Path(str(cfg.output_dir))
        self.spec = None
        self.model = self.tok = self.hparams = None
        self.requests: list[dict] = []
        self.state: dict = {}
        self.originals: dict[str, torch.Tensor] = {}
        self.reference: OriginalOutputs | None = None
        self._mark = time.perf_counter()

    # -------------------------------------------------------------------------------------------- entry point
    def execute(self) -> dict:
        check_config(self.cfg)
        self.dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.dir / LOG_FILE, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package_logger = logging.getLogger("mose_easyedit")
        previous_level = package_logger.level
        package_logger.setLevel(str(self.cfg.log_level).upper())
        package_logger.addHandler(handler)
        try:
            return self._execute()
        finally:
            package_logger.removeHandler(handler)
            package_logger.setLevel(previous_level)
            handler.close()

    def _execute(self) -> dict:
        cfg = self.cfg
        resolved = OmegaConf.to_container(cfg, resolve=True)
        config_path = self.dir / CONFIG_FILE
        if config_path.exists() and not self._holds_edits():
            # a run that stopped before its first edit (a bad layer, say) left only its settings: start afresh
            logger.info("%s holds no edit yet: its earlier settings are replaced", self.dir)
            for name in (CONFIG_FILE, HPARAMS_FILE):
                (self.dir / name).unlink(missing_ok=True)
        if config_path.exists():
            compare_configs(OmegaConf.to_container(OmegaConf.load(config_path), resolve=True), resolved, self.dir)
        summary = self._completed_summary()
        if summary is not None:
            return summary
        check_general_data(cfg)
        self.requests = load_requests(cfg)
        self.hparams = build_hparams(cfg)
        self.spec = METHODS[cfg.method.name]
        hparams_dict = jsonable(self.hparams.to_dict())
        hp_path = self.dir / HPARAMS_FILE
        if hp_path.exists():
            compare_configs(yaml.safe_load(hp_path.read_text(encoding="utf-8")), hparams_dict, hp_path)
        if not config_path.exists():
            ckpt.atomic_write_text(config_path, OmegaConf.to_yaml(cfg, resolve=True))
        ckpt.atomic_write_text(hp_path, yaml.safe_dump(hparams_dict, sort_keys=False))
        logger.info("run %s: %s on %s, %s, %d edit(s) in steps of %d", self.dir, method_label(cfg), cfg.model.id,
                    cfg.data.name, cfg.num_edits, cfg.batch_size)

        torch.set_num_threads(cfg.num_threads)
        ckpt.set_seed(cfg.seed)
        self.model, self.tok = load_model(cfg.model)
        try:
            self.hparams.check_model(self.model)
        except ValueError as exc:
            raise ExperimentError(f"{hparams_path(cfg)}: {exc}") from None
        self._warm_caches()
        self.reference = self._locality_reference()
        self._restore_or_start()
        self._edit_loop()
        return self._finish()

    def _holds_edits(self) -> bool:
        """Whether the run folder holds anything computed by an edit (results, a checkpoint, a summary)."""
        results = self.dir / RESULTS_FILE
        return ((results.exists() and results.stat().st_size > 0) or (self.dir / CHECKPOINT_FILE).exists()
                or (self.dir / SUMMARY_FILE).exists())

    def _completed_summary(self) -> dict | None:
        path = self.dir / SUMMARY_FILE
        if not path.exists():
            return None
        summary = ckpt.read_json_if_valid(path)
        if not summary or not summary.get("complete"):
            return None
        results = self.dir / RESULTS_FILE
        try:
            records = ckpt.read_jsonl(results) if results.exists() else []
        except ckpt.CorruptFileError as exc:
            raise ExperimentError(f"{exc}: the run is complete but its per-edit results are damaged; restore the "
                                  f"line or delete {self.dir} to run it again") from None
        if len(records) != summary.get("steps"):
            raise ExperimentError(f"{results}: {len(records)} complete line(s) for the {summary.get('steps')} "
                                  f"step(s) of the complete run; restore it or delete {self.dir} to run it again")
        logger.info("run %s is already complete (%s); nothing to do", self.dir, path)
        self._cleanup(final=True)
        return summary

    # ------------------------------------------------------------------------------------------ preparation
    def _warm_caches(self) -> None:
        """Context templates and key statistics on the original model, so no edit pays for them and a resumed run
        sees exactly what an uninterrupted one does; then W₀ of every touchable layer."""
        hp, model = self.hparams, self.model
        layers = touchable_layers(hp, num_layers(model))
        start = time.perf_counter()
        if hasattr(hp, "context_template_length_params"):
            context_templates(model, self.tok, hp.context_template_length_params, hp.seed)
        if getattr(hp, "USES_KEY_STATISTICS", False) and layers:
            second_moments(model, self.tok, layers, hp)
        modules = [hp.rewrite_module_tmp.format(layer) for layer in layers]
        self.originals = {m: read_weight(model, m).detach().to("cpu", copy=True) for m in modules}
        logger.info("caches warmed on the original model for layers %s in %.1f s", layers,
                    time.perf_counter() - start)

    def _locality_reference(self) -> OriginalOutputs:
        """The original model's locality outputs for every request: computed once, kept in the run directory."""
        path = self.dir / REFERENCE_FILE
        digest = requests_digest(self.requests)
        if path.exists():
            saved = ckpt.read_json_if_valid(path) or {}
            if saved.get("digest") == digest:
                return OriginalOutputs({text: (tuple(pair[0]), tuple(pair[1]))
                                        for text, pair in saved["predictions"].items()})
        reference = cache_locality_reference(self.model, self.tok, self.requests, self.cfg.eval_batch_size,
                                             self.cfg.progress)
        ckpt.atomic_write_json(path, {"digest": digest, "predictions": {
            text: [list(labels), list(argmax)] for text, (labels, argmax) in reference.predictions.items()}})
        return reference

    def _restore_or_start(self) -> None:
        path = self.dir / CHECKPOINT_FILE
        digest = requests_digest(self.requests)
        if path.exists():
            payload = ckpt.load_checkpoint(path)
            state = payload["state"]
            if state.get("digest") != digest:
                raise ExperimentError(f"{path} was written for other requests; remove the run directory")
            for module in state["touched"]:  # W₀ of modules outside the touchable layers, before restoring
                if module not in self.originals:
                    self.originals[module] = read_weight(self.model, module).detach().to("cpu", copy=True)
            ckpt.restore_checkpoint(self.model, payload)
            self.state = state
            self.state["resumes"] = state.get("resumes", 0) + 1
            ckpt.atomic_write_jsonl(self.dir / RESULTS_FILE, self.state["records"])
            logger.info("resumed %s at %d/%d edit(s) (phase %s)", self.dir, state["edits_done"],
                        self.cfg.num_edits, state["phase"])
            return
        self.state = {
            "digest": digest, "phase": "edit", "steps_done": 0, "edits_done": 0, "records": [],
            "touched": [], "parameters": [], "stale": [], "stability": {}, "general_before": None,
            "stability_original": {}, "wall_seconds": 0.0, "resumes": 0,
        }
        for module, weight in self.originals.items():
            self.state["stability_original"][module] = weight_stability(weight, None, self.cfg.stability_dtype)
        if general_enabled(self.cfg):
            start = time.perf_counter()
            self.state["general_before"] = self._general_before()
            logger.info("general abilities before editing: %s (%.1f s)", self.state["general_before"],
                        time.perf_counter() - start)
        for stale in (RESULTS_FILE, FINAL_PARTIAL_FILE):  # left by an attempt killed before its first checkpoint
            if (self.dir / stale).exists():
                (self.dir / stale).unlink()
        self._checkpoint()

    # ------------------------------------------------------------------------------------------- edit loop
    def _session(self):
        sessions = self.model.__dict__.get(SESSIONS_ATTRIBUTE, {})
        if self.spec.name in sessions:
            return sessions[self.spec.name]
        return next(iter(sessions.values())) if len(sessions) == 1 else None

    def _edit_loop(self) -> None:
        cfg, state = self.cfg, self.state
        steps = cfg.num_edits // cfg.batch_size
        if state["steps_done"] >= steps:
            return
        with logging_redirect_tqdm(), tqdm(total=steps, initial=state["steps_done"], unit="step",
                                           desc=f"{cfg.method.name} edits (b={cfg.batch_size})",
                                           disable=not cfg.progress, dynamic_ncols=True) as bar:
            for step in range(state["steps_done"], steps):
                record = self._edit_step(step, steps)
                bar.update(1)
                curve = record.get("curve")
                if curve:
                    bar.set_postfix(rel=f"{curve.get('reliability', math.nan):.3f}",
                                    loc=f"{curve.get('locality', math.nan):.3f}")

    def _edit_step(self, step: int, steps: int) -> dict:
        cfg, state, model = self.cfg, self.state, self.model
        b = cfg.batch_size
        batch = self.requests[step * b:(step + 1) * b]
        session = self._session()
        history_before = len(session.history) if session is not None else 0
        start = time.perf_counter()
        _, weights_copy = self.spec.apply(model, self.tok, batch, self.hparams, return_orig_weights=True)
        edit_seconds = time.perf_counter() - start
        written = self._note_written(weights_copy)
        increments = self._record_increments(step + 1, weights_copy) if cfg.record_increments else None
        del weights_copy
        session = self._session()
        entry = session.history[-1] if session is not None and len(session.history) > history_before else {}
        edits = (step + 1) * b
        record: dict[str, Any] = {"step": step + 1, "edits": edits,
                                  "case_ids": [r.get("case_id", step * b + i) for i, r in enumerate(batch)],
                                  "modules": written}
        diagnostics = jsonable({k: v for k, v in entry.items() if k not in ("seconds", "per_layer")})
        per_layer = method_layer_diagnostics(entry)
        if per_layer:
            diagnostics["per_layer"] = {str(k): v for k, v in per_layer.items()}
        record["method"] = diagnostics
        if increments is not None:
            record["increments"] = {module: {"rank": rank, "dropped": dropped}
                                    for module, (rank, dropped) in increments.items()}
        # the step's own facts right after their edit (one forward pass): set against the curve's retention, it
        # tells edits that failed when made from edits lost to later ones
        begin = time.perf_counter()
        accuracy = token_accuracy(model, self.tok, [r["prompt"] for r in batch], [r["target_new"] for r in batch],
                                  cfg.eval_batch_size, progress=False)
        record["immediate"] = {"reliability": sum(accuracy) / len(accuracy),
                               "strict_reliability": sum(a == 1.0 for a in accuracy) / len(accuracy)}
        immediate_seconds = time.perf_counter() - begin
        stages = {stage: float(value) for stage, value in entry.get("seconds", {}).items() if stage != "total"}
        seconds = {"keys": 0.0, "targets": 0.0, "update": 0.0, **stages, "edit": edit_seconds,
                   "immediate": immediate_seconds}
        last = step + 1 == steps
        if last or (cfg.stability_every and (step + 1) % cfg.stability_every == 0):
            begin = time.perf_counter()
            record["stability"] = self._stability()
            seconds["stability"] = time.perf_counter() - begin
        evaluated = False
        begin = time.perf_counter()
        if crossed(edits, b, curve_every(cfg)):
            record["curve"] = self._curve(edits)
            evaluated = True
        if general_enabled(cfg) and crossed(edits, b, cfg.general_every):
            record["general"] = self._general()
            evaluated = True
        seconds["evaluation"] = time.perf_counter() - begin if evaluated else 0.0
        record["seconds"] = seconds
        state["records"].append(record)
        state["steps_done"], state["edits_done"] = step + 1, edits
        with open(self.dir / RESULTS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        logger.debug("step %d/%d: %s", step + 1, steps, record)
        if last or evaluated or crossed(edits, b, cfg.checkpoint_every):
            if last:
                state["phase"] = "final"
            self._checkpoint()
            logger.info("%d/%d edit(s) done, %.2f s/edit so far%s", edits, cfg.num_edits,
                        sum(r["seconds"]["edit"] for r in state["records"]) / edits,
                        f"; curve {record['curve']}" if "curve" in record else "")
        else:
            self._write_progress()
        return record

    def _note_written(self, weights_copy: Mapping[str, torch.Tensor]) -> list[str]:
        """Record which parameters the step wrote; W₀ of a module first written outside the touchable layers is
        its pre-edit copy from ``weights_copy``."""
        state, written = self.state, []
        for name, (module, previous) in self._pre_edit_weights(weights_copy).items():
            if name not in state["parameters"]:
                state["parameters"].append(name)
            if module not in self.originals:
                self.originals[module] = previous.to("cpu", copy=True)
                state["stability_original"][module] = weight_stability(self.originals[module], None,
                                                                       self.cfg.stability_dtype)
            if module not in state["touched"]:
                state["touched"].append(module)
            if module not in state["stale"]:
                state["stale"].append(module)
            written.append(module)
        return written

    def _pre_edit_weights(self, weights_copy: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, torch.Tensor]]:
        """``{parameter name: (module, its pre-edit weight in (out, in) orientation)}`` of a step's
        ``weights_copy`` (GPT-2's Conv1D stores (in, out))."""
        out = {}
        for name, previous in weights_copy.items():
            module = name[:-len(".weight")] if name.endswith(".weight") else name
            value = previous.detach()
            out[name] = (module, value.T if is_conv1d(get_module(self.model, module)) else value)
        return out

    def _record_increments(self, step: int, weights_copy: Mapping[str, torch.Tensor]) -> dict:
        """The step's ΔW of every module it wrote, as low-rank factors under ``increments/`` (Figure 5)."""
        from .increments import record_step  # here, so `python -m ...increments` finds it unimported

        deltas = {module: read_weight(self.model, module).double().cpu() - before.double().cpu()
                  for module, before in self._pre_edit_weights(weights_copy).values()}
        return record_step(self.dir, step, deltas)

    def _stability(self) -> dict[str, dict]:
        """Stability of every module touched so far; only the ones written since the last measurement are
        recomputed."""
        state = self.state
        for module in state["stale"]:
            state["stability"][module] = weight_stability(read_weight(self.model, module), self.originals[module],
                                                          self.cfg.stability_dtype)
        state["stale"] = []
        return {module: dict(state["stability"][module]) for module in state["touched"]}

    def _curve(self, edits: int) -> dict:
        indices = curve_indices(edits, self.cfg.curve_facts)
        chosen = [self.requests[i] for i in indices]
        results = evaluate_requests(self.model, self.tok, chosen, self.reference, self.cfg.eval_batch_size,
                                    progress=False)
        return {"edits": edits, **summarize(results)}

    def _general_before(self) -> dict[str, float]:
        """The unedited model's general-task scores; with ``general_cache`` they are computed once per weights,
        tasks, subset and data files and shared by every run on this machine (``$MOSE_EASYEDIT_CACHE/general``)."""
        if not self.cfg.general_cache:
            return self._general()
        cfg = self.cfg
        key = {"model": model_identity(self.model), "weights": weights_digest(self.model), "protocol": PROTOCOL,
               "tasks": list(cfg.general_tasks), "subset": cfg.general_subset_size, "seed": cfg.general_seed,
               "batch": cfg.general_batch_size,
               "files": {task: file_digest(task_file(task, cfg.data_dir)) for task in cfg.general_tasks}}
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = cache_dir() / "general" / f"{key['model']}-{digest}.json"
        saved = ckpt.read_json_if_valid(path) if path.exists() else None
        if saved and "scores" in saved:
            logger.info("general abilities before editing read from %s", path)
            return saved["scores"]
        scores = self._general()
        path.parent.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_json(path, {"key": key, "scores": scores})
        return scores

    def _general(self) -> dict[str, float]:
        cfg = self.cfg
        try:
            return evaluate_general(self.model, self.tok, list(cfg.general_tasks), cfg.general_subset_size,
                                    cfg.general_seed, cfg.data_dir, cfg.general_batch_size, progress=cfg.progress)
        except (ValueError, FileNotFoundError) as exc:
            raise ExperimentError(f"general tasks (data_dir={cfg.data_dir}): {exc}") from None

    # -------------------------------------------------------------------------------------- checkpointing
    def _checkpoint(self) -> None:
        now = time.perf_counter()
        self.state["wall_seconds"] += now - self._mark
        self._mark = now
        self.state["checkpoint_edits"] = self.state["edits_done"]
        ckpt.save_checkpoint(self.dir / CHECKPOINT_FILE, self.model, self.state["parameters"], self.state)
        self._write_progress()

    def _write_progress(self, phase: str | None = None) -> None:
        ckpt.atomic_write_json(self.dir / PROGRESS_FILE, {
            "phase": phase or self.state["phase"], "edits_done": self.state["edits_done"],
            "steps_done": self.state["steps_done"], "num_edits": self.cfg.num_edits,
            "checkpoint_edits": self.state.get("checkpoint_edits", 0), "time": time.time()})

    def _cleanup(self, final: bool) -> None:
        names = [FINAL_PARTIAL_FILE, REFERENCE_FILE] if final else []
        if final and not self.cfg.keep_checkpoint:
            names.append(CHECKPOINT_FILE)
        for name in names:
            path = self.dir / name
            if path.exists():
                path.unlink()

    # ---------------------------------------------------------------------------------------- final phase
    def _finish(self) -> dict:
        cfg, state = self.cfg, self.state
        partial_path = self.dir / FINAL_PARTIAL_FILE
        partial = {"digest": state["digest"], "facts": [], "general": None, "seconds": 0.0}
        if partial_path.exists():
            saved = ckpt.read_json_if_valid(partial_path) or {}
            if saved.get("digest") == state["digest"]:
                partial = saved
        self._write_progress("final")
        total = len(self.requests)
        chunk = cfg.final_eval_chunk
        with logging_redirect_tqdm(), tqdm(total=total, initial=len(partial["facts"]), unit="fact",
                                           desc="retention after the last edit", disable=not cfg.progress,
                                           dynamic_ncols=True) as bar:
            for begin in range(len(partial["facts"]), total, chunk):
                start = time.perf_counter()
                facts = evaluate_requests(self.model, self.tok, self.requests[begin:begin + chunk], self.reference,
                                          cfg.eval_batch_size, progress=False)
                partial["facts"].extend(facts)
                partial["seconds"] += time.perf_counter() - start
                ckpt.atomic_write_json(partial_path, partial)
                bar.update(len(facts))
        if general_enabled(cfg) and partial["general"] is None:
            last = state["records"][-1] if state["records"] else {}
            if "general" in last and last["edits"] == cfg.num_edits:
                partial["general"] = last["general"]
            else:
                start = time.perf_counter()
                partial["general"] = self._general()
                partial["seconds"] += time.perf_counter() - start
            ckpt.atomic_write_json(partial_path, partial)
        now = time.perf_counter()
        state["wall_seconds"] += now - self._mark
        self._mark = now

        for record in state["records"]:
            first = (record["step"] - 1) * cfg.batch_size
            record["retention"] = partial["facts"][first:first + cfg.batch_size]
        ckpt.atomic_write_jsonl(self.dir / RESULTS_FILE, state["records"])
        summary = self._summary(partial)
        try:
            summary["plots"] = plot_run(self.dir, state["records"], summary)
        except Exception:  # plots can be redrawn from results.jsonl; never lose a finished run to them
            logger.exception("plotting failed; results are kept")
            summary["plots"] = []
        ckpt.atomic_write_json(self.dir / SUMMARY_FILE, summary)
        self._write_progress("complete")
        self._cleanup(final=True)
        logger.info("run complete: %s — reliability %.4f, generalization %.4f, locality %.4f, %.2f s/edit",
                    self.dir, summary["metrics"].get("reliability", math.nan),
                    summary["metrics"].get("generalization", math.nan), summary["metrics"].get("locality", math.nan),
                    summary["time"]["sec_per_edit"])
        return summary

    def _summary(self, partial: Mapping) -> dict:
        cfg, state, records = self.cfg, self.state, self.state["records"]
        n = cfg.num_edits

        def per_edit(key: str) -> float:
            return sum(r["seconds"].get(key, 0.0) for r in records) / n

        final_stability = records[-1].get("stability", {}) if records else {}
        original = {m: state["stability_original"][m] for m in final_stability}
        rho = [v["rho"] for r in records for v in r["method"].get("per_layer", {}).values() if "rho" in v]
        fit = [v["fit_error"] for r in records for v in r["method"].get("per_layer", {}).values()
               if "fit_error" in v]
        general_curve = [{"edits": 0, **state["general_before"]}] if state.get("general_before") else []
        general_curve += [{"edits": r["edits"], **r["general"]} for r in records if "general" in r]
        if partial.get("general") and (not general_curve or general_curve[-1]["edits"] != n):
            general_curve.append({"edits": n, **partial["general"]})
        return {
            "complete": True,
            "method": cfg.method.name,
            "label": method_label(cfg),
            "model": cfg.model.id,
            "data": cfg.data.name,
            "num_edits": n,
            "batch_size": cfg.batch_size,
            "steps": len(records),
            "seed": cfg.seed,
            "ablation": cfg.ablation,
            "metrics": summarize(partial["facts"]),
            "general": {"before": state.get("general_before"), "after": partial.get("general"),
                        "curve": general_curve},
            "curve": [r["curve"] for r in records if "curve" in r],
            "stability": {
                "layers": {m: self._layer_of(m) for m in final_stability},
                "original": original,
                "final": final_stability,
                **summarize_stability(original, final_stability),
            },
            "method_diagnostics": {
                "rho_mean": float(np.mean(rho)) if rho else None,
                "rho_max": float(np.max(rho)) if rho else None,
                "fit_error_mean": float(np.mean(fit)) if fit else None,
                "fit_error_max": float(np.max(fit)) if fit else None,
                "layer_counts": self._layer_counts(records),
            },
            "time": {
                "sec_per_edit": per_edit("edit"),
                "keys_per_edit": per_edit("keys"),
                "targets_per_edit": per_edit("targets"),
                "update_per_edit": per_edit("update"),
                "stability_per_edit": per_edit("stability"),
                "evaluation_per_edit": per_edit("evaluation"),
                "final_evaluation_seconds": partial.get("seconds", 0.0),
                "wall_seconds": state["wall_seconds"],
                "resumes": state.get("resumes", 0),
            },
            "hparams": jsonable(self.hparams.to_dict()),
            "output_dir": str(self.dir),
        }

    def _layer_of(self, module: str) -> int | None:
        template = getattr(self.hparams, "rewrite_module_tmp", None)
        for layer in range(num_layers(self.model)):
            if template and template.format(layer) == module:
                return layer
        return None

    @staticmethod
    def _layer_counts(records: Sequence[dict]) -> dict[str, int]:
        """How often each layer was edited (from the method's reported ``layers``)."""
        counts: dict[str, int] = {}
        for record in records:
            for layer in record["method"].get("layers") or []:
                counts[str(layer)] = counts.get(str(layer), 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: int(kv[0])))


def run(cfg: DictConfig) -> dict:
    """Run (or resume, or just report) the experiment ``cfg``; returns its summary."""
    return SequentialRun(cfg).execute()
