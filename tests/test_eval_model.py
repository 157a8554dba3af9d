"""Evaluation with tiny random Llama models: batching, generation, TOFU logs, NaN, KL, MIA,
the unlearning callback and the CLI end to end."""

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import rounding_bound
from negpref import losses
from negpref.cli import main
from negpref.data import PromptFormat, collate, encode_qa, format_prompt
from negpref.errors import NegprefError
from negpref.eval import (
    TofuEvalCallback,
    TofuSets,
    aggregate,
    aggregate_eval_dir,
    evaluate_tofu,
    load_logs,
    load_tofu_sets,
    peak_forget_quality,
)
from negpref.eval.scoring import score_answers
from negpref.eval.tofu_logs import write_logs
from negpref.generation import greedy_generate, prompt_ids
from negpref.logprobs import token_logps_from_logits
from negpref.models import build_tokenizer, save_model, tiny_llama

TOFU_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"
# KL of a model against itself scored in another batch layout (tiny_llama: hidden 64, 400 tokens)
KL_ROUNDING = rounding_bound(torch.float32, 64, math.log(400))
OPTIONS = dict(batch_size=4, max_new_tokens=4, max_length=256)


@pytest.fixture(scope="module")
def sets():
    # Membership-inference non-members: two other authors' QA pairs stand in for a holdout set.
    return load_tofu_sets(TOFU_DIR, "forget10", limit=2, holdout=TOFU_DIR / "forget01.json")


@pytest.fixture(scope="module")
def forget_only(sets):
    """The forget set with a one-item retain set: for tests about forget-set handling."""
    retain = TofuSets.from_records(forget=sets.retain.records[:1], retain=sets.retain.records[:1])
    return TofuSets(split="forget10", forget=sets.forget, retain=retain.forget)


@pytest.fixture(scope="module")
def tokenizer(sets):
    texts = []
    for s in [*sets.present().values(), sets.holdout]:
        for r in s.records:
            texts += [r["question"], r["answer"], *r.get("perturbed_answer", [])]
    return build_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(len(tokenizer), seed=0)


def by_hand_logp(model, tokenizer, question, answer) -> float:
    enc = encode_qa(tokenizer, question, answer, 256)
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(
        log_probs[t - 1, ids[0, t]].item() for t in range(1, ids.shape[1]) if enc.answer_mask[t]
    )


def test_batched_scores_equal_unbatched_and_hand_computation(model, tokenizer, sets):
    pairs = [(r["question"], a) for r in sets.retain.records for a in r["perturbed_answer"][:2]]
    batched = score_answers(model, tokenizer, pairs, batch_size=4, max_length=256)
    single = score_answers(model, tokenizer, pairs, batch_size=1, max_length=256)
    # A sum of n same-sign fp32 token log-probs is exact to n * eps relative; n <= 48 here.
    # Measured 8.0e-8 batched vs single, 2.1e-8 vs float64 by hand (was rtol=1e-5)
    rtol = rounding_bound(torch.float32, max(batched.n_tokens), 1.0)
    np.testing.assert_allclose(batched.logps, single.logps, rtol=rtol)
    assert batched.n_tokens == single.n_tokens
    for i in (0, 3):
        assert batched.logps[i] == pytest.approx(
            by_hand_logp(model, tokenizer, *pairs[i]), rel=rtol
        )
    # P(a|q)^(1/|a|) from the token-mean loss.
    prob = math.exp(-batched.avg_losses[0])
    assert prob == pytest.approx(math.exp(batched.logps[0] / batched.n_tokens[0]))


