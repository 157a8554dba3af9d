"""Per-item and aggregate evaluation math against hand computation and scipy / sklearn."""

import math
import zlib

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from conftest import rounding_bound
from negpref.eval import metrics, mia


def test_answer_prob_is_length_normalised_probability():
    # P(a|q) = 0.5 * 0.25 over two tokens -> (1/8)^(1/2); the token-mean NLL is -log(1/8)/2.
    avg_loss = -math.log(0.5 * 0.25) / 2
    assert metrics.answer_prob(avg_loss) == pytest.approx(math.sqrt(1 / 8))


def test_truth_ratio_is_geometric_mean_perturbed_over_paraphrased():
    # Token-mean losses: paraphrased 1.0, perturbed 2.0 and 3.0 -> exp(1 - 2.5).
    assert metrics.truth_ratio(1.0, [2.0, 3.0]) == pytest.approx(math.exp(-1.5))
    p_para, p_pert = math.exp(-1.0), [math.exp(-2.0), math.exp(-3.0)]
    geometric = math.sqrt(p_pert[0] * p_pert[1])
    assert metrics.truth_ratio(1.0, [2.0, 3.0]) == pytest.approx(geometric / p_para)
    ratios = metrics.truth_ratios([1.0, 0.5], [[2.0, 3.0], [0.5]])  # lists may differ in length
    np.testing.assert_allclose(ratios, [math.exp(-1.5), 1.0])


def test_normalized_prob_by_hand_and_without_underflow():
    expected = math.exp(-1) / (math.exp(-1) + math.exp(-2) + math.exp(-4))
    assert metrics.normalized_prob(1.0, [2.0, 4.0]) == pytest.approx(expected)
    # exp(-1000) underflows to 0 in float64; the log-space form still gives 1/(1+e^-1).
    assert metrics.normalized_prob(1000.0, [1001.0]) == pytest.approx(1 / (1 + math.exp(-1)))
    assert math.isnan(metrics.normalized_prob(math.nan, [1.0]))


def test_truth_ratio_aggregates_follow_tofu():
    ratios = [0.5, 2.0, 1.0, math.nan]  # NaN items are left out
    assert metrics.forget_truth_ratio(ratios) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert metrics.utility_truth_ratio([0.5, 2.0]) == pytest.approx((0.5 + 0.0) / 2)
    assert math.isnan(metrics.forget_truth_ratio([math.nan]))


def test_model_utility_is_harmonic_mean():
    assert metrics.model_utility([1.0, 2.0, 4.0]) == pytest.approx(3 / (1 + 1 / 2 + 1 / 4))
    assert metrics.model_utility([0.5, 0.0, 0.9]) == 0.0
    assert math.isnan(metrics.model_utility([0.5, math.nan]))


def test_forget_quality_is_scipy_ks_pvalue():
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(size=40), rng.lognormal(0.5, size=30)
    pvalue, statistic = metrics.forget_quality(a, b)
    reference = ks_2samp(a, b)
    assert pvalue == reference.pvalue and statistic == reference.statistic
    assert metrics.forget_quality(a, a) == (1.0, 0.0)
    # NaN items are dropped before the test.
    assert metrics.forget_quality([*a, math.nan], b)[0] == reference.pvalue


def test_perplexity_is_token_weighted():
    # Sums of NLL 2 and 6 over 1 and 3 tokens -> exp(8 / 4); NaN items and empty ones skipped.
    assert metrics.perplexity([2.0, 6.0, math.nan, 1.0], [1, 3, 5, 0]) == pytest.approx(
        math.exp(2.0)
    )


def test_rouge_recalls_and_empty_generation():
    rouge1, rouge_l = metrics.rouge_recalls(
        ["the cat sat on the mat", "Paris"], ["on the mat the cat", ""]
    )
    # Unigrams: 5 of the answer's 6 are covered (stemmed, "the" counted twice); the longest
    # common subsequence of the answer with the generation is "the cat" or "on the mat" -> 3/6.
    assert rouge1 == [pytest.approx(5 / 6), 0.0]
    assert rouge_l == [pytest.approx(3 / 6), 0.0]


