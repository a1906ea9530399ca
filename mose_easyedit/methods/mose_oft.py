"""MOSE-OFT: the MOSE authors' released code (famoustourist/MOSE:easyeditor/models/oft), on the shared engine.

The public code does not implement the paper's closed form (see ``mose.py``). It wraps ``down_proj`` of a few fixed
layers in an orthogonal adapter, trains only the adapter with Adam on the target's teacher-forced NLL and keeps

    tuner "oft" (oft_main.py):      W ← W Qᵀ,   Q = blockdiag(Q_1 … Q_r),  Q_i = (I − S_i)(I + S_i)⁻¹,  S_i skew
    tuner "hra" (oft_main_new.py):  W ← W H,    H = Π_j (I − 2 u_j u_jᵀ / ‖u_j‖²)

Both rotate the *input* side of W, so every singular value of W (‖W‖_F, κ₂) is unchanged, and the module's
output for a key k can be any W u with ‖u_i‖ = ‖k_i‖ on each block i (unlike MOSE's output-side R W, which can
never change ‖W k‖).

Here the adapters are peft's own layers, and each edit call is merged before it returns: the tuner wraps the rewrite
module only while it trains, the rotation M (``get_delta_weight``, re-evaluated in float64) is multiplied into the
weight, the original module is put back (always, also on errors) and the new weight goes through ``ctx.write``, so
the engine's backup, atomic rollback and EasyEdit's ``weights_copy`` restore apply as for every other method.
The model stays a plain transformers model; no peft module survives a call.

Which side peft 0.21.2 rotates (read in its source):

* OFT, ``peft/tuners/oft/layer.py`` ``Linear.merge``: ``result = torch.mm(oft_mat, weight.t().to(oft_mat.dtype));
  weight.copy_(result.t())`` i.e. W ← W Qᵀ; its forward rotates the input first
  (``OFTRotationModule.forward``: ``einsum("...rk,rkc->...rc", x_reshaped, orth_rotate)``, x ← x Q) and then runs
  the base layer. Input side with the authors' Cayley form: peft's exact branch is
  ``torch.linalg.solve(id_mat + Q_skew, id_mat - Q_skew, left=False)`` = (I − S)(I + S)⁻¹, the authors'
  ``cayley_batch``; its COFT projection is the authors' ``project_batch``. Chosen as the default.
* HRA, ``peft/tuners/hra/layer.py`` ``HRALinear.merge``: ``new_weight = torch.mm(base_layer.weight.data,
  delta_weight)`` i.e. W ← W H: input side, the authors' Householder variant.
* BOFT, ``peft/tuners/boft/layer.py`` ``Linear.merge``: ``orig_weight = torch.mm(butterfly_oft_mat,
  orig_weight.to(...))`` between two transposes, then ``orig_weight = orig_weight * boft_s``, i.e.
  W ← diag(s) W Bᵀ: input side too, but ``boft_s`` is a trainable per-output scale that changes the singular
  values, and the butterfly factorisation is in neither of the authors' files. Not offered.

GPT-2's ``Conv1D`` (weight stored (in, out)): none of the three tuners accepts it in peft 0.21
(``_get_tuner_layer_class`` knows ``nn.Linear``/``Conv2d``/``Embedding``; ``fan_in_fan_out`` only triggers a warning
for ``nn.Linear``), so the tuner wraps a temporary ``nn.Linear`` whose weight is a transposed *view* of the Conv1D
weight (no copy). Any other module type raises ``TypeError``.

Differences from the authors' code, on purpose: every call is merged and starts from Q = I (theirs keeps the
wrapper and keeps training the same S across a sequential run, so COFT bounds the total rotation; here it bounds
each edit's); NLL is averaged per target token, then per request (theirs: HF's mean over all target tokens of a
batch, identical for one request); padding is explicit, so the tokenizer's padding side does not matter (theirs
assumes left padding); an optional early stop (off by default, as theirs); context-template prefixes optional.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..editor import EditContext, Method
from ..hparams import LocateEditHyperParams
from ..modeling import base_model, get_module, input_device, is_conv1d, plain_head
from ..targets import frozen_eval, rewrite_rows
from ..tokens import pad_batch, pad_id

logger = logging.getLogger(__name__)

TUNERS = ("oft", "hra")
ADAPTER = "mose_oft"


@dataclasses.dataclass(kw_only=True)
class MOSEOFTHyperParams(LocateEditHyperParams):
    """The authors' released variant; ``layers`` is the fixed set of layers whose rewrite module is rotated.

    Of the shared fields only the module templates, ``layers``, ``seed``, ``chunk_size`` and (with
    ``use_context_templates``) ``context_template_length_params`` are read; target optimisation and covariance
    statistics are not used.
    """

    USES_KEY_STATISTICS: ClassVar[bool] = False

    ALG_NAMES = ("MOSE-OFT", "MOSE-OFT-core")  # the "-core" name: see easyedit.accepted_alg_names

    # Orthogonal factor: "oft" (block-diagonal Cayley, W ← W Qᵀ) or "hra" (Householder product, W ← W H).
    tuner: str = "oft"
    # OFT blocks: the authors' `block` (r) = number of blocks, block size p / num_blocks; or set block_size instead
    # (exactly one of the two non-zero).
    num_blocks: int = 4
    block_size: int = 0
    # Constrained OFT: after each step ‖S_i‖_F ≤ eps / √r, with eps = coft_eps · block_size² as in the authors'
    # OFTInjectedLinear (is_coft=True, eps=1e-5).
    coft: bool = True
    coft_eps: float = 1e-5
    # HRA: number of Householder reflections (the authors' oft_main_new.py uses `block` = 4), each kept at unit norm.
    hra_rank: int = 4
    # Training of the adapter only (Adam on the target NLL).
    lr: float = 5e-4
    num_steps: int = 25
    weight_decay: float = 0.0
    # Stop once the mean target NLL is below this (0 = run all num_steps, as the authors do).
    stop_loss: float = 0.0
    # Train on the context-template prefixes too (MEMIT's; the authors use the bare prompt only).
    use_context_templates: bool = False

    def validate(self, source: str = "<hparams>") -> None:
        super().validate(source)
        if self.tuner not in TUNERS:
            raise ValueError(f"{source}: key 'tuner' must be one of {list(TUNERS)}, got {self.tuner!r}")
        if self.num_blocks < 0 or self.block_size < 0 or (self.num_blocks > 0) == (self.block_size > 0):
            raise ValueError(f"{source}: exactly one of the keys 'num_blocks' and 'block_size' must be > 0 "
                             f"(got {self.num_blocks} and {self.block_size})")
        if self.block_size == 1:
            raise ValueError(f"{source}: key 'block_size' must be >= 2 (1×1 rotations are fixed)")
        if self.coft_eps <= 0:
            raise ValueError(f"{source}: key 'coft_eps' must be > 0")
        if self.hra_rank < 1:
            raise ValueError(f"{source}: key 'hra_rank' must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"{source}: key 'lr' must be > 0")
        if self.num_steps < 1:
            raise ValueError(f"{source}: key 'num_steps' must be >= 1")
        if self.weight_decay < 0 or self.stop_loss < 0:
            raise ValueError(f"{source}: keys 'weight_decay' and 'stop_loss' must be >= 0")

    def blocks(self, in_features: int) -> tuple[int, int]:
        """``(number of blocks, block size)`` for a module with ``in_features`` inputs; an error if they do not tile
        it (peft would silently change them)."""
        size = self.block_size or in_features // self.num_blocks
        if size < 2 or in_features % size != 0 or (self.num_blocks and self.num_blocks * size != in_features):
            key = "block_size" if self.block_size else "num_blocks"
            raise ValueError(f"hparams key '{key}' = {getattr(self, key)} does not tile the rewrite module's "
                             f"{in_features} inputs into blocks of size >= 2")
        return in_features // size, size


# ---------------------------------------------------------------------------------------------------------------
# peft adapters: build, rotation, temporary injection


def _peft():
    try:
        from peft import HRAConfig, OFTConfig
        from peft.tuners.hra.layer import HRALinear
        from peft.tuners.oft.layer import Linear as OFTLinear
    except ImportError as exc:  # pragma: no cover - peft is a dependency
        raise ImportError(f"MOSE-OFT needs peft's OFT and HRA tuners (tested with peft 0.21): {exc}") from exc
    return OFTConfig, OFTLinear, HRAConfig, HRALinear


def linear_view(module: nn.Module) -> nn.Linear:
    """The module as an ``nn.Linear`` peft can wrap: itself, or for GPT-2's Conv1D a Linear whose parameters are
    views of the Conv1D's (weight transposed, nothing copied)."""
    if isinstance(module, nn.Linear):
        return module
    if is_conv1d(module):
        fan_in, fan_out = module.weight.shape
        view = nn.Linear(fan_in, fan_out, bias=module.bias is not None, device="meta")
        view.weight = nn.Parameter(module.weight.detach().T, requires_grad=False)
        if module.bias is not None:
            view.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
        return view
    raise TypeError(f"MOSE-OFT rotates nn.Linear or GPT-2 Conv1D modules; got {type(module).__name__} "
                    "(peft's OFT/HRA tuners do not support it)")