def test_batched_left_padded_generation_equals_one_at_a_time_and_manual_greedy(model, tokenizer):
    questions = [
        "Who wrote the play?",
        "Where was the author Jaime Vasquez born and raised?",
        "Why?",
    ]
    batched = greedy_generate(model, tokenizer, questions, batch_size=3, max_new_tokens=6)
    single = greedy_generate(model, tokenizer, questions, batch_size=1, max_new_tokens=6)
    assert batched == single
    ids = prompt_ids(tokenizer, questions[1], 256)
    with torch.no_grad():
        for _ in range(6):
            next_id = model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item()
            if next_id == tokenizer.eos_token_id:
                break
            ids.append(next_id)
    generated = ids[len(prompt_ids(tokenizer, questions[1], 256)) :]
    assert batched[1] == tokenizer.decode(generated, skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def logs(model, tokenizer, sets):
    return evaluate_tofu(model, tokenizer, sets, ref_model=model, **OPTIONS)


def test_logs_are_in_tofu_format_and_consistent(logs, sets):
    assert list(logs) == [
        "eval_log.json",
        "eval_real_author_wo_options.json",
        "eval_real_world_wo_options.json",
        "eval_log_forget.json",
        "eval_log_holdout.json",
        "negpref_meta",
    ]
    # How the prompts were built and which conventions scored them travel with the logs.
    assert logs["negpref_meta"] == {
        "prompt_format": {
            "system_prompt": None,
            "chat_template": True,
            "fallback_template": "Question: {question}\nAnswer:",
            "template_used": "fallback",  # the tiny test tokenizer has no chat template
        },
        "conventions": "npo",
        "mia_k": 0.2,
        "generation": True,
    }
    tofu_metrics = {
        "avg_gt_loss",
        "gt_loss",
        "num_token_gt",
        "generated_text",
        "rouge1_recall",
        "rougeL_recall",
        "average_perturb_loss",
        "avg_paraphrased_loss",
        "truth_ratio",
        "paraphrased_loss",
        "perturb_loss",
        "num_token_paraphrased",
        "num_token_perturb",
    }
    for file in list(logs)[:4]:
        per_metric = logs[file]
        assert tofu_metrics <= set(per_metric)
        for k in per_metric["avg_gt_loss"]:
            assert per_metric["avg_gt_loss"][k] == pytest.approx(
                per_metric["gt_loss"][k] / per_metric["num_token_gt"][k]
            )
            para, pert = (
                per_metric["avg_paraphrased_loss"][k],
                per_metric["average_perturb_loss"][k],
            )
            assert per_metric["truth_ratio"][k] == pytest.approx(math.exp(para - np.mean(pert)))
            assert len(pert) == len(per_metric["perturb_loss"][k])
    authors = logs["eval_real_author_wo_options.json"]
    assert authors["avg_paraphrased_loss"] == authors["avg_gt_loss"]  # TOFU's base answer
    g, pert = authors["avg_gt_loss"]["0"], authors["average_perturb_loss"]["0"]
    normalized = math.exp(-g) / (math.exp(-g) + sum(math.exp(-p) for p in pert))
    assert authors["normalized_gt_loss"]["0"] == pytest.approx(-math.log(normalized))
    question, _, answer = logs["eval_log_forget.json"]["generated_text"]["1"]
    assert (question, answer) == (
        sets.forget.records[1]["question"],
        sets.forget.records[1]["answer"],
    )
    # The reference is the model itself: zero KL up to rounding. The model scores an answer
    # beside its paraphrase and perturbed answers, the reference the answers alone: another
    # batch layout, so logits differ by fp32 rounding, and so does each log-prob, by at most
    # eps * (terms of a logit: the hidden width) * log(vocab size) (measured 8.5e-9).
    for v in logs["eval_log_forget.json"]["kl_ref"].values():
        assert abs(v) <= KL_ROUNDING


def test_aggregate_of_model_logs(logs):
    result = aggregate(logs, logs)
    assert result["forget_quality"] == 1.0
    assert 0 <= result["model_utility"] <= 1
    for kind in ("retain", "real_authors", "world_facts", "forget"):
        assert 0 < result[f"{kind}/prob"] <= 1
    assert abs(result["forget_kl"]) <= KL_ROUNDING and abs(result["retain_kl"]) <= KL_ROUNDING
    assert result["forget_perplexity"] > 1
    for attack in ("loss", "zlib", "min_k", "min_k_plus_plus"):
        auc = result[f"mia/{attack}"]
        assert 0 <= auc <= 1
        # Against itself: no leakage, undefined (None) when the retain AUC is 1.
        assert result[f"privleak/{attack}"] == (0.0 if auc < 1 else None)
    assert result["privleak_reference"] == "retain logs"


def test_privleak_against_a_retain_model_with_chance_auc(logs):
    from negpref.eval.mia import mia_auc

    retain = json.loads(json.dumps(logs))
    holdout_scores = list(retain["eval_log_holdout.json"]["mia_loss"].values())
    # The retain model's members score like its non-members: AUC 0.5.
    retain["eval_log_forget.json"]["mia_loss"] = dict(
        zip(retain["eval_log_forget.json"]["mia_loss"], holdout_scores)
    )
    auc = mia_auc(
        list(logs["eval_log_forget.json"]["mia_loss"].values()),
        list(logs["eval_log_holdout.json"]["mia_loss"].values()),
    )
    result = aggregate(logs, retain)
    assert result["mia/loss"] == auc
    # MUSE's PrivLeak, in percent, on 1 - AUC
    assert result["privleak/loss"] == pytest.approx(((1 - auc) - 0.5) / 0.5 * 100)


def test_forget_kl_against_another_reference(model, tokenizer, sets, forget_only):
    ref = tiny_llama(len(tokenizer), seed=1)
    logs = evaluate_tofu(model, tokenizer, forget_only, ref_model=ref, **OPTIONS)
    record = sets.forget.records[1]
    batch = collate([encode_qa(tokenizer, record["question"], record["answer"], 256)], 0)
    with torch.no_grad():
        policy = model(input_ids=batch["input_ids"]).logits[:, :-1]
        reference = ref(input_ids=batch["input_ids"]).logits[:, :-1]
    expected = losses.kl(policy, reference, batch["answer_mask"][:, 1:], direction="ref||policy")
    # fp32 rounding of the vocabulary-wide sum of p (log p - log q), relative to the KL:
    # eps * V = 4.8e-5; measured 3.6e-7 (was rel=1e-4)
    rel = rounding_bound(torch.float32, len(tokenizer), 1.0)
    assert logs["eval_log_forget.json"]["kl_ref"]["1"] == pytest.approx(expected.item(), rel=rel)
    assert aggregate(logs)["forget_kl"] > 0


def test_nan_items_are_marked_and_counted(model, tokenizer, sets, forget_only):
    def tokens(record) -> set[int]:
        texts = [record["answer"], record["paraphrased_answer"], *record["perturbed_answer"]]
        return {
            t for a in texts for t in encode_qa(tokenizer, record["question"], a, 256).input_ids
        }

    others = set().union(
        *(tokens(r) for r in [sets.forget.records[0], *forget_only.retain.records])
    )
    poison = min(set(prompt_ids(tokenizer, sets.forget.records[1]["question"], 256)) - others)

    def nan_rows(module, args, kwargs, output):
        rows = (kwargs["input_ids"] == poison).any(-1)
        if kwargs["input_ids"].shape[1] > 1:  # scoring forwards, not cached generation steps
            output.logits[rows] = math.nan

    handle = model.register_forward_hook(nan_rows, with_kwargs=True)
    try:
        logs = evaluate_tofu(model, tokenizer, forget_only, **OPTIONS)
    finally:
        handle.remove()
    forget = logs["eval_log_forget.json"]
    assert [k for k, v in forget["avg_gt_loss"].items() if math.isnan(v)] == ["1"]
    assert math.isnan(forget["truth_ratio"]["1"])
    result = aggregate(logs, logs)
    assert result["counts"]["forget"]["nan_items"] == 1
    assert math.isfinite(result["forget/prob"]) and result["forget_quality"] == 1.0


def test_empty_generations_are_counted(model, tokenizer, forget_only):
    eos = tokenizer.eos_token_id

    def eos_first(module, args, output):
        output.logits[..., eos] = 1e4

    handle = model.register_forward_hook(eos_first)
    try:
        logs = evaluate_tofu(model, tokenizer, forget_only, **OPTIONS)
    finally:
        handle.remove()
    assert all(t[1] == "" for t in logs["eval_log_forget.json"]["generated_text"].values())
    result = aggregate(logs)
    assert result["counts"]["forget"]["empty_generations"] == 2
    assert result["forget/rougeL"] == 0.0


def test_callback_saves_step_logs_and_curves(model, tokenizer, sets, logs, tmp_path):
    callback = TofuEvalCallback(sets, retain_logs=logs, ref_model=model, **OPTIONS)
    model.train()
    evals = []
    for step in (0, 5):
        state = SimpleNamespace(step=step, epoch=step / 5, out_dir=tmp_path)
        evals.append(callback.on_evaluate(state, model, tokenizer))
    assert model.training  # the callback restores the training mode
    assert evals[1]["forget_quality"] == 1.0 and evals[1]["epoch"] == 1.0
    for key in ("model_utility", "forget_truth_ratio", "forget_kl"):
        assert evals[1][key] is not None
    assert (tmp_path / "evals" / "step_000005.json").is_file()
    recomputed = aggregate_eval_dir(tmp_path, logs)
    assert [e["step"] for e in recomputed] == [0, 5]
    # paths are relative to the run directory, so a moved run still finds its logs
    assert evals[1]["logs_path"] == recomputed[1]["logs_path"] == "evals/step_000005.json"
    assert recomputed[1]["model_utility"] == pytest.approx(evals[1]["model_utility"])
    model.eval()


def test_peak_forget_quality():
    evals = [
        {"step": 0, "forget_quality": 1e-5, "model_utility": 0.6},
        {"step": 10, "forget_quality": 0.4, "model_utility": 0.5},
        {"step": 20, "forget_quality": 0.4, "model_utility": 0.55},
        {"step": 30, "forget_quality": None, "model_utility": 0.5},
    ]
    assert peak_forget_quality(evals)["step"] == 20
    assert peak_forget_quality([{"step": 0, "forget_quality": None}]) is None


def test_callback_refuses_retain_logs_of_other_items(sets, logs):
    other = json.loads(json.dumps(logs))
    for per_item in other["eval_log_forget.json"].values():
        del per_item["1"]
    with pytest.raises(NegprefError, match="retain logs hold 1 forget items but these logs hold 2"):
        TofuEvalCallback(sets, retain_logs=other)


def test_cli_end_to_end_with_a_saved_tiny_model(model, tokenizer, tmp_path, capsys):
    save_model(model, tokenizer, tmp_path / "model")
    out = tmp_path / "run"
    args = [
        "eval",
        "--benchmark",
        "tofu",
        "--split",
        "forget05",
        "--model",
        str(tmp_path / "model"),
        "--data-dir",
        str(TOFU_DIR),
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--json",
    ]
    assert main([*args, "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (
        json.loads((out / "aggregate.json").read_text())["model_utility"]
        == printed["model_utility"]
    )
    logs = json.loads((out / "logs.json").read_text())
    assert len(logs["eval_log_forget.json"]["avg_gt_loss"]) == 2
    assert printed["run"]["sets"]["forget"].endswith("forget05_perturbed.json")
    # The run's own logs are a valid retain reference for a second run on the same items.
    code = main([*args, "--out", str(tmp_path / "again"), "--retain-logs", str(out / "logs.json")])
    assert code == 0 and json.loads(capsys.readouterr().out)["forget_quality"] == 1.0


def test_cli_help_renders():
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0


def test_cli_alignment_flag_delegates(monkeypatch):
    import negpref.commands.eval as eval_command

    calls = []
    fake = SimpleNamespace(
        add_arguments=lambda parser: parser.add_argument("--align-thing", default="x"),
        main=lambda args: calls.append(args.align_thing) or 0,
    )
    monkeypatch.setattr(eval_command, "alignment", fake)
    assert main(["eval", "--alignment", "--align-thing", "y"]) == 0 and calls == ["y"]


# ------------------------------------------------------------- formats, prompts, conventions

CHAT_TEMPLATE = (  # like SmolLM2's: a default system turn unless the messages bring one
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<|system|>Default system prompt\n{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHAT_TEMPLATE
    return chat


def test_prompt_format_is_settable(chat_tokenizer):
    question = "Who wrote it?"
    assert format_prompt(chat_tokenizer, question) == (
        "<|system|>Default system prompt\n<|user|>Who wrote it?\n<|assistant|>"
    )
    own = PromptFormat(system_prompt="Answer briefly.")
    assert format_prompt(chat_tokenizer, question, own) == (
        "<|system|>Answer briefly.\n<|user|>Who wrote it?\n<|assistant|>"
    )
    plain = PromptFormat(chat_template=False)
    assert format_prompt(chat_tokenizer, question, plain) == "Question: Who wrote it?\nAnswer:"
    custom = PromptFormat(
        chat_template=False, system_prompt="S.", fallback_template="Q: {question}\nA:"
    )
    assert format_prompt(chat_tokenizer, question, custom) == "S.\nQ: Who wrote it?\nA:"
    assert custom.describe(chat_tokenizer)["template_used"] == "fallback"
    with pytest.raises(NegprefError, match="--fallback-template: must contain"):
        PromptFormat(fallback_template="Q: {q}")
    with pytest.raises(NegprefError, match=r"only \{question\} may appear"):
        PromptFormat(fallback_template="{question} {other}")


def test_score_answers_and_evaluate_tofu_use_the_prompt_format(model, chat_tokenizer, forget_only):
    pairs = [(r["question"], r["answer"]) for r in forget_only.forget.records]
    own = PromptFormat(system_prompt="Answer briefly.")
    default = score_answers(model, chat_tokenizer, pairs, max_length=256)
    with_own = score_answers(model, chat_tokenizer, pairs, max_length=256, prompt=own)
    # same answer tokens, other context: other log-probs
    assert default.n_tokens == with_own.n_tokens and default.logps != with_own.logps
    batch = collate([encode_qa(chat_tokenizer, *pairs[0], 256, own)], 0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    token_logps, _ = token_logps_from_logits(logits, batch["input_ids"], batch["answer_mask"])
    assert with_own.logps[0] == pytest.approx(float(token_logps.sum()), rel=1e-5)
    logs = evaluate_tofu(model, chat_tokenizer, forget_only, prompt=own, generate=False, **OPTIONS)
    assert logs["negpref_meta"]["prompt_format"] == {**own.describe(), "template_used": "chat"}
    avg = logs["eval_log_forget.json"]["avg_gt_loss"]
    assert avg[forget_only.forget.keys[0]] == pytest.approx(with_own.avg_losses[0], rel=1e-5)


def test_no_generation_skips_rouge_and_says_what_is_missing(model, tokenizer, forget_only):
    logs = evaluate_tofu(model, tokenizer, forget_only, generate=False, **OPTIONS)
    forget = logs["eval_log_forget.json"]
    assert "generated_text" not in forget and "rougeL_recall" not in forget
    assert "truth_ratio" in forget and logs["negpref_meta"]["generation"] is False
    result = aggregate(logs, logs)
    assert result["forget_quality"] == 1.0  # probabilities only: still computable
    assert result["model_utility"] is None and "forget/rougeL" not in result
    assert "needs ROUGE-L" in result["missing"]["model_utility"]


def test_open_unlearning_conventions_and_format_keep_mia(model, tokenizer, sets, logs, tmp_path):
    ou_logs = evaluate_tofu(model, tokenizer, sets, conventions="open-unlearning", **OPTIONS)
    assert ou_logs["negpref_meta"]["mia_k"] == 0.4
    npo_forget, ou_forget = logs["eval_log_forget.json"], ou_logs["eval_log_forget.json"]
    assert ou_forget["mia_loss"] == npo_forget["mia_loss"]  # LOSS keeps every token
    assert ou_forget["mia_min_k"] != npo_forget["mia_min_k"]  # no EOS, k = 0.4
    result = aggregate(ou_logs, ou_logs)
    write_logs(tmp_path, ou_logs, result, "open-unlearning")
    theirs = json.loads((tmp_path / "TOFU_EVAL.json").read_text())
    key = sets.forget.keys[0]
    # their sign: a higher score means non-member
    assert theirs["mia_min_k"]["forget"]["value_by_index"][key]["score"] == pytest.approx(
        -ou_forget["mia_min_k"][key]
    )
    assert theirs["mia_min_k"]["agg_value"] == result["mia/min_k"]
    back = load_logs(tmp_path / "TOFU_EVAL.json")
    again = aggregate(back, back)
    for attack in ("loss", "zlib", "min_k", "min_k_plus_plus"):
        assert again[f"mia/{attack}"] == pytest.approx(result[f"mia/{attack}"], rel=1e-12)
    # without retain MIA scores: open-unlearning's fixed reference AUC 0.5
    fixed = aggregate(ou_logs)
    assert fixed["privleak_reference"] == "fixed AUC 0.5"
    auc = fixed["mia/min_k"]
    assert fixed["privleak/min_k"] == pytest.approx(((1 - auc) - 0.5) / 0.5 * 100)
    assert "privleak/min_k" not in aggregate(ou_logs, privleak_ref_auc=None)


def test_cli_open_unlearning_format_without_generation(model, tokenizer, tmp_path, capsys):
    save_model(model, tokenizer, tmp_path / "model")
    args = [
        "eval",
        "--split",
        "forget05",
        "--model",
        str(tmp_path / "model"),
        "--data-dir",
        str(TOFU_DIR),
        "--limit",
        "2",
        "--holdout",
        str(TOFU_DIR / "forget01.json"),
        "--no-generation",
        "--conventions",
        "open-unlearning",
        "--system-prompt",
        "Answer briefly.",
        "--log-format",
        "open-unlearning",
        "--json",
    ]
    out = tmp_path / "run"
    assert main([*args, "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == [
        "TOFU_EVAL.json",
        "TOFU_SUMMARY.json",
        "aggregate.json",
    ]
    config = printed["run"]["config"]
    assert (config["conventions"], config["system_prompt"], config["generation"]) == (
        "open-unlearning",
        "Answer briefly.",
        False,
    )
    theirs = json.loads((out / "TOFU_EVAL.json").read_text())
    assert theirs["negpref_meta"]["prompt_format"]["system_prompt"] == "Answer briefly."
    assert "forget_Q_A_ROUGE" not in theirs and printed["model_utility"] is None
    # the folder is accepted as --retain-logs of a second run on the same items
    code = main([*args, "--out", str(tmp_path / "again"), "--retain-logs", str(out)])
    again = json.loads(capsys.readouterr().out)
    assert code == 0 and again["forget_quality"] == 1.0
    assert again["privleak_reference"] == "retain logs" and again["privleak/min_k"] == 0.0
