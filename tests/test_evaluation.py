"""EasyEdit-convention metrics on the embedded SmolLM2-135M model."""
from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from mose_easyedit.data import load_dataset
from mose_easyedit.evaluation import (
    cache_locality_reference,
    counterfact_probability_scores,
    evaluate_requests,
    locality_score,
    query_pairs,
    summarize,
    token_accuracy,
)
from mose_easyedit.modeling import input_device, load_default_model
from mose_easyedit.tokens import encode, join_target

FACT_PROMPTS = [
    "The capital of France is",
    "The Eiffel Tower is located in the city of",
    "Barack Obama was born in",
    "The largest planet in the solar system is",
    "Water is made of hydrogen and",
]


def _greedy_ids(model, tok, prompt: str, steps: int = 3) -> list[int]:
    ids = torch.tensor([tok(prompt)["input_ids"]], device=input_device(model))
    config = GenerationConfig(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, num_beams=1,
                              pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, ids.shape[1]:].tolist()


def _greedy_targets(model, tok) -> list[tuple[str, str]]:
    """(prompt, target) pairs whose target is the model's own greedy continuation and re-tokenises to the same
    ids when joined as ``prompt + " " + target``."""
    pairs = []
    for prompt in FACT_PROMPTS:
        ids = _greedy_ids(model, tok, prompt)
        target = tok.decode(ids)
        text, cut = join_target(prompt, target)
        if target.startswith(" ") and list(encode(tok, text, None, cut).target_ids) == ids:
            pairs.append((prompt, target))
    return pairs


@pytest.fixture(scope="module")
def requests_mixed(shared_data):
    """CounterFact (str fields), ROME-format CounterFact (list fields) and KnowEdit ZsRE (portability)."""
    rome = load_dataset("counterfact-rome", data_dir=shared_data, limit=1)
    neighborhood = rome[0]["locality"]["neighborhood"]
    for key in ("prompt", "ground_truth"):  # 4 of the 10 neighbourhood prompts keep the tests fast
        neighborhood[key] = neighborhood[key][:4]
    return (load_dataset("counterfact", data_dir=shared_data, limit=2) + rome
            + load_dataset("zsre", data_dir=shared_data, limit=2))


@pytest.fixture(scope="module")
def greedy_pairs(default_model):
    return _greedy_targets(*default_model)


def test_token_accuracy_greedy_and_nonsense(default_model, greedy_pairs):
    model, tok = default_model
    pairs = greedy_pairs
    assert len(pairs) >= 2, "expected some prompts whose greedy continuation re-tokenises identically"
    scores = token_accuracy(model, tok, [p for p, _ in pairs], [t for _, t in pairs], progress=False)
    assert scores == [1.0] * len(pairs)
    nonsense = token_accuracy(model, tok, FACT_PROMPTS[:2], ["zebra quantum pickle saxophone"] * 2, progress=False)
    assert all(0.0 <= s < 1.0 for s in nonsense)


def test_padding_side_and_batching_do_not_matter(default_model, requests_mixed):
    model, tok = default_model
    prompts = [r["prompt"] for r in requests_mixed] + FACT_PROMPTS[:3]
    targets = [r["target_new"] for r in requests_mixed] + [r["ground_truth"] for r in requests_mixed][:3]
    original_side = tok.padding_side
    try:
        results = {}
        for side in ("left", "right"):
            tok.padding_side = side
            reference = cache_locality_reference(model, tok, requests_mixed, progress=False)
            results[side] = (token_accuracy(model, tok, prompts, targets, batch_size=16, progress=False),
                             locality_score(model, tok, requests_mixed, reference, progress=False),
                             reference.predictions)
        assert results["left"] == results["right"]
        one_by_one = token_accuracy(model, tok, prompts, targets, batch_size=1, progress=False)
        assert one_by_one == results["right"][0]
    finally:
        tok.padding_side = original_side


