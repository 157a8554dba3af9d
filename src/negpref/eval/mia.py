"""Membership-inference attacks on answer tokens, their AUC, and MUSE's privacy leakage.

Every attack maps a sequence to a score where *higher means more likely a member* (seen in
training), so ``AUC = P(score(member) > score(non-member))``: 1.0 for a model that memorised the
forget set, about 0.5 for one that never saw it (the retain model).

- ``loss``: mean answer-token log-likelihood (Yeom et al.).
- ``zlib``: that log-likelihood divided by the zlib-compressed length of the answer text in
  bytes (Carlini et al. 2021, as implemented by Min-K%'s authors).
- ``min_k``: mean of the lowest ``k`` fraction of token log-probs (Shi et al. 2024).
- ``min_k_plus_plus``: the same on token log-probs standardised by the next-token
  distribution, ``(log p(x_t) - mu_t) / sigma_t`` with ``mu_t = E_z[log p(z)]`` and
  ``sigma_t^2 = Var_z[log p(z)]`` under ``z ~ p(.|x_<t)`` (Zhang et al. 2024).

Attacks that need more than one forward of the model (``MODEL_ATTACKS``), asked for by name:

- ``reference``: the mean log-likelihood minus a reference model's, ``ref_loss - loss``
  (Carlini et al. 2021; open-unlearning's ``mia_reference`` with the sign turned), the
  reference being a model that never saw the members (e.g. the retain model);
- ``reference_ratio``: ``-loss / ref_loss``, the same comparison as a ratio of the two token-mean
  NLLs (Carlini et al. 2021's ratio of log-perplexities);
- ``gradnorm``: minus the mean over parameter tensors of the ``p``-norm of the gradient of the
  token-mean NLL (Wang et al. 2024, arXiv:2402.17012; open-unlearning's ``mia_gradnorm``, p = 2):
  a member sits near a minimum, so its gradient is small.

Privacy leakage (MUSE's PrivLeak, as MUSE and open-unlearning compute it) compares the
unlearned model's AUC with the retain model's on ``1 - AUC`` (MUSE's AUC ranks non-members
first): ``((1-AUC) - (1-AUC_retain)) / (1-AUC_retain) * 100``, in percent. 0 is ideal; an
under-unlearned model (forget set still recognised, AUC above the retain model's) scores
negative, an over-unlearned one positive. Without a retain model, open-unlearning takes
``AUC_retain = 0.5`` (a model that never saw the forget set cannot tell it from the holdout).

Under open-unlearning's conventions Min-K% and Min-K%++ leave the last answer token (EOS) out
(``drop_last_answer_token``) and default to ``k = 0.4``.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch

ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")
MODEL_ATTACKS = ("reference", "reference_ratio", "gradnorm")
ALL_ATTACKS = (*ATTACKS, *MODEL_ATTACKS)
GRADNORM_P = 2.0  # open-unlearning's mia_gradnorm p


def _bottom_k_mean(values: torch.Tensor, mask: torch.Tensor, k: float) -> torch.Tensor:
    """Per row, the mean of the ``max(1, int(n*k))`` smallest masked values (n masked)."""
    n = mask.sum(-1)
    count = torch.clamp((n * k).floor(), min=1)
    ranked = values.masked_fill(mask == 0, math.inf).sort(-1).values
    positions = torch.arange(values.shape[-1], device=values.device)
    keep = positions.unsqueeze(0) < count.unsqueeze(-1)
    means = ranked.masked_fill(~keep, 0.0).sum(-1) / count
    return means.masked_fill(n == 0, math.nan)


def drop_last_answer_token(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` without each row's last masked position: open-unlearning's Min-K% tokens, which
    skip the EOS prediction (``tokenwise_logprobs`` drops the last labelled token)."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(mask > 0, positions, -1).max(-1, keepdim=True).values
    return mask * (positions.unsqueeze(0) != last)


def min_k_scores(token_logps: torch.Tensor, mask: torch.Tensor, k: float = 0.2) -> torch.Tensor:
    """Min-K% per sequence from token log-probs ``[batch, tokens]`` and the answer mask."""
    return _bottom_k_mean(token_logps.float(), mask, k)


def min_k_plus_plus_scores(
    token_logps: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor, k: float = 0.2
) -> torch.Tensor:
    """Min-K%++ per sequence; ``logits`` ``[batch, tokens, vocab]`` aligned with the tokens."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    probs = log_probs.exp()
    mu = (probs * log_probs).sum(-1)
    variance = (probs * log_probs.square()).sum(-1) - mu.square()
    # A near-deterministic next token has ~0 variance; the floor keeps its score finite.
    z = (token_logps.float() - mu) / variance.clamp(min=1e-6).sqrt()
    return _bottom_k_mean(z, mask, k)


def zlib_score(mean_logp: float, text: str) -> float:
    """Mean log-likelihood over the zlib-compressed byte length of ``text``."""
    return mean_logp / len(zlib.compress(text.encode("utf-8")))


def reference_scores(mean_logp: float, ref_mean_logp: float) -> dict[str, float]:
    """``reference`` and ``reference_ratio`` from the model's and the reference's token-mean
    log-likelihoods of one sequence."""
    return {
        "reference": mean_logp - ref_mean_logp,
        "reference_ratio": -mean_logp / ref_mean_logp if ref_mean_logp else math.nan,
    }


def gradnorm_score(grads, p: float = GRADNORM_P) -> float:
    """``-mean_i ||g_i||_p`` over the gradient tensors ``grads`` of one sequence's loss."""
    norms = torch.stack([torch.linalg.vector_norm(g.float(), ord=p) for g in grads])
    return -norms.mean().item()


def mia_auc(member_scores, nonmember_scores) -> float:
    """ROC AUC of telling members (label 1) from non-members by score; NaN scores dropped."""
    from sklearn.metrics import roc_auc_score

    members = np.asarray(member_scores, dtype=np.float64)
    nonmembers = np.asarray(nonmember_scores, dtype=np.float64)
    members, nonmembers = members[np.isfinite(members)], nonmembers[np.isfinite(nonmembers)]
    if not members.size or not nonmembers.size:
        return math.nan
    labels = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
    return float(roc_auc_score(labels, np.concatenate([members, nonmembers])))


def privleak(auc_unlearned: float, auc_retain: float) -> float:
    """MUSE's PrivLeak in percent: ``((1-AUC) - (1-AUC_retain)) / (1-AUC_retain) * 100``.

    Negative when the unlearned model still tells members apart better than the retain model.
    """
    if not auc_retain < 1:
        # undefined: a retain model ranking every member first (open-unlearning divides by
        # 1e-10 here and reports ~1e10 times the difference)
        return math.nan
    return ((1 - auc_unlearned) - (1 - auc_retain)) / (1 - auc_retain) * 100


def mia_summary(aucs: dict, retain_aucs: dict, ref_auc: float | None) -> dict:
    """``mia/<attack>`` AUCs and ``privleak/<attack>`` against the retain model's AUCs, or
    against the fixed ``ref_auc`` when there are none (None: no PrivLeak)."""
    result = {f"mia/{attack}": auc for attack, auc in aucs.items()}
    if aucs and retain_aucs:
        result["privleak_reference"] = "retain logs"
        for attack in aucs.keys() & retain_aucs.keys():
            result[f"privleak/{attack}"] = privleak(aucs[attack], retain_aucs[attack])
    elif aucs and ref_auc is not None:
        result["privleak_reference"] = f"fixed AUC {ref_auc:g}"
        for attack, auc in aucs.items():
            result[f"privleak/{attack}"] = privleak(auc, ref_auc)
    return result
