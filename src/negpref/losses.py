"""The math of every method, as pure functions of per-sequence or per-token log-probabilities.

Sequence-level losses take 1-D tensors over the batch holding, per sequence, the *sum* of the
log-probs of the answer tokens (``logprobs.sequence_logps`` produces them); token-level losses
(WGA, SatImp, UNDIAL, CE-U) take ``[batch, tokens]`` per-token log-probs or ``[batch, tokens,
vocab]`` logits with the answer mask, RMU's ``activation_mse`` a block's activations. Every
loss returns a scalar and accepts ``weights`` (per-sample, non-negative): the reduction is then
``sum(w*l) / sum(w)`` (token-level: ``token_mean``); without weights it is the plain mean.
U2A's weighted unlearning and importance-weighted batches go through this single reduction.

Sign conventions follow the NPO paper: every function is a quantity to *minimise*.
``ga`` returns ``E[log pi(y|x)]``, so minimising it ascends the forget-set NLL.

open-unlearning reduces some terms differently (``docs/conventions.md``); those variants are
the ``*_token_mean`` functions, ``kl_all_positions`` and ``simnpo_delta`` below, and
``negpref.conventions`` selects between them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "activation_mse",
    "ceu",
    "dpo",
    "ga",
    "ga_token_mean",
    "kl",
    "kl_all_positions",
    "kto",
    "logit_margin",
    "masked_token_mean",
    "nll",
    "nll_token_mean",
    "npo",
    "npo_weight",
    "reduce",
    "satimp",
    "simnpo",
    "simnpo_delta",
    "token_mean",
    "undial",
    "wga",
]


def reduce(values: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of per-sample ``values``, or ``sum(w*v)/sum(w)`` with per-sample ``weights``."""
    if values.ndim != 1:
        raise ValueError(f"per-sample values must be 1-D, got shape {tuple(values.shape)}")
    if weights is None:
        return values.mean()
    weights = torch.as_tensor(weights, dtype=values.dtype, device=values.device)
    if weights.shape != values.shape:
        raise ValueError(
            f"weights has shape {tuple(weights.shape)} but the batch has {tuple(values.shape)}; "
            "pass one weight per sample"
        )
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("weights must be finite; got inf or NaN")
    if bool((weights < 0).any()):
        raise ValueError(f"weights must be non-negative; got minimum {weights.min().item():g}")
    total = weights.sum()
    if not bool(total > 0):
        raise ValueError("weights are all zero: at least one sample needs a positive weight")
    return (weights * values).sum() / total


