"""What MOSE's two sides share: the hyperparameters of layer selection and protection, the choice of the layer
window (paper Eq. 21–22), the carried state (keys of earlier edits, the output side's preservation moment, the
undo log) and undo.

The two update rules live beside this module: the paper's output side ``W ← R W`` in ``mose.py`` and the input
side ``W ← W Q`` in ``mose_input.py`` (docs/methods.md §1: layer selection §1.3, undo §1.6).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from ..cache import model_cache
from ..editor import EditContext, Method
from ..hparams import LocateEditHyperParams
from ..input_rotation import plane_rotate
from ..modeling import num_layers, read_weight, write_weight
from ..session import get_session

TARGET_REACH = ("free", "rotation")


@dataclasses.dataclass(kw_only=True)
class MOSESharedHyperParams(LocateEditHyperParams):
    """Fields both sides read; ``layers`` is the fixed window used when ``layer_selection`` is false."""

    # Eq. 21–22: pick l* per edit from candidate_layers; edit l* and `neighbours` layers on each side.
    layer_selection: bool = True
    candidate_layers: list[int] = dataclasses.field(default_factory=list)
    neighbours: int = 1
    # Preserve the outputs of keys edited earlier in the run (output side: weight γ on their K Kᵀ; the input
    # side keeps its planes orthogonal to them whatever these say).
    protect_edits: bool = True
    protect_weight: float = 1.0
    # How many edit calls can be undone (each keeps a float32 d×d rotation, or the input side's planes, per
    # edited layer on the CPU).
    undo_history: int = 32
    # Target optimisation: "free" (MEMIT's δ) or "rotation" (δ projected at every step onto what the window's
    # rotations can deliver).
    target_reach: str = "free"

    def validate(self, source: str = "<hparams>") -> None:
        super().validate(source)
        if self.layer_selection and not self.candidate_layers:
            raise ValueError(f"{source}: key 'candidate_layers' must list layers when layer_selection is true")
        if self.neighbours < 0:
            raise ValueError(f"{source}: key 'neighbours' must be >= 0")
        if self.protect_weight < 0:
            raise ValueError(f"{source}: key 'protect_weight' must be >= 0")
        if self.undo_history < 0:
            raise ValueError(f"{source}: key 'undo_history' must be >= 0")
        if self.target_reach not in TARGET_REACH:
            raise ValueError(f"{source}: key 'target_reach' must be one of {list(TARGET_REACH)}, "
                             f"got {self.target_reach!r}")

    def layer_fields(self) -> tuple[str, ...]:
        return ("layers", "candidate_layers") if self.layer_selection else ("layers",)


# ------------------------------------------------------------------------------------------------ carried state
@dataclasses.dataclass(frozen=True)
class RotationStep:
    """Undo of one output-side edit of one module: W ← Rᵀ W (R float32 on the CPU)."""

    R: torch.Tensor
    count: int

    def revert(self, weight: torch.Tensor) -> torch.Tensor:
        return self.R.to(weight.device, torch.float64).T @ weight


@dataclasses.dataclass(frozen=True)
class KeyRotationStep:
    """Undo of one input-side edit of one module by a whole p × p rotation: W ← W Qᵀ (Q float32 on the CPU)."""

    Q: torch.Tensor
    count: int

    def revert(self, weight: torch.Tensor) -> torch.Tensor:
        return weight @ self.Q.to(weight.device, torch.float64).T


@dataclasses.dataclass(frozen=True)
class PlaneSteps:
    """Undo of one input-side edit of one module: its planes ``(a, b, t)`` turned back, newest first."""

    planes: tuple
    count: int

    def revert(self, weight: torch.Tensor) -> torch.Tensor:
        for a, b, t in reversed(self.planes):
            weight = plane_rotate(weight, a.to(weight.device), b.to(weight.device), -t)
        return weight


@dataclasses.dataclass(frozen=True)
class MOSEState:
    """What a MOSE run carries between calls, per module: the keys of earlier edits (p × n, float32, CPU), the
    output side's preservation moment G = W (λC + γ K_p K_pᵀ) Wᵀ with the (λ, γ) it was built for, the undo log
    (one ``{module: step}`` per call, oldest first) and the steps of the call in progress."""

    protected_keys: dict = dataclasses.field(default_factory=dict)
    preservation: dict = dataclasses.field(default_factory=dict)
    undo_log: tuple = ()
    pending: dict = dataclasses.field(default_factory=dict)

    def earlier_keys(self, module: str, like: torch.Tensor) -> torch.Tensor:
        """The module's protected keys (p × n_p) in float64 on ``like``'s device; no columns if none."""
        keys = self.protected_keys.get(module)
        return like[:, :0] if keys is None else keys.to(like.device, torch.float64)

    def after_layer(self, module: str, K: torch.Tensor, step, preservation=None) -> "MOSEState":
        """The state once ``module`` was edited for keys ``K`` (undone by ``step``)."""
        K = K.float().cpu()
        old = self.protected_keys.get(module)
        keys = {**self.protected_keys, module: K if old is None else torch.cat([old, K], dim=1)}
        moments = self.preservation if preservation is None else {**self.preservation, module: preservation}
        return dataclasses.replace(self, protected_keys=keys, preservation=moments,
                                   pending={**self.pending, module: step})

    def close_call(self, undo_history: int) -> "MOSEState":
        """The call's steps become one undo entry; the log keeps the last ``undo_history``."""
        log = (self.undo_log + (self.pending,))[max(0, len(self.undo_log) + 1 - undo_history):]
        return dataclasses.replace(self, undo_log=log, pending={})

    def undone(self) -> tuple["MOSEState", dict]:
        """``(state without the newest call, that call's {module: step})``; G is rebuilt when next needed."""
        entry = self.undo_log[-1]
        keys = {module: (value[:, :value.shape[1] - entry[module].count] if module in entry else value)
                for module, value in self.protected_keys.items()}
        moments = {module: value for module, value in self.preservation.items() if module not in entry}
        return dataclasses.replace(self, protected_keys=keys, preservation=moments,
                                   undo_log=self.undo_log[:-1]), entry