def build_tuner(base: nn.Linear, hp: MOSEOFTHyperParams) -> nn.Module:
    """A peft OFT/HRA layer around ``base`` at the identity rotation (eval mode; its parameters float32, trainable)."""
    OFTConfig, OFTLinear, HRAConfig, HRALinear = _peft()
    if hp.tuner == "oft":
        r, size = hp.blocks(base.in_features)
        options = dict(r=r, oft_block_size=0, module_dropout=0.0, coft=hp.coft, eps=hp.coft_eps * size ** 2,
                       block_share=False, init_weights=True)
        if "use_cayley_neumann" in OFTConfig.__dataclass_fields__:
            options["use_cayley_neumann"] = False  # peft's default truncated series is only nearly orthogonal
        layer = OFTLinear(base, ADAPTER, config=OFTConfig(**options), r=r)
    else:
        if hp.hra_rank > base.in_features:
            raise ValueError(f"hparams key 'hra_rank' = {hp.hra_rank} exceeds the module's {base.in_features} inputs")
        layer = HRALinear(base, ADAPTER, config=HRAConfig(r=hp.hra_rank, init_weights=True), r=hp.hra_rank)
    for p in adapter_parameters(layer):
        p.data = p.data.float()
        p.requires_grad_(True)
    normalise_householder(layer)
    return layer.eval()


