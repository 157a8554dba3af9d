"""Exact memorization, extraction strength, and the reference / GradNorm membership attacks:
hand computations on constructed inputs, then a tiny Llama through the TOFU evaluation."""

import math
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import rounding_bound
from negpref.data import collate, encode_qa
from negpref.errors import NegprefError
from negpref.eval import (
    TofuEvalCallback,
    TofuSets,
    aggregate,
    evaluate_tofu,
    load_logs,
    load_tofu_sets,
)
from negpref.eval.memorization import exact_memorization, extraction_strength, greedy_matches
from negpref.eval.mia import gradnorm_score, mia_auc, reference_scores
from negpref.eval.scoring import gradnorm_scores, score_answers
from negpref.eval.tofu_logs import FORGET_FILE, HOLDOUT_FILE, write_logs
from negpref.models import build_tokenizer, tiny_llama

# pytest.approx's default (1e-6 relative) only compares exact rationals or the same float
# computation done twice (same batches, same model); other tolerances say where they come from.
TOFU_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"


def one_hot_logits(predicted: list[list[int]], vocab: int = 5) -> torch.Tensor:
    """Logits whose argmax at each position is the given token."""
    logits = torch.zeros(len(predicted), len(predicted[0]), vocab)
    for row, tokens in enumerate(predicted):
        for t, token in enumerate(tokens):
            logits[row, t, token] = 1.0
    return logits


def test_exact_memorization_and_extraction_strength_by_hand():
    targets = torch.tensor(
        [
            [4, 1, 2, 3, 1, 2],  # first position is prompt: its miss must not count
            [4, 1, 2, 3, 1, 2],
            [4, 1, 2, 3, 1, 2],
            [4, 1, 2, 3, 1, 2],
        ]
    )
    predicted = [
        [0, 1, 2, 3, 1, 2],  # every answer token right
        [0, 1, 2, 0, 1, 2],  # miss at answer token 3 of 5: the last 2 are completed
        [0, 1, 2, 3, 1, 0],  # the last one missed: nothing is extracted
        [0, 0, 0, 0, 0, 0],  # all missed
    ]
    mask = torch.tensor([[0, 1, 1, 1, 1, 1]] * 4)
    matches = greedy_matches(one_hot_logits(predicted), targets, mask)
    torch.testing.assert_close(
        exact_memorization(matches, mask), torch.tensor([1.0, 0.8, 0.8, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        extraction_strength(matches, mask), torch.tensor([1.0, 0.4, 0.0, 0.0], dtype=torch.float64)
    )
    empty = torch.zeros(1, 6, dtype=torch.long)
    assert math.isnan(exact_memorization(matches[:1], empty).item())
    assert math.isnan(extraction_strength(matches[:1], empty).item())


def brute_force_extraction_strength(hits: list[bool]) -> float:
    """Wang et al.'s definition read literally: the smallest k whose suffix is all predicted."""
    n = len(hits)
    k = next((k for k in range(n + 1) if all(hits[k:])), n)
    return 1 - k / n


def test_extraction_strength_matches_the_definition_on_random_rows():
    rng = random.Random(0)
    rows, masks = [], []
    for _ in range(200):
        width = 12
        start, n = rng.randrange(0, 4), rng.randrange(1, 8)
        hits = [rng.random() < 0.7 for _ in range(width)]
        mask = [1 if start <= t < start + n else 0 for t in range(width)]
        rows.append(hits)
        masks.append(mask)
    matches = torch.tensor(rows) & torch.tensor(masks).bool()
    mask = torch.tensor(masks)
    es = extraction_strength(matches, mask)
    em = exact_memorization(matches, mask)
    for i, (hits, m) in enumerate(zip(rows, masks)):
        answer_hits = [h for h, keep in zip(hits, m) if keep]
        assert es[i].item() == pytest.approx(brute_force_extraction_strength(answer_hits))
        assert em[i].item() == pytest.approx(sum(answer_hits) / len(answer_hits))


def test_reference_and_gradnorm_scores_by_hand():
    # token-mean log-likelihood -0.5 under the model, -2.0 under the reference: a member-like
    # item (the model likes it more than a model that never saw it).
    scores = reference_scores(-0.5, -2.0)
    assert scores["reference"] == pytest.approx(1.5)
    assert scores["reference_ratio"] == pytest.approx(-0.25)
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 0.0], [0.0, 0.0]])]
    assert gradnorm_score(grads, p=2) == pytest.approx(-(5.0 + 1.0) / 2)
    assert gradnorm_score(grads, p=1) == pytest.approx(-(7.0 + 1.0) / 2)
    assert gradnorm_score(grads, p=math.inf) == pytest.approx(-(4.0 + 1.0) / 2)


