"""Dataset loaders: real files give the right counts and request fields; malformed records fail loudly."""
from __future__ import annotations

import json

import pytest

from mose_easyedit.data import (
    CONCEPT_DEFAULT_GROUND_TRUTH,
    detect_format,
    load_conceptedit,
    load_counterfact,
    load_dataset,
    load_zsre,
    resolve_data_dir,
)

REQUIRED = ("case_id", "prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality")


def _check_request(request: dict) -> None:
    for key in REQUIRED:
        assert key in request, key
    assert request["subject"] in request["prompt"]
    assert request["target_new"] and request["target_new"] == request["target_new"].strip()
    assert isinstance(request["rephrase_prompt"], (str, list))
    for entry in request["locality"].values():
        assert set(entry) == {"prompt", "ground_truth"}


# ------------------------------------------------------------------------------------------------ real files
def test_counterfact_easyedit_format(shared_data):
    path = shared_data / "counterfact" / "counterfact-edit.json"
    requests = load_counterfact(path)
    assert len(requests) == 10_000
    first = requests[0]
    assert first == {
        "case_id": 0,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "subject": "Danielle Darrieux",
        "target_new": "English",
        "ground_truth": "French",
        "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
        "locality": {"neighborhood": {"prompt": "Michel Rocard is a native speaker of", "ground_truth": "French"}},
    }
    for request in requests[:200]:
        _check_request(request)
    window = load_counterfact(path, limit=5, start=3)
    assert [r["case_id"] for r in window] == [r["case_id"] for r in requests[3:8]]
    assert len({r["case_id"] for r in requests}) == len(requests)


def test_counterfact_rome_format(shared_data):
    path = shared_data / "counterfact" / "rome_format_subset" / "counterfact_filtered.json"
    requests = load_counterfact(path)
    assert len(requests) == 1400
    first = requests[0]
    _check_request(first)
    assert first["prompt"] == "The mother tongue of Danielle Darrieux is"
    assert "{}" not in first["prompt"]
    assert (first["target_new"], first["ground_truth"]) == ("English", "French")
    assert isinstance(first["rephrase_prompt"], list) and len(first["rephrase_prompt"]) == 2
    neighborhood = first["locality"]["neighborhood"]
    assert len(neighborhood["prompt"]) == 10
    assert neighborhood["ground_truth"] == ["French"] * 10  # neighbourhood truth = target_true
    assert len(first["attribute_prompts"]) == 10
    assert first["original_case_id"] == 0  # from case_id_map.tsv beside the file
    assert all("original_case_id" in r for r in requests)


def test_zsre_knowedit_format(shared_data):
    path = shared_data / "zsre" / "ZsRE-test-all.json"
    # Three real records name a subject that is not in their prompt: the error names file, index and field.
    with pytest.raises(ValueError, match=r"ZsRE-test-all\.json: record 396: field 'subject'"):
        load_zsre(path)
    requests = load_zsre(path, skip_invalid=True)
    assert len(requests) == 1304 - 3
    assert {396, 597, 676}.isdisjoint(r["case_id"] for r in requests)
    first = requests[0]
    _check_request(first)
    assert first["ground_truth"] == "Aspidoceratidae"  # first alternative of the list
    assert first["locality"]["Relation_Specificity"] == {
        "prompt": ["The taxon rank of Epaspidoceras is", "Epaspidoceras taxon rank"],
        "ground_truth": ["genus", "genus"],
    }
    assert first["portability"] == {"Reasoning": {
        "prompt": ["What is the common name for the family Epaspidoceras belongs to?"],
        "ground_truth": ["Owlet moths"]}}
    assert all(len(r["portability"]) == 1 for r in requests)
    assert len(load_zsre(path, limit=10)) == 10  # a window before the bad records loads without skipping


def test_zsre_mend_format(shared_data):
    path = shared_data / "zsre" / "zsre_mend_train-1k.json"
    # Two real records have an empty new target (alt == "").
    with pytest.raises(ValueError, match=r"zsre_mend_train-1k\.json: record 534: field 'alt': empty"):
        load_zsre(path)
    requests = load_zsre(path, skip_invalid=True)
    assert len(requests) == 1000 - 2
    assert {534, 723}.isdisjoint(r["case_id"] for r in requests)
    first = requests[0]
    _check_request(first)
    assert first["prompt"] == "What is the product made by UniFirst?"
    assert (first["target_new"], first["ground_truth"]) == ("unmanned aircraft", "uniform")
    assert first["rephrase_prompt"] == "What will be the product of UniFirst?"
    loc = first["locality"]["neighborhood"]
    assert loc["prompt"].startswith("nq question: ") and loc["ground_truth"] == "Walter Sobchak"


def test_load_dataset_by_name_and_path(shared_data, monkeypatch):
    assert len(load_dataset("counterfact", data_dir=shared_data, limit=7)) == 7
    assert load_dataset("counterfact-rome", data_dir=shared_data, limit=1)[0]["case_id"] == 0
    assert len(load_dataset("zsre-mend", data_dir=shared_data, start=990)) == 10
    assert len(load_dataset("zsre-mend", data_dir=shared_data, skip_invalid=True)) == 998
    assert len(load_dataset("zsre", data_dir=shared_data, skip_invalid=True)) == 1301
    by_path = load_dataset(shared_data / "zsre" / "zsre_mend_train-1k.json", limit=3)
    assert by_path == load_dataset("zsre-mend", data_dir=shared_data, limit=3)
    monkeypatch.setenv("MOSE_EASYEDIT_DATA", str(shared_data))
    assert len(load_dataset("counterfact", limit=2)) == 2
    with pytest.raises(FileNotFoundError, match="ConceptEdit"):
        load_dataset("conceptedit")
    with pytest.raises(ValueError, match="unknown dataset name"):
        load_dataset("wikibio")


