"""Generalized-link DPO: DPO re-derived as Gaussian estimation (Wipf 2024, Section 4).

A preference probability is written ``mu(pi(y_l|x) / pi(y_w|x))`` with a monotone link ``mu``
(eq. 8). With ``xi_theta = mu(u_theta)`` and ``xi_ref = mu(u_ref)`` for the policy and reference
ratios ``u = pi(y_l|x)/pi(y_w|x)`` (eq. 9), eq. 11 fits the pair ``[xi_theta, xi_ref]`` with a
zero-mean isotropic Gaussian of per-tuple variance ``gamma``. Minimising over ``gamma`` in closed
form (``gamma* = |v|^2 / 2``) leaves, up to the constant ``1 + log(pi)``, the per-tuple loss

    log(xi_theta^2 + xi_ref^2)                                   (eq. 26)

and with ``mu(u) = u^(lambda/2)`` this is ``-log sigmoid(lambda * margin)`` plus a term that
depends on the reference only: the DPO loss (Proposition 4.1, eq. 27).

Links are written through ``s = lambda * log u`` as ``log mu = h(s)``: ``power`` (``h = s/2``,
i.e. ``u^(lambda/2)``), and CDF links ``mu = F(lambda log u)`` for ``logistic``, ``probit``
(Gaussian CDF) and ``cloglog`` (``1 - exp(-e^s)``). Everything is computed in log space.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from negpref.losses import reduce


def _log_cloglog(s: torch.Tensor) -> torch.Tensor:
    # log(1 - exp(-e^s)): below s = -20 it equals s to 1e-9 (and the direct form underflows);
    # above 30, mu is 1 in float64. Clamping keeps the unused branch's gradient finite.
    direct = torch.log(-torch.expm1(-torch.exp(s.clamp(-20.0, 30.0))))
    return torch.where(s < -20.0, s, direct)


LINKS = {
    "power": lambda s: 0.5 * s,
    "logistic": F.logsigmoid,
    "probit": torch.special.log_ndtr,
    "cloglog": _log_cloglog,
}


def log_link(name: str, log_u: torch.Tensor, lam: float) -> torch.Tensor:
    """``log mu(u)`` for link ``name`` at ``log u``, scale ``lam``."""
    if name not in LINKS:
        raise ValueError(f"unknown link {name!r}; known links: {', '.join(LINKS)}")
    return LINKS[name](lam * log_u)


def gaussian_nll(xi_theta: torch.Tensor, xi_ref: torch.Tensor, gamma: torch.Tensor):
    """``-log N([xi_theta, xi_ref] | 0, gamma I)`` of eq. 11, per tuple (2-D Gaussian)."""
    sq = xi_theta**2 + xi_ref**2
    return sq / (2 * gamma) + torch.log(2 * math.pi * gamma)


def optimal_gamma(xi_theta: torch.Tensor, xi_ref: torch.Tensor) -> torch.Tensor:
    """The per-tuple variance minimising eq. 11: ``|v|^2 / 2`` (eq. 24)."""
    return (xi_theta**2 + xi_ref**2) / 2


def link_losses(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    link: str = "power",
) -> torch.Tensor:
    """Per-tuple ``log(mu(u_theta)^2 + mu(u_ref)^2)``: eq. 11 minimised over gamma, less 1+log pi."""
    log_u_theta = policy_rejected_logps - policy_chosen_logps
    log_u_ref = ref_rejected_logps - ref_chosen_logps
    return torch.logaddexp(
        2 * log_link(link, log_u_theta, beta), 2 * log_link(link, log_u_ref, beta)
    )


def link_dpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    link: str = "power",
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generalized-link DPO loss, reduced like every loss in ``negpref.losses``."""
    per_tuple = link_losses(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta,
        link,
    )
    return reduce(per_tuple, weights)
