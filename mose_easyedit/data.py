"""Dataset loaders that turn the editing benchmarks into EasyEdit request dicts.

A request is a plain dict::

    {"case_id": int, "prompt": str, "subject": str, "target_new": str, "ground_truth": str,
     "rephrase_prompt": str | list[str],
     "locality": {name: {"prompt": str | list[str], "ground_truth": str | list[str]}},
     "portability": {name: {"prompt": ..., "ground_truth": ...}}}      # only where the data has it

``subject`` is always a substring of ``prompt`` (EasyEdit asserts the same). Targets are stripped of surrounding
whitespace: the editing methods add the separating space themselves.

Supported formats (detected from the records' keys):

* CounterFact, EasyEdit/MEND format (``counterfact-edit.json``: ``prompt, subject, target_new, ground_truth,
  rephrase_prompt, locality_prompt, locality_ground_truth``);
* CounterFact, original ROME format (``requested_rewrite{prompt with "{}", subject, target_new{str},
  target_true{str}}, paraphrase_prompts, neighborhood_prompts, ...``);
* ZsRE, KnowEdit format (``ZsRE-test-all.json``: ``ground_truth`` lists, ``locality.Relation_Specificity``,
  ``portability``);
* ZsRE, MEND/MEMIT format (``src, subject, alt, answers, rephrase, loc, loc_ans``);
* ConceptEdit (``final_<model>_<inter|intra>.json``: ``prompt, phrase_prompt, target_new_desc, instance_prompt,
  locality_prompt, locality_answer, label``), mapped the way EasyEdit's ``examples/run_concept_editing.py`` and
  ``ConceptEditor._prepare_requests`` do it.

Malformed records raise :class:`ValueError` naming the file, the record's index in the file and the field.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

DATA_ENV = "MOSE_EASYEDIT_DATA"

#: Ground truth EasyEdit's ConceptEditor uses when none is given (ConceptEdit has no "old" answer).
CONCEPT_DEFAULT_GROUND_TRUTH = "<|endoftext|>"

#: Dataset names ``load_dataset`` understands, with their file under the data directory.
DEFAULT_FILES = {
    "counterfact": ("counterfact", "counterfact-edit.json"),
    "counterfact-rome": ("counterfact", "rome_format_subset", "counterfact_filtered.json"),
    "zsre": ("zsre", "ZsRE-test-all.json"),
    "zsre-mend": ("zsre", "zsre_mend_train-1k.json"),
}


# ----------------------------------------------------------------------------------------------- data directory
def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The shared data folder: ``data_dir`` if given, else ``$MOSE_EASYEDIT_DATA``; a clear error if neither."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_ENV) or None
    if data_dir is None:
        raise ValueError(
            f"no data directory: pass data_dir=... or set the environment variable {DATA_ENV} to the folder "
            "that holds counterfact/, zsre/ and general_tasks/ (the project's shared/data)"
        )
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {path} does not exist")
    return path


# --------------------------------------------------------------------------------------------------- validation
class _Record:
    """One raw record with field accessors that raise errors naming file, index and field."""

    def __init__(self, path: Path, index: int, raw: Any):
        self.path, self.index = path, index
        if not isinstance(raw, dict):
            raise self.error("<record>", f"expected a JSON object, got {type(raw).__name__}")
        self.raw = raw

    def error(self, field: str, message: str) -> ValueError:
        return ValueError(f"{self.path}: record {self.index}: field '{field}': {message}")

    def get(self, field: str, types: type | tuple[type, ...], container: dict | None = None,
            name: str | None = None):
        """``container[field]`` (the record by default), checked against ``types``; ``name`` is the field's
        dotted path for messages."""
        source = self.raw if container is None else container
        name = name or field
        if field not in source:
            raise self.error(name, "missing")
        value = source[field]
        if isinstance(value, bool) or not isinstance(value, types):
            expected = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
            raise self.error(name, f"expected {expected}, got {type(value).__name__}")
        return value

    def text(self, field: str, container: dict | None = None, name: str | None = None, strip: bool = False) -> str:
        """A non-empty string field."""
        value = self.get(field, str, container, name)
        if not value.strip():
            raise self.error(name or field, "empty")
        return value.strip() if strip else value

    def texts(self, field: str, container: dict | None = None, name: str | None = None,
              allow_empty_list: bool = False) -> str | list[str]:
        """A non-empty string, or a list of non-empty strings."""
        name = name or field
        value = self.get(field, (str, list), container, name)
        if isinstance(value, str):
            if not value.strip():
                raise self.error(name, "empty")
            return value
        if not value and not allow_empty_list:
            raise self.error(name, "empty list")
        for j, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(f"{name}[{j}]", f"expected str, got {type(item).__name__}")
            if not item.strip():
                raise self.error(f"{name}[{j}]", "empty")
        return list(value)

    def answer(self, value: Any, name: str) -> str:
        """An answer that may be a string or a list of alternative strings (possibly nested): the first one."""
        while isinstance(value, list):
            if not value:
                raise self.error(name, "empty list of answers")
            value, name = value[0], f"{name}[0]"
        if not isinstance(value, str):
            raise self.error(name, f"expected str, got {type(value).__name__}")
        if not value.strip():
            raise self.error(name, "empty")
        return value.strip()

    def check_subject(self, prompt: str, subject: str, field: str = "subject") -> None:
        if subject not in prompt:
            raise self.error(field, f"subject {subject!r} does not occur in prompt {prompt!r}")


# ------------------------------------------------------------------------------------------------------ reading
def json_lines(path: str | os.PathLike, complete_only: bool = False):
    """``(line number, object)`` for every non-blank line of a JSON-lines file; a line that is not a JSON object
    raises ``ValueError`` naming the file and the line. ``complete_only``: stop at a last line without its newline
    (an append cut off by a kill)."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if complete_only and not line.endswith("\n"):
                return
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {number}: not valid JSON ({exc})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object")
            yield number, record


