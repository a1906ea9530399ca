"""Context templates and keys: the edited module's input at the subject's last token.

Keys are averaged over context templates as MEMIT does: the bare prompt plus short prefixes generated once per
model ("The", "Therefore", "Because", "I", "You" followed by a few generated tokens and ". "). The mean is
taken within each template family, then across families.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Sequence

import torch

from .cache import model_cache
from .modeling import blocks_from, decoder_blocks, input_device, is_block
from .nethook import StopForward, Trace, TraceDict
from .requests import EditRequest
from .tokens import Encoded, encode_prompt, pad_batch, pad_id

logger = logging.getLogger(__name__)

PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")


def context_templates(model, tok, length_params: Sequence[Sequence[int]], seed: int = 0) -> list[list[str]]:
    """Template families as prefixes: ``[[""], [prefix, ...], ...]``. Generated once per model and cached.

    ``length_params`` is ROME's ``[[length, count], ...]``: ``count`` prefixes of ``length`` tokens (start word
    included), spread over the five start words; MEMIT's choice is ``[[10, 5]]``. Sampling (top-k 5) uses a
    private RNG seeded with ``seed``.
    """
    key = ("context_templates", tuple(tuple(p) for p in length_params), seed)
    cache = model_cache(model)
    if key in cache:
        return cache[key]
    families: list[list[str]] = [[""]]
    device = input_device(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        for length, count in length_params:
            family = []
            for i in range(count):
                start = PREFIX_STARTS[i % len(PREFIX_STARTS)]
                ids = tok(start, return_tensors="pt").to(device)
                out = model.generate(**ids, max_new_tokens=max(1, length - 1), do_sample=True, top_k=5,
                                     pad_token_id=pad_id(tok))
                text = tok.decode(out[0], skip_special_tokens=True)
                text = text.replace("{", " ").replace("}", " ").replace("\n", " ").strip()
                family.append(text + ". ")
            families.append(family)
    logger.debug("context templates: %s", families)
    cache[key] = families
    return families


def encode_rows(tok, requests: Sequence[EditRequest], families: list[list[str]], with_target: bool = False):
    """Every (request, template) pair tokenised; returns ``(rows, index)`` where ``index[j][f]`` lists the row
    numbers of request j in family f."""
    rows: list[Encoded] = []
    index: list[list[list[int]]] = []
    for request in requests:
        per_family = []
        for family in families:
            numbers = []
            for prefix in family:
                target = request.target if with_target else None
                rows.append(encode_prompt(tok, request.prompt, request.subject, prefix, target))
                numbers.append(len(rows) - 1)
            per_family.append(numbers)
        index.append(per_family)
    return rows, index


class BlockInputs:
    """The input of one decoder block at every position of each chunk of rows, kept by a :func:`trace_at_subject`
    pass so that the next pass over the same rows starts at that block instead of at the embeddings.

    Valid only while no block below the kept one changes; the caller guarantees it (MEMIT's ascending layer loop
    writes only the kept block before the next pass). On model families where a forward cannot start mid-way
    (see :func:`~mose_easyedit.modeling.decoder_blocks`) nothing is kept and every pass runs whole."""

    def __init__(self, model, layer_tmp: str):
        self.found = decoder_blocks(model)
        self.layer_tmp = layer_tmp
        self.block: int | None = None
        self.hidden: list[torch.Tensor] = []

    def keeps(self, model, block: int) -> bool:
        return self.found is not None and is_block(model, self.found[1], self.layer_tmp.format(block), block)


@torch.no_grad()
def trace_at_subject(model, tok, rows: Sequence[Encoded], inputs: Sequence[str], outputs: Sequence[str] = (),
                     stop_at: str | None = None, chunk_size: int = 64, resume: BlockInputs | None = None,
                     keep: int | None = None) -> dict[tuple[str, str], torch.Tensor]:
    """Run the rows (right-padded explicitly) and return the inputs of the modules ``inputs`` and the outputs of
    ``outputs`` at each row's subject token, as float32 ``(rows, dim)`` tensors keyed ``("input"|"output", name)``.
    The forward stops after module ``stop_at``. With ``resume`` it starts at the block ``resume`` holds (from the
    previous pass over the same rows) and keeps the input of block ``keep`` for the next one."""
    device = input_device(model)
    wanted = [("input", name) for name in inputs] + [("output", name) for name in outputs]
    gathered: dict[tuple[str, str], list[torch.Tensor]] = {key: [] for key in wanted}
    start = resume.block if resume is not None else None
    if start is not None and len(resume.hidden) != -(-len(rows) // chunk_size):
        start = None  # kept for other rows
    keep_name = resume.layer_tmp.format(keep) if resume is not None and keep is not None and resume.keeps(model, keep) \
        else None
    kept: list[torch.Tensor | None] = []
    for number, first in enumerate(range(0, len(rows), chunk_size)):
        chunk = rows[first:first + chunk_size]
        ids, mask, _ = pad_batch([r.ids for r in chunk], pad_id(tok), "right", device)
        positions = torch.tensor([r.subject_last for r in chunk], device=device)
        with TraceDict(model, list(inputs) + list(outputs), retain_input=bool(inputs), retain_output=bool(outputs),
                       stop_at=stop_at) as traces, \
                (Trace(model, keep_name, retain_input=True) if keep_name else contextlib.nullcontext()) as block:
            try:
                if start is not None:
                    with blocks_from(*resume.found, start) as base:
                        base(inputs_embeds=resume.hidden[number], attention_mask=mask, use_cache=False)
                else:
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
            except StopForward:
                pass
        kept.append(block.input if keep_name else None)
        for kind, name in wanted:
            value = traces[name].input if kind == "input" else traces[name].output
            rows_idx = torch.arange(len(chunk), device=value.device)
            gathered[(kind, name)].append(value[rows_idx, positions.to(value.device)].float())
    if resume is not None:  # the next pass starts at ``keep`` only if every chunk recorded its input
        complete = keep_name is not None and all(h is not None for h in kept)
        resume.block, resume.hidden = (keep, kept) if complete else (None, [])
    return {key: torch.cat(parts) for key, parts in gathered.items()}


def family_mean(vectors: torch.Tensor, index: list[list[list[int]]]) -> torch.Tensor:
    """Mean within each family, then across families: ``(rows, dim)`` -> ``(dim, n_requests)``."""
    columns = []
    for per_family in index:
        means = [vectors[numbers].mean(0) for numbers in per_family]
        columns.append(torch.stack(means).mean(0))
    return torch.stack(columns, dim=1)


def bare_rows(index: list[list[list[int]]]) -> list[int]:
    """Row numbers of the bare prompts (family 0, the ``""`` prefix)."""
    return [per_family[0][0] for per_family in index]
