"""Per-item and aggregate TOFU math on plain numbers: no models here.

Conventions follow TOFU's code and logs (``locuslab/tofu``: ``evaluate_util.py`` writes the
per-item logs, ``aggregate_eval_stat.py`` aggregates them). Every probability is
length-normalised: ``P(a|q)^(1/|a|) = exp(-avg_loss)`` with ``avg_loss`` the token-mean NLL of
the answer (EOS included).

Truth ratio, per item, as TOFU logs it (``truth_ratio``)::

    R = exp(avg_paraphrased_loss - mean_i(avg_perturbed_loss_i))
      = geomean_i P(perturbed_i)^(1/|perturbed_i|) / P(paraphrased)^(1/|paraphrased|)

This is the NPO paper's eq. 16 with the mean over perturbed answers taken in log space, which is
what TOFU's released logs and aggregation use. Its aggregates:

- forget set: ``mean(min(R, 1/R))`` (symmetric, so the direction of R does not matter);
- retain / real authors / world facts: ``mean(max(0, 1 - R))`` (TOFU writes it
  ``max(0, 1 - 1/r)`` with ``r = 1/R``), high when the paraphrased answer beats the perturbed ones.

Items whose values are NaN (a model that produced NaN log-probs) are left out of every mean and
of the KS test; the callers count them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.special import logsumexp
from scipy.stats import hmean, ks_2samp


def _finite(values) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


def answer_prob(avg_loss: float) -> float:
    """``P(a|q)^(1/|a|)`` from the token-mean NLL of the answer."""
    return math.exp(-avg_loss)


def truth_ratio(avg_paraphrased_loss: float, avg_perturbed_losses: Sequence[float]) -> float:
    """TOFU's per-item ``truth_ratio``: geometric-mean P(perturbed) / P(paraphrased)."""
    return float(truth_ratios([avg_paraphrased_loss], [avg_perturbed_losses])[0])


def normalized_prob(avg_gt_loss: float, avg_perturbed_losses: Sequence[float]) -> float:
    """Real-authors / world-facts probability: ``P(a) / (P(a) + sum_i P(perturbed_i))``."""
    # In log space: a probability that underflows to 0 must not turn this into 0/0.
    losses = np.asarray([avg_gt_loss, *avg_perturbed_losses], dtype=np.float64)
    return math.exp(-avg_gt_loss - float(logsumexp(-losses)))


def truth_ratios(avg_paraphrased_losses, avg_perturbed_losses) -> np.ndarray:
    """Vectorised :func:`truth_ratio` over items (perturbed lists may differ in length)."""
    para = np.asarray(avg_paraphrased_losses, dtype=np.float64)
    pert = np.array([float(np.mean(p)) for p in avg_perturbed_losses])
    with np.errstate(over="ignore"):  # inf is a valid ratio here (min(r, 1/r) = 0)
        return np.exp(para - pert)


def forget_truth_ratio(ratios) -> float:
    """Forget-set aggregate: ``mean(min(R, 1/R))`` over finite items."""
    r = _finite(ratios)
    return float(np.mean(np.minimum(r, 1.0 / r))) if r.size else math.nan


def utility_truth_ratio(ratios) -> float:
    """Retain / real-authors / world-facts aggregate: ``mean(max(0, 1 - R))``."""
    r = _finite(ratios)
    return float(np.mean(np.maximum(0.0, 1.0 - r))) if r.size else math.nan


def mean_finite(values) -> float:
    v = _finite(values)
    return float(v.mean()) if v.size else math.nan


def forget_quality(unlearned_ratios, retain_ratios) -> tuple[float, float]:
    """``(p-value, statistic)`` of the two-sample KS test on forget-set truth ratios."""
    a, b = _finite(unlearned_ratios), _finite(retain_ratios)
    if not a.size or not b.size:
        return math.nan, math.nan
    result = ks_2samp(a, b)
    return float(result.pvalue), float(result.statistic)


def model_utility(components: Sequence[float]) -> float:
    """Harmonic mean of the utility components (TOFU's nine); NaN if any is NaN."""
    values = np.asarray(components, dtype=np.float64)
    if not values.size or not np.isfinite(values).all():
        return math.nan
    return float(hmean(values))


def perplexity(gt_losses, num_tokens) -> float:
    """Token-level perplexity of a set: ``exp(sum NLL / sum tokens)`` over finite items."""
    losses = np.asarray(gt_losses, dtype=np.float64)
    tokens = np.asarray(num_tokens, dtype=np.float64)
    keep = np.isfinite(losses) & (tokens > 0)
    if not keep.any():
        return math.nan
    with np.errstate(over="ignore"):  # a collapsed model's perplexity is inf, not an error
        return float(np.exp(losses[keep].sum() / tokens[keep].sum()))


def rouge_recalls(answers: Sequence[str], generations: Sequence[str]) -> tuple[list, list]:
    """ROUGE-1 and ROUGE-L recall of each generation against its answer (TOFU's scorer).

    An empty generation scores 0.
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    rouge1, rouge_l = [], []
    for answer, generation in zip(answers, generations, strict=True):
        scores = scorer.score(answer, generation)
        rouge1.append(float(scores["rouge1"].recall))
        rouge_l.append(float(scores["rougeL"].recall))
    return rouge1, rouge_l


def rouge_l_scores(references: Sequence[str], generations: Sequence[str]) -> tuple[list, list]:
    """ROUGE-L F1 and recall of each generation against its reference (stemmed, as MUSE and
    open-unlearning score verbatim and knowledge memorization). An empty generation scores 0."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    f1, recall = [], []
    for reference, generation in zip(references, generations, strict=True):
        score = scorer.score(reference, generation)["rougeL"]
        f1.append(float(score.fmeasure))
        recall.append(float(score.recall))
    return f1, recall