def test_min_k_scores_by_hand():
    token_logps = torch.tensor([[-1.0, -5.0, -3.0, -2.0, 0.0], [-0.5, -0.1, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.float32)
    # Row 0: 4 tokens, k=0.5 -> the 2 lowest (-5, -3); row 1: 2 tokens -> 1 lowest.
    np.testing.assert_allclose(mia.min_k_scores(token_logps, mask, 0.5), [-4.0, -0.5])
    # k=0.2 keeps at least one token.
    np.testing.assert_allclose(mia.min_k_scores(token_logps, mask, 0.2), [-5.0, -0.5])
    assert mia.min_k_scores(token_logps, torch.zeros_like(mask), 0.2).isnan().all()


def test_min_k_plus_plus_by_hand():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 3.0]]])
    targets = [0, 1]
    mask = torch.ones(1, 2)
    token_logps = torch.log_softmax(logits, -1)[0, [0, 1], targets].unsqueeze(0)
    z = []
    for t, target in enumerate(targets):
        row = logits[0, t].tolist()
        lp = [x - math.log(sum(math.exp(y) for y in row)) for x in row]
        p = [math.exp(x) for x in lp]
        mu = sum(pi * li for pi, li in zip(p, lp))
        var = sum(pi * li * li for pi, li in zip(p, lp)) - mu * mu
        z.append((lp[target] - mu) / math.sqrt(var))
    # fp32 against float64: ~16 roundings (log-softmax, two 3-term moments, sqrt, divide); the
    # E[l^2] - mu^2 cancellation amplifies them < 2x here. Measured 2.5e-8 (was rel=1e-5)
    rel = rounding_bound(torch.float32, 2 * 16, 1.0)
    score = mia.min_k_plus_plus_scores(token_logps, logits, mask, k=0.5)
    assert score.item() == pytest.approx(min(z), rel=rel)
    score = mia.min_k_plus_plus_scores(token_logps, logits, mask, k=1.0)
    assert score.item() == pytest.approx(sum(z) / 2, rel=rel)


def test_zlib_score():
    text = "abc abc abc abc"
    assert mia.zlib_score(-2.0, text) == -2.0 / len(zlib.compress(text.encode()))


def test_mia_auc_on_constructed_scores():
    assert mia.mia_auc([3.0, 4.0, 5.0], [0.0, 1.0, 2.0]) == 1.0  # perfectly separable
    assert mia.mia_auc([0.0, 1.0], [3.0, 4.0]) == 0.0
    assert mia.mia_auc([1.0, 1.0], [1.0, 1.0]) == 0.5
    # Pairs (member > non-member): (1 vs 2) no, (3 vs 2) yes -> 1/2.
    assert mia.mia_auc([1.0, 3.0], [2.0]) == 0.5
    assert mia.mia_auc([1.0, 3.0, math.nan], [2.0]) == 0.5
    assert math.isnan(mia.mia_auc([], [1.0]))


def test_privleak_follows_muse_sign_convention():
    # MUSE: PrivLeak = (AUC_muse(unlearned) - AUC_muse(retain)) / AUC_muse(retain) * 100, where
    # MUSE's AUC ranks non-members first, i.e. AUC_muse = 1 - our member-positive AUC; an
    # under-unlearned model scores strongly negative, an over-unlearned one positive.
    members_still_known = mia.mia_auc([3.0, 4.0, 5.0], [0.0, 1.0, 2.0])  # every member first
    retain_model = mia.mia_auc([0.0, 2.0, 4.0], [1.0, 3.0, 5.0])  # 3 of 9 pairs ordered
    assert (members_still_known, retain_model) == (1.0, pytest.approx(1 / 3))
    muse_unlearned, muse_retain = 1 - members_still_known, 1 - retain_model
    expected = (muse_unlearned - muse_retain) / muse_retain * 100
    assert mia.privleak(members_still_known, retain_model) == pytest.approx(expected)
    assert mia.privleak(members_still_known, retain_model) == pytest.approx(-100.0)
    # open-unlearning's default reference (no retain model): AUC 0.5
    assert mia.privleak(0.8, 0.5) == pytest.approx(-60.0)
    assert mia.privleak(0.25, 0.5) == pytest.approx(50.0)  # over-unlearned: positive
    assert mia.privleak(0.5, 0.5) == 0.0
    assert math.isnan(mia.privleak(0.5, 1.0))  # 1 - AUC_retain = 0: undefined