def adapter_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters peft added (the skew-symmetric generators or the Householder vectors)."""
    return [p for name, p in layer.named_parameters() if not name.startswith("base_layer.")]


@torch.no_grad()
def normalise_householder(layer: nn.Module) -> None:
    """Keep HRA's vectors at unit norm (the authors renormalise every step), so ``lr`` means the same at any
    width; a no-op for OFT."""
    if hasattr(layer, "hra_u"):
        u = layer.hra_u[ADAPTER]
        u.div_(u.norm(dim=0, keepdim=True).clamp(min=1e-12))


@torch.no_grad()
def input_rotation(layer: nn.Module) -> torch.Tensor:
    """The diagonal blocks ``(r, b, b)`` float64 of M, the merged weight being W M: Qᵀ for OFT (r blocks), H for
    HRA (one p × p block). peft's ``get_delta_weight``, evaluated with the adapter temporarily in float64."""
    params = adapter_parameters(layer)
    saved = [p.data for p in params]
    try:
        for p in params:
            p.data = p.data.double()
        rotation = layer.get_delta_weight(ADAPTER).double()
    finally:
        for p, data in zip(params, saved):
            p.data = data
    if not hasattr(layer, "oft_R"):
        return rotation[None]
    size = layer.oft_block_size[ADAPTER]
    return torch.stack([rotation[s:s + size, s:s + size].T for s in range(0, rotation.shape[0], size)])


