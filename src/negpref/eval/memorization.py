"""Exact memorization and extraction strength: how much of a target the model predicts.

Both read the model's greedy (argmax) next-token predictions under teacher forcing: position
``t`` predicts target token ``t`` from the true tokens before it, as open-unlearning computes
them (``src/evals/metrics/memorization.py``). Targets are the scored tokens of an item: a TOFU
answer (EOS included) given its question, or a MUSE continuation given its text prefix.

- Exact memorization (Tirumala et al. 2022): the fraction of target tokens predicted,
  ``EM = (1/n) sum_t [argmax p(.|x_<t) = x_t]``.
- Extraction strength (Carlini et al. 2021, as Wang et al. 2025 define it for unlearning):
  the fraction of the target that the model completes from the shortest prefix of it,
  ``ES = 1 - k/n`` with ``k`` the smallest number of leading target tokens after which every
  remaining one is predicted; 1 when all are predicted, 0 when the last one is not.
  open-unlearning's loop never reaches ``k = n``, so it reports ``1/n`` instead of 0 when the
  last token is mispredicted; otherwise the two agree.

An item with no target tokens scores NaN.
"""

from __future__ import annotations

import math

import torch


def greedy_matches(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[batch, tokens]`` bool: the argmax of ``logits`` is the target, on masked positions.

    ``logits`` ``[batch, tokens, vocab]`` are aligned with ``targets`` (already shifted).
    """
    return (logits.argmax(-1) == targets) & (mask > 0)


def exact_memorization(matches: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, the fraction of masked positions whose target was predicted."""
    n = (mask > 0).sum(-1)
    em = matches.sum(-1).double() / n.clamp(min=1)
    return em.masked_fill(n == 0, math.nan)


def extraction_strength(matches: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, the length of the longest fully predicted suffix of the target over its length."""
    scored = mask > 0
    n = scored.sum(-1)
    position = scored.long().cumsum(-1)  # 1-based index of each target token within its row
    missed = scored & ~matches
    last_missed = torch.where(missed, position, torch.zeros_like(position)).max(-1).values
    es = (n - last_missed).double() / n.clamp(min=1)
    return es.masked_fill(n == 0, math.nan)
