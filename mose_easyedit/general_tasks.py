"""General-ability probes after editing (docs/methods.md §9): the paper's RTE, Natural Questions, SAMSum and SST-2
scored on generations, RTE and SST-2 scored by likelihood (``rte_ll``, ``sst2_ll``), and held-out WikiText-2
perplexity (``wikitext_ppl``).

Zero-shot prompts, exactly as in the methods table; greedy decoding; only the newly generated tokens are decoded
(special tokens skipped, generation cut at the first end-of-sequence token). Batches are left-padded explicitly
with an attention mask, and nothing global is touched (``tokenizer.padding_side`` is neither read nor changed).

Scoring avoids the known bugs of the original scripts: the answer is searched only in the generated text, never in
the prompt; every example is scored exactly once; special tokens are skipped by the tokenizer, not by cutting a
fixed number of characters; label tasks get several new tokens, so labels that tokenise into several pieces fit.

* RTE: accuracy; the first word of the generation, ``True`` ↔ entailment, ``False`` ↔ not_entailment (anything
  else is wrong);
* SST-2: accuracy; the first word must be ``positive``/``negative`` (label 1 = positive);
* NQ: exact match of any SQuAD-normalised answer against a whole-word span of the normalised generation;
* SAMSum: mean of ROUGE-1/2/L F1 (``rouge_score``, with stemming) against the reference summary.

Subsets are chosen by hashing ``(task, seed, index)``, so they are identical for every method and model, do not
depend on library versions, and a smaller subset is contained in a larger one with the same seed.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .data import json_lines, resolve_data_dir
from .evaluation import eval_mode, target_nll
from .modeling import base_model, input_device, plain_head
from .tokens import join_target, pad_batch, pad_id

logger = logging.getLogger(__name__)

#: The paper's four generation-scored tasks (its Figure 3).
PAPER_TASKS = ("rte", "nq", "samsum", "sst2")
#: Likelihood-scored classification (lm-evaluation-harness convention): the label whose continuation the model
#: gives the higher log-probability, on the same prompts and subsets as the generation-scored task.
LIKELIHOOD_TASKS = {"rte_ll": ("rte", {True: "True", False: "False"}),
                    "sst2_ll": ("sst2", {1: "positive", 0: "negative"})}
#: Held-out perplexity of WikiText-2 (raw test split), windows of PERPLEXITY_WINDOW tokens; lower is better.
PERPLEXITY_TASKS = ("wikitext_ppl",)
PERPLEXITY_WINDOW = 64
TASKS = PAPER_TASKS + tuple(LIKELIHOOD_TASKS) + PERPLEXITY_TASKS
#: Changes whenever a score's definition changes, so cached scores of the unedited model are not reused across it.
PROTOCOL = 2

RTE_PROMPT = "{s1} entails the {s2}. True or False? answer:"
NQ_PROMPT = "Refer to the passage below and answer the following question. Passage: {doc} Question: {q}"
SAMSUM_PROMPT = "{dialogue} TL;DR:"
SST2_PROMPT = ("For each snippet of text, label the sentiment of the text as positive or negative. "
               "The answer should be exact 'positive' or 'negative'. text: {text} answer:")

#: New-token budgets: a few tokens for labels (room for multi-piece labels), 20 for NQ, 25 for SAMSum.
MAX_NEW_TOKENS = {"rte": 5, "nq": 20, "samsum": 25, "sst2": 5}

FILES = {
    "rte": ("rte", "test-NLI.tsv"),
    "nq": ("nq", "test-OpenDomainQA.jsonl"),
    "samsum": ("samsum", "test-summarization.json"),
    "sst2": ("sst2", "test-SentimentAnalysis.tsv"),
}


# ------------------------------------------------------------------------------------------------------ loading
def task_file(task: str, data_dir=None) -> Path:
    """The file of a task. ``data_dir`` (or ``$MOSE_EASYEDIT_DATA``) may be the shared data folder or its
    ``general_tasks`` subfolder (WikiText lives in the shared folder's ``text_corpus``)."""
    if task not in TASKS:
        raise ValueError(f"unknown general task {task!r}; known: {list(TASKS)}")
    root = resolve_data_dir(data_dir)
    if task in PERPLEXITY_TASKS:
        base = root.parent if root.name == "general_tasks" else root
        path = base / "text_corpus" / "wikitext-2-raw.test.raw"
        if not path.is_file():
            raise FileNotFoundError(f"{task}: data file {path} does not exist")
        return path
    task = LIKELIHOOD_TASKS.get(task, (task,))[0]
    if (root / "general_tasks").is_dir():
        root = root / "general_tasks"
    path = root.joinpath(*FILES[task])
    if not path.is_file():
        raise FileNotFoundError(f"{task}: data file {path} does not exist")
    return path


def _read_tsv(path: Path, columns: Sequence[str]) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise ValueError(f"{path}: empty file")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"{path}: header {header} lacks column(s) {missing}")
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise ValueError(f"{path}: line {line}: {len(row)} fields, expected {len(header)}")
        out.append(dict(zip(header, row)))
    return out


