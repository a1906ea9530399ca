"""The shared locate-then-edit engine: every method is this loop plus one small update rule.

    validate requests → choose the layer window → target z at the window's top layer →
    for each layer in the window (ascending): keys K, current h, residual spread over the remaining layers,
    Update(W', state', diagnostics) = rule(batch, operands, state, hparams) → write W' →
    after the last layer: state'' = finish(state') → swap state'' into the session
    (or, on any error, restore every touched weight and keep the session's state as it was).

A rule is a pure function: the layer's tensors (:class:`LayerBatch`), the layer's cached operands
(:class:`Operands`: C, its Cholesky factor, a null-space projector), the method's carried state (one frozen
dataclass per method) and the hyperparameters in, an :class:`Update` out. It never sees the model or the call.

``apply_method`` implements EasyEdit's ``apply_algo`` contract: it edits in place and returns
``(model, weights_copy)``.
"""
from __future__ import annotations

import copy as copy_module
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from .keys import BlockInputs, bare_rows, context_templates, encode_rows, family_mean, trace_at_subject
from .modeling import get_module, num_layers, read_weight, write_weight
from .requests import EditRequest, validate_requests
from .session import EditSession, get_session
from .stats import second_moments
from .targets import TargetResult, optimize_targets

logger = logging.getLogger(__name__)


@dataclass
class LayerBatch:
    """Everything an update rule needs at one layer of the window.

    ``W`` (d, p) float64 current weight; ``K`` (p, n) template-mean keys; ``K_bare`` (p, n) bare-prompt keys;
    ``residual`` (d, n) the share of z − h this layer must deliver; ``values`` = W K + residual.
    """

    layer: int
    module: str
    W: torch.Tensor
    K: torch.Tensor
    K_bare: torch.Tensor
    residual: torch.Tensor
    position: int
    window: list[int]

    @property
    def values(self) -> torch.Tensor:
        return self.W @ self.K + self.residual


@dataclass(frozen=True)
class Operands:
    """A layer's cached operands, fetched by the method for its rule: ``C`` (p, p) the key second moment on the
    weight's device, ``C_factor`` its Cholesky factor (None: not positive definite), ``P`` a null-space projector
    of C and ``P_rank`` its rank, ``shield`` an orthonormal basis of the earlier edits' keys inside P's range
    (the input side)."""

    C: Optional[torch.Tensor] = None
    C_factor: Optional[torch.Tensor] = None
    P: Optional[torch.Tensor] = None
    P_rank: Optional[int] = None
    shield: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Update:
    """What a rule returns: the layer's new weight (d, p) float64, the carried state after this layer, and the
    layer's diagnostics."""

    weight: torch.Tensor
    state: Any = None
    diagnostics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class NoState:
    """The carried state of a method that carries nothing between calls."""


