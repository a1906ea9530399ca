"""Target values z: MEMIT's ``compute_z``, vectorised over templates and requests.

For each request a vector δ (size d) is added to the output of block ``layer`` at the subject's last token of
every rewriting prompt (template prefix + prompt + target) and of the KL prompt ``"{subject} is a"``. δ is
optimised with Adam on

    mean_templates NLL(target | prompt) / |target|  +  kl_factor · KL(p_orig ‖ p_δ)  +  v_weight_decay · ‖δ‖ / ‖h‖²

with early stop (loss < ``target_early_stop``) and a clamp ‖δ‖ ≤ clamp_norm_factor · ‖h‖, where h is the block
output (``clamp_reference="residual"``, MEMIT) or the edited module's output (``"module_output"``, ROME) at the
bare prompt's subject token. Returns z = h + δ.

Speed: tokens before the subject's last token never see δ (causal attention), so their key/value cache is
computed once and every step runs only the tokens from the subject's last token onwards.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from .modeling import input_device
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


def _rows(tok, requests: Sequence[EditRequest], prefixes: Sequence[str]):
    """Rewriting rows (one per request and prefix) then one KL row per request."""
    rewrite, owner = [], []
    for j, request in enumerate(requests):
        for prefix in prefixes:
            rewrite.append(encode_prompt(tok, request.prompt, request.subject, prefix, request.target))
            owner.append(j)
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


class _Runner:
    """Runs suffixes over a cached, left-padded prefix; δ is added at each row's subject column."""

    def __init__(self, model, tok, prefixes, suffixes, delta_columns):
        self.model = model
        device = input_device(model)
        pad = pad_id(tok)
        self.width = max(len(p) for p in prefixes)
        self.cache = None
        if self.width:
            pre_ids, pre_mask, _ = pad_batch([p if p else [pad] for p in prefixes], pad, "left", device)
            if any(not p for p in prefixes):  # an empty prefix: its placeholder column stays masked
                for i, p in enumerate(prefixes):
                    if not p:
                        pre_mask[i] = 0
            pre_pos = (pre_mask.cumsum(1) - 1).clamp(min=0)
            self.width = pre_ids.shape[1]
            with torch.no_grad():
                out = model(input_ids=pre_ids, attention_mask=pre_mask, position_ids=pre_pos, use_cache=True)
            self.cache = out.past_key_values
            prefix_mask, prefix_len = pre_mask, pre_mask.sum(1)
        else:
            prefix_mask = torch.zeros((len(prefixes), 0), dtype=torch.long, device=device)
            prefix_len = torch.zeros(len(prefixes), dtype=torch.long, device=device)
        self.ids, suf_mask, _ = pad_batch(suffixes, pad, "right", device)
        self.mask = torch.cat([prefix_mask, suf_mask], dim=1)
        self.positions = prefix_len[:, None] + torch.arange(self.ids.shape[1], device=device)[None, :]
        self.rows = torch.arange(len(suffixes), device=device)
        self.columns = torch.tensor(delta_columns, device=device)

    def logits(self, layer_name: str, add: torch.Tensor | None, rows: torch.Tensor, columns: torch.Tensor,
               capture: dict | None = None) -> torch.Tensor:
        """Forward with ``add`` (rows, d) added to ``layer_name``'s output at the δ columns; returns the logits at
        positions ``(rows[i], columns[i])`` only (the output head is applied to those hidden states alone)."""

        def edit(hidden):
            where = (self.rows.to(hidden.device), self.columns.to(hidden.device))
            if capture is not None:
                capture["hidden"] = hidden[where].detach().to(self.ids.device)
            if add is None:
                return hidden
            hidden = hidden.clone()
            hidden[where] += add.to(device=hidden.device, dtype=hidden.dtype)
            return hidden

        # the forward appends to the cache in place: give it a copy so the prefix cache stays graph-free
        cache = copy.deepcopy(self.cache) if self.cache is not None else None
        kwargs = dict(input_ids=self.ids, attention_mask=self.mask, position_ids=self.positions,
                      past_key_values=cache, use_cache=cache is not None)
        head = self.model.get_output_embeddings()
        plain_head = head is not None and getattr(self.model.config, "final_logit_softcapping", None) is None
        with Trace(self.model, layer_name, edit_output=edit):
            if plain_head:
                base = getattr(self.model, self.model.base_model_prefix)
                hidden = base(**kwargs).last_hidden_state
                picked = hidden[rows.to(hidden.device), columns.to(hidden.device)]
                return head(picked.to(head.weight.device)).to(self.ids.device)
            logits = self.model(**kwargs).logits
        return logits[rows.to(logits.device), columns.to(logits.device)].to(self.ids.device)


