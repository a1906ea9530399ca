"""Tokenisation with character offsets: where the subject ends, where the target begins.

Everything is tokenised as one string (``prompt + " " + target``) so the model sees the tokens it would see in
running text, and positions are found from character offsets, never from the tokenizer's padding side.
Batches are padded here, explicitly, so results do not depend on ``tokenizer.padding_side``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Encoded:
    """One tokenised text: ``ids``; ``subject_last`` (index of the subject's last token, or -1);
    ``target_start`` (index of the first target token, or ``len(ids)`` when there is no target)."""

    ids: tuple[int, ...]
    subject_last: int = -1
    target_start: int = -1

    @property
    def target_ids(self) -> tuple[int, ...]:
        return self.ids[self.target_start:]


def join_target(prompt: str, target: str) -> tuple[str, int]:
    """``prompt + " " + target`` (whitespace normalised) and the character index where the target's space starts."""
    prompt = prompt.rstrip()
    return f"{prompt} {target.strip()}", len(prompt)


def _offsets(tok, text: str):
    enc = tok(text, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _token_at_char(tok, text: str, char: int, ids, offsets) -> int:
    """Index of the token that covers character ``char`` of ``text``."""
    if offsets is not None:
        for i, (start, end) in enumerate(offsets):
            if start <= char < end:
                return i
        # Some tokenizers leave whitespace out of offsets; take the last token starting at or before char.
        candidates = [i for i, (start, end) in enumerate(offsets) if end > start and start <= char]
        if candidates:
            return candidates[-1]
        raise ValueError(f"no token covers character {char} of {text!r}")
    return len(tok(text[: char + 1])["input_ids"]) - 1


def encode(tok, text: str, subject_span: tuple[int, int] | None = None, target_char: int | None = None) -> Encoded:
    """Tokenise ``text``; locate the token holding the last character of ``subject_span`` (a character range)
    and the first token at or after character ``target_char``."""
    if getattr(tok, "is_fast", False):
        ids, offsets = _offsets(tok, text)
    else:
        ids, offsets = list(tok(text)["input_ids"]), None
    subject_last = -1
    if subject_span is not None:
        subject_last = _token_at_char(tok, text, subject_span[1] - 1, ids, offsets)
    target_start = len(ids)
    if target_char is not None:
        if offsets is not None:
            target_start = next((i for i, (s, e) in enumerate(offsets) if e > target_char and e > s), len(ids))
            # a token that began inside the prompt stays with the prompt
            if target_start < len(ids) and offsets[target_start][0] < target_char:
                target_start += 1
        else:
            target_start = len(tok(text[:target_char])["input_ids"])
        if target_start >= len(ids):
            raise ValueError(f"the target of {text!r} produced no tokens")
        if subject_last >= target_start:
            raise ValueError(f"subject overlaps the target in {text!r}")
    return Encoded(tuple(ids), subject_last, target_start)


def find_subject(prompt: str, subject: str) -> tuple[int, int]:
    """Character span of ``subject`` in ``prompt`` (last occurrence; leading/trailing spaces ignored)."""
    needle = subject.strip()
    start = prompt.rfind(needle)
    if not needle or start < 0:
        raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    return start, start + len(needle)


def encode_prompt(tok, prompt: str, subject: str, prefix: str = "", target: str | None = None) -> Encoded:
    """Tokenise ``prefix + prompt`` (plus ``" " + target`` if given), locating subject and target."""
    span = find_subject(prompt, subject)
    if target is None:
        text, target_char = prefix + prompt, None
    else:
        joined, cut = join_target(prompt, target)
        text, target_char = prefix + joined, len(prefix) + cut
    return encode(tok, text, (len(prefix) + span[0], len(prefix) + span[1]), target_char)


def pad_batch(sequences, pad_id: int, side: str = "right", device=None):
    """Pad lists of token ids to one tensor; returns ``(input_ids, attention_mask, offsets)`` where
    ``offsets[i]`` is the column of sequence i's first token (non-zero only for left padding)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    offsets = []
    for i, seq in enumerate(sequences):
        start = width - len(seq) if side == "left" else 0
        ids[i, start:start + len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, start:start + len(seq)] = 1
        offsets.append(start)
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask, offsets


def pad_id(tok) -> int:
    for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0
