"""Target values z: MEMIT's ``compute_z``, vectorised over templates and requests.

For each request a vector δ (size d) is added to the output of block ``layer`` at the subject's last token of
every rewriting prompt (template prefix + prompt + target) and of the KL prompt ``"{subject} is a"``. δ is
optimised with Adam on

    mean_templates NLL(target | prompt) / |target|  +  kl_factor · KL(p_orig ‖ p_δ)  +  v_weight_decay · ‖δ‖ / ‖h‖²

with early stop (loss < ``target_early_stop``) and a clamp ‖δ‖ ≤ clamp_norm_factor · ‖h‖, where h is the block
output (``clamp_reference="residual"``, MEMIT) or the edited module's output (``"module_output"``, ROME) at the
bare prompt's subject token. Returns z = h + δ.

Speed: tokens before the subject's last token never see δ (causal attention), so their key/value cache is
computed once and every step runs only the tokens from the subject's last token onwards. Blocks up to ``layer``
never see δ either: on decoder families whose blocks take the embeddings unchanged (LLaMA, Mistral, Qwen2/3)
their output is computed once and every step runs only the blocks above ``layer``. A request leaves the batch as
soon as it meets the early-stop criterion, so a batch costs the sum of its requests' steps, not the slowest one's
times the batch size. ``early_stop_on`` chooses the criterion: ``"loss"`` (EasyEdit: the whole objective below
``target_early_stop``), ``"nll"`` (only its edit term, the target NLL, below it; the KL term is a regulariser
that on some models never falls below the threshold, which makes every edit run all steps) or
``"most_probable"`` (ENCORE's MPES: every target token is the argmax at its position in every rewriting prompt,
ahead of the runner-up by ``target_margin`` in probability).
"""
from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .modeling import (base_model, blocks_from, cache_argument, decoder_blocks, input_device, is_block, plain_head,
                       returned_cache)
from .nethook import Trace
from .requests import EditRequest
from .tokens import Encoded, encode_prompt, pad_batch, pad_id

logger = logging.getLogger(__name__)

KL_PROMPT = "{} is a"


@dataclass
class TargetResult:
    """``z`` (d, n) target outputs of block ``layer``; ``init`` (d, n) the current outputs h; ``delta`` = z - h."""

    layer: int
    z: torch.Tensor
    init: torch.Tensor
    module_output: torch.Tensor
    losses: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    @property
    def delta(self) -> torch.Tensor:
        return self.z - self.init


@contextlib.contextmanager
def frozen_eval(model):
    """Parameters without grad and the model in eval mode for the duration; both restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def rewrite_rows(tok, requests: Sequence[EditRequest], prefixes: Sequence[str]) -> tuple[list[Encoded], list[int]]:
    """The teacher-forced rows ``prefix + prompt + target``, one per request and prefix, and each row's request."""
    rewrite, owner = [], []
    for j, request in enumerate(requests):
        for prefix in prefixes:
            rewrite.append(encode_prompt(tok, request.prompt, request.subject, prefix, request.target))
            owner.append(j)
    return rewrite, owner


def _rows(tok, requests: Sequence[EditRequest], prefixes: Sequence[str]):
    """Rewriting rows (one per request and prefix) then one KL row per request."""
    rewrite, owner = rewrite_rows(tok, requests, prefixes)
    kl = [encode_prompt(tok, KL_PROMPT.format(r.subject), r.subject) for r in requests]
    return rewrite, owner, kl


def _split(rows: Sequence[Encoded], use_cache: bool, is_kl: bool):
    """Cut each row at its subject token (when caching): returns (prefixes, suffixes, cut positions)."""
    prefixes, suffixes, cuts = [], [], []
    for row in rows:
        cut = row.subject_last if use_cache else 0
        end = len(row.ids) if is_kl else len(row.ids) - 1
        prefixes.append(list(row.ids[:cut]))
        suffixes.append(list(row.ids[cut:end]))
        cuts.append(cut)
    return prefixes, suffixes, cuts


def _upper_blocks(model, layer_name: str, layer: int):
    """``(base, blocks)`` when a forward can start above block ``layer`` of this model, else None."""
    found = decoder_blocks(model)
    return found if found is not None and is_block(model, found[1], layer_name, layer) else None