def optimize_targets(model, tok, requests: Sequence[EditRequest], layer: int, hparams,
                     families: list[list[str]], clamp_reference: str = "residual",
                     use_prefix_cache: bool = True) -> TargetResult:
    """Optimise z at block ``layer`` for every request jointly (each request has its own δ)."""
    layer_name = hparams.layer_module_tmp.format(layer)
    module_name = hparams.rewrite_module_tmp.format(layer)
    prefixes = [p for family in families for p in family]
    rewrite, owner, kl = _rows(tok, requests, prefixes)
    n, rows = len(requests), rewrite + kl
    owner_all = torch.tensor(owner + list(range(n)))
    pre_r, suf_r, cut_r = _split(rewrite, use_prefix_cache, False)
    pre_k, suf_k, cut_k = _split(kl, use_prefix_cache, True)
    columns = [row.subject_last - cut for row, cut in zip(rows, cut_r + cut_k)]

    with frozen_eval(model):
        runner = _Runner(model, tok, pre_r + pre_k, suf_r + suf_k, columns)
        device = runner.ids.device
        # positions (row, column, token) of every target token in the rewriting rows
        loss_rows, loss_cols, loss_tokens = [], [], []
        for i, (row, cut) in enumerate(zip(rewrite, cut_r)):
            for t in range(row.target_start, len(row.ids)):
                loss_rows.append(i)
                loss_cols.append(t - 1 - cut)
                loss_tokens.append(row.ids[t])
        loss_rows_t = torch.tensor(loss_rows, device=device)
        loss_cols_t = torch.tensor(loss_cols, device=device)
        loss_tokens_t = torch.tensor(loss_tokens, device=device)
        target_len = torch.tensor([len(r.target_ids) for r in rewrite], device=device, dtype=torch.float32)
        prompts_per_request = torch.bincount(torch.tensor(owner, device=device), minlength=n).float()
        kl_rows = torch.arange(len(rewrite), len(rows), device=device)
        kl_cols = torch.tensor([len(s) - 1 for s in suf_k], device=device)
        # one forward serves both: the loss positions first, then the KL positions
        all_rows = torch.cat([loss_rows_t, kl_rows])
        all_cols = torch.cat([loss_cols_t, kl_cols])
        n_loss = len(loss_rows)
        bare_rows = torch.tensor([j * len(prefixes) for j in range(n)], device=device)

        # δ = 0 pass: h (block output), the module output (for ROME's clamp), the original KL distribution.
        capture: dict = {}
        with Trace(model, module_name, retain_output=True) as module_trace, torch.no_grad():
            logits = runner.logits(layer_name, None, all_rows, all_cols, capture)
        init = capture["hidden"][bare_rows].float()
        out = module_trace.output
        module_output = out[runner.rows.to(out.device), runner.columns.to(out.device)].to(device)[bare_rows].float()
        kl_reference = F.log_softmax(logits[n_loss:].float(), dim=-1)
        reference = module_output if clamp_reference == "module_output" else init
        max_norm = hparams.clamp_norm_factor * reference.norm(dim=1)

        delta = torch.zeros_like(init, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        steps = torch.zeros(n, dtype=torch.long)
        losses = torch.zeros(n, device=device)
        owner_dev = owner_all.to(device)
        for step in range(hparams.v_num_grad_steps):
            logits = runner.logits(layer_name, delta[owner_dev], all_rows, all_cols)
            log_probs = F.log_softmax(logits[:n_loss].float(), dim=-1)
            token_nll = -log_probs.gather(1, loss_tokens_t[:, None]).squeeze(1)
            per_row = torch.zeros(len(rewrite), device=device).index_add(0, loss_rows_t, token_nll) / target_len
            nll = torch.zeros(n, device=device).index_add(0, torch.tensor(owner, device=device), per_row)
            nll = nll / prompts_per_request
            kl_log_probs = F.log_softmax(logits[n_loss:].float(), dim=-1)
            kl = F.kl_div(kl_log_probs, kl_reference, log_target=True, reduction="none").sum(-1)
            decay = hparams.v_weight_decay * delta.norm(dim=1) / init.norm(dim=1) ** 2
            loss = nll + hparams.kl_factor * kl + decay
            losses = loss.detach()
            newly_done = (losses < hparams.target_early_stop) & ~done
            done |= newly_done
            if bool(done.all()) or step == hparams.v_num_grad_steps - 1:
                break
            active = ~done
            steps[active.cpu()] += 1
            frozen_values = delta.detach().clone()
            optimizer.zero_grad(set_to_none=True)
            (loss * active).sum().backward()
            optimizer.step()
            with torch.no_grad():
                delta[done] = frozen_values[done]
                norms = delta.norm(dim=1)
                scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12), torch.ones_like(norms))
                delta.mul_(scale[:, None])
        del runner
    z = (init + delta.detach()).float()
    logger.debug("targets at layer %d: loss %s after %s steps", layer, losses.tolist(), steps.tolist())
    return TargetResult(layer, z.T.contiguous(), init.T.contiguous(), module_output.T.contiguous(),
                        losses.tolist(), steps.tolist())
