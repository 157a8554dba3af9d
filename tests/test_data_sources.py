"""Data in through every source for every verb: JSON, JSONL, Parquet, CSV, ``save_to_disk``
folders, ``datasets`` objects from Python, hub names (online; offline a clear error), with the
same records out and the same place numbering in errors."""

import json
from pathlib import Path

import datasets
import pytest

from negpref.cli import main
from negpref.data.preference import load_preferences
from negpref.data.records import load_records
from negpref.errors import NegprefError
from negpref.models import build_tokenizer, save_model, tiny_llama
from negpref.u2a import load_negatives
from negpref.unlearn.dataset import load_qa

pytestmark = pytest.mark.usefixtures("one_thread")

QA = [
    {"question": "Who wrote the red book?", "answer": "Ana Lima wrote it."},
    {"question": "Where was she born?", "answer": "42"},  # a numeric-looking answer stays text
    {"question": "What is her genre?", "answer": "Crime, mostly; some poetry."},
    {"question": "When did she start?", "answer": "She started in 1990."},
]
PREFS = [
    {"prompt": "Say something nice.", "chosen": "You are kind.", "rejected": "Go away."},
    {"prompt": "Greet me.", "chosen": "Hello friend.", "rejected": "Whatever."},
]
FORMATS = ("json", "jsonl", "parquet", "csv", "disk", "disk_dict", "dataset", "dataset_dict")


