"""General-ability probes: loaders, prompts, subset selection, scorers and a tiny end-to-end run."""
from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from mose_easyedit import general_tasks as gt
from mose_easyedit.modeling import input_device


# ------------------------------------------------------------------------------------------------------ loaders
def test_loaders_read_the_real_files(shared_data):
    rte = gt.load_rte(shared_data)
    assert len(rte) == 2489 and sum(ex["label"] for ex in rte) == 1249
    assert rte[0] == {"sentence1": "No Weapons of Mass Destruction Found in Iraq Yet.",
                      "sentence2": "Weapons of Mass Destruction Found in Iraq.", "label": False}
    nq = gt.load_nq(shared_data)
    assert len(nq) == 3610
    assert nq[0]["answers"] == ["Wilhelm Conrad R\u00f6ntgen"]
    assert nq[0]["passage"].startswith("The first Nobel Prize in Physics")  # output[0], whitespace stripped
    samsum = gt.load_samsum(shared_data)
    assert len(samsum) == 818 and "\r" not in samsum[0]["dialogue"]
    sst2 = gt.load_sst2(shared_data / "general_tasks")  # the general_tasks folder itself works too
    assert len(sst2) == 872 and sum(ex["label"] for ex in sst2) == 444
    assert sst2[0] == {"sentence": "it 's a charming and often affecting journey .", "label": 1}


def test_data_dir_from_environment(shared_data, monkeypatch):
    monkeypatch.delenv("MOSE_EASYEDIT_DATA", raising=False)
    with pytest.raises(ValueError, match="MOSE_EASYEDIT_DATA"):
        gt.load_sst2()
    monkeypatch.setenv("MOSE_EASYEDIT_DATA", str(shared_data))
    assert len(gt.load_sst2()) == 872


def test_prompts_exactly_as_in_the_methods_table():
    assert gt.build_prompt("rte", {"sentence1": "A cat sat.", "sentence2": "An animal sat"}) == \
        "A cat sat. entails the An animal sat. True or False? answer:"
    assert gt.build_prompt("nq", {"passage": "P.", "question": "who?"}) == \
        "Refer to the passage below and answer the following question. Passage: P. Question: who?"
    assert gt.build_prompt("samsum", {"dialogue": "A: hi\nB: yo"}) == "A: hi\nB: yo TL;DR:"
    assert gt.build_prompt("sst2", {"sentence": "great film"}) == (
        "For each snippet of text, label the sentiment of the text as positive or negative. "
        "The answer should be exact 'positive' or 'negative'. text: great film answer:")
    assert gt.MAX_NEW_TOKENS == {"rte": 5, "nq": 20, "samsum": 25, "sst2": 5}


# ----------------------------------------------------------------------------------------------------- subsets
def test_subset_selection_is_deterministic():
    first = gt.select_subset(872, 10, seed=0, task="sst2")
    assert first == gt.select_subset(872, 10, seed=0, task="sst2")
    assert first == sorted(first) and len(set(first)) == 10 and all(0 <= i < 872 for i in first)
    assert first != gt.select_subset(872, 10, seed=1, task="sst2")
    assert first != gt.select_subset(872, 10, seed=0, task="rte")
    assert set(gt.select_subset(872, 4, seed=0, task="sst2")) <= set(first)  # nested
    assert gt.select_subset(5, None) == gt.select_subset(5, 50) == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------------- scorers
def test_label_scorers():
    assert gt.parse_rte(" True, because the premise says so") is True
    assert gt.score_rte(" True, because", True) == 1.0
    assert gt.score_rte("\n\nFALSE.", False) == 1.0
    assert gt.score_rte(" False", True) == 0.0
    assert gt.score_rte(" Maybe true", True) == 0.0 and gt.score_rte(" Maybe true", False) == 0.0
    assert gt.score_rte("", False) == 0.0
    assert gt.score_sst2(" Positive.", 1) == 1.0
    assert gt.score_sst2(" negative\n\nWhat is", 0) == 1.0
    assert gt.score_sst2(" negative", 1) == 0.0
    assert gt.score_sst2(" The answer is positive", 1) == 0.0  # the first word decides


def test_nq_and_samsum_scorers(monkeypatch):
    assert gt.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert gt.score_nq(" It is the Eiffel Tower, of course.", ["Eiffel Tower"]) == 1.0
    assert gt.score_nq(" in the 1990s", ["1990"]) == 0.0  # whole words only
    assert gt.score_nq(" Wilhelm Roentgen", ["Roentgen", "nobody"]) == 1.0
    assert gt.score_nq(" I don't know", ["Paris"]) == 0.0
    # The answer appears in the prompt (the passage), but only the generation is scored.
    example = {"question": "What is the capital of France?", "answers": ["Paris"],
               "passage": "Paris is the capital of France."}
    monkeypatch.setattr(gt, "generate_texts", lambda *args, **kwargs: [" I don't know"])
    result = gt.evaluate_task(None, None, "nq", examples=[example], progress=False)
    assert "Paris" in result.prompts[0] and result.score == 0.0 and result.scores == [0.0]
    perfect = gt.score_samsum("Amanda baked cookies", "Amanda baked cookies")
    assert perfect == pytest.approx(1.0)
    assert 0.0 < gt.score_samsum("Amanda baked some cookies today", "Amanda baked cookies") < 1.0
    assert gt.score_samsum("", "Amanda baked cookies") == 0.0


