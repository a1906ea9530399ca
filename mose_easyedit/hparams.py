"""Typed hyperparameter dataclasses with EasyEdit-style ``from_hparams(path)``.

Every key is checked: an unknown, missing or ill-typed key raises ``ValueError`` naming the key and the file.
``LocateEditHyperParams`` holds what the shared locate-then-edit core reads (module templates, target
optimisation, covariance statistics); each method adds its own fields in a subclass.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import yaml

logger = logging.getLogger(__name__)
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
# The shipped YAMLs, package data (``hparams/`` in a checkout links here), one folder per method.
HPARAMS_ROOT = Path(__file__).resolve().parent / "hparams_files"
EARLY_STOPS = ("loss", "nll", "most_probable")
# Names under which EasyEdit has a method of its own: our classes keep ours reachable there as "X-core".
EASYEDIT_OWN_METHODS = ("ROME", "MEMIT", "EMMET", "AlphaEdit")


def _with_suffix(base: Path) -> list[Path]:
    return [base] if base.suffix in (".yaml", ".yml") else [base, base.with_name(base.name + ".yaml")]


def _resolve_path(path: str | Path, alg_name: str) -> Path:
    """``path`` as given (``.yaml`` optional), else a shipped YAML: a bare name in ``<alg_name>/``, or
    ``METHOD/name`` (also written ``hparams/METHOD/name``, as in the README), from any working directory."""
    given = Path(path)
    parts = given.parts[1:] if given.parts[:1] == ("hparams",) else given.parts
    bases = [given]
    if not given.is_absolute():
        if len(parts) == 1 and alg_name:
            bases.append(HPARAMS_ROOT / alg_name / parts[0])
        bases.append(HPARAMS_ROOT.joinpath(*parts))
    candidates = list(dict.fromkeys(c for base in bases for c in _with_suffix(base)))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    pattern = f"{alg_name}/*.yaml" if alg_name and (HPARAMS_ROOT / alg_name).is_dir() else "*/*.yaml"
    shipped = sorted(p.relative_to(HPARAMS_ROOT).with_suffix("").as_posix() for p in HPARAMS_ROOT.glob(pattern))
    raise FileNotFoundError(f"hyperparameter file not found: {path} (looked for {', '.join(map(str, candidates))}; "
                            f"shipped: {', '.join(shipped)})")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str, source: str):
    """Check ``value`` against the annotation ``tp`` (int, float, str, bool, list[...], Optional/Union)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, key, source)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(f"{source}: key '{key}' = {value!r} is not {_type_name(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{source}: key '{key}' must be a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{source}: key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{source}: key '{key}' must be true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{source}: key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.match(value.strip()):  # PyYAML reads 1e-3 as a string
            return float(value)
        raise ValueError(f"{source}: key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{source}: key '{key}' must be a string, got {value!r}")
    return value


@dataclasses.dataclass(kw_only=True)
class HyperParams:
    """Fields EasyEdit's BaseEditor reads, shared by every method."""

    ALG_NAMES: ClassVar[tuple[str, ...]] = ()

    alg_name: str
    model_name: str = ""
    device: Union[int, str] = 0
    model_parallel: bool = False
    max_length: int = 40
    batch_size: int = 1
    fp16: bool = False

    @classmethod
    def from_dict(cls, config: dict, source: str = "<dict>"):
        if not isinstance(config, dict):
            raise ValueError(f"{source}: expected a mapping of hyperparameters, got {type(config).__name__}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - set(fields))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))} for {cls.__name__}")
        missing = [name for name, f in fields.items() if name not in config
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"{source}: missing key(s) {', '.join(map(repr, missing))} for {cls.__name__}")
        values = {key: _coerce(value, hints[key], key, source) for key, value in config.items()}
        if cls.ALG_NAMES and values["alg_name"] not in cls.ALG_NAMES:
            raise ValueError(f"{source}: alg_name {values['alg_name']!r} is not one of {list(cls.ALG_NAMES)}")
        if values["alg_name"] in EASYEDIT_OWN_METHODS:
            # EasyEdit's BaseEditor would run its own method under the bare name: ours is always "X-core"
            values["alg_name"] += "-core"
            logger.debug("%s: alg_name %s read as %s (our implementation under EasyEdit)", source,
                         config["alg_name"], values["alg_name"])
        hparams = cls(**values)
        hparams.validate(source)
        return hparams

    @classmethod
    def from_hparams(cls, path: str | Path):
        """Load a YAML file: a path (``.yaml`` optional), a bare name of a shipped file for this method
        (``"smollm2-135m"``) or ``"METHOD/name"``."""
        default_alg = cls.ALG_NAMES[0] if cls.ALG_NAMES else ""
        resolved = _resolve_path(path, default_alg)
        with open(resolved, encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
        return cls.from_dict(config, str(resolved))

    def validate(self, source: str = "<hparams>") -> None:
        """Checks that need no model; subclasses extend."""
        if self.batch_size < 1:
            raise ValueError(f"{source}: key 'batch_size' must be >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(kw_only=True)
class LocateEditHyperParams(HyperParams):
    """What the shared locate-then-edit core reads."""

    # Whether the method reads the key statistics C (the experiment runner warms them only then).
    USES_KEY_STATISTICS: ClassVar[bool] = True

    # Layers: the edited window (fixed-layer methods) or the fallback window (MOSE with selection off).
    layers: list[int]
    # Module templates ("{}" is the layer index), as in EasyEdit.
    rewrite_module_tmp: str = "model.layers.{}.mlp.down_proj"
    layer_module_tmp: str = "model.layers.{}"
    mlp_module_tmp: str = "model.layers.{}.mlp"
    attn_module_tmp: str = "model.layers.{}.self_attn"
    ln_f_module: str = "model.norm"
    lm_head_module: str = "lm_head"
    fact_token: str = "subject_last"
    # Target values (MEMIT's compute_z).
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_loss_layer: Optional[int] = None
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    target_early_stop: float = 5e-2
    # When the target optimisation stops: "loss" (EasyEdit: NLL + KL + decay below target_early_stop), "nll"
    # (the edit term alone below it) or "most_probable" (ENCORE's MPES: every target token is the argmax in every
    # rewriting prompt, by at least target_margin in probability).
    early_stop_on: str = "loss"
    target_margin: float = 0.0
    context_template_length_params: list[list[int]] = dataclasses.field(default_factory=lambda: [[10, 5]])
    # Covariance statistics of keys.
    mom2_adjustment: bool = True
    mom2_dataset: str = "generated"
    mom2_n_samples: int = 1000
    mom2_sample_length: int = 128
    mom2_dtype: str = "float32"
    mom2_update_weight: float = 15000.0
    stats_dir: Optional[str] = None
    # Runtime.
    seed: int = 0
    chunk_size: int = 64
    show_progress: bool = False

    def validate(self, source: str = "<hparams>") -> None:
        super().validate(source)
        if not self.layers:
            raise ValueError(f"{source}: key 'layers' must list at least one layer")
        if self.fact_token != "subject_last":
            raise ValueError(f"{source}: key 'fact_token' supports only 'subject_last', got {self.fact_token!r}")
        if self.early_stop_on not in EARLY_STOPS:
            raise ValueError(f"{source}: key 'early_stop_on' must be one of {list(EARLY_STOPS)}, "
                             f"got {self.early_stop_on!r}")
        if not 0.0 <= self.target_margin < 1.0:
            raise ValueError(f"{source}: key 'target_margin' must be in [0, 1), got {self.target_margin}")
        if self.mom2_dtype not in ("float32", "float64"):
            raise ValueError(f"{source}: key 'mom2_dtype' must be float32 or float64")
        for key in ("v_num_grad_steps", "mom2_n_samples", "mom2_sample_length", "chunk_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{source}: key '{key}' must be >= 1")
        for key in ("v_lr", "clamp_norm_factor"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{source}: key '{key}' must be > 0")

    def check_model(self, model) -> None:
        """Checks against the model: layer indices in range, module templates resolvable."""
        from .modeling import get_module, num_layers

        n = num_layers(model)
        for key in self.layer_fields():
            for layer in getattr(self, key):
                if not 0 <= layer < n:
                    raise ValueError(f"hparams key '{key}': layer {layer} is outside the model's 0..{n - 1}")
        if self.v_loss_layer is not None and self.v_loss_layer != n - 1:
            raise ValueError(f"hparams key 'v_loss_layer' = {self.v_loss_layer}: targets are optimised through "
                             f"the whole model, so it must be the last layer ({n - 1}) or omitted")
        for template in (self.rewrite_module_tmp, self.layer_module_tmp):
            get_module(model, template.format(self.layers[0]))

    def layer_fields(self) -> tuple[str, ...]:
        return ("layers",)