def write(rows: list[dict], fmt: str, root: Path):
    """``rows`` in format ``fmt``: a path, or the object itself for the Python formats."""
    ds = datasets.Dataset.from_list(rows)
    if fmt == "json":
        (root / "d.json").write_text(json.dumps(rows, indent=1))
        return root / "d.json"
    if fmt == "jsonl":
        (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return root / "d.jsonl"
    if fmt == "parquet":
        ds.to_parquet(str(root / "d.parquet"))
        return root / "d.parquet"
    if fmt == "csv":
        ds.to_csv(str(root / "d.csv"), index=False)
        return root / "d.csv"
    if fmt == "disk":
        ds.save_to_disk(str(root / "saved"))
        return root / "saved"
    if fmt == "disk_dict":
        datasets.DatasetDict(train=ds, test=ds.select([0])).save_to_disk(str(root / "saved_dict"))
        return root / "saved_dict"
    if fmt == "dataset":
        return ds
    assert fmt == "dataset_dict"
    return datasets.DatasetDict(train=ds)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_source_gives_the_same_records(tmp_path, fmt):
    assert list(load_qa(write(QA, fmt, tmp_path), "forget records")) == QA
    pref = load_preferences(write(PREFS, fmt, tmp_path))
    assert [(r.prompt, r.chosen, r.rejected) for r in pref.records] == [
        (p["prompt"], p["chosen"], [p["rejected"]]) for p in PREFS
    ]
    negatives = load_negatives(write(QA, fmt, tmp_path))
    assert [(n["prompt"], n["response"]) for n in negatives] == [
        (r["question"], r["answer"]) for r in QA
    ]
    prompts = load_records(write([{"prompt": p["prompt"]} for p in PREFS], fmt, tmp_path))
    assert [r["prompt"] for r in prompts] == [p["prompt"] for p in PREFS]


@pytest.mark.parametrize(
    "fmt, where",
    [
        ("jsonl", "d.jsonl:2"),  # 1-based line
        ("json", "d.json:6 record 2"),  # 1-based record, and the line it starts on
        ("csv", "d.csv:3"),  # 1-based line (the header is line 1)
        ("parquet", "d.parquet record 2"),  # 1-based row
        ("disk", "saved record 2"),
        ("dataset", "forget records record 2"),
    ],
)
def test_places_are_numbered_one_way(tmp_path, fmt, where):
    rows = [QA[0], {"question": "Q?", "answer": ""}, QA[2]]
    with pytest.raises(NegprefError) as info:
        load_qa(write(rows, fmt, tmp_path), "forget records")
    assert str(info.value).startswith(f"{tmp_path / where}" if fmt != "dataset" else where)
    assert "missing field(s) answer" in str(info.value)


def test_datasetdict_without_train_names_its_splits(tmp_path):
    ds = datasets.Dataset.from_list(QA)
    with pytest.raises(NegprefError, match="splits a, b and no `train`"):
        load_qa(datasets.DatasetDict(a=ds, b=ds), "forget records")


def test_unreadable_parquet_is_one_line(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(NegprefError, match=r"bad\.parquet: could not read as parquet") as info:
        load_records(bad)
    assert "\n" not in str(info.value)


def test_hub_dataset_name_offline_is_a_clear_error_and_online_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NegprefError, match=r"owner/forget-set: not found .*HF_HUB_OFFLINE=1"):
        load_qa("owner/forget-set", "forget records")
    with pytest.raises(NegprefError, match=r"forgt\.json: not found"):  # a typo, not a hub id
        load_qa("forgt.json", "forget records")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("negpref.hub.offline_reason", lambda: None)
    asked = []

    def hub(name, config=None, **kwargs):
        asked.append((name, config))
        return datasets.DatasetDict(train=datasets.Dataset.from_list(QA))

    monkeypatch.setattr(datasets, "load_dataset", hub)
    records = load_qa("owner/forget-set", "forget records")
    assert list(records) == QA and records.where(1) == "owner/forget-set record 2"
    assert list(load_qa("owner/forget-set:forget01", "forget records")) == QA
    assert asked == [("owner/forget-set", None), ("owner/forget-set", "forget01")]


# --------------------------------------------------------------------------- every verb


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    texts = [r["question"] + " " + r["answer"] for r in QA] + [
        p["prompt"] + " " + p["chosen"] + " " + p["rejected"] for p in PREFS
    ]
    tok = build_tokenizer(texts * 4, 300)
    save_model(tiny_llama(len(tok), seed=0), tok, root / "model")
    return root / "model"


def test_unlearn_cli_reads_parquet_and_csv(model_dir, tmp_path, capsys):
    forget = write(QA, "parquet", tmp_path)
    retain = write(QA[::-1], "csv", tmp_path)
    out = tmp_path / "run"
    argv = [
        "unlearn", "--model", str(model_dir), "--forget", str(forget), "--retain", str(retain),
        "--method", "GA+RT", "--out", str(out), "--per-device-train-batch-size", "2",
        "--gradient-accumulation-steps", "1", "--num-train-epochs", "1", "--warmup-epochs", "0",
        "--json",
    ]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2  # 4 forget records, 2 per step


def test_align_cli_reads_a_saved_dataset_folder(model_dir, tmp_path, capsys):
    data = write(PREFS, "disk", tmp_path)
    out = tmp_path / "run"
    argv = [
        "align", "--model", str(model_dir), "--data", str(data), "--out", str(out),
        "--max-steps", "1", "--per-device-train-batch-size", "2", "--use-cpu", "--json",
    ]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 1 and summary["data"]["records"] == 2


def test_eval_alignment_reads_parquet_prompts(model_dir, tmp_path, capsys):
    prompts = write([{"prompt": p["prompt"]} for p in PREFS], "parquet", tmp_path)
    out = tmp_path / "ev"
    argv = [
        "eval", "--alignment", "--model", str(model_dir), "--align-prompts", str(prompts),
        "--align-metrics", "asr_keyword", "--max-new-tokens", "2", "--out", str(out), "--json",
    ]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 2


@pytest.mark.parametrize("fmt", ["dataset", "dataset_dict"])
def test_python_objects_for_unlearn_run_and_align_trainer(model_dir, tmp_path, fmt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from negpref.align.config import AlignConfig
    from negpref.align.trainer import AlignTrainer
    from negpref.unlearn import UnlearnConfig, run

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    config = UnlearnConfig(
        method="GA",
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        warmup_epochs=0,
    )
    result = run(config, model=model, tokenizer=tok, forget_records=write(QA, fmt, tmp_path))
    assert result.summary["steps"] == 2

    align_config = AlignConfig(
        per_device_train_batch_size=2,
        max_steps=1,
        use_cpu=True,
        output_dir=str(tmp_path / "align"),
        save_strategy="no",
        report_to="none",
    )
    trainer = AlignTrainer(model, align_config, write(PREFS, fmt, tmp_path), tok)
    assert len(trainer.items) == 2
    trainer.train()
    assert trainer.state.global_step == 1


def test_u2a_cli_reads_parquet_negatives_and_csv_preferences(model_dir, tmp_path, capsys):
    negatives = write(QA, "parquet", tmp_path)
    preference = write(PREFS, "csv", tmp_path)
    out = tmp_path / "u2a"
    argv = [
        "u2a", "--model", str(model_dir), "--forget", str(negatives), "--preference",
        str(preference), "--rounds", "1", "--init-size", "2", "--per-round", "1", "--delta",
        "-1", "--inner-steps", "1", "--inner-learning-rate", "1e-3", "--batch-size", "2", "--lora-r", "2",
        "--out", str(out), "--json",
    ]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["candidates"] == len(QA) and summary["selected"] == 2


def test_csv_cells_stay_text_and_rows_are_named_by_their_first_line(tmp_path):
    good = tmp_path / "qa.csv"
    good.write_text('question,answer\n\nHow many?,42\n"a, b?","two\nlines"\n\nLast?,yes\n')
    records = load_qa(good, "forget records")
    assert [r["answer"] for r in records] == ["42", "two\nlines", "yes"]
    assert records.places == [f"{good}:3", f"{good}:4", f"{good}:7"]
    extra = tmp_path / "extra.csv"
    extra.write_text("question,answer\nq,a\nq2,a2,oops\n")
    with pytest.raises(NegprefError, match=r"extra\.csv:3: more cells than the header"):
        load_qa(extra, "forget records")
    open_quote = tmp_path / "quote.csv"
    open_quote.write_text('question,answer\nq,a\nq2,"never closed\n')
    with pytest.raises(NegprefError, match=r"quote\.csv:3: malformed CSV"):
        load_qa(open_quote, "forget records")