def test_data_dir_required(monkeypatch):
    monkeypatch.delenv("MOSE_EASYEDIT_DATA", raising=False)
    with pytest.raises(ValueError, match="MOSE_EASYEDIT_DATA"):
        resolve_data_dir(None)


# ------------------------------------------------------------------------------------------------ ConceptEdit
# ConceptEdit is not available offline (shared/data/README.md): these records follow the schema EasyEdit's
# examples/run_concept_editing.py reads from final_<model>_<inter|intra>.json.
CONCEPT_RECORDS = [
    {"prompt": "Definition of Beekeeper:", "phrase_prompt": "What is the meaning of Beekeeper?",
     "target_new_desc": "a person who repairs clocks and watches",
     "instance_prompt": "Is Lorenzo Langstroth a Beekeeper? Answer yes or no:",
     "locality_prompt": "Definition of Carpenter:",
     "locality_answer": "a person who makes and repairs wooden objects", "label": "Beekeeper"},
    {"prompt": "Definition of Sonnet:", "phrase_prompt": "What does Sonnet mean?",
     "target_new_desc": "a large body of salt water", "instance_prompt": None,
     "locality_prompt": None, "locality_answer": None, "label": "Sonnet"},
]


def test_conceptedit_mapping(tmp_path):
    path = tmp_path / "final_gpt2_inter.json"
    path.write_text(json.dumps(CONCEPT_RECORDS))
    requests = load_conceptedit(path)
    assert len(requests) == 2
    first = requests[0]
    _check_request(first)
    assert first["subject"] == "Beekeeper"  # EasyEdit: subject = label
    assert first["target_new"] == "a person who repairs clocks and watches"
    assert first["ground_truth"] == CONCEPT_DEFAULT_GROUND_TRUTH
    assert first["rephrase_prompt"] == "What is the meaning of Beekeeper?"
    assert first["locality"] == {"neighborhood": {"prompt": "Definition of Carpenter:",
                                                  "ground_truth": "a person who makes and repairs wooden objects"}}
    assert first["instance"] == {"instance": {"prompt": "Is Lorenzo Langstroth a Beekeeper? Answer yes or no:"}}
    assert requests[1]["locality"] == {} and requests[1]["instance"] == {}  # None prompts are skipped
    assert load_dataset(path) == requests  # detected from the keys
    assert detect_format(CONCEPT_RECORDS[0]) == "conceptedit"


# ------------------------------------------------------------------------------------------- malformed records
GOOD_CF = {"case_id": 3, "prompt": "The capital of France is", "subject": "France", "target_new": "Rome",
           "ground_truth": "Paris", "rephrase_prompt": "France's capital city is",
           "locality_prompt": "The capital of Spain is", "locality_ground_truth": "Madrid"}


def _write(tmp_path, records, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("mutate, field, message", [
    (lambda r: r.pop("target_new"), "target_new", "missing"),
    (lambda r: r.update(target_new=5), "target_new", "expected str, got int"),
    (lambda r: r.update(target_new="   "), "target_new", "empty"),
    (lambda r: r.update(subject="Germany"), "subject", "does not occur in prompt"),
    (lambda r: r.update(rephrase_prompt=["ok", 3]), r"rephrase_prompt\[1\]", "expected str"),
    (lambda r: r.update(case_id="x"), "case_id", "expected int"),
])
def test_malformed_counterfact_records(tmp_path, mutate, field, message):
    bad = dict(GOOD_CF)
    mutate(bad)
    path = _write(tmp_path, [dict(GOOD_CF), dict(GOOD_CF), bad])
    with pytest.raises(ValueError, match=rf"bad\.json: record 2: field '{field}': .*{message}"):
        load_counterfact(path)
    assert len(load_counterfact(path, skip_invalid=True)) == 2
    assert len(load_counterfact(path, limit=2)) == 2  # records outside the window are not checked


def test_malformed_rome_and_zsre_records(tmp_path):
    rome = {"case_id": 0, "requested_rewrite": {"prompt": "The capital of is", "subject": "France",
                                                "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
            "paraphrase_prompts": ["a"], "neighborhood_prompts": ["b"]}
    with pytest.raises(ValueError, match=r"record 0: field 'requested_rewrite.prompt': expected exactly one"):
        load_counterfact(_write(tmp_path, [rome]))
    rome["requested_rewrite"]["prompt"] = "The capital of {} is"
    rome["requested_rewrite"]["target_true"] = {"str": ""}
    with pytest.raises(ValueError, match=r"field 'requested_rewrite.target_true.str': empty"):
        load_counterfact(_write(tmp_path, [rome]))
    mend = {"subject": "UniFirst", "src": "What does UniFirst make?", "alt": "drones", "answers": [],
            "rephrase": "UniFirst makes what?", "loc": "nq question: who", "loc_ans": "me"}
    with pytest.raises(ValueError, match=r"record 0: field 'answers': empty list"):
        load_zsre(_write(tmp_path, [mend]))
    knowedit = {"subject": "X", "prompt": "Who is X?", "target_new": "Y", "ground_truth": ["Z"],
                "locality": {"Relation_Specificity": [{"prompt": "X is", "ground_truth": 7}]}}
    with pytest.raises(ValueError, match=r"field 'locality.Relation_Specificity\[0\].ground_truth'"):
        load_zsre(_write(tmp_path, [knowedit]))
    with pytest.raises(ValueError, match=r"record 1: field '<record>'"):
        load_counterfact(_write(tmp_path, [dict(GOOD_CF), "oops"]))
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_counterfact(_write(tmp_path, {"a": 1}))
    with pytest.raises(ValueError, match="not in a ZsRE format"):
        load_zsre(_write(tmp_path, [dict(GOOD_CF)]))
