"""Editing metrics in EasyEdit's convention (methods.md §9), plus MEMIT-style CounterFact probability scores.

* reliability / generalization / portability: teacher-forced token accuracy of the target after the prompt, the
  two tokenised together as one string ``prompt + " " + target`` (:func:`mose_easyedit.tokens.join_target`);
* locality: on ``locality_prompt + " " + locality_answer``, the fraction of answer positions where the edited
  model's argmax equals the **original** (pre-edit) model's argmax, cached once by
  :func:`cache_locality_reference` before any edit (not the previous step's model, not the ground truth).

Batches are always right-padded explicitly (:func:`mose_easyedit.tokens.pad_batch`), so no result depends on
``tokenizer.padding_side``. Request fields may be strings or lists (see :mod:`mose_easyedit.data`).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .modeling import input_device
from .tokens import Encoded, encode, join_target, pad_batch, pad_id

logger = logging.getLogger(__name__)

METRICS = ("reliability", "generalization", "locality", "portability")


# ----------------------------------------------------------------------------------------- request field access
def _first_answer(value: Any, where: str) -> str:
    """A string answer, or the first of a (possibly nested) list of alternatives."""
    while isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{where}: empty list of answers")
        value = value[0]
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string answer, got {type(value).__name__}")
    return value


def _as_prompts(value: Any, where: str) -> list[str]:
    """A prompt field (str or list of str) as a list, dropping ``None``/empty entries."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, (list, tuple)):
        out = []
        for j, item in enumerate(value):
            if item is None or (isinstance(item, str) and not item.strip()):
                continue
            if not isinstance(item, str):
                raise ValueError(f"{where}[{j}]: expected a string prompt, got {type(item).__name__}")
            out.append(item)
        return out
    raise ValueError(f"{where}: expected a string or a list of strings, got {type(value).__name__}")


def query_pairs(entry: Any, where: str = "entry") -> list[tuple[str, str]]:
    """``(prompt, answer)`` pairs of one locality/portability entry ``{"prompt": str|list, "ground_truth":
    str|list}``. A single prompt with a list of answers takes the first answer (alternatives); a list of prompts
    with a list of answers pairs them up; a list of prompts with one answer shares it."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected {{'prompt', 'ground_truth'}}, got {type(entry).__name__}")
    if "prompt" not in entry or "ground_truth" not in entry:
        raise ValueError(f"{where}: needs both 'prompt' and 'ground_truth'")
    prompts, answers = entry["prompt"], entry["ground_truth"]
    if prompts is None:
        return []
    if isinstance(prompts, str):
        return [(prompts, _first_answer(answers, f"{where}.ground_truth"))] if prompts.strip() else []
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"{where}.prompt: expected a string or a list, got {type(prompts).__name__}")
    if isinstance(answers, (list, tuple)):
        if len(answers) != len(prompts):
            raise ValueError(f"{where}: {len(prompts)} prompts but {len(answers)} answers")
        pairs = [(p, _first_answer(a, f"{where}.ground_truth[{j}]"))
                 for j, (p, a) in enumerate(zip(prompts, answers))]
    else:
        answer = _first_answer(answers, f"{where}.ground_truth")
        pairs = [(p, answer) for p in prompts]
    out = []
    for j, (prompt, answer) in enumerate(pairs):
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            continue
        if not isinstance(prompt, str):
            raise ValueError(f"{where}.prompt[{j}]: expected a string, got {type(prompt).__name__}")
        out.append((prompt, answer))
    return out


def _groups(request: dict, key: str) -> dict[str, list[tuple[str, str]]]:
    """``{name: pairs}`` for a request's ``locality`` or ``portability`` dict (missing → empty)."""
    value = request.get(key) or {}
    if not isinstance(value, dict):
        raise ValueError(f"request {request.get('case_id', '?')}: '{key}' must be a dict of named entries")
    groups = {}
    for name, entry in value.items():
        pairs = query_pairs(entry, f"{key}.{name}")
        if pairs:
            groups[name] = pairs
    return groups