# -------------------------------------------------------------------------------------------- with the model
def test_batched_generation_matches_unpadded(default_model, shared_data):
    model, tok = default_model
    examples = gt.load_sst2(shared_data)
    prompts = [gt.build_prompt("sst2", examples[i]) for i in (0, 1, 5, 9)]
    assert len({len(tok(p)["input_ids"]) for p in prompts}) > 1  # really padded
    batched = gt.generate_texts(model, tok, prompts, max_new_tokens=5, batch_size=4, progress=False)
    config = GenerationConfig(max_new_tokens=5, do_sample=False, num_beams=1, pad_token_id=tok.eos_token_id)
    for prompt, text in zip(prompts, batched):
        ids = torch.tensor([tok(prompt)["input_ids"]], device=input_device(model))
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        new = [t for t in out[0, ids.shape[1]:].tolist() if t != tok.eos_token_id]
        assert text == tok.decode(new, skip_special_tokens=True)
        assert not text.startswith(prompt)


def test_evaluate_general_on_tiny_subsets(default_model, shared_data):
    model, tok = default_model
    original_side = tok.padding_side
    try:
        tok.padding_side = "right"  # generation must pad left by itself and leave the tokenizer alone
        scores = gt.evaluate_general(model, tok, subset_size=4, seed=0, data_dir=shared_data, batch_size=4,
                                     progress=False)
        assert tok.padding_side == "right"
    finally:
        tok.padding_side = original_side
    assert set(scores) == {"rte", "nq", "samsum", "sst2"}
    assert all(0.0 <= value <= 1.0 for value in scores.values()), scores
    assert scores["samsum"] > 0.0  # some word overlap with the reference summaries


# ------------------------------------------------------------------------------- likelihood scoring, perplexity
def test_likelihood_scoring_picks_the_label_of_the_higher_log_probability(default_model, shared_data):
    from mose_easyedit.evaluation import target_nll

    model, tok = default_model
    examples = gt.load_sst2(shared_data)[:6]
    prompts = [gt.build_prompt("sst2", ex) for ex in examples]
    labels = {1: "positive", 0: "negative"}
    nll = {k: target_nll(model, tok, prompts, [text] * len(prompts), progress=False, reduction="sum")
           for k, text in labels.items()}
    expected = [1 if nll[1][i] <= nll[0][i] else 0 for i in range(len(prompts))]
    assert gt.likelihood_predictions(model, tok, prompts, labels, batch_size=4, progress=False) == expected
    # the one-forward path (every label one token) and the pairwise path agree
    two_tokens = {1: "positive!", 0: "negative!"}
    assert gt._single_token_labels(tok, prompts, list(two_tokens.values())) is None
    nll2 = {k: target_nll(model, tok, prompts, [text] * len(prompts), progress=False, reduction="sum")
            for k, text in two_tokens.items()}
    assert gt.likelihood_predictions(model, tok, prompts, two_tokens, progress=False) == [
        1 if nll2[1][i] <= nll2[0][i] else 0 for i in range(len(prompts))]
    result = gt.evaluate_task(model, tok, "sst2_ll", subset_size=6, data_dir=shared_data, progress=False)
    chosen = [gt.load_sst2(shared_data)[i] for i in result.indices]
    assert result.indices == gt.select_subset(872, 6, 0, "sst2")  # the generation task's subset
    assert result.score == sum(float({"positive": 1, "negative": 0}[g] == ex["label"])
                               for g, ex in zip(result.generations, chosen)) / 6


def test_wikitext_perplexity_is_the_exponentiated_mean_token_loss(default_model, shared_data):
    model, tok = default_model
    assert gt.task_file("wikitext_ppl", shared_data).name == "wikitext-2-raw.test.raw"
    assert gt.task_file("rte_ll", shared_data) == gt.task_file("rte", shared_data)
    windows = gt.windows_of(tok, gt.load_wikitext(shared_data), gt.PERPLEXITY_WINDOW)
    assert all(len(w) == gt.PERPLEXITY_WINDOW for w in windows) and len(windows) > 1000
    result = gt.evaluate_task(model, tok, "wikitext_ppl", subset_size=3, data_dir=shared_data, progress=False)
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor([windows[i]]), labels=torch.tensor([windows[i]])).loss
                  for i in result.indices]
    assert result.score == pytest.approx(float(torch.exp(torch.stack(losses).mean())), rel=1e-4)
    assert 5 < result.score < 500  # an intact small model on Wikipedia text
    damaged = gt.perplexity(_scaled_copy(model, "model.layers.5.mlp.down_proj", 30.0), tok,
                            [windows[i] for i in result.indices])
    assert damaged > 2 * result.score  # a damaged layer stands out


def _scaled_copy(model, module: str, factor: float):
    import copy

    from mose_easyedit.modeling import read_weight, write_weight

    clone = copy.deepcopy(model)
    write_weight(clone, module, read_weight(clone, module) * factor)
    return clone