def _read_json_list(path: str | os.PathLike) -> tuple[Path, list]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return path, data


def _convert(path: Path, data: list, convert: Callable[[_Record], dict], limit: int | None, start: int,
             skip_invalid: bool) -> list[dict]:
    """Convert ``data[start:start+limit]``; errors carry the index in the file."""
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    stop = len(data) if limit is None else min(len(data), start + limit)
    requests, skipped = [], []
    for index in range(start, stop):
        try:
            requests.append(convert(_Record(path, index, data[index])))
        except ValueError as exc:
            if not skip_invalid:
                raise ValueError(f"{exc} (pass skip_invalid=True to drop malformed records)") from None
            skipped.append(index)
            logger.warning("skipping malformed record: %s", exc)
    if skipped:
        logger.warning("%s: skipped %d malformed record(s): %s", path, len(skipped), skipped)
    logger.info("loaded %d request(s) from %s", len(requests), path)
    return requests


def _case_id(record: _Record) -> int:
    if "case_id" in record.raw:
        return record.get("case_id", int)
    return record.index


# ------------------------------------------------------------------------------------------------------ detection
def detect_format(record: Any) -> str:
    """The format of one raw record: ``counterfact-easyedit``, ``counterfact-rome``, ``zsre-knowedit``,
    ``zsre-mend`` or ``conceptedit``; ``"unknown"`` otherwise."""
    if not isinstance(record, dict):
        return "unknown"
    keys = set(record)
    if "requested_rewrite" in keys:
        return "counterfact-rome"
    if "target_new_desc" in keys or {"phrase_prompt", "label"} <= keys:
        return "conceptedit"
    if {"src", "alt"} <= keys:
        return "zsre-mend"
    if "locality_prompt" in keys and "target_new" in keys:
        return "counterfact-easyedit"
    if {"prompt", "target_new"} <= keys and isinstance(record.get("locality"), dict):
        return "zsre-knowedit"
    return "unknown"


def _detect_file(path: Path, data: list) -> str:
    if not data:
        raise ValueError(f"{path}: the file holds no records")
    return detect_format(data[0])


# ------------------------------------------------------------------------------------------------- CounterFact
def _counterfact_easyedit(record: _Record) -> dict:
    prompt = record.text("prompt")
    subject = record.text("subject")
    record.check_subject(prompt, subject)
    request = {
        "case_id": _case_id(record),
        "prompt": prompt,
        "subject": subject,
        "target_new": record.text("target_new", strip=True),
        "ground_truth": record.text("ground_truth", strip=True),
        "rephrase_prompt": record.texts("rephrase_prompt"),
        "locality": {
            "neighborhood": {
                "prompt": record.texts("locality_prompt"),
                "ground_truth": record.answer(record.get("locality_ground_truth", (str, list)),
                                              "locality_ground_truth"),
            }
        },
    }
    return request