def load_rte(data_dir=None) -> list[dict]:
    """RTE examples ``{"sentence1", "sentence2", "label"}`` with ``label`` True for entailment."""
    path = task_file("rte", data_dir)
    examples = []
    for i, row in enumerate(_read_tsv(path, ("sentence1", "sentence2", "label"))):
        label = row["label"].strip()
        if label not in ("entailment", "not_entailment"):
            raise ValueError(f"{path}: row {i}: field 'label': unexpected value {label!r}")
        examples.append({"sentence1": row["sentence1"].strip(), "sentence2": row["sentence2"].strip(),
                         "label": label == "entailment"})
    return examples


def load_sst2(data_dir=None) -> list[dict]:
    """SST-2 examples ``{"sentence", "label"}`` with ``label`` 1 = positive, 0 = negative."""
    path = task_file("sst2", data_dir)
    examples = []
    for i, row in enumerate(_read_tsv(path, ("sentence", "label"))):
        label = row["label"].strip()
        if label not in ("0", "1"):
            raise ValueError(f"{path}: row {i}: field 'label': unexpected value {label!r}")
        examples.append({"sentence": row["sentence"].strip(), "label": int(label)})
    return examples


def load_nq(data_dir=None) -> list[dict]:
    """NQ examples ``{"question", "answers", "passage"}``; the passage is the record's ``output[0]``."""
    path = task_file("nq", data_dir)
    examples = []
    for line_no, record in json_lines(path):
        where = f"{path}: line {line_no}"
        question, answers, output = record.get("question"), record.get("answer"), record.get("output")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: field 'question': missing or empty")
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers) or not answers:
            raise ValueError(f"{where}: field 'answer': expected a non-empty list of strings")
        if isinstance(output, list):
            output = output[0] if output else None
        if not isinstance(output, str) or not output.strip():
            raise ValueError(f"{where}: field 'output': expected a passage")
        examples.append({"question": question.strip(), "answers": answers, "passage": output.strip()})
    return examples


def load_samsum(data_dir=None) -> list[dict]:
    """SAMSum examples ``{"id", "dialogue", "summary"}`` (Windows line ends normalised)."""
    path = task_file("samsum", data_dir)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list")
    examples = []
    for i, record in enumerate(data):
        for key in ("dialogue", "summary"):
            if not isinstance(record, dict) or not isinstance(record.get(key), str) or not record[key].strip():
                raise ValueError(f"{path}: record {i}: field '{key}': missing or empty")
        examples.append({"id": str(record.get("id", i)),
                         "dialogue": record["dialogue"].replace("\r\n", "\n").strip(),
                         "summary": record["summary"].strip()})
    return examples


def load_wikitext(data_dir=None) -> list[str]:
    """The WikiText-2 raw test split's paragraphs (its ``= Heading =`` lines and blank lines dropped)."""
    path = task_file("wikitext_ppl", data_dir)
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("=")]


LOADERS: dict[str, Callable[..., list[dict]]] = {"rte": load_rte, "nq": load_nq, "samsum": load_samsum,
                                                 "sst2": load_sst2}


