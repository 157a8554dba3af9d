"""Preference records (TRL formats, candidate lists, unpaired) and the offline preference task."""

import json
import logging
from pathlib import Path

import pytest

from negpref.data import pref_task
from negpref.data.preference import FieldNames, load_preferences, normalize_records
from negpref.errors import NegprefError
from negpref.rewards import sentiment

TOFU = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


def test_string_chat_and_candidate_formats():
    data = normalize_records(
        [
            {"prompt": "Q1", "chosen": "good", "rejected": "bad"},
            {"prompt": _user("Q2"), "chosen": _assistant("good"), "rejected": _assistant("bad")},
            {"prompt": "Q3", "chosen": "best", "rejected": ["w1", _assistant("w2"), "w3"]},
        ],
        "mem",
    )
    r1, r2, r3 = data.records
    assert (r1.prompt, r1.chosen, r1.rejected) == ("Q1", "good", ["bad"])
    assert r2.prompt == _user("Q2") and (r2.chosen, r2.rejected) == ("good", ["bad"])
    assert r3.rejected == ["w1", "w2", "w3"]
    assert data.stats == {
        "records": 3,
        "candidates_min": 1,
        "candidates_max": 3,
        "candidates_mean": 5 / 3,
    }


def test_implicit_prompt_conversational_and_text():
    conv = _user("What color is the sky?")
    data = normalize_records(
        [
            {"chosen": conv + _assistant("Blue."), "rejected": conv + _assistant("Green.")},
            {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        ],
        "mem",
    )
    assert data.records[0].prompt == conv
    assert (data.records[0].chosen, data.records[0].rejected) == ("Blue.", ["Green."])
    assert data.records[1].prompt == "The sky is"
    assert (data.records[1].chosen, data.records[1].rejected) == ("blue.", ["green."])


def test_identical_candidates_dropped_counted_and_warned(caplog):
    with caplog.at_level(logging.WARNING):
        data = normalize_records(
            [
                {"prompt": "a", "chosen": "x", "rejected": ["x ", "y", "x"]},
                {"prompt": "b", "chosen": "z", "rejected": "z"},
                {"prompt": "c", "chosen": "u", "rejected": "v"},
            ],
            "mem",
        )
    assert [r.rejected for r in data.records] == [["y"], ["v"]]
    assert (data.dropped_candidates, data.dropped_records) == (3, 1)
    assert "dropped 3 rejected candidate(s)" in caplog.text


def test_bad_records_name_the_record_and_field():
    with pytest.raises(NegprefError, match=r"mem record 2: `rejected` has no candidates \(K=0\)"):
        normalize_records(
            [
                {"prompt": "a", "chosen": "x", "rejected": "y"},
                {"prompt": "b", "chosen": "x", "rejected": []},
            ],
            "mem",
        )
    with pytest.raises(NegprefError, match="mem record 1: missing field `chosen`"):
        normalize_records([{"prompt": "a", "rejected": "y"}], "mem")
    with pytest.raises(NegprefError, match="one assistant message"):
        normalize_records([{"prompt": "a", "chosen": _assistant("x") * 2, "rejected": "y"}], "mem")
    with pytest.raises(NegprefError, match="no usable preference pairs"):
        normalize_records([{"prompt": "a", "chosen": "x", "rejected": "x"}], "mem")


def test_unpaired_records_pair_desirable_with_undesirable_candidates():
    data = normalize_records(
        [
            {"prompt": "p", "completion": "good1", "label": True},
            {"prompt": "p", "completion": "bad1", "label": False},
            {"prompt": "p", "completion": "good2", "label": True},
            {"prompt": "p", "completion": "bad2", "label": False},
            {"prompt": "lonely", "completion": "only good", "label": True},
        ],
        "mem",
    )
    assert [(r.chosen, r.rejected) for r in data.records] == [
        ("good1", ["bad1", "bad2"]),
        ("good2", ["bad1", "bad2"]),
    ]
    assert data.dropped_records == 1


def test_max_candidates_keeps_the_first_k():
    data = normalize_records(
        [{"prompt": "a", "chosen": "x", "rejected": ["1", "2", "3"]}], "mem", max_candidates=2
    )
    assert data.records[0].rejected == ["1", "2"]


def test_jsonl_parquet_and_saved_dataset(tmp_path):
    import datasets

    rows = [
        {"prompt": "Q", "chosen": "a", "rejected": ["b", "c"]},
        {"prompt": "R", "chosen": "d", "rejected": ["e", "f"]},
    ]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for path in (jsonl, tmp_path / "p.parquet", tmp_path / "saved"):
        data = load_preferences(path)
        assert [(r.prompt, r.chosen, r.rejected) for r in data.records] == [
            ("Q", "a", ["b", "c"]),
            ("R", "d", ["e", "f"]),
        ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(NegprefError, match=r"bad.jsonl:2:2: malformed JSON"):
        load_preferences(bad)
    with pytest.raises(NegprefError, match="not found"):
        load_preferences(tmp_path / "missing.jsonl")


def test_tofu_perturbed_answers_as_candidates():
    data = load_preferences(
        TOFU / "forget01_perturbed.json",
        FieldNames(prompt="question", chosen="answer", rejected="perturbed_answer"),
    )
    raw = [json.loads(line) for line in (TOFU / "forget01_perturbed.json").read_text().splitlines()]
    assert len(data.records) == len(raw) == 40
    assert data.records[0].prompt == raw[0]["question"]
    assert data.records[0].rejected == raw[0]["perturbed_answer"]
    assert data.stats["candidates_max"] == 5


def test_task_records_have_a_strictly_best_chosen_and_k_distinct_candidates(tmp_path):
    records = pref_task.make_preferences(40, 4, seed=3)
    for r in records:
        best = sentiment(r["prompt"], r["chosen"])
        assert len(r["rejected"]) == len(set(r["rejected"])) == 4
        assert all(sentiment(r["prompt"], c) < best for c in r["rejected"])
    assert records == pref_task.make_preferences(40, 4, seed=3)  # seeded
    counts = pref_task.write_task(tmp_path, n_records=8, k=2, seed=0)
    assert counts == {"train": 8, "eval": 24, "sft": 32}
    assert len(load_preferences(tmp_path / "train.jsonl").records) == 8
    with pytest.raises(NegprefError, match="at least one rejected"):
        pref_task.make_preferences(1, 0)