def rotate_inputs(W: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """W M in float64 for a block-diagonal M given by its diagonal ``blocks`` (r, b, b)."""
    W = W.double()
    blocks = blocks.to(W.device, torch.float64)
    size = blocks.shape[-1]
    if blocks.shape[0] * size != W.shape[1]:
        raise ValueError(f"rotation blocks {tuple(blocks.shape)} do not fit a weight with {W.shape[1]} inputs")
    return torch.cat([W[:, i * size:(i + 1) * size] @ block for i, block in enumerate(blocks)], dim=1)


def orthogonality_error(blocks: torch.Tensor, probes: int = 8, seed: int = 0) -> float:
    """max |Bᵀ B x − x| over a few fixed random unit vectors x per block (O(b²) per probe, no b³ Gram matrix)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(blocks.shape[-1], probes, generator=gen, dtype=torch.float64).to(blocks.device)
    x = x / x.norm(dim=0, keepdim=True)
    return float((blocks.mT @ (blocks @ x) - x).abs().max())


@contextlib.contextmanager
def injected(model: nn.Module, module_names: list[str], hp: MOSEOFTHyperParams) -> Iterator[dict[str, nn.Module]]:
    """Wrap each named module in a fresh peft tuner for the duration; the original module objects are always put
    back, also when building, training or merging fails."""
    restore = []
    try:
        layers = {}
        for name in module_names:
            parent_name, _, child = name.rpartition(".")
            parent = get_module(model, parent_name) if parent_name else model
            original = getattr(parent, child)
            layer = build_tuner(linear_view(original), hp)
            restore.append((parent, child, original))
            setattr(parent, child, layer)
            layers[name] = layer
        yield layers
    finally:
        for parent, child, original in reversed(restore):
            setattr(parent, child, original)


# ---------------------------------------------------------------------------------------------------------------
# the training objective


@dataclasses.dataclass
class NLLBatch:
    """Teacher-forced rows ``prefix + prompt + " " + target``, right-padded; ``positions`` (row, column) predict
    ``labels``; ``weights`` turn per-token NLL into mean over tokens, then rows of a request, then requests."""

    ids: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    columns: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor

    def chunk(self, start: int, stop: int) -> "NLLBatch":
        keep = (self.rows >= start) & (self.rows < stop)
        return NLLBatch(self.ids[start:stop], self.mask[start:stop], self.rows[keep] - start, self.columns[keep],
                        self.labels[keep], self.weights[keep])


def nll_batch(tok, requests, prefixes: list[str], device) -> NLLBatch:
    encoded, _ = rewrite_rows(tok, requests, prefixes)
    ids, mask, _ = pad_batch([e.ids for e in encoded], pad_id(tok), "right", device)
    rows, columns, labels, weights = [], [], [], []
    for i, e in enumerate(encoded):
        n_target = len(e.ids) - e.target_start
        for t in range(e.target_start, len(e.ids)):
            rows.append(i)
            columns.append(t - 1)
            labels.append(e.ids[t])
            weights.append(1.0 / (n_target * len(prefixes) * len(requests)))
    long = dict(dtype=torch.long, device=device)
    return NLLBatch(ids, mask, torch.tensor(rows, **long), torch.tensor(columns, **long), torch.tensor(labels, **long),
                    torch.tensor(weights, dtype=torch.float32, device=device))


def target_logits(model, batch: NLLBatch) -> torch.Tensor:
    """Logits at the target-predicting positions only (the output head runs on those hidden states alone)."""
    if plain_head(model):
        hidden = base_model(model)(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).last_hidden_state
        return model.get_output_embeddings()(hidden[batch.rows, batch.columns])
    logits = model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits
    return logits[batch.rows, batch.columns]


def weighted_nll(model, batch: NLLBatch) -> torch.Tensor:
    log_probs = F.log_softmax(target_logits(model, batch).float(), dim=-1)
    return -(log_probs.gather(1, batch.labels[:, None]).squeeze(1) * batch.weights).sum()


# ---------------------------------------------------------------------------------------------------------------
# the method


class MOSEOFT(Method):
    name = "MOSE-OFT"
    hparams_class = MOSEOFTHyperParams

    def train(self, ctx: EditContext, layers: dict[str, nn.Module], prefixes: list[str]) -> tuple[list[float], int]:
        """Adam on the adapters' parameters; returns the loss before each step taken (and the final loss) and the
        number of steps."""
        hp = ctx.hparams
        batch = nll_batch(ctx.tok, ctx.requests, prefixes, input_device(ctx.model))
        n_rows = batch.ids.shape[0]
        params = [p for layer in layers.values() for p in adapter_parameters(layer)]
        optimizer = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        losses, steps = [], 0
        for step in range(hp.num_steps + 1):
            optimizer.zero_grad(set_to_none=True)
            last = step == hp.num_steps
            total = 0.0
            with torch.set_grad_enabled(not last):
                for start in range(0, n_rows, hp.chunk_size):
                    loss = weighted_nll(ctx.model, batch.chunk(start, start + hp.chunk_size))
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"{self.name}: target NLL is not finite at step {step}")
                    if not last:
                        loss.backward()
                    total += float(loss.detach())
            losses.append(total)
            if last or total < hp.stop_loss:
                break
            optimizer.step()
            for layer in layers.values():
                normalise_householder(layer)
            steps += 1
        return losses, steps

    def merge(self, ctx: EditContext, layer: int, blocks: torch.Tensor) -> None:
        """W ← W M for the layer's trained input rotation (blocks of M), written through ``ctx.write``."""
        W = ctx.weight(layer)
        new = rotate_inputs(W, blocks)
        identity = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
        diagnostics = dict(orthogonality_error=orthogonality_error(blocks),
                           rotation_distance=float((blocks - identity).norm()),
                           relative_change=float((new - W).norm() / W.norm()))
        ctx.diagnostics["per_layer"][layer] = diagnostics
        if not torch.isfinite(new).all():
            raise FloatingPointError(f"{self.name}: merged weight of layer {layer} is not finite")
        if diagnostics["orthogonality_error"] > 1e-8:
            raise FloatingPointError(f"{self.name}: rotation of layer {layer} is not orthogonal "
                                     f"(error {diagnostics['orthogonality_error']:.2e})")
        ctx.write(layer, new)

    def edit(self, ctx: EditContext) -> None:
        hp = ctx.hparams
        window = sorted(set(hp.layers))
        names = [ctx.module(layer) for layer in window]
        ctx.diagnostics.update(layers=window, tuner=hp.tuner, per_layer={})
        # context templates are generated (once per model) before any adapter is in place
        prefixes = [p for family in ctx.families for p in family] if hp.use_context_templates else [""]
        rotations = {}
        with frozen_eval(ctx.model), torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp.seed)  # HRA's initial vectors; OFT starts at exactly Q = I
            with injected(ctx.model, names, hp) as layers:
                with ctx.timed("train"):
                    losses, steps = self.train(ctx, layers, prefixes)
                with ctx.timed("update"):
                    for layer, name in zip(window, names):
                        rotations[layer] = input_rotation(layers[name])
        # the original modules are back in place: merge through the engine (backup, rollback, weights_copy)
        with ctx.timed("update"):
            for layer in window:
                self.merge(ctx, layer, rotations.pop(layer))
        ctx.diagnostics.update(loss_start=losses[0], loss_final=losses[-1], losses=losses, steps=steps)
        logger.debug("%s: NLL %.4f -> %.4f in %d steps on layers %s", self.name, losses[0], losses[-1], steps, window)


MOSE_OFT_METHOD = MOSEOFT()


def apply_mose_oft_to_model(model, tok, requests, hparams: MOSEOFTHyperParams, copy: bool = False,
                            return_orig_weights: bool = False, **kwargs):
    """Edit ``model`` in place with MOSE-OFT; EasyEdit's contract: returns ``(model, weights_copy)``.

    ``requests``: EasyEdit request dicts (``prompt``, ``subject``, ``target_new``; others ignored). All requests of
    one call are trained jointly. Diagnostics per call (NLL before/after, steps, ‖M − I‖_F, orthogonality error,
    relative weight change, seconds per stage) go to ``edit_history(model, "MOSE-OFT")``.
    """
    return MOSE_OFT_METHOD.apply(model, tok, requests, hparams, copy=copy, return_orig_weights=return_orig_weights,
                                 **kwargs)