# -------------------------------------------------------------------------------------------- forward passes
@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Evaluate with dropout off, restoring the model's train/eval flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _encode_pair(tok, prompt: str, target: str) -> Encoded:
    text, cut = join_target(prompt, target)
    enc = encode(tok, text, None, cut)
    if enc.target_start < 1:
        raise ValueError(f"the prompt of {text!r} produced no tokens to predict the target from")
    return enc


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _accepts_logits_to_keep(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep``, to skip the LM head on most prompt positions."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _forward_targets(model, tok, encodings: Sequence[Encoded], batch_size: int, want: str,
                     desc: str, progress: bool) -> list:
    """For each encoding, over its target positions: ``want="argmax"`` → tuple of predicted ids;
    ``want="nll"`` → mean negative log-likelihood of the target tokens (float); ``want="nll_sum"`` → their sum."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results: list = [None] * len(encodings)
    if not encodings:
        return results
    device, pid = input_device(model), pad_id(tok)
    order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))  # little padding per batch
    batches = list(_chunks(order, batch_size))
    keep_supported = _accepts_logits_to_keep(model)
    with eval_mode(model), torch.no_grad():
        for chunk in tqdm(batches, desc=desc, disable=not progress or len(batches) < 2, leave=False):
            ids, mask, _ = pad_batch([encodings[i].ids for i in chunk], pid, "right", device)
            # Only the positions that predict target tokens need logits (position t-1 predicts token t).
            # An int keeps the last positions: [first, width) covers every row's target-predicting positions.
            first = min(encodings[i].target_start for i in chunk) - 1
            kwargs = {"logits_to_keep": ids.shape[1] - first} if keep_supported else {}
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).logits
            offset = ids.shape[1] - logits.shape[1]  # robust to a model that ignores logits_to_keep
            for row, i in enumerate(chunk):
                enc = encodings[i]
                start, stop = enc.target_start, len(enc.ids)
                scores = logits[row, start - 1 - offset:stop - 1 - offset]
                if want == "argmax":
                    results[i] = tuple(scores.argmax(dim=-1).tolist())
                else:
                    labels = torch.tensor(enc.ids[start:stop], device=scores.device)
                    logp = torch.log_softmax(scores.float(), dim=-1).gather(1, labels[:, None])
                    results[i] = float(-(logp.sum() if want == "nll_sum" else logp.mean()))
    return results


def _unique_encodings(tok, pairs: Sequence[tuple[str, str]]):
    """Encode each distinct (prompt, target) once. Returns ``(encodings, texts, index)``: the distinct encodings,
    their joined texts, and for each pair the position of its encoding."""
    positions: dict[str, int] = {}
    encodings: list[Encoded] = []
    texts: list[str] = []
    index = []
    for prompt, target in pairs:
        text, _ = join_target(prompt, target)
        if text not in positions:
            positions[text] = len(encodings)
            encodings.append(_encode_pair(tok, prompt, target))
            texts.append(text)
        index.append(positions[text])
    return encodings, texts, index


def token_accuracy(model, tok, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 16,
                   progress: bool = True) -> list[float]:
    """Teacher-forced token accuracy of each target after its prompt.

    ``prompt + " " + target`` is tokenised as one string; the score is the fraction of target tokens that equal
    the argmax of the logits at the previous position. Batched, right-padded explicitly, without gradients.
    """
    if isinstance(prompts, str) or isinstance(targets, str):
        raise TypeError("token_accuracy takes lists of prompts and targets")
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    encodings, _, index = _unique_encodings(tok, list(zip(prompts, targets)))
    predictions = _forward_targets(model, tok, encodings, batch_size, "argmax", "token accuracy", progress)
    scores = []
    for i in index:
        labels = encodings[i].target_ids
        hits = sum(int(p == t) for p, t in zip(predictions[i], labels))
        scores.append(hits / len(labels))
    return scores


def target_nll(model, tok, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 16,
               progress: bool = True, reduction: str = "mean") -> list[float]:
    """Negative log-likelihood of each target after its prompt (same tokenisation as :func:`token_accuracy`):
    per token (``reduction="mean"``) or of the whole target (``"sum"``, -log p(target | prompt))."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    encodings, _, index = _unique_encodings(tok, list(zip(prompts, targets)))
    want = "nll" if reduction == "mean" else "nll_sum"
    nll = _forward_targets(model, tok, encodings, batch_size, want, "target NLL", progress)
    return [nll[i] for i in index]