def _read_case_id_map(path: Path) -> dict[int, int] | None:
    """``case_id_map.tsv`` beside a ROME-format subset: file case_id -> original CounterFact case_id."""
    table = path.parent / "case_id_map.tsv"
    if not table.is_file():
        return None
    mapping = {}
    with open(table, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            try:
                mapping[int(row["file_case_id"])] = int(row["original_case_id"])
            except (KeyError, TypeError, ValueError):
                logger.warning("ignoring %s: unexpected columns", table)
                return None
    return mapping


def _counterfact_rome(record: _Record) -> dict:
    rewrite = record.get("requested_rewrite", dict)
    template = record.text("prompt", rewrite, "requested_rewrite.prompt")
    if template.count("{}") != 1:
        raise record.error("requested_rewrite.prompt", f"expected exactly one '{{}}' placeholder in {template!r}")
    subject = record.text("subject", rewrite, "requested_rewrite.subject")
    new = record.get("target_new", dict, rewrite, "requested_rewrite.target_new")
    true = record.get("target_true", dict, rewrite, "requested_rewrite.target_true")
    target_new = record.text("str", new, "requested_rewrite.target_new.str", strip=True)
    target_true = record.text("str", true, "requested_rewrite.target_true.str", strip=True)
    prompt = template.replace("{}", subject)
    record.check_subject(prompt, subject, "requested_rewrite.subject")
    paraphrases = record.texts("paraphrase_prompts")
    neighborhood = record.texts("neighborhood_prompts")
    neighborhood = [neighborhood] if isinstance(neighborhood, str) else neighborhood
    request = {
        "case_id": _case_id(record),
        "prompt": prompt,
        "subject": subject,
        "target_new": target_new,
        "ground_truth": target_true,
        "rephrase_prompt": paraphrases,
        # Neighbourhood subjects share the edited fact's true object: their ground truth is target_true.
        "locality": {"neighborhood": {"prompt": neighborhood, "ground_truth": [target_true] * len(neighborhood)}},
    }
    for extra in ("attribute_prompts", "generation_prompts"):
        if extra in record.raw:
            request[extra] = record.texts(extra, allow_empty_list=True)
    return request


def load_counterfact(path: str | os.PathLike, limit: int | None = None, start: int = 0,
                     skip_invalid: bool = False) -> list[dict]:
    """CounterFact requests from an EasyEdit/MEND-format or an original ROME-format file (auto-detected).

    ``records[start:start + limit]`` are converted. ROME-format prompts get the subject filled in, the two
    paraphrases become a list ``rephrase_prompt`` and the neighbourhood prompts the locality set (ground truth
    ``target_true``); when ``case_id_map.tsv`` sits beside the file, requests also carry ``original_case_id``.
    """
    path, data = _read_json_list(path)
    return _counterfact_file(path, data, limit, start, skip_invalid)


def _counterfact_file(path: Path, data: list, limit, start, skip_invalid) -> list[dict]:
    kind = _detect_file(path, data)
    if kind == "counterfact-easyedit":
        return _convert(path, data, _counterfact_easyedit, limit, start, skip_invalid)
    if kind == "counterfact-rome":
        requests = _convert(path, data, _counterfact_rome, limit, start, skip_invalid)
        mapping = _read_case_id_map(path)
        if mapping is not None:
            for request in requests:
                if request["case_id"] in mapping:
                    request["original_case_id"] = mapping[request["case_id"]]
        return requests
    raise ValueError(f"{path}: record 0 is not in a CounterFact format (detected: {kind})")


# ------------------------------------------------------------------------------------------------------- ZsRE
def _query_set(record: _Record, items: Any, name: str) -> dict | None:
    """KnowEdit's ``[{prompt, ground_truth}, ...]`` list as ``{"prompt": [...], "ground_truth": [...]}``
    (the first alternative of each answer list); ``None`` for an empty list."""
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list):
        raise record.error(name, "expected a list of {prompt, ground_truth} objects, "
                                 f"got {type(items).__name__}")
    prompts, answers = [], []
    for j, item in enumerate(items):
        where = f"{name}[{j}]"
        if not isinstance(item, dict):
            raise record.error(where, f"expected an object, got {type(item).__name__}")
        prompt = record.get("prompt", (str, list), item, f"{where}.prompt")
        prompt = record.answer(prompt, f"{where}.prompt")  # a list of prompts here means alternatives
        answer = record.answer(record.get("ground_truth", (str, list), item, f"{where}.ground_truth"),
                               f"{where}.ground_truth")
        prompts.append(prompt)
        answers.append(answer)
    if not prompts:
        return None
    return {"prompt": prompts, "ground_truth": answers}


