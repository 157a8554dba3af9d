"""The types every U2A module shares: parameter gradients, the task and objective protocols,
and the warning class. Kept apart so that ``algorithm``, ``implicit`` and ``objectives`` import
this module and never each other in a circle."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

Grads = list[torch.Tensor]  # one tensor per trainable parameter, in ``trainable`` order


class U2AWarning(UserWarning):
    """Something U2A corrected on its own (clamped sizes, renormalised weights)."""


class ForgetTask(Protocol):
    """The candidate negatives and the unlearning loss on them."""

    def __len__(self) -> int: ...

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Tensors with one leading row per sample of ``indices``."""

    def loss(self, model, batch: dict[str, torch.Tensor], weights=None) -> torch.Tensor:
        """Scalar unlearning loss, reduced like ``negpref.losses`` (``sum(w*l)/sum(w)``)."""

    def retain_loss(self, model, step: int) -> torch.Tensor | None:
        """The retain term of GA+RT / NPO+RT (independent of the weights), or None."""


class AlignmentObjective(Protocol):
    def value_and_grad(self, model, params: list[torch.nn.Parameter]) -> tuple[float, Grads]:
        """``J`` (higher is better) and ``grad J`` (an estimate where ``J`` is sampled)."""
