"""Validation of EasyEdit request dicts, before anything touches the model."""
from __future__ import annotations

from dataclasses import dataclass

from .tokens import find_subject


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt`` (contains ``subject``) should continue with ``target``."""

    prompt: str
    subject: str
    target: str
    raw: dict


def _text(request: dict, key: str, index: int) -> str:
    if key not in request:
        raise ValueError(f"request {index}: missing field '{key}'")
    value = request[key]
    if isinstance(value, dict) and "str" in value:  # ROME/MEMIT style {"str": ..., "id": ...}
        value = value["str"]
    if not isinstance(value, str):
        raise ValueError(f"request {index}: field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"request {index}: field '{key}' is empty")
    return value


def validate_requests(requests) -> list[EditRequest]:
    """Check every request (``prompt``, ``subject``, ``target_new``) and return them normalised.

    Raises ``ValueError`` naming the request index and the field. A prompt may use MEMIT's ``{}``
    placeholder for the subject.
    """
    if isinstance(requests, dict):
        requests = [requests]
    if not isinstance(requests, (list, tuple)) or not requests:
        raise ValueError("requests must be a non-empty list of request dicts")
    out = []
    for index, request in enumerate(requests):
        if not isinstance(request, dict):
            raise ValueError(f"request {index}: expected a dict, got {type(request).__name__}")
        prompt = _text(request, "prompt", index)
        subject = _text(request, "subject", index)
        target = _text(request, "target_new", index)
        if "{}" in prompt:
            prompt = prompt.replace("{}", subject.strip())
        try:
            find_subject(prompt, subject)
        except ValueError:
            raise ValueError(f"request {index}: field 'subject' ({subject!r}) does not occur in field 'prompt' "
                             f"({prompt!r})") from None
        out.append(EditRequest(prompt.rstrip(), subject.strip(), target.strip(), request))
    return out