def _zsre_knowedit(record: _Record) -> dict:
    prompt = record.text("prompt")
    subject = record.text("subject")
    record.check_subject(prompt, subject)
    request = {
        "case_id": _case_id(record),
        "prompt": prompt,
        "subject": subject,
        "target_new": record.answer(record.get("target_new", (str, list)), "target_new"),
        "ground_truth": record.answer(record.get("ground_truth", (str, list)), "ground_truth"),
    }
    if "rephrase_prompt" in record.raw:
        request["rephrase_prompt"] = record.texts("rephrase_prompt")
    locality = {}
    for name, items in record.get("locality", dict).items():
        entry = _query_set(record, items, f"locality.{name}")
        if entry is not None:
            locality[name] = entry
    request["locality"] = locality
    if "portability" in record.raw:
        portability = {}
        for name, items in record.get("portability", dict).items():
            entry = _query_set(record, items, f"portability.{name}")
            if entry is not None:
                portability[name] = entry
        if portability:
            request["portability"] = portability
    return request


def _zsre_mend(record: _Record) -> dict:
    prompt = record.text("src")
    subject = record.text("subject")
    record.check_subject(prompt, subject)
    request = {
        "case_id": _case_id(record),
        "prompt": prompt,
        "subject": subject,
        "target_new": record.text("alt", strip=True),
        "ground_truth": record.answer(record.get("answers", (str, list)), "answers"),
        "rephrase_prompt": record.texts("rephrase"),
        # The locality prompt keeps its "nq question: " prefix, exactly as EasyEdit's zsRE scripts pass it.
        "locality": {"neighborhood": {
            "prompt": record.text("loc"),
            "ground_truth": record.answer(record.get("loc_ans", (str, list)), "loc_ans"),
        }},
    }
    if "portability" in record.raw:
        port = record.get("portability", dict)
        if "New Question" in port:
            request["portability"] = {"one_hop": {
                "prompt": record.text("New Question", port, "portability.New Question"),
                "ground_truth": record.answer(
                    record.get("New Answer", (str, list), port, "portability.New Answer"),
                    "portability.New Answer"),
            }}
    return request


def load_zsre(path: str | os.PathLike, limit: int | None = None, start: int = 0,
              skip_invalid: bool = False) -> list[dict]:
    """ZsRE requests from a KnowEdit-format or a MEND/MEMIT-format file (auto-detected).

    KnowEdit: ``ground_truth`` (a list of alternatives) becomes its first alternative; each locality/portability
    group becomes ``{"prompt": [...], "ground_truth": [...]}``. MEND: prompt ``src``, target ``alt``, ground truth
    ``answers[0]``, rephrase ``rephrase``, locality ``neighborhood`` = ``loc``/``loc_ans``.
    Note: in the shared data, three records of the KnowEdit test split (indices 396, 597, 676) name a subject
    that is not in their prompt, and two of ``zsre_mend_train-1k.json`` (534, 723) have an empty ``alt``; loading
    a whole file therefore needs ``skip_invalid=True`` (such records are dropped with a warning).
    """
    path, data = _read_json_list(path)
    return _zsre_file(path, data, limit, start, skip_invalid)


def _zsre_file(path: Path, data: list, limit, start, skip_invalid) -> list[dict]:
    kind = _detect_file(path, data)
    if kind == "zsre-knowedit":
        return _convert(path, data, _zsre_knowedit, limit, start, skip_invalid)
    if kind == "zsre-mend":
        return _convert(path, data, _zsre_mend, limit, start, skip_invalid)
    raise ValueError(f"{path}: record 0 is not in a ZsRE format (detected: {kind})")


# ------------------------------------------------------------------------------------------------ ConceptEdit
def _optional_texts(record: _Record, field: str) -> str | list[str] | None:
    if record.raw.get(field) is None:
        return None
    return record.texts(field)


def _conceptedit(record: _Record) -> dict:
    prompt = record.text("prompt")
    subject = record.text("label")  # EasyEdit passes subject=[d['label'] ...] and asserts it is in the prompt
    record.check_subject(prompt, subject, "label")
    request = {
        "case_id": _case_id(record),
        "prompt": prompt,
        "subject": subject,
        "target_new": record.text("target_new_desc", strip=True),
        "ground_truth": CONCEPT_DEFAULT_GROUND_TRUTH,
        "locality": {},
        "instance": {},
    }
    rephrase = _optional_texts(record, "phrase_prompt")
    if rephrase is not None:
        request["rephrase_prompt"] = rephrase
    locality_prompt = _optional_texts(record, "locality_prompt")
    if locality_prompt is not None:  # EasyEdit skips a locality entry whose prompt is None
        answer = record.get("locality_answer", (str, list))
        if isinstance(locality_prompt, list) and isinstance(answer, list):
            if len(answer) != len(locality_prompt):
                raise record.error("locality_answer", f"{len(answer)} answers for {len(locality_prompt)} prompts")
            answer = [record.answer(a, f"locality_answer[{j}]") for j, a in enumerate(answer)]
        else:
            answer = record.answer(answer, "locality_answer")
        request["locality"]["neighborhood"] = {"prompt": locality_prompt, "ground_truth": answer}
    instance_prompt = _optional_texts(record, "instance_prompt")
    if instance_prompt is not None:
        request["instance"]["instance"] = {"prompt": instance_prompt}
    return request


