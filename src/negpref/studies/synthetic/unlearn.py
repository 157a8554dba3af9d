"""Unlearning methods of the synthetic study and the one gradient-descent loop that runs them.

A method is its loss: a forget term from ``negpref.losses`` on per-sample log-probs of the
binary model, optionally plus the retain (RT) cross-entropy. Every "arm" (a method with its
learning rate and beta) and every instance runs side by side in one batched loop: the arms'
losses are summed, so one backward pass yields each arm's own gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from negpref import losses
from negpref.studies.synthetic.data import log_prob
from negpref.threads import single_threaded


@dataclass(frozen=True)
class LogProbs:
    """Per-sample log-probs of one arm, flattened over instances (each a 1-D tensor)."""

    forget: torch.Tensor  # log pi_theta(y|x) on the forget set
    ref_forget: torch.Tensor  # log pi_ref(y|x)
    positive: torch.Tensor | None  # log pi_theta(y~|x), y~ ~ Bern(0.5)
    ref_positive: torch.Tensor | None
    retain: torch.Tensor | None  # log pi_theta(y|x) on the retain set


def _ones(logps: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(logps)  # one "token" per answer: the binary label


def _ga(lp: LogProbs, beta: float | None) -> torch.Tensor:
    return losses.ga(lp.forget)


def _npo(lp: LogProbs, beta: float | None) -> torch.Tensor:
    return losses.npo(lp.forget, lp.ref_forget, beta)


def _dpo(lp: LogProbs, beta: float | None) -> torch.Tensor:
    # Scaled by 2/beta like NPO (the authors' synthetic code), so that dropping the positive
    # term of DPO gives exactly NPO, as in the derivation of eq. 3.
    return (2.0 / beta) * losses.dpo(lp.positive, lp.forget, lp.ref_positive, lp.ref_forget, beta)


def _idk(lp: LogProbs, beta: float | None) -> torch.Tensor:
    return losses.nll(lp.positive, _ones(lp.positive))


FORGET_TERMS: dict[str, Callable[[LogProbs, float | None], torch.Tensor]] = {
    "GA": _ga,
    "NPO": _npo,
    "DPO": _dpo,
    "IDK": _idk,
}
USES_BETA = {"NPO", "DPO"}
METHODS = tuple(name + suffix for name in FORGET_TERMS for suffix in ("", "+RT"))
PAPER_METHODS = ("GA", "GA+RT", "NPO", "NPO+RT", "DPO+RT", "IDK+RT")


def forget_term(method: str) -> str:
    return method.removesuffix("+RT")


def method_loss(method: str, lp: LogProbs, beta: float | None) -> torch.Tensor:
    """The loss a method minimises: its forget term, plus the retain NLL for ``*+RT``."""
    loss = FORGET_TERMS[forget_term(method)](lp, beta)
    if method.endswith("+RT"):
        loss = loss + losses.nll(lp.retain, _ones(lp.retain))
    return loss


@dataclass(frozen=True)
class Arm:
    """One trajectory of the study: ``method`` run at ``lr`` (and ``beta``), shown as ``label``."""

    label: str
    method: str
    lr: float
    beta: float | None = None


@single_threaded()
def unlearn(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_forget: int,
    ref_theta: torch.Tensor,
    arms: list[Arm],
    steps: int,
    observe: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    positive_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``steps`` of gradient descent for every arm and instance, from ``ref_theta``.

    ``features`` ``[I, N, width]`` with the forget set in rows ``[:n_forget]``, ``labels``
    ``[I, N]``, ``ref_theta`` ``[I, width]``. ``observe(theta, logits)`` maps the current
    parameters ``[I, M, width]`` (M = len(arms)) and their logits on ``features`` ``[I, M, N]``
    to metrics ``[I, M, ...]``; it is called before the first step and after every step, and
    the stacked ``[steps + 1, I, M, ...]`` tensor is returned.
    """
    n_instances = features.shape[0]
    lrs = torch.tensor([arm.lr for arm in arms], dtype=features.dtype)[:, None]
    theta = ref_theta[:, None, :].repeat(1, len(arms), 1).requires_grad_(True)
    ref_logits = ref_theta[:, None, :] @ features.mT  # [I, 1, N]
    forget_labels = labels[:, None, :n_forget]
    ref_forget = log_prob(ref_logits[..., :n_forget], forget_labels)
    ref_positive = None
    if positive_labels is not None:
        positive_labels = positive_labels[:, None, :]
        ref_positive = log_prob(ref_logits[..., :n_forget], positive_labels)
    history = []
    for step in range(steps + 1):
        logits = theta @ features.mT
        history.append(observe(theta.detach(), logits.detach()))
        if step == steps:
            break
        forget = log_prob(logits[..., :n_forget], forget_labels)
        retain = log_prob(logits[..., n_forget:], labels[:, None, n_forget:])
        positive = (
            None if positive_labels is None else log_prob(logits[..., :n_forget], positive_labels)
        )
        total = logits.new_zeros(())
        for m, arm in enumerate(arms):
            lp = LogProbs(
                forget=forget[:, m].reshape(-1),
                ref_forget=ref_forget[:, 0].reshape(-1),
                positive=None if positive is None else positive[:, m].reshape(-1),
                ref_positive=None if ref_positive is None else ref_positive[:, 0].reshape(-1),
                retain=retain[:, m].reshape(-1),
            )
            # The losses average over all instances' samples; times I, each instance's
            # gradient is that of its own loss.
            total = total + n_instances * method_loss(arm.method, lp, arm.beta)
        (grad,) = torch.autograd.grad(total, theta)
        with torch.no_grad():
            theta -= lrs * grad
    return torch.stack(history)


def recorded_steps(steps: int, every: int) -> list[int]:
    """Steps kept in results.json: every ``every``-th one, and always the last."""
    kept = list(range(0, steps + 1, every))
    return kept if kept[-1] == steps else [*kept, steps]