def select_subset(n_total: int, subset_size: int | None, seed: int = 0, task: str = "") -> list[int]:
    """Indices (ascending) of a deterministic pseudo-random subset of ``range(n_total)``: the ``subset_size``
    indices with the smallest SHA-256 of ``"task:seed:index"``. All of them when ``subset_size`` is None or not
    smaller than ``n_total``."""
    if subset_size is None or subset_size >= n_total:
        return list(range(n_total))
    if subset_size < 0:
        raise ValueError(f"subset_size must be >= 0, got {subset_size}")

    def key(i: int) -> bytes:
        return hashlib.sha256(f"{task}:{seed}:{i}".encode()).digest()

    return sorted(sorted(range(n_total), key=key)[:subset_size])


# ------------------------------------------------------------------------------------------------------ prompts
def build_prompt(task: str, example: dict) -> str:
    """The zero-shot prompt of one example, exactly as in methods.md §9."""
    if task == "rte":
        return RTE_PROMPT.format(s1=example["sentence1"], s2=example["sentence2"])
    if task == "nq":
        return NQ_PROMPT.format(doc=example["passage"], q=example["question"])
    if task == "samsum":
        return SAMSUM_PROMPT.format(dialogue=example["dialogue"])
    if task == "sst2":
        return SST2_PROMPT.format(text=example["sentence"])
    raise ValueError(f"unknown general task {task!r}")


# --------------------------------------------------------------------------------------------------- generation
def _eos_ids(model, tok) -> set[int]:
    ids = set()
    model_config = getattr(model, "generation_config", None)
    for source in (tok.eos_token_id, getattr(model_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(x) for x in source)
    return ids


def generate_texts(model, tok, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 8,
                   progress: bool = True, desc: str = "generate") -> list[str]:
    """Greedy continuations of ``prompts``; returns only the decoded new text of each (special tokens skipped,
    cut at the first EOS). Left padding is built explicitly and passed with its attention mask."""
    from transformers import GenerationConfig

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []
    encoded = [list(tok(p)["input_ids"]) for p in prompts]
    device, pid = input_device(model), pad_id(tok)
    eos = _eos_ids(model, tok)
    # Everything that shapes greedy decoding is set explicitly: generate() fills only unset (None) fields from
    # the model's own generation_config, so a checkpoint's sampling or penalty defaults cannot leak in.
    config = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False,
                              num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0,
                              pad_token_id=pid, eos_token_id=sorted(eos) or None)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    outputs: list[str] = [""] * len(prompts)
    with eval_mode(model), torch.no_grad():
        for chunk in tqdm(batches, desc=desc, disable=not progress or len(batches) < 2, leave=False):
            ids, mask, _ = pad_batch([encoded[i] for i in chunk], pid, "left", device)
            generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            new_tokens = generated[:, ids.shape[1]:].tolist()
            for row, i in enumerate(chunk):
                tokens = new_tokens[row]
                cut = next((k for k, t in enumerate(tokens) if t in eos), len(tokens))
                outputs[i] = tok.decode(tokens[:cut], skip_special_tokens=True)
    return outputs


# ------------------------------------------------------------------------------------------------------ scoring
def first_word(text: str) -> str:
    """The first alphabetic word of ``text``, lower-cased (``""`` if none)."""
    match = re.search(r"[A-Za-z]+", text)
    return match.group(0).lower() if match else ""


def parse_rte(generation: str) -> bool | None:
    """True (entailment) / False (not entailment) from the first word of the generation; None if neither."""
    return {"true": True, "false": False}.get(first_word(generation))


def score_rte(generation: str, label: bool) -> float:
    prediction = parse_rte(generation)
    return float(prediction is not None and prediction == bool(label))


def parse_sst2(generation: str) -> int | None:
    """1 (positive) / 0 (negative) from the first word of the generation; None if neither."""
    return {"positive": 1, "negative": 0}.get(first_word(generation))


def score_sst2(generation: str, label: int) -> float:
    prediction = parse_sst2(generation)
    return float(prediction is not None and prediction == int(label))


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and the articles a/an/the, squeeze whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def score_nq(generation: str, answers: Sequence[str]) -> float:
    """1.0 when some normalised answer equals a contiguous run of whole words of the normalised *generation*
    (never the prompt), else 0.0."""
    words = normalize_answer(generation).split()
    for answer in answers:
        target = normalize_answer(answer).split()
        if not target:
            continue
        n = len(target)
        if any(words[k:k + n] == target for k in range(len(words) - n + 1)):
            return 1.0
    return 0.0