def load_conceptedit(path: str | os.PathLike, limit: int | None = None, start: int = 0,
                     skip_invalid: bool = False) -> list[dict]:
    """ConceptEdit requests from an EasyEdit ``final_<model>_<inter|intra>.json`` file.

    Mirrors EasyEdit (``examples/run_concept_editing.py`` + ``ConceptEditor._prepare_requests``): prompt
    ``prompt``; subject ``label`` (must occur in the prompt); target ``target_new_desc``; ground truth
    ``"<|endoftext|>"`` (EasyEdit's default, the data has none); rephrase ``phrase_prompt``; locality
    ``neighborhood`` = ``locality_prompt``/``locality_answer``; ``instance`` = ``{"instance": {"prompt":
    instance_prompt}}``. The ConceptEdit files are not in the shared data (see its README).
    """
    path, data = _read_json_list(path)
    return _conceptedit_file(path, data, limit, start, skip_invalid)


def _conceptedit_file(path: Path, data: list, limit, start, skip_invalid) -> list[dict]:
    kind = _detect_file(path, data)
    if kind != "conceptedit":
        raise ValueError(f"{path}: record 0 is not in the ConceptEdit format (detected: {kind})")
    return _convert(path, data, _conceptedit, limit, start, skip_invalid)


# ------------------------------------------------------------------------------------------------ dispatching
_LOADERS = {
    "counterfact-easyedit": _counterfact_file,
    "counterfact-rome": _counterfact_file,
    "zsre-knowedit": _zsre_file,
    "zsre-mend": _zsre_file,
    "conceptedit": _conceptedit_file,
}


def dataset_path(name: str, data_dir: str | os.PathLike | None = None, concept_model: str = "gpt2",
                 concept_module: str = "inter") -> Path:
    """The file behind a dataset name (``counterfact``, ``counterfact-rome``, ``zsre``, ``zsre-mend``,
    ``conceptedit``) inside the data directory."""
    root = resolve_data_dir(data_dir)
    key = name.lower()
    if key in DEFAULT_FILES:
        return root.joinpath(*DEFAULT_FILES[key])
    if key == "conceptedit":
        path = root / "conceptedit" / f"final_{concept_model}_{concept_module}.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: ConceptEdit is not part of the shared data; download "
                f"final_{concept_model}_{concept_module}.json (Hugging Face zjunlp/ConceptEdit) and pass its path"
            )
        return path
    raise ValueError(f"unknown dataset name {name!r}; known: {sorted([*DEFAULT_FILES, 'conceptedit'])}")


def load_dataset(name_or_path: str | os.PathLike, limit: int | None = None, start: int = 0,
                 data_dir: str | os.PathLike | None = None, skip_invalid: bool = False, **kwargs) -> list[dict]:
    """Requests by dataset name (``counterfact``, ``counterfact-rome``, ``zsre``, ``zsre-mend``, ``conceptedit``;
    files under ``data_dir`` / ``$MOSE_EASYEDIT_DATA``) or by the path of a file, whose format is detected.
    ``kwargs`` (``concept_model``, ``concept_module``) choose the ConceptEdit file."""
    text = os.fspath(name_or_path)
    candidate = Path(text).expanduser()
    if candidate.suffix.lower() == ".json" or candidate.is_file():
        path = candidate
    else:
        path = dataset_path(text, data_dir, **kwargs)
    path, data = _read_json_list(path)
    kind = _detect_file(path, data)
    if kind not in _LOADERS:
        raise ValueError(f"{path}: cannot tell the dataset format of record 0 (keys: {sorted(data[0])[:12]})"
                         if isinstance(data[0], dict) else f"{path}: record 0 is not a JSON object")
    logger.info("%s: detected format %s", path, kind)
    return _LOADERS[kind](path, data, limit, start, skip_invalid)