# ------------------------------------------------------------------------------ tiny model


@pytest.fixture(scope="module")
def sets():
    return load_tofu_sets(TOFU_DIR, "forget10", limit=2, holdout=TOFU_DIR / "forget01.json")


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


@pytest.fixture(scope="module")
def other(tokenizer):
    return tiny_llama(len(tokenizer), seed=1)


def test_memorization_scores_equal_greedy_predictions_one_at_a_time(model, tokenizer, sets):
    pairs = [(r["question"], r["answer"]) for r in sets.forget.records]
    scores = score_answers(model, tokenizer, pairs, batch_size=2, max_length=256, memorization=True)
    for i, (q, a) in enumerate(pairs):
        enc = encode_qa(tokenizer, q, a, 256)
        ids = torch.tensor([enc.input_ids])
        with torch.no_grad():
            predicted = model(input_ids=ids).logits[0, :-1].argmax(-1)
        hits = [
            bool(predicted[t - 1] == ids[0, t])
            for t in range(1, ids.shape[1])
            if enc.answer_mask[t]
        ]
        assert scores.exact_memorization[i] == pytest.approx(sum(hits) / len(hits))
        assert scores.extraction_strength[i] == pytest.approx(brute_force_extraction_strength(hits))


def test_gradnorm_equals_backward_by_hand_and_leaves_grads_alone(model, tokenizer, sets):
    q, a = sets.forget.records[0]["question"], sets.forget.records[0]["answer"]
    enc = encode_qa(tokenizer, q, a, 256)
    [score] = gradnorm_scores(model, tokenizer.pad_token_id, [enc])
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated
    batch = collate([enc], tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"]).logits[0, :-1].double()
    targets = batch["input_ids"][0, 1:]
    mask = batch["answer_mask"][0, 1:].bool()
    nll = -torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0][mask].mean()
    nll.backward()
    norms = [p.grad.double().norm().item() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    # fp32 gradients against a float64 backward: each parameter's gradient sums over the
    # answer tokens and the hidden width; eps * (tokens * hidden) relative bounds the norm.
    rtol = rounding_bound(torch.float32, int(mask.sum()) * 64, 1.0)
    assert score == pytest.approx(-float(np.mean(norms)), rel=rtol)


def test_gradnorm_refuses_a_model_without_trainable_parameters(tokenizer, sets):
    frozen = tiny_llama(len(tokenizer), seed=2).requires_grad_(False)
    enc = encode_qa(tokenizer, "q?", "a", 64)
    with pytest.raises(NegprefError, match="no parameters that require gradients"):
        gradnorm_scores(frozen, tokenizer.pad_token_id, [enc])


@pytest.fixture(scope="module")
def logs(model, other, tokenizer, sets):
    return evaluate_tofu(
        model,
        tokenizer,
        sets,
        batch_size=4,
        max_new_tokens=4,
        max_length=256,
        mia_ref_model=other,
        gradnorm=True,
    )


def test_tofu_logs_hold_memorization_and_model_attacks(logs, model, other, tokenizer, sets):
    forget, holdout = logs[FORGET_FILE], logs[HOLDOUT_FILE]
    # Memorization on the forget set only, as open-unlearning computes it.
    assert set(forget["exact_memorization"]) == set(sets.forget.keys)
    assert "exact_memorization" not in logs["eval_log.json"]
    for name in ("mia_reference", "mia_reference_ratio", "mia_gradnorm"):
        assert set(forget[name]) == set(sets.forget.keys)
        assert set(holdout[name]) == set(sets.holdout.keys)
    pairs = [(r["question"], r["answer"]) for r in sets.holdout.records]
    own = score_answers(model, tokenizer, pairs, max_length=256)
    ref = score_answers(other, tokenizer, pairs, max_length=256)
    # The same sums of fp32 token log-probs in other batches: eps * tokens * the largest mean
    # log-likelihood bounds each mean, so twice that the difference (ratio: relative).
    bound = rounding_bound(torch.float32, max(own.n_tokens + ref.n_tokens), 1.0)
    largest = max(abs(lp / n) for lp, n in zip(own.logps + ref.logps, own.n_tokens + ref.n_tokens))
    for key, lp, n, ref_lp, ref_n in zip(
        sets.holdout.keys, own.logps, own.n_tokens, ref.logps, ref.n_tokens
    ):
        assert holdout["mia_reference"][key] == pytest.approx(
            lp / n - ref_lp / ref_n, abs=2 * bound * largest
        )
        assert holdout["mia_reference_ratio"][key] == pytest.approx(
            -(lp / n) / (ref_lp / ref_n), rel=2 * bound
        )
    result = aggregate(logs)
    for attack in ("reference", "reference_ratio", "gradnorm"):
        expected = mia_auc(
            list(forget[f"mia_{attack}"].values()), list(holdout[f"mia_{attack}"].values())
        )
        assert result[f"mia/{attack}"] == pytest.approx(expected)
        assert result[f"privleak/{attack}"] == pytest.approx(((1 - expected) - 0.5) / 0.5 * 100)
    assert result["forget/exact_memorization"] == pytest.approx(
        np.mean(list(forget["exact_memorization"].values()))
    )
    assert result["forget/extraction_strength"] == pytest.approx(
        np.mean(list(forget["extraction_strength"].values()))
    )


def test_reference_attack_against_the_model_itself_is_zero(model, tokenizer, sets):
    one = TofuSets.from_records(
        forget=sets.forget.records[:1],
        retain=sets.retain.records[:1],
        holdout=sets.holdout.records[:1],
    )
    logs = evaluate_tofu(model, tokenizer, one, max_length=256, generate=False, mia_ref_model=model)
    assert logs[FORGET_FILE]["mia_reference"]["0"] == 0.0
    assert logs[FORGET_FILE]["mia_reference_ratio"]["0"] == -1.0


def test_open_unlearning_format_round_trips_memorization_and_attacks(logs, tmp_path):
    result = aggregate(logs)
    write_logs(tmp_path, logs, result, "open-unlearning")
    theirs = __import__("json").loads((tmp_path / "TOFU_EVAL.json").read_text())
    forget = logs[FORGET_FILE]
    assert theirs["extraction_strength"]["value_by_index"]["0"]["score"] == pytest.approx(
        forget["extraction_strength"]["0"]
    )
    assert theirs["exact_memorization"]["agg_value"] == pytest.approx(
        result["forget/exact_memorization"]
    )
    # open-unlearning's sign: a higher score means non-member, the negative of ours.
    assert theirs["mia_gradnorm"]["forget"]["value_by_index"]["0"]["score"] == pytest.approx(
        -forget["mia_gradnorm"]["0"]
    )
    assert theirs["mia_reference"]["auc"] == pytest.approx(result["mia/reference"])
    back = load_logs(tmp_path / "TOFU_EVAL.json")
    for name in ("exact_memorization", "extraction_strength", "mia_gradnorm", "mia_reference"):
        for key, value in forget[name].items():
            assert back[FORGET_FILE][name][key] == pytest.approx(value)
    assert aggregate(back)["mia/gradnorm"] == pytest.approx(result["mia/gradnorm"])


def test_callback_gradnorm_mid_training_keeps_the_accumulated_gradients(tokenizer, sets, other):
    model = tiny_llama(len(tokenizer), seed=3)
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)  # a half-accumulated training step
    callback = TofuEvalCallback(
        sets, batch_size=4, max_new_tokens=2, max_length=256, mia_ref_model=other, gradnorm=True
    )
    result = callback.on_evaluate(SimpleNamespace(step=3), model, tokenizer)
    assert model.training
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())
    for attack in ("gradnorm", "reference", "reference_ratio"):
        assert 0.0 <= result[f"mia/{attack}"] <= 1.0