class _Runner:
    """Runs suffixes over a cached, left-padded prefix; δ is added at each row's subject column of block
    ``layer``'s output. Once ``start`` (that output at δ = 0) is known, later forwards run only the blocks above."""

    def __init__(self, model, tok, prefixes, suffixes, delta_columns, layer: int, layer_name: str,
                 skip_lower_layers: bool = True):
        self.model, self.layer, self.layer_name = model, layer, layer_name
        self.upper = _upper_blocks(model, layer_name, layer) if skip_lower_layers else None
        self.start: torch.Tensor | None = None
        device = input_device(model)
        pad = pad_id(tok)
        self.cache = None
        if max(len(p) for p in prefixes):
            pre_ids, pre_mask, _ = pad_batch([p if p else [pad] for p in prefixes], pad, "left", device)
            for i, p in enumerate(prefixes):  # an empty prefix: its placeholder column stays masked
                if not p:
                    pre_mask[i] = 0
            pre_pos = (pre_mask.cumsum(1) - 1).clamp(min=0)
            with torch.no_grad():  # the base model: the prefix needs its cache, not its logits
                out = base_model(model)(input_ids=pre_ids, attention_mask=pre_mask, position_ids=pre_pos,
                                        use_cache=True)
            self.cache = returned_cache(out)
            prefix_mask, prefix_len = pre_mask, pre_mask.sum(1)
        else:
            prefix_mask = torch.zeros((len(prefixes), 0), dtype=torch.long, device=device)
            prefix_len = torch.zeros(len(prefixes), dtype=torch.long, device=device)
        self.ids, suf_mask, _ = pad_batch(suffixes, pad, "right", device)
        self.mask = torch.cat([prefix_mask, suf_mask], dim=1)
        self.positions = prefix_len[:, None] + torch.arange(self.ids.shape[1], device=device)[None, :]
        self.columns = torch.tensor(delta_columns, device=device)

    @property
    def rows(self) -> torch.Tensor:
        return torch.arange(self.ids.shape[0], device=self.ids.device)

    def subset(self, keep: torch.Tensor) -> "_Runner":
        """The same runner restricted to rows ``keep`` (cache, inputs and the captured block output)."""
        other = copy.copy(self)
        keep = keep.to(self.ids.device)
        other.ids, other.mask = self.ids[keep], self.mask[keep]
        other.positions, other.columns = self.positions[keep], self.columns[keep]
        if self.start is not None:
            other.start = self.start[keep.to(self.start.device)]
        if self.cache is not None:
            other.cache = copy.deepcopy(self.cache)
            other.cache.batch_select_indices(keep)
        return other

    def _where(self, device):
        return self.rows.to(device), self.columns.to(device)

    def logits(self, add: torch.Tensor | None, rows: torch.Tensor, columns: torch.Tensor,
               capture: dict | None = None) -> torch.Tensor:
        """Forward with ``add`` (rows, d) added to block ``layer``'s output at the δ columns; returns the logits at
        positions ``(rows[i], columns[i])`` only (the output head is applied to those hidden states alone).
        ``capture`` receives the block's output at the δ columns (and the runner keeps all of it as ``start``)."""
        # the forward appends to the cache in place: give it a copy so the prefix cache stays graph-free
        cache = copy.deepcopy(self.cache) if self.cache is not None else None
        kwargs = {"attention_mask": self.mask, "position_ids": self.positions, cache_argument(self.model): cache,
                  "use_cache": cache is not None}
        if self.upper is not None and self.start is not None and capture is None:
            hidden = self.start
            if add is not None:
                hidden = hidden.clone()
                hidden[self._where(hidden.device)] += add.to(device=hidden.device, dtype=hidden.dtype)
            with blocks_from(*self.upper, self.layer + 1) as base:
                return self._head(base(inputs_embeds=hidden.to(self.ids.device), **kwargs).last_hidden_state,
                                  rows, columns)

        def edit(hidden):
            where = self._where(hidden.device)
            if capture is not None:
                capture["hidden"] = hidden[where].detach().to(self.ids.device)
                self.start = hidden.detach()
            if add is None:
                return hidden
            hidden = hidden.clone()
            hidden[where] += add.to(device=hidden.device, dtype=hidden.dtype)
            return hidden

        with Trace(self.model, self.layer_name, edit_output=edit):
            if plain_head(self.model):
                return self._head(base_model(self.model)(input_ids=self.ids, **kwargs).last_hidden_state, rows, columns)
            logits = self.model(input_ids=self.ids, **kwargs).logits
        return logits[rows.to(logits.device), columns.to(logits.device)].to(self.ids.device)

    def _head(self, hidden: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        picked = hidden[rows.to(hidden.device), columns.to(hidden.device)]
        return head(picked.to(head.weight.device)).to(self.ids.device)


def optimize_targets(model, tok, requests: Sequence[EditRequest], layer: int, hparams,
                     families: list[list[str]], clamp_reference: str = "residual",
                     use_prefix_cache: bool = True, skip_lower_layers: bool = True,
                     project: Callable[[torch.Tensor], torch.Tensor] | None = None) -> TargetResult:
    """Optimise z at block ``layer`` for every request jointly (each request has its own δ).

    ``project`` (optional) maps δ (n, d) to the nearest δ the update rule can deliver; it is applied after the
    norm clamp at every step, so the optimisation runs inside that set (``target_reach``)."""
    layer_name = hparams.layer_module_tmp.format(layer)
    module_name = hparams.rewrite_module_tmp.format(layer)
    prefixes = [p for family in families for p in family]
    rewrite, owner, kl = _rows(tok, requests, prefixes)
    n, rows = len(requests), rewrite + kl
    row_owner = owner + list(range(n))
    pre_r, suf_r, cut_r = _split(rewrite, use_prefix_cache, False)
    pre_k, suf_k, cut_k = _split(kl, use_prefix_cache, True)
    columns = [row.subject_last - cut for row, cut in zip(rows, cut_r + cut_k)]
    # every target token of the rewriting rows: (row, column predicting it, token); then each KL row's last column
    loss_entries = [(i, t - 1 - cut, row.ids[t]) for i, (row, cut) in enumerate(zip(rewrite, cut_r))
                    for t in range(row.target_start, len(row.ids))]
    kl_entries = [(len(rewrite) + j, len(suf) - 1) for j, suf in enumerate(suf_k)]
    target_len = [len(r.target_ids) for r in rewrite] + [1] * n

    with frozen_eval(model):
        full = _Runner(model, tok, pre_r + pre_k, suf_r + suf_k, columns, layer, layer_name, skip_lower_layers)
        device = full.ids.device
        full_layout = _Layout(list(range(n)), row_owner, loss_entries, kl_entries, target_len, device)
        bare_rows = torch.tensor([j * len(prefixes) for j in range(n)], device=device)

        # The δ = 0 pass through the whole model is also the first step's forward: it gives h (the block output),
        # the module output (for ROME's clamp), the original KL distribution and the first loss.
        delta = torch.zeros((n, model.config.hidden_size), device=device, requires_grad=True)
        capture: dict = {}
        with Trace(model, module_name, retain_output=True) as module_trace:
            first_logits = full.logits(delta[full_layout.owner], full_layout.rows, full_layout.columns, capture)
        init = capture["hidden"][bare_rows].float()
        out = module_trace.output
        module_output = out[full.rows.to(out.device), full.columns.to(out.device)].to(device)[bare_rows].float()
        kl_reference = F.log_softmax(first_logits[full_layout.n_loss:].detach().float(), dim=-1)
        reference = module_output if clamp_reference == "module_output" else init
        max_norm = hparams.clamp_norm_factor * reference.norm(dim=1)
        criterion = getattr(hparams, "early_stop_on", "loss")
        margin = float(getattr(hparams, "target_margin", 0.0))

        optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        steps = torch.zeros(n, dtype=torch.long)
        losses = torch.zeros(n, device=device)
        runner, layout = full, full_layout
        for step in range(hparams.v_num_grad_steps):
            active = (~done).nonzero().squeeze(1)
            if len(active) < len(layout.requests):  # finished requests leave the batch
                layout = _Layout(active.tolist(), row_owner, loss_entries, kl_entries, target_len, device)
                runner = full.subset(layout.row_ids)
            logits = first_logits if step == 0 else runner.logits(delta[layout.owner], layout.rows, layout.columns)
            nll, kl = layout.loss_terms(logits, kl_reference)
            decay = hparams.v_weight_decay * delta[active].norm(dim=1) / init[active].norm(dim=1) ** 2
            loss = nll + hparams.kl_factor * kl + decay
            losses[active] = loss.detach()
            if criterion == "most_probable":
                met = layout.most_probable(logits, margin)
            else:
                met = (nll if criterion == "nll" else loss).detach() < hparams.target_early_stop
            done[active[met]] = True
            if bool(done.all()) or step == hparams.v_num_grad_steps - 1:
                break
            steps[active[~met].cpu()] += 1
            frozen_values = delta.detach().clone()
            optimizer.zero_grad(set_to_none=True)
            loss[~met].sum().backward()
            optimizer.step()
            with torch.no_grad():
                delta[done] = frozen_values[done]
                norms = delta.norm(dim=1)
                scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12), torch.ones_like(norms))
                delta.mul_(scale[:, None])
                if project is not None:
                    delta[~done] = project(delta.detach())[~done].to(delta.dtype)
        del runner, full, first_logits
    z = (init + delta.detach()).float()
    logger.debug("targets at layer %d: loss %s after %s steps", layer, losses.tolist(), steps.tolist())
    return TargetResult(layer, z.T.contiguous(), init.T.contiguous(), module_output.T.contiguous(),
                        losses.tolist(), steps.tolist())