def token_mean(
    values: torch.Tensor, n_tokens: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum(w*v) / sum(w*n)``: per-sequence sums ``values`` pooled into one mean per token.

    Without weights this is the mean over every answer token of the batch (what a causal LM's
    ``outputs.loss`` averages), so long answers weigh more than in :func:`reduce`.
    """
    if values.ndim != 1 or n_tokens.shape != values.shape:
        raise ValueError(
            f"values and n_tokens must be 1-D of one shape, got {tuple(values.shape)} and "
            f"{tuple(n_tokens.shape)}"
        )
    counts = n_tokens.to(values.dtype)
    if weights is not None:
        # reduce() checks the weights; the ratio of two weighted means is the weighted ratio
        return reduce(values, weights) / reduce(counts, weights)
    return values.sum() / counts.sum().clamp(min=1)


def _check_beta(beta: float) -> None:
    if not beta > 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")


def ga(policy_logps: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient ascent: ``E[log pi(y|x)]``. Unbounded below; minimising it diverges."""
    return reduce(policy_logps, weights)


def ga_token_mean(
    policy_logps: torch.Tensor, n_tokens: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Gradient ascent as open-unlearning's ``GradAscent``: the answer-token mean log-prob of
    the batch (``-outputs.loss``), not the mean of per-sequence sums."""
    return token_mean(policy_logps, n_tokens, weights)


def npo(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float = 0.1,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """NPO (eq. 3): ``(2/beta) * log(1 + (pi/pi_ref)^beta)``, bounded below by 0.

    Written as a softplus of the log-ratio so that ratios of ``exp(+-1e4)`` stay finite.
    """
    _check_beta(beta)
    log_ratio = policy_logps - ref_logps
    return reduce((2.0 / beta) * F.softplus(beta * log_ratio), weights)


def npo_weight(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float = 0.1):
    """NPO's adaptive weight ``W = 2 pi^b / (pi^b + pi_ref^b)`` per sample (eq. 5).

    ``grad npo = E[W * grad log pi]``: W is 1 at the reference and vanishes for samples
    already unlearned, which is what slows NPO's divergence relative to GA.
    """
    _check_beta(beta)
    return 2.0 * torch.sigmoid(beta * (policy_logps - ref_logps))


def simnpo(
    policy_logps: torch.Tensor,
    lengths: torch.Tensor,
    beta: float = 2.5,
    gamma: float = 0.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """SimNPO: reference-free NPO on the length-normalised log-prob, with margin ``gamma``."""
    _check_beta(beta)
    mean_logps = policy_logps / lengths.to(policy_logps.dtype).clamp(min=1)
    return reduce(-(2.0 / beta) * F.logsigmoid(-beta * mean_logps - gamma), weights)


def simnpo_delta(
    policy_logps: torch.Tensor,
    lengths: torch.Tensor,
    beta: float = 2.5,
    delta: float = 0.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """SimNPO as open-unlearning writes it, ``-(2/beta) log sigmoid(beta * (nll_mean - delta))``:
    the margin is taken before the temperature, i.e. :func:`simnpo` with ``gamma = beta*delta``."""
    return simnpo(policy_logps, lengths, beta, beta * delta, weights)


def dpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """DPO (sigmoid loss): ``-log sigmoid(beta * (chosen log-ratio - rejected log-ratio))``."""
    _check_beta(beta)
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return reduce(-F.logsigmoid(beta * margin), weights)


def kto(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float = 0.1,
    z_ref: torch.Tensor | float = 0.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """KTO on undesirable samples, the NPO paper's form (eqs. 18-19).

    ``z_ref`` is the batch estimate of ``beta * KL(pi || pi_ref)``; like the KTO paper we treat
    it as a baseline, so it is detached and clipped at 0.
    """
    _check_beta(beta)
    z = torch.as_tensor(z_ref, dtype=policy_logps.dtype, device=policy_logps.device)
    z = z.detach().clamp(min=0)
    log_ratio = policy_logps - ref_logps
    return reduce((2.0 / beta) * -F.logsigmoid(z - beta * log_ratio), weights)


def nll(
    policy_logps: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Token-mean negative log-likelihood per sequence: the retain (RT) and IDK term."""
    return reduce(-policy_logps / lengths.to(policy_logps.dtype).clamp(min=1), weights)


def nll_token_mean(
    policy_logps: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Negative log-likelihood per answer token of the whole batch (open-unlearning's retain
    NLL, ``outputs.loss``), instead of the mean of per-sequence token means of :func:`nll`."""
    return -token_mean(policy_logps, lengths, weights)


def _log_softmax_pair(policy_logits: torch.Tensor, ref_logits: torch.Tensor):
    """Log-softmaxes of policy and reference logits of one shape, in at least float32 (in bf16
    the difference of two near-equal log-probs is noise)."""
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(
            f"policy and reference logits differ in shape: {tuple(policy_logits.shape)} vs "
            f"{tuple(ref_logits.shape)}"
        )
    wide = torch.promote_types(policy_logits.dtype, torch.float32)
    return F.log_softmax(policy_logits.to(wide), dim=-1), F.log_softmax(ref_logits.to(wide), dim=-1)


def kl(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    direction: str = "policy||ref",
) -> torch.Tensor:
    """Token-level KL between next-token distributions, averaged over the masked tokens.

    ``policy_logits`` and ``ref_logits`` are ``[batch, tokens, vocab]`` aligned with ``mask``
    (``[batch, tokens]``, 1 on answer tokens). ``direction="policy||ref"`` is
    ``KL(pi_theta || pi_ref)``, the retain/forget KL terms of the NPO paper's eq. 17;
    ``"ref||policy"`` is ``KL(pi_ref || pi_theta)``, the paper's *forget KL* metric (Appendix C)
    and what TOFU's KL regulariser computes. Per sequence the KL is the mean over its masked
    tokens; sequences are then reduced like every other loss.
    """
    if direction not in ("policy||ref", "ref||policy"):
        raise ValueError(f"direction must be 'policy||ref' or 'ref||policy', got {direction!r}")
    policy_logp, ref_logp = _log_softmax_pair(policy_logits, ref_logits)
    p_logp, q_logp = (
        (policy_logp, ref_logp) if direction == "policy||ref" else (ref_logp, policy_logp)
    )
    token_kl = (p_logp.exp() * (p_logp - q_logp)).sum(-1)
    mask = mask.to(token_kl.dtype)
    per_seq = (token_kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return reduce(per_seq.to(policy_logits.dtype), weights)


def kl_all_positions(policy_logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """``KL(pi_ref || pi_theta)`` averaged over every position of ``[batch, tokens, vocab]``.

    open-unlearning's ``compute_kl_divergence``: ``kl_div(..., reduction="batchmean")`` on the
    logits flattened to ``[batch*tokens, vocab]``, so prompt, padding and the last position
    (which predicts nothing) all count. Pass the logits of the group's own padded width.
    """
    policy_logp, ref_logp = _log_softmax_pair(policy_logits, ref_logits)
    token_kl = (ref_logp.exp() * (ref_logp - policy_logp)).sum(-1)
    return token_kl.mean().to(policy_logits.dtype)


# --- token-level losses ------------------------------------------------------------------------
# Their papers (and open-unlearning) average over every answer token of the batch; with per-item
# weights each sequence's tokens carry its weight (``token_mean``).


def masked_token_mean(
    per_token: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of ``[batch, tokens]`` values over the tokens where ``mask`` is 1 (see token_mean)."""
    mask = mask.to(per_token.dtype)
    return token_mean((per_token * mask).sum(-1), mask.sum(-1), weights)


def wga(
    token_logps: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 1.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted gradient ascent (Wang et al. 2025): ``mean_t p_t^beta log p_t``.

    ``p_t^beta`` is detached: it only weighs each token's ascent step, so tokens the model has
    already forgotten (small ``p_t``) stop pulling, unlike GA's equal weights.
    """
    weight = token_logps.detach().exp() ** beta
    return masked_token_mean(weight * token_logps, mask, weights)


def satimp(
    token_logps: torch.Tensor,
    mask: torch.Tensor,
    beta1: float = 5.0,
    beta2: float = 1.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """SatImp (Yang et al. 2025): ``-mean_t p_t^beta1 (1 - p_t)^beta2 CE_t`` with ``CE_t =
    -log p_t``; the weight (saturation ``p^beta1`` times importance ``(1-p)^beta2``) is
    detached."""
    p = token_logps.detach().exp()
    weight = p**beta1 * (1 - p) ** beta2
    return masked_token_mean(weight * token_logps, mask, weights)


def _soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Per-position ``-sum_v q_v log softmax(logits)_v`` in float32 (``[batch, tokens]``)."""
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    # q_v = 0 exactly where a target logit is -inf: 0 * log p, never 0 * -inf
    return -(target_probs * logp).sum(-1)


def undial(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 10.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """UNDIAL (Dong et al. 2025): cross-entropy to the reference's next-token distribution with
    the true token's logit lowered by ``beta``, ``softmax(ref_logits - beta * onehot(y))``.

    ``logits``/``ref_logits`` are ``[batch, tokens, vocab]`` aligned with ``targets`` and
    ``mask`` (``[batch, tokens]``); the target is a constant (the reference is frozen).
    """
    ref = ref_logits.detach().to(torch.promote_types(ref_logits.dtype, torch.float32))
    index = targets.unsqueeze(-1)
    lowered = ref.scatter(-1, index, ref.gather(-1, index) - beta)
    return masked_token_mean(_soft_cross_entropy(logits, lowered.softmax(-1)), mask, weights)


def ceu(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    ignore_first: float = 1,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """CE-U (B. Yang 2025): cross-entropy to the model's own next-token distribution with
    the true token's logit set to -inf (detached), so all mass moves off the true token.

    Answer tokens whose 1-based index in their answer is ``<= ignore_first`` are left out
    (default 1: the footnote to the CE-U paper's training settings, as open-unlearning does).
    """
    wide = torch.promote_types(logits.dtype, torch.float32)
    suppressed = logits.detach().to(wide).scatter(-1, targets.unsqueeze(-1), -math.inf)
    mask = mask.to(wide)
    scored = mask * (mask.cumsum(-1) > ignore_first)
    return masked_token_mean(_soft_cross_entropy(logits, suppressed.softmax(-1)), scored, weights)


def logit_margin(
    logits: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """PDU's forget term (Entesari et al. 2025): ``mean_t (max_v z_tv - mean_v z_tv)^2``, the
    squared gap between each answer position's largest and mean logit. It is 0 exactly when
    the position's distribution is uniform, so descending it flattens the forget answers."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    margin = (wide.max(-1).values - wide.mean(-1)).pow(2)
    return masked_token_mean(margin, mask.to(wide.dtype), weights)


def activation_mse(
    activations: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMU's activation loss: per sequence the mean over its masked positions of the squared
    error averaged over the hidden dimension, then reduced over sequences.

    ``activations`` ``[batch, tokens, hidden]``; ``target`` broadcasts to it (RMU's scaled
    random vector on forget rows, the frozen model's activations on retain rows); ``mask``
    ``[batch, tokens]`` marks the answer positions.
    """
    wide = torch.promote_types(activations.dtype, torch.float32)
    squared = (activations.to(wide) - target.detach().to(wide)).pow(2).mean(-1)
    mask = mask.to(wide)
    per_seq = (squared * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return reduce(per_seq, weights)