_ROUGE = None


def score_samsum(generation: str, reference: str) -> float:
    """Mean of ROUGE-1, ROUGE-2 and ROUGE-L F1 of the generation against the reference summary."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    if not generation.strip():
        return 0.0
    scores = _ROUGE.score(reference, generation)
    return sum(scores[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")) / 3.0


def score_example(task: str, generation: str, example: dict) -> float:
    if task == "rte":
        return score_rte(generation, example["label"])
    if task == "sst2":
        return score_sst2(generation, example["label"])
    if task == "nq":
        return score_nq(generation, example["answers"])
    if task == "samsum":
        return score_samsum(generation, example["summary"])
    raise ValueError(f"unknown general task {task!r}")


# --------------------------------------------------------------------------------------------------- evaluation
@dataclass
class TaskResult:
    """One task's score with what produced it: example indices, prompts, generations and per-example scores."""

    task: str
    score: float
    indices: list[int]
    prompts: list[str]
    generations: list[str]
    scores: list[float]


def likelihood_predictions(model, tok, prompts: Sequence[str], labels: dict, batch_size: int = 8,
                           progress: bool = True) -> list:
    """For each prompt, the label (a key of ``labels``) whose text has the highest log-probability as the
    continuation, log p(label text | prompt) summed over its tokens (ties: the first label)."""
    keys = list(labels)
    single = _single_token_labels(tok, prompts, [labels[k] for k in keys])
    if single is not None:  # every label one token after every prompt: one forward pass per prompt suffices
        bases, label_ids = single
        chosen = []
        with eval_mode(model), torch.no_grad():
            for start in range(0, len(bases), batch_size):
                scores = _last_position_logits(model, tok, bases[start:start + batch_size])[:, label_ids]
                chosen += [keys[int(k)] for k in scores.float().argmax(dim=1)]
        return chosen
    pairs = [(prompt, labels[key]) for prompt in prompts for key in keys]
    nll = target_nll(model, tok, [p for p, _ in pairs], [t for _, t in pairs], batch_size, progress, "sum")
    return [keys[min(range(len(keys)), key=lambda k: nll[i * len(keys) + k])] for i in range(len(prompts))]


_WINDOWS: dict[tuple, list[list[int]]] = {}


def _last_position_logits(model, tok, rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """(len(rows), vocab) logits at each row's last token (rows right-padded into one batch); with a plain output
    head only those positions go through it."""
    ids, mask, _ = pad_batch(rows, pad_id(tok), "right", input_device(model))
    last = torch.tensor([len(r) - 1 for r in rows])
    if plain_head(model):
        states = base_model(model)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return model.get_output_embeddings()(states[torch.arange(len(rows)), last.to(states.device)])
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return logits[torch.arange(len(rows)), last.to(logits.device)]


def _single_token_labels(tok, prompts: Sequence[str], texts: Sequence[str]):
    """``(prompt ids, label ids)`` when each label text adds exactly one token after every prompt (joined as
    :func:`~mose_easyedit.tokens.join_target` joins them), else None."""
    bases, label_ids = [], None
    for prompt in prompts:
        base = list(tok(prompt.rstrip())["input_ids"])
        ids = []
        for text in texts:
            full = list(tok(join_target(prompt, text)[0])["input_ids"])
            if len(full) != len(base) + 1 or full[:-1] != base:
                return None
            ids.append(full[-1])
        if label_ids is not None and ids != label_ids:
            return None
        label_ids = ids
        bases.append(base)
    return bases, label_ids


def windows_of(tok, paragraphs: Sequence[str], length: int) -> list[list[int]]:
    """Non-overlapping windows of ``length`` tokens over the paragraphs joined by blank lines (remembered per
    tokenizer and text, so a run's repeated evaluations tokenise the corpus once)."""
    text = "\n\n".join(paragraphs)
    key = (id(tok), len(tok), hashlib.sha1(text.encode()).hexdigest(), length)
    if key not in _WINDOWS:
        ids = tok(text)["input_ids"]
        _WINDOWS[key] = [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)]
    return _WINDOWS[key]