class _Layout:
    """Index tensors for the rows of a set of requests: which rows run, where the loss and KL positions are in
    them, and how per-position terms reduce to per-request NLL and KL."""

    def __init__(self, requests: list[int], row_owner, loss_entries, kl_entries, target_len, device):
        self.requests = requests
        slot = {j: k for k, j in enumerate(requests)}
        self.row_ids = torch.tensor([i for i, j in enumerate(row_owner) if j in slot], device=device)
        new_row = {int(i): k for k, i in enumerate(self.row_ids.tolist())}
        loss = [(new_row[i], c, t) for i, c, t in loss_entries if i in new_row]
        kls = [(new_row[i], c) for i, c in kl_entries if i in new_row]
        self.n_loss = len(loss)
        self.rows = torch.tensor([e[0] for e in loss] + [e[0] for e in kls], device=device, dtype=torch.long)
        self.columns = torch.tensor([e[1] for e in loss] + [e[1] for e in kls], device=device, dtype=torch.long)
        self.tokens = torch.tensor([e[2] for e in loss], device=device, dtype=torch.long)
        self.owner = torch.tensor([row_owner[i] for i in self.row_ids.tolist()], device=device)  # δ row per row
        rewrite_rows = [k for k, i in enumerate(self.row_ids.tolist()) if i < len(row_owner) - len(kl_entries)]
        self.n_rewrite = len(rewrite_rows)
        self.target_len = torch.tensor([target_len[i] for i in self.row_ids.tolist()[:self.n_rewrite]],
                                       device=device, dtype=torch.float32)
        self.rewrite_slot = torch.tensor([slot[row_owner[i]] for i in self.row_ids.tolist()[:self.n_rewrite]],
                                         device=device, dtype=torch.long)
        self.kl_requests = torch.tensor(requests, device=device)
        self.prompts_per_request = torch.bincount(self.rewrite_slot, minlength=len(requests)).float()

    def most_probable(self, logits: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
        """Per request: is every target token the argmax in every rewriting prompt, its probability ahead of
        every other token's by at least ``margin`` (ENCORE's most-probable early stopping)?"""
        probs = F.softmax(logits[:self.n_loss].detach().float(), dim=-1)
        target = probs.gather(1, self.tokens[:, None]).squeeze(1)
        others = probs.scatter(1, self.tokens[:, None], -1.0).max(dim=1).values
        ok = target - others > margin
        failed = torch.zeros(len(self.requests), device=logits.device).index_add(
            0, self.rewrite_slot[self.rows[:self.n_loss]], (~ok).float())
        return failed == 0

    def loss_terms(self, logits: torch.Tensor, kl_reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-request mean target NLL (over prompts, each normalised by its target length) and KL(p_orig ‖ p_δ)."""
        device = logits.device
        log_probs = F.log_softmax(logits[:self.n_loss].float(), dim=-1)
        token_nll = -log_probs.gather(1, self.tokens[:, None]).squeeze(1)
        per_row = torch.zeros(self.n_rewrite, device=device).index_add(0, self.rows[:self.n_loss], token_nll)
        per_row = per_row / self.target_len
        nll = torch.zeros(len(self.requests), device=device).index_add(0, self.rewrite_slot, per_row)
        nll = nll / self.prompts_per_request
        kl_log_probs = F.log_softmax(logits[self.n_loss:].float(), dim=-1)
        kl = F.kl_div(kl_log_probs, kl_reference[self.kl_requests], log_target=True, reduction="none").sum(-1)
        return nll, kl