# --------------------------------------------------------------------------------------------------- locality
@dataclass
class OriginalOutputs:
    """The pre-edit model's argmax tokens over each locality answer span.

    ``predictions`` maps the joined text ``prompt + " " + answer`` to ``(answer token ids, argmax ids)``; keying by
    text lets the reference serve any subset or reordering of the requests it was computed for.
    """

    predictions: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.predictions)

    def lookup(self, text: str, answer_ids: Sequence[int]) -> tuple[int, ...]:
        """The original argmax ids for a joined locality text, checking the answer tokenises as it did then."""
        if text not in self.predictions:
            raise KeyError(f"no original-model reference for locality text {text!r}: "
                           "compute it with cache_locality_reference on these requests before editing")
        labels, argmax = self.predictions[text]
        if tuple(answer_ids) != tuple(labels):
            raise ValueError(f"the tokenizer splits {text!r} differently from when the reference was cached")
        return argmax


def _locality_pairs(requests: Sequence[dict]) -> list[list[list[tuple[str, str]]]]:
    """Per request, per locality group, its (prompt, answer) pairs."""
    return [list(_groups(request, "locality").values()) for request in requests]


def cache_locality_reference(model, tok, requests: Sequence[dict], batch_size: int = 16,
                             progress: bool = True) -> OriginalOutputs:
    """Run the (unedited) model once over every locality ``prompt + " " + answer`` and store its argmax tokens at
    the teacher-forced answer positions. Call this before the first edit."""
    pairs = [pair for groups in _locality_pairs(requests) for group in groups for pair in group]
    encodings, texts, _ = _unique_encodings(tok, pairs)
    predictions = _forward_targets(model, tok, encodings, batch_size, "argmax", "locality reference", progress)
    reference = OriginalOutputs(
        {text: (tuple(enc.target_ids), pred) for text, enc, pred in zip(texts, encodings, predictions)}
    )
    logger.info("cached original-model locality outputs for %d text(s)", len(reference))
    return reference


def locality_score(model, tok, requests: Sequence[dict], reference: OriginalOutputs, batch_size: int = 16,
                   progress: bool = True) -> list[float | None]:
    """Per request: the mean over its locality items of the fraction of answer positions where this model's
    argmax equals the original model's (from ``reference``); ``None`` for a request without locality data."""
    per_request = _locality_pairs(requests)
    pairs = [pair for groups in per_request for group in groups for pair in group]
    encodings, texts, index = _unique_encodings(tok, pairs)
    predictions = _forward_targets(model, tok, encodings, batch_size, "argmax", "locality", progress)
    per_text = []
    for text, enc, current in zip(texts, encodings, predictions):
        original = reference.lookup(text, enc.target_ids)
        per_text.append(sum(int(a == b) for a, b in zip(current, original)) / len(original))
    agreement = [per_text[i] for i in index]
    scores: list[float | None] = []
    cursor = 0
    for groups in per_request:
        n = sum(len(group) for group in groups)
        scores.append(sum(agreement[cursor:cursor + n]) / n if n else None)
        cursor += n
    return scores


# ------------------------------------------------------------------------------------------------- per request
def evaluate_requests(model, tok, requests: Sequence[dict], reference: OriginalOutputs | None = None,
                      batch_size: int = 16, progress: bool = True) -> list[dict]:
    """EasyEdit-convention metrics of each request on the model as it is now.

    Returns one dict per request with ``case_id``, ``reliability`` (prompt → target_new), ``generalization``
    (mean over the rephrase prompts; absent without them), ``locality`` (only with a ``reference``) and
    ``portability`` (mean token accuracy of its ground truths, where the request has any).
    """
    jobs: list[tuple[int, str, str, str]] = []  # (request index, metric, prompt, target)
    for r, request in enumerate(requests):
        where = f"request {request.get('case_id', r)}"
        target = request.get("target_new")
        if not isinstance(target, str) or not target.strip():
            raise ValueError(f"{where}: 'target_new' must be a non-empty string")
        for prompt in _as_prompts(request.get("prompt"), f"{where}.prompt"):
            jobs.append((r, "reliability", prompt, target))
        for prompt in _as_prompts(request.get("rephrase_prompt"), f"{where}.rephrase_prompt"):
            jobs.append((r, "generalization", prompt, target))
        for pairs in _groups(request, "portability").values():
            for prompt, answer in pairs:
                jobs.append((r, "portability", prompt, answer))
    accuracy = token_accuracy(model, tok, [j[2] for j in jobs], [j[3] for j in jobs], batch_size, progress)
    collected: list[dict[str, list[float]]] = [{} for _ in requests]
    for (r, metric, _, _), score in zip(jobs, accuracy):
        collected[r].setdefault(metric, []).append(score)
    locality = None
    if reference is not None:
        locality = locality_score(model, tok, requests, reference, batch_size, progress)
    records = []
    for r, request in enumerate(requests):
        record = {"case_id": request.get("case_id", r)}
        for metric in ("reliability", "generalization", "portability"):
            if metric in collected[r]:
                values = collected[r][metric]
                record[metric] = sum(values) / len(values)
        if locality is not None and locality[r] is not None:
            record["locality"] = locality[r]
        records.append(record)
    return records


