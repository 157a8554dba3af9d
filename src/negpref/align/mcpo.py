"""MC-PO: Monte-Carlo kernels that draw hard negatives, and the ranking-NCE loss.

MC-PO (Chen et al. 2025) casts preference optimization as maximum likelihood of
``p(y|x) ~ pi_ref(y|x) exp(r(x, y))`` and estimates its normalizer by sampling, in the manner
of contrastive divergence: the samples serve as the rejected completions. Over a finite set of
K candidates the kernel's target is

    P(candidate j) ~ exp(score_j / T),   score = beta * (log pi - log pi_ref)  (implicit reward)
                                         or log pi (the policy's likelihood)

so candidates the current model rates highly -- hard negatives -- are drawn most. Two ways to
draw (ours; the paper's exact kernel is not public): ``steps = 0`` draws exactly from the
target; ``steps = n`` runs n steps of an independence Metropolis-Hastings chain with a uniform
proposal over the candidates, started at a uniform candidate (contrastive divergence runs a
short chain rather than sampling exactly; n -> infinity recovers the exact draw).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from negpref.losses import reduce


@dataclass
class KernelDraw:
    indices: torch.Tensor  # [B, M] drawn candidate per prompt and draw
    probs: torch.Tensor  # [B, K] the kernel's target distribution (0 on padding)
    entropy: torch.Tensor  # [B] entropy of the target in nats
    hardest: torch.Tensor  # [B] index of the highest-scoring candidate
    accept_rate: float  # Metropolis-Hastings acceptance (1.0 for exact draws)

    @property
    def hardest_hit_rate(self) -> float:
        return (self.indices == self.hardest[:, None]).float().mean().item()


def kernel_log_probs(scores: torch.Tensor, mask: torch.Tensor, temperature: float):
    """``log softmax(score / T)`` over each row's valid candidates (``mask`` true)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logits = (scores / temperature).masked_fill(~mask, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def _uniform(mask: torch.Tensor, n: int, generator) -> torch.Tensor:
    return torch.multinomial(mask.float(), n, replacement=True, generator=generator)


def independence_mh(
    scores: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    steps: int,
    num_draws: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, float]:
    """``num_draws`` independent chains per row; returns their states after ``steps`` steps."""
    state = _uniform(mask, num_draws, generator)
    accepted = 0
    for _ in range(steps):
        proposal = _uniform(mask, num_draws, generator)
        log_ratio = (scores.gather(1, proposal) - scores.gather(1, state)) / temperature
        uniform = torch.rand(state.shape, generator=generator, dtype=scores.dtype)
        accept = torch.log(uniform) < log_ratio
        state = torch.where(accept, proposal, state)
        accepted += int(accept.sum())
    rate = accepted / (steps * state.numel()) if steps else 1.0
    return state, rate


def draw(
    scores: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    steps: int = 0,
    num_draws: int = 1,
    generator: torch.Generator | None = None,
) -> KernelDraw:
    """Draw ``num_draws`` negatives per row of ``scores`` ([B, K], padding where ``~mask``)."""
    scores = scores.detach().double().cpu()
    mask = mask.cpu()
    if not bool(mask.any(-1).all()):
        raise ValueError("every prompt needs at least one candidate")
    log_probs = kernel_log_probs(scores, mask, temperature)
    probs = log_probs.exp()
    if steps == 0:
        indices = torch.multinomial(probs, num_draws, replacement=True, generator=generator)
        rate = 1.0
    else:
        indices, rate = independence_mh(scores, mask, temperature, steps, num_draws, generator)
    entropy = -(probs * log_probs.masked_fill(~mask, 0.0)).sum(-1)
    hardest = scores.masked_fill(~mask, float("-inf")).argmax(-1)
    return KernelDraw(indices, probs.float(), entropy.float(), hardest, rate)


def ranking_nce(
    chosen_logratios: torch.Tensor,
    negative_logratios: torch.Tensor,
    negative_mask: torch.Tensor,
    beta: float = 0.1,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ranking NCE: ``-log softmax(beta * [r_chosen, r_neg_1..M])[chosen]`` per prompt.

    ``*_logratios`` are ``log pi - log pi_ref``; ``negative_logratios`` is [B, M] with padding
    where ``~negative_mask``. With one negative this is exactly the DPO (sigmoid) loss.
    """
    negatives = (beta * negative_logratios).masked_fill(~negative_mask, float("-inf"))
    logits = torch.cat([beta * chosen_logratios[:, None], negatives], dim=1)
    return reduce(-F.log_softmax(logits, dim=1)[:, 0], weights)