@dataclass
class EditContext:
    """One call's view of the model: cached templates and statistics, weight backup, timings, diagnostics."""

    model: torch.nn.Module
    tok: object
    hparams: object
    session: EditSession
    requests: list[EditRequest]
    state: Any = None  # the method's carried state as this call has advanced it so far
    backup: dict[str, torch.Tensor] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=lambda: {"keys": 0.0, "reach": 0.0, "targets": 0.0,
                                                               "update": 0.0})
    diagnostics: dict = field(default_factory=dict)
    # operands a method computes once per call and reads twice (for the reach projection and for its rule)
    memo: dict = field(default_factory=dict)

    @property
    def families(self) -> list[list[str]]:
        return context_templates(self.model, self.tok, self.hparams.context_template_length_params,
                                 self.hparams.seed)

    def module(self, layer: int) -> str:
        return self.hparams.rewrite_module_tmp.format(layer)

    @contextmanager
    def timed(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def weight(self, layer: int) -> torch.Tensor:
        """Current weight of the layer's rewrite module, (out, in), as float64."""
        return read_weight(self.model, self.module(layer)).double()

    def write(self, layer: int, value: torch.Tensor) -> None:
        """Write a new (out, in) weight, backing up the original first (for rollback and ``weights_copy``)."""
        module = self.module(layer)
        if module not in self.backup:
            self.backup[module] = get_module(self.model, module).weight.detach().clone()
        write_weight(self.model, module, value)

    def second_moments(self, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        with self.timed("keys"):
            return second_moments(self.model, self.tok, layers, self.hparams)

    def keys(self, layers: Sequence[int], output_layer: int | None = None, resume: BlockInputs | None = None):
        """Template-mean keys ``{layer: (p, n)}``, bare-prompt keys, and (if ``output_layer``) the current block
        output h at the bare prompts ``(d, n)`` — all in one forward pass that stops as early as possible. With
        ``resume`` the pass starts at the block input it kept from the previous pass and keeps the input of the
        lowest keyed layer's block for the next one."""
        hp = self.hparams
        with self.timed("keys"):
            rows, index = encode_rows(self.tok, self.requests, self.families)
            inputs = [self.module(layer) for layer in layers]
            outputs = [hp.layer_module_tmp.format(output_layer)] if output_layer is not None else []
            deepest = max(list(layers) + ([output_layer] if output_layer is not None else []))
            traced = trace_at_subject(self.model, self.tok, rows, inputs, outputs,
                                      hp.layer_module_tmp.format(deepest), hp.chunk_size, resume, min(layers))
            bare = bare_rows(index)
            keys = {layer: family_mean(traced[("input", self.module(layer))], index).double() for layer in layers}
            keys_bare = {layer: traced[("input", self.module(layer))][bare].T.double() for layer in layers}
            h = traced[("output", outputs[0])][bare].T.double() if outputs else None
        return keys, keys_bare, h

    def targets(self, layer: int, clamp_reference: str = "residual", project=None) -> TargetResult:
        with self.timed("targets"):
            return optimize_targets(self.model, self.tok, self.requests, layer, self.hparams, self.families,
                                    clamp_reference, project=project)


Rule = Callable[[LayerBatch, Operands, Any, Any], Update]


def spread_update(ctx: EditContext, window: Sequence[int], method: "Method", target: TargetResult) -> None:
    """MEMIT's multi-layer spreading: visit the window's layers in ascending order; at each, recompute keys and
    the current h at the top layer (lower layers already updated) and hand the rule the residual
    (z − h) / (layers remaining). Only the visited layer changes between two passes, so each pass starts at the
    previous layer's block (the blocks below it are unchanged) where the model family allows."""
    window = sorted(window)
    resume = BlockInputs(ctx.model, ctx.hparams.layer_module_tmp)
    for position, layer in enumerate(window):
        keys, keys_bare, h = ctx.keys([layer], output_layer=target.layer, resume=resume)
        W = ctx.weight(layer)
        residual = (target.z.double().to(W.device) - h.to(W.device)) / (len(window) - position)
        batch = LayerBatch(layer, ctx.module(layer), W, keys[layer].to(W.device), keys_bare[layer].to(W.device),
                           residual, position, list(window))
        with ctx.timed("update"):
            update = method.rule(batch, method.operands(ctx, layer, W), ctx.state, ctx.hparams)
            if not torch.isfinite(update.weight).all():
                raise FloatingPointError(f"{ctx.session.method}: update of layer {layer} is not finite")
            ctx.write(layer, update.weight)
            ctx.state = update.state
            method.record(ctx, batch, update.diagnostics)


class Method:
    """A locate-then-edit method on the shared core: a window, a clamp reference, the operands its rule reads,
    the rule itself (a pure function, ``rule = staticmethod(...)``) and the type of its carried state."""

    name: str = ""
    hparams_class: type = object
    clamp_reference: str = "residual"
    state_class: type = NoState
    rule: Rule

    def window(self, ctx: EditContext) -> list[int]:
        return sorted(ctx.hparams.layers)

    # the per-layer diagnostics an experiment summary averages over a run
    summary_diagnostics: tuple[str, ...] = ("rho", "fit_error")
    # the layer-choice ablations (paper §6.4) the method supports; see :meth:`ablation`
    ablations: tuple[str, ...] = ()

    def operands(self, ctx: EditContext, layer: int, W: torch.Tensor) -> Operands:
        """The layer's cached operands on ``W``'s device; default: none."""
        return Operands()

    def touchable_layers(self, hparams, total: int) -> list[int]:
        """Every layer an edit with ``hparams`` may write, on a model of ``total`` layers."""
        return sorted(layer for layer in hparams.layers if 0 <= layer < total)

    def ablation(self, which: str, fixed_layer: Optional[int]) -> dict:
        """The hyperparameter changes of the layer-choice ablation ``which`` (one of :attr:`ablations`)."""
        raise ValueError(f"{self.name} has no layer selection to ablate")

    def record(self, ctx: EditContext, batch: LayerBatch, diagnostics: dict) -> None:
        """Where a layer's diagnostics go in the call's record; default: ``per_layer[layer]``."""
        ctx.diagnostics.setdefault("per_layer", {})[batch.layer] = diagnostics

    def reach(self, ctx: EditContext, window: list[int]) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The projection of the target optimisation's δ onto what the rule can deliver (``target_reach``);
        None: unconstrained."""
        return None

    def checked_window(self, ctx: EditContext) -> list[int]:
        """:meth:`window`, refused when it reaches the last layer (a change there cannot influence later tokens)."""
        window = self.window(ctx)
        if max(window) >= num_layers(ctx.model) - 1:
            raise ValueError(f"{self.name}: layer window {window} reaches the last layer; a change there cannot "
                             f"influence later tokens, so the top edited layer must be below "
                             f"{num_layers(ctx.model) - 1}")
        return window

    def edit(self, ctx: EditContext) -> None:
        window = self.checked_window(ctx)
        with ctx.timed("reach"):  # building the projection; applying it at every step counts as "targets"
            project = self.reach(ctx, window)
        target = ctx.targets(max(window), self.clamp_reference, project)
        ctx.diagnostics.update(layers=window, target_loss=target.losses, target_steps=target.steps,
                               delta_norm=target.delta.norm(dim=0).tolist())
        spread_update(ctx, window, self, target)

    def finish(self, ctx: EditContext, state):
        """The carried state after the call's last layer (e.g. AlphaEdit's moment grown by the batch's keys);
        may still write weights (PRUNE's restraint). Default: ``state`` as the rule left it."""
        return state

    def apply(self, model, tok, requests, hparams, copy: bool = False, return_orig_weights: bool = False,
              **kwargs):
        """EasyEdit's ``apply_algo``: edit ``model`` in place; return ``(model, weights_copy)``.

        The edit is atomic: on any error every touched weight is restored bit for bit and the session's state is
        left as it was. Extra keyword arguments from EasyEdit (``train_ds``, ``keep_original_weight``, ...) are
        accepted and ignored.
        """
        if not isinstance(hparams, self.hparams_class):
            raise TypeError(f"{self.name} needs {self.hparams_class.__name__}, got {type(hparams).__name__}")
        normalised = validate_requests(requests)
        hparams.check_model(model)
        if copy:
            model = copy_module.deepcopy(model)
        session = kwargs.get("session") or get_session(model, self.name)
        state = session.state if isinstance(session.state, self.state_class) else self.state_class()
        ctx = EditContext(model, tok, hparams, session, normalised, state=state)
        start = time.perf_counter()
        try:
            self.edit(ctx)
            state = self.finish(ctx, ctx.state)
        except BaseException:
            with torch.no_grad():
                for module, original in ctx.backup.items():
                    get_module(model, module).weight.copy_(original)
            raise
        session.state = state
        session.num_edits += len(normalised)
        session.record_weights(model, ctx.backup)
        ctx.diagnostics.update(num_requests=len(normalised), edit_index=session.num_edits,
                               seconds={**ctx.timings, "total": time.perf_counter() - start})
        session.history.append(ctx.diagnostics)
        logger.debug("%s edit %d: %s", self.name, session.num_edits, ctx.diagnostics)
        weights_copy = {}
        if return_orig_weights:
            weights_copy = {f"{module}.weight": value for module, value in ctx.backup.items()}
        return model, weights_copy