def perplexity(model, tok, windows: Sequence[Sequence[int]], batch_size: int = 8) -> float:
    """exp of the mean next-token negative log-likelihood over every window (each predicted from its own start)."""
    device = input_device(model)
    total, count = 0.0, 0
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(windows), batch_size):
            ids = torch.tensor(windows[start:start + batch_size], device=device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += ids[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))


def evaluate_task(model, tok, task: str, subset_size: int | None = 200, seed: int = 0, data_dir=None,
                  batch_size: int = 8, progress: bool = True,
                  examples: Sequence[dict] | None = None) -> TaskResult:
    """Score ``model`` on a deterministic subset of one task (``examples`` overrides loading from disk).

    Generation-scored tasks score each generation; likelihood-scored ones (``rte_ll``, ``sst2_ll``) the label of
    the higher log-probability on the same prompts and subset (``generations`` holds the chosen label's text);
    ``wikitext_ppl`` is the perplexity over a subset of ``subset_size`` windows of :data:`PERPLEXITY_WINDOW`
    tokens (``scores`` is empty, lower is better)."""
    if task not in TASKS:
        raise ValueError(f"unknown general task {task!r}; known: {list(TASKS)}")
    if task in PERPLEXITY_TASKS:
        windows = windows_of(tok, load_wikitext(data_dir) if examples is None else examples, PERPLEXITY_WINDOW)
        indices = select_subset(len(windows), subset_size, seed, task)
        score = perplexity(model, tok, [windows[i] for i in indices], batch_size)
        logger.info("%s: %.3f over %d window(s) of %d tokens", task, score, len(indices), PERPLEXITY_WINDOW)
        return TaskResult(task, score, indices, [], [], [])
    if task in LIKELIHOOD_TASKS:
        base, labels = LIKELIHOOD_TASKS[task]
        examples = LOADERS[base](data_dir) if examples is None else examples
        indices = select_subset(len(examples), subset_size, seed, base)  # the generation task's subset
        chosen = [examples[i] for i in indices]
        prompts = [build_prompt(base, ex) for ex in chosen]
        predicted = likelihood_predictions(model, tok, prompts, labels, batch_size, progress)
        scores = [float(p == ex["label"]) for p, ex in zip(predicted, chosen)]
        score = sum(scores) / len(scores) if scores else float("nan")
        logger.info("%s: %.4f on %d example(s)", task, score, len(scores))
        return TaskResult(task, score, indices, prompts, [labels[p] for p in predicted], scores)
    if examples is None:
        examples = LOADERS[task](data_dir)
    indices = select_subset(len(examples), subset_size, seed, task)
    chosen = [examples[i] for i in indices]
    prompts = [build_prompt(task, ex) for ex in chosen]
    generations = generate_texts(model, tok, prompts, MAX_NEW_TOKENS[task], batch_size, progress, desc=task)
    scores = [score_example(task, gen, ex) for gen, ex in zip(generations, chosen)]
    score = sum(scores) / len(scores) if scores else float("nan")
    logger.info("%s: %.4f on %d example(s)", task, score, len(scores))
    return TaskResult(task, score, indices, prompts, generations, scores)


def evaluate_general(model, tok, tasks: Sequence[str] = PAPER_TASKS, subset_size: int | None = 200, seed: int = 0,
                     data_dir=None, batch_size: int = 8, progress: bool = True) -> dict[str, float]:
    """``{task: score}`` for each task, each on the same deterministic subset for every method and model."""
    if isinstance(tasks, str):
        tasks = (tasks,)
    scores, started = {}, time.perf_counter()
    for index, task in enumerate(tasks):
        scores[task] = evaluate_task(model, tok, task, subset_size, seed, data_dir, batch_size, progress).score
        if index == 0 and len(tasks) > 1:
            elapsed = time.perf_counter() - started
            logger.info("general task %s took %.0f s; the other %d task(s) of this evaluation take roughly %.0f s "
                        "more (the generation-scored tasks are slower)", task, elapsed, len(tasks) - 1,
                        elapsed * (len(tasks) - 1))
    return scores