STRICT_METRICS = ("reliability", "generalization")


def summarize(records: Sequence[dict]) -> dict:
    """Mean of every numeric metric over the records that have it (``case_id`` and non-numbers skipped), plus
    ``strict_reliability`` / ``strict_generalization`` (the fraction of records scoring 1.0: every target token
    the argmax) and ``count``, the number of records."""
    totals: dict[str, list[float]] = {}
    for record in records:
        for key, value in record.items():
            if key in ("case_id", "original_case_id") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and not math.isnan(float(value)):
                totals.setdefault(key, []).append(float(value))
    summary = {key: sum(values) / len(values) for key, values in totals.items()}
    for key in STRICT_METRICS:
        if key in totals:  # the fraction of facts whose every target token is the argmax
            summary[f"strict_{key}"] = sum(value == 1.0 for value in totals[key]) / len(totals[key])
    summary["count"] = len(records)
    return summary


# ------------------------------------------------------------------------------------ MEMIT-style probabilities
def counterfact_probability_scores(model, tok, requests: Sequence[dict], batch_size: int = 16,
                                   progress: bool = True) -> list[dict]:
    """MEMIT-style CounterFact scores (the second, optional convention), per request, from mean token NLLs:

    * ``efficacy``: 1 if P(target_new | prompt) > P(ground_truth | prompt), else 0;
    * ``paraphrase``: the same comparison, averaged over the rephrase prompts;
    * ``neighborhood``: over the locality prompts, the fraction where the true answer (the locality ground truth)
      stays more likely than target_new.
    """
    jobs: list[tuple[int, str, int, str, str]] = []  # (request, metric, slot, prompt, target)
    for r, request in enumerate(requests):
        where = f"request {request.get('case_id', r)}"
        new = request.get("target_new")
        true = request.get("ground_truth")
        if not isinstance(new, str) or not isinstance(true, str):
            raise ValueError(f"{where}: 'target_new' and 'ground_truth' must be strings for probability scores")
        for metric, prompts in (("efficacy", _as_prompts(request.get("prompt"), where)),
                                ("paraphrase", _as_prompts(request.get("rephrase_prompt"), where))):
            for k, prompt in enumerate(prompts):
                jobs.append((r, metric, 2 * k, prompt, new))
                jobs.append((r, metric, 2 * k + 1, prompt, true))
        pairs = [pair for group in _groups(request, "locality").values() for pair in group]
        for k, (prompt, answer) in enumerate(pairs):
            jobs.append((r, "neighborhood", 2 * k, prompt, new))
            jobs.append((r, "neighborhood", 2 * k + 1, prompt, answer))
    nll = target_nll(model, tok, [j[3] for j in jobs], [j[4] for j in jobs], batch_size, progress)
    slots: list[dict[str, dict[int, float]]] = [{} for _ in requests]
    for (r, metric, slot, _, _), value in zip(jobs, nll):
        slots[r].setdefault(metric, {})[slot] = value
    records = []
    for r, request in enumerate(requests):
        record = {"case_id": request.get("case_id", r)}
        for metric, values in slots[r].items():
            wins = []
            for k in range(len(values) // 2):
                nll_new, nll_other = values[2 * k], values[2 * k + 1]
                # efficacy/paraphrase: the new target wins; neighbourhood: the true answer must still win
                wins.append(float(nll_new < nll_other) if metric != "neighborhood" else float(nll_other < nll_new))
            record[metric] = sum(wins) / len(wins)
        records.append(record)
    return records