# ----------------------------------------------------------------------------------------------- layer choice
def layer_window(center: int, neighbours: int, total: int) -> list[int]:
    """``center`` and ``neighbours`` layers on each side, shifted inward at the model's ends."""
    size = min(2 * neighbours + 1, total)
    start = min(max(center - neighbours, 0), total - size)
    return list(range(start, start + size))


def layer_scores(key_norms: dict[int, torch.Tensor], sigmas: dict[int, float]) -> dict[int, float]:
    """Eq. 21–22 with MEMIT's residual (the same numerator at every layer): score(l)² = Σ_j 1 / (σ_l ‖k_j^l‖)²,
    σ_l = ‖W^l‖₂; the edited layer is the argmin."""
    return {layer: float(torch.sqrt((1.0 / (sigmas[layer] * norms) ** 2).sum()))
            for layer, norms in key_norms.items()}


def spectral_norm(model, module: str) -> float:
    """σ_max of the module's weight, cached per model on first use (a rotation never changes it)."""
    cache = model_cache(model)
    key = ("sigma_max", module)
    if key not in cache:
        cache[key] = float(torch.linalg.matrix_norm(read_weight(model, module).float(), ord=2))
    return cache[key]


class MOSEBase(Method):
    """The engine side both MOSE rules share: the per-edit window and the undo log."""

    state_class = MOSEState
    ablations = ("fixed", "selected", "selected_neighbours")

    def touchable_layers(self, hparams, total: int) -> list[int]:
        """``layers`` and, with layer selection, every candidate's window."""
        layers = set(hparams.layers)
        if hparams.layer_selection:
            for candidate in hparams.candidate_layers:
                layers.update(layer_window(candidate, hparams.neighbours, total))
        return sorted(layer for layer in layers if 0 <= layer < total)

    def ablation(self, which: str, fixed_layer: Optional[int]) -> dict:
        """Paper §6.4: one fixed layer, the selected layer alone, or the selected layer with its neighbours."""
        if which == "fixed":
            return {"layer_selection": False, "layers": [fixed_layer]}
        return {"layer_selection": True, "neighbours": 0 if which == "selected" else 1}

    def window(self, ctx: EditContext) -> list[int]:
        hp = ctx.hparams
        total = num_layers(ctx.model)
        if not hp.layer_selection:
            window = sorted(hp.layers)
            ctx.second_moments(window)
            ctx.diagnostics["layer_scores"] = None
            return window
        # every layer a window can reach, so statistics are gathered in one corpus pass
        reachable = sorted({layer for c in hp.candidate_layers for layer in layer_window(c, hp.neighbours, total)})
        ctx.second_moments(reachable)
        keys, _, _ = ctx.keys(hp.candidate_layers)
        scores = layer_scores({layer: keys[layer].norm(dim=0) for layer in hp.candidate_layers},
                              {layer: spectral_norm(ctx.model, ctx.module(layer)) for layer in hp.candidate_layers})
        best = min(scores, key=scores.get)
        ctx.diagnostics["layer_scores"] = scores
        ctx.diagnostics["selected_layer"] = best
        return layer_window(best, hp.neighbours, total)

    def finish(self, ctx: EditContext, state: MOSEState) -> MOSEState:
        return state.close_call(ctx.hparams.undo_history)


MOSE_SESSIONS = ("MOSE", "MOSE-input")


def undo_mose_edits(model, steps: int = 1, method: Optional[str] = None) -> int:
    """Undo the last ``steps`` MOSE edit calls (newest first): W ← Rᵀ W on the output side, the planes turned back
    on the input side; returns how many were undone. ``method`` ("MOSE" or "MOSE-input") is needed only when both
    have a live run on the model.

    The inverse is exact in float64; writing it back rounds once to the weight's dtype, so an undone weight equals
    the original up to that rounding (float32: ~1e-8 relative; bf16: ~1e-3), not bit for bit.

    Raises ``ValueError`` if fewer than ``steps`` are logged (see ``undo_history``).
    """
    names: Union[tuple, list] = (method,) if method is not None else MOSE_SESSIONS
    sessions = [s for s in (get_session(model, name, create=False) for name in names) if s is not None]
    if len(sessions) > 1:
        raise ValueError("both MOSE and MOSE-input have edits on this model; pass method='MOSE' or 'MOSE-input'")
    session = sessions[0] if sessions else None
    state = session.state if session is not None and isinstance(session.state, MOSEState) else MOSEState()
    if steps < 0 or steps > len(state.undo_log):
        raise ValueError(f"cannot undo {steps} MOSE edit(s): {len(state.undo_log)} can be undone on this model")
    for _ in range(steps):
        state, entry = state.undone()
        for module, step in entry.items():
            weight = read_weight(model, module)
            write_weight(model, module, step.revert(weight.double()))
        session.state = state
        session.num_edits -= session.history.pop().get("num_requests", 1)
        session.record_weights(model, entry)
    return steps
