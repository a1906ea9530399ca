"""MOSE-input-room: the input side with its window chosen per call by the room the layers have left
(docs/methods.md §1.4).

The input side keeps each plane ⊥ the keys of every earlier edit of its layer, so each edit takes one direction out
of the subspace that layer's planes may use (about 1000–1250 of p = 1536 in the embedded model's layers 4–8). In a
fixed window every layer carries every edit and the reach α/‖k‖ falls with the number of edits
(docs/benchmarks.md §7.2). Here each call edits the window of ``2·neighbours + 1`` layers, centred on one of
``candidate_layers``, whose layers have the most room for the call's keys:

    room_l = mean_j ‖P_l k_j‖ / ‖k_j‖ · sqrt((n_l − m_l) / n_l)

with P_l the projector onto the null space of the generic keys (rank n_l) and m_l the number of earlier edit keys
protected at layer l; the square root is the share of a key's null-space part that survives m_l removed
directions when they are not aligned with it (the exact reach is computed by the rule itself). A window that has
taken many edits leaves room to another, so the edits spread over more layers as they accumulate. The update
rule, the protection and undo are the input side's own (``mose_input.py``).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..editor import EditContext
from ..modeling import num_layers
from ..null_space import null_space
from .mose_input import MOSEInput, MOSEInputHyperParams, input_rotation_rule
from .mose_shared import layer_window


@dataclasses.dataclass(kw_only=True)
class MOSEInputRoomHyperParams(MOSEInputHyperParams):
    """The input side's fields; with ``layer_selection`` the window is chosen by room, not by Eq. 21–22."""

    ALG_NAMES = ("MOSE-input-room",)
    input_subspace: str = "null_c"

    def validate(self, source: str = "<hparams>") -> None:
        super().validate(source)
        if self.input_subspace != "null_c":
            raise ValueError(f"{source}: key 'input_subspace' must be 'null_c' for MOSE-input-room (room is "
                             f"measured in the null space of the generic keys), got {self.input_subspace!r}")


def layer_room(K: torch.Tensor, P: torch.Tensor, rank: int, used: int) -> float:
    """Room of one layer for keys ``K`` (p × n): mean ‖P k‖/‖k‖ times sqrt of the free share of P's rank."""
    share = (P.to(K.dtype) @ K).norm(dim=0) / K.norm(dim=0).clamp(min=1e-30)
    return float(share.mean()) * math.sqrt(max(0, rank - used) / rank) if rank else 0.0


class MOSEInputRoom(MOSEInput):
    name = "MOSE-input-room"
    hparams_class = MOSEInputRoomHyperParams
    rule = staticmethod(input_rotation_rule)

    def window(self, ctx: EditContext) -> list[int]:
        hp = ctx.hparams
        if not hp.layer_selection:
            return super().window(ctx)
        total = num_layers(ctx.model)
        windows = {center: layer_window(center, hp.neighbours, total) for center in hp.candidate_layers}
        layers = sorted({layer for window in windows.values() for layer in window})
        moments = ctx.second_moments(layers)
        keys, _, _ = ctx.keys(layers)
        room = {}
        for layer in layers:
            module = ctx.module(layer)
            K = keys[layer]
            P, rank = null_space(ctx.model, module, moments[layer].to(K.device), hp.nullspace_threshold)
            room[layer] = layer_room(K, P, rank, self.protected(ctx.state, module, K, hp).shape[1])
        scores = {center: sum(room[layer] for layer in window) / len(window) for center, window in windows.items()}
        top = max(scores.values())
        best = next(center for center in windows if scores[center] >= top * (1 - 1e-9))  # ties: the first listed
        ctx.diagnostics["layer_scores"] = scores
        ctx.diagnostics["selected_layer"] = best
        return windows[best]


MOSE_INPUT_ROOM_METHOD = MOSEInputRoom()


def apply_mose_input_room_to_model(model, tok, requests, hparams: MOSEInputRoomHyperParams, copy: bool = False,
                                   return_orig_weights: bool = False, **kwargs):
    """Edit ``model`` in place with MOSE-input-room; EasyEdit's contract: returns ``(model, weights_copy)``.
    Diagnostics (the room score of every candidate window, the chosen centre, the input side's per-request
    records) go to ``edit_history(model, "MOSE-input-room")``."""
    return MOSE_INPUT_ROOM_METHOD.apply(model, tok, requests, hparams, copy=copy,
                                        return_orig_weights=return_orig_weights, **kwargs)
