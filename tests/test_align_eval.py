"""Alignment metrics (negpref eval --alignment) and the negpref align command line."""

import json
import math

import pytest
import torch

from conftest import rounding_bound
from negpref.cli import main
from negpref.data import collate, encode_qa, pref_task
from negpref.errors import NegprefError
from negpref.eval import alignment
from negpref.generation import Sampling
from negpref.logprobs import sequence_logps
from negpref.models import save_model, tiny_llama
from negpref.rewards import sentiment

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return pref_task.task_tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    """A saved tiny policy, reward models with 1 and 2 outputs, task data and prompts."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("align")
    save_model(tiny_llama(len(tokenizer), seed=0), tokenizer, root / "policy")
    for labels in (1, 2):
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, num_labels=labels, pad_token_id=0,
        )  # fmt: skip
        torch.manual_seed(0)
        save_model(LlamaForSequenceClassification(config), tokenizer, root / f"rm{labels}")
    pref_task.write_task(root / "task", n_records=8, k=2)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in pref_task.prompts()[:4]))
    return root


def test_reward_model_scorer_checks_the_head_and_scores_with_its_logit(files, tokenizer):
    with pytest.raises(NegprefError, match="its head has 2 outputs"):
        alignment.reward_model_scorer(str(files / "rm2"))
    scorer = alignment.reward_model_scorer(str(files / "rm1"))
    values = scorer(["Review the car."], ["the engine was great ."])
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(files / "rm1").eval()
    ids = tokenizer("Review the car.\nthe engine was great .", return_tensors="pt")
    with torch.no_grad():
        expected = model(**ids).logits[0, 0].item()
    # The score is a 32-wide dot product of the unit-RMS final hidden state with the head
    # (|w| < 1): fp32 rounding eps * 32 = 3.8e-6; measured 0 (was 1e-5)
    assert values[0] == pytest.approx(expected, abs=rounding_bound(torch.float32, 32, 1.0))


def test_evaluate_reward_win_rate_asr_and_perplexity(tokenizer):
    model = tiny_llama(len(tokenizer), seed=0)
    prompts = pref_task.prompts()[:3]
    scorer = alignment.function_scorer("sentiment")
    metrics = ("reward", "win_rate", "asr_keyword", "perplexity")
    result, items = alignment.evaluate(
        model, tokenizer, prompts, Sampling(6, 0.0), metrics, scorer, (model, tokenizer), 64, 2
    )
    assert result["win_rate"] == 0.5  # greedy completions of the same model tie
    assert result["reward"] == pytest.approx(
        sum(sentiment(p, it["completion"]) for p, it in zip(prompts, items)) / 3
    )
    assert result["asr_keyword"] == 1.0 and result["refusal_rate"] == 0.0
    encoded = [encode_qa(tokenizer, p, it["completion"], 64) for p, it in zip(prompts, items)]
    with torch.no_grad():
        out = sequence_logps(model, collate(encoded, tokenizer.pad_token_id))
    n_tokens = out.n_tokens.sum().item()
    mean_nll = -out.logps.sum().item() / n_tokens
    expected = math.exp(mean_nll)
    # exp(x) carries x's absolute error as a relative one: fp32 rounding of the n-token mean NLL,
    # 1.6e-5 here; measured 1.6e-7 (was rel=1e-4)
    assert result["perplexity"] == pytest.approx(
        expected, rel=rounding_bound(torch.float32, n_tokens, mean_nll)
    )


def test_coherence_is_the_cosine_of_minilm_embeddings():
    values = alignment.coherence(
        ["How do I bake bread?", "How do I bake bread?"],
        ["How do I bake bread?", "The stock market closed lower on Tuesday."],
    )
    # cosine of unit-scale 384-d MiniLM embeddings: fp32 rounding of 384-term dot products,
    # eps * 384 = 4.6e-5; measured 6e-8 (was 1e-5, below the derived bound)
    assert values[0] == pytest.approx(1.0, abs=rounding_bound(torch.float32, 384, 1.0))
    assert values[1] < 0.5


def test_eval_alignment_cli(files, tmp_path, capsys):
    out = tmp_path / "ev"
    argv = [
        "eval", "--alignment", "--model", str(files / "policy"), "--ref-model",
        str(files / "policy"), "--align-prompts", str(files / "prompts.jsonl"), "--align-reward",
        "sentiment", "--align-metrics", "reward", "win_rate", "asr_keyword",
        "--max-new-tokens", "4", "--out", str(out), "--json",
    ]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 4 and result["win_rate"] == 0.5
    assert len((out / "alignment_items.jsonl").read_text().splitlines()) == 4
    assert main(argv) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    bad = [*argv[:-3], "--reward-model", str(files / "rm2"), "--out", str(tmp_path / "ev2")]
    bad.remove("--align-reward")
    bad.remove("sentiment")
    assert main(bad) == 2
    assert "single score" in capsys.readouterr().err


def test_align_cli_trains_writes_the_run_and_refuses_bad_input(files, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "align", "--model", str(files / "policy"), "--data", str(files / "task" / "train.jsonl"),
        "--method", "mcpo", "--max-steps", "2", "--per-device-train-batch-size", "4", "--use-cpu",
        "--eval-reward", "sentiment", "--eval-prompts", "2", "--eval-samples", "1",
        "--eval-max-new-tokens", "4", "--out", str(out), "--json",
    ]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["data"]["records"] == 8
    assert [e["step"] for e in summary["evals"]] == [0, 2]
    for name in (
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "report.html",
        "model/config.json",
    ):
        assert (out / name).exists(), name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"rewards/chosen", "rewards/margins", "logps/rejected", "mcpo/kernel_entropy"} <= set(
        lines[1]
    )
    assert main(argv) == 2
    assert "pass --overwrite" in capsys.readouterr().err

    k0 = tmp_path / "k0.jsonl"
    k0.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": []}) + "\n")
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text(
        json.dumps({"prompt": "Review " * 80, "chosen": "b", "rejected": "c"}) + "\n"
    )
    for data, message in [
        (k0, "K=0"),
        (long_prompt, "leaves no room"),
        (tmp_path / "no.jsonl", "not found"),
    ]:
        bad = [
            *argv[:4],
            str(data),
            "--out",
            str(tmp_path / f"bad_{data.stem}"),
            "--max-length",
            "64",
        ]
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert message in err and "negpref align: error:" in err
        assert not (tmp_path / f"bad_{data.stem}").exists()


def test_make_task_cli(tmp_path, capsys):
    assert (
        main(
            [
                "align",
                "make-task",
                "--out",
                str(tmp_path / "t"),
                "--records",
                "4",
                "--k",
                "2",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out) == {"train": 4, "eval": 24, "sft": 16}