def test_locality_against_original_model(default_model, requests_mixed):
    model, tok = default_model
    reference = cache_locality_reference(model, tok, requests_mixed, progress=False)
    assert locality_score(model, tok, requests_mixed, reference, progress=False) == [1.0] * len(requests_mixed)
    # Locality compares with the original model's argmax, not with the ground-truth answer tokens.
    gt_pairs = [pair for r in requests_mixed for entry in r["locality"].values() for pair in query_pairs(entry)]
    gt_acc = token_accuracy(model, tok, [p for p, _ in gt_pairs], [a for _, a in gt_pairs], progress=False)
    assert min(gt_acc) < 1.0

    weight = model.model.layers[10].mlp.down_proj.weight
    saved = weight.detach().clone()
    was_training = model.training
    try:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            weight.add_(torch.randn(weight.shape, generator=generator).to(weight) * saved.std() * 20)
        model.train()  # evaluation must switch dropout off and restore the flag
        perturbed = locality_score(model, tok, requests_mixed, reference, progress=False)
        assert model.training
        assert all(0.0 <= s <= 1.0 for s in perturbed)
        assert sum(perturbed) / len(perturbed) < 0.95
    finally:
        with torch.no_grad():
            weight.copy_(saved)
        model.train(was_training)
    assert locality_score(model, tok, requests_mixed, reference, progress=False) == [1.0] * len(requests_mixed)

    with pytest.raises(KeyError, match="cache_locality_reference"):
        other = [{"prompt": "x", "target_new": "y",
                  "locality": {"n": {"prompt": "Unseen prompt", "ground_truth": "z"}}}]
        locality_score(model, tok, other, reference, progress=False)


def test_evaluate_requests_and_summary(default_model, requests_mixed):
    model, tok = default_model
    reference = cache_locality_reference(model, tok, requests_mixed, progress=False)
    records = evaluate_requests(model, tok, requests_mixed, reference, progress=False)
    assert [r["case_id"] for r in records] == [r["case_id"] for r in requests_mixed]
    for request, record in zip(requests_mixed, records):
        assert {"reliability", "generalization", "locality"} <= set(record)
        assert ("portability" in record) == ("portability" in request)
        assert all(0.0 <= v <= 1.0 for k, v in record.items() if k != "case_id")
        assert record["locality"] == 1.0
    # generalization over a list of rephrases is the mean of the per-rephrase accuracies
    rome = requests_mixed[2]
    per_rephrase = token_accuracy(model, tok, rome["rephrase_prompt"], [rome["target_new"]] * 2, progress=False)
    assert records[2]["generalization"] == pytest.approx(sum(per_rephrase) / 2)
    summary = summarize(records)
    assert summary["count"] == len(records)
    assert summary["reliability"] == pytest.approx(sum(r["reliability"] for r in records) / len(records))
    assert summary["portability"] == pytest.approx((records[3]["portability"] + records[4]["portability"]) / 2)
    assert "case_id" not in summary
    assert summary["strict_reliability"] == sum(r["reliability"] == 1.0 for r in records) / len(records)
    assert summary["strict_generalization"] == pytest.approx(
        sum(r["generalization"] == 1.0 for r in records) / len(records))
    without_reference = evaluate_requests(model, tok, requests_mixed, progress=False)
    assert all("locality" not in r for r in without_reference)


def test_counterfact_probability_scores(default_model, requests_mixed, greedy_pairs):
    model, tok = default_model
    prompt, target = greedy_pairs[0]
    request = {"case_id": 0, "prompt": prompt, "target_new": target, "ground_truth": "zebra quantum pickle",
               "rephrase_prompt": [prompt], "locality": {"n": {"prompt": prompt, "ground_truth": target}}}
    scores = counterfact_probability_scores(model, tok, [request], progress=False)[0]
    assert scores == {"case_id": 0, "efficacy": 1.0, "paraphrase": 1.0, "neighborhood": 0.0}
    swapped = dict(request, target_new="zebra quantum pickle", ground_truth=target)
    assert counterfact_probability_scores(model, tok, [swapped], progress=False)[0]["efficacy"] == 0.0
    for record in counterfact_probability_scores(model, tok, requests_mixed[:3], progress=False):
        assert all(0.0 <= record[k] <= 1.0 for k in ("efficacy", "paraphrase", "neighborhood"))


def test_bfloat16_model(requests_mixed):
    torch.set_num_threads(1)
    model, tok = load_default_model(dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    requests = requests_mixed[:2]
    scores = token_accuracy(model, tok, [r["prompt"] for r in requests], [r["target_new"] for r in requests],
                            progress=False)
    assert all(0.0 <= s <= 1.0 for s in scores)
    reference = cache_locality_reference(model, tok, requests, progress=False)
    assert locality_score(model, tok, requests, reference, progress=False) == [1.0] * 2
