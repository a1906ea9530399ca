"""The experiment configuration: composing it (Hydra), checking it, and comparing a run folder's saved settings
with the current ones before a run resumes."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from ..data import DATA_ENV, load_conceptedit, load_counterfact, load_dataset, load_zsre
from ..general_tasks import TASKS, task_file
from ..methods import METHODS

logger = logging.getLogger("mose_easyedit.experiments.runner")

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


class ExperimentError(ValueError):
    """A configuration or data problem, reported as one clear message (the CLI exits with status 2)."""


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
