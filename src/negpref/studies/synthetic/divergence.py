"""Theorem 2 of the NPO paper: GA diverges linearly in t, NPO logarithmically.

Setting of Section 3.1 / Appendix B.2: logistic regression ``pi(y=1|x) = sigmoid(<x, theta>)``,
a forget set of ``n_f <= d`` nearly orthogonal points (``x_i ~ N(0, I_d / d)``, so
``|<x_i, x_j>| ~ 1/sqrt(d)`` and ``||x_i|| ~ 1``), labels drawn from the initial model, and
gradient descent on the GA and NPO losses from ``theta_init``. The tracked quantity is
``||theta_t - theta_init||_{X^T X} = ||X (theta_t - theta_init)||_2``, the movement of the
forget-set logits. Both losses run in the study's one loop (``unlearn``) as two arms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import optimize, stats

from negpref.config import config_to_dict, require
from negpref.studies.synthetic.data import DTYPE
from negpref.studies.synthetic.unlearn import Arm, recorded_steps, unlearn


@dataclass
class DivergenceConfig:
    """Theorem 2's high-dimensional logistic regression (n_f <= d)."""

    dim: int = field(default=1000, metadata={"help": "dimension d"})
    n_forget: int = field(default=20, metadata={"help": "forget-set size n_f (at most d)"})
    steps: int = field(default=2000, metadata={"help": "gradient-descent steps T"})
    lr: float = field(default=1.0, metadata={"help": "step size eta (Theorem 2's NPO part: <= 1)"})
    beta: float = field(default=1.0, metadata={"help": "NPO's beta"})
    seed: int = field(default=0, metadata={"help": "seed of X, theta_init and labels"})
    record_every: int = field(default=1, metadata={"help": "write every k-th step to results.json"})

    def validate(self) -> None:
        for name in ("dim", "n_forget", "record_every"):
            value = getattr(self, name)
            require(value >= 1, name, value, "must be at least 1")
        require(self.steps >= 10, "steps", self.steps, "must be at least 10 to fit growth curves")
        require(
            self.n_forget <= self.dim,
            "n_forget",
            self.n_forget,
            f"Theorem 2 needs n_f <= d = {self.dim}",
        )
        for name in ("lr", "beta"):
            value = getattr(self, name)
            require(value > 0 and math.isfinite(value), name, value, "must be a positive number")


def draw_problem(config: DivergenceConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``X`` [n_f, d] with rows ``N(0, I/d)``, ``theta_init ~ N(0, I_d)`` (so the initial
    logits are O(1)), and labels ``y_i ~ Bern(sigmoid(<x_i, theta_init>))``."""
    generator = torch.Generator().manual_seed(config.seed)
    x = torch.randn(config.n_forget, config.dim, generator=generator, dtype=DTYPE)
    x = x / math.sqrt(config.dim)
    theta_init = torch.randn(config.dim, generator=generator, dtype=DTYPE)
    labels = torch.bernoulli(torch.sigmoid(x @ theta_init), generator=generator)
    return x, labels, theta_init


def r_squared(y: np.ndarray, fitted: np.ndarray) -> float:
    return float(1.0 - np.sum((y - fitted) ** 2) / np.sum((y - y.mean()) ** 2))


def fit_linear(t: np.ndarray, y: np.ndarray) -> dict:
    """``y ~ a t`` (through the origin, Theorem 2's GA form) and ``y ~ a t + b``."""
    slope = float(t @ y / (t @ t))
    affine = stats.linregress(t, y)
    return {
        "slope": slope,
        "r2": r_squared(y, slope * t),
        "affine_slope": float(affine.slope),
        "affine_intercept": float(affine.intercept),
        "affine_r2": r_squared(y, affine.slope * t + affine.intercept),
    }


def fit_log(t: np.ndarray, y: np.ndarray) -> dict:
    """``y ~ c log(1 + k t)`` (Theorem 2's NPO form), by least squares in (c, k)."""
    k0 = 1.0 / max(float(t[len(t) // 10]), 1.0)
    c0 = float(y[-1] / np.log1p(k0 * t[-1]))
    (c, k), _ = optimize.curve_fit(
        lambda tt, c, k: c * np.log1p(k * tt), t, y, p0=(c0, k0), bounds=(0.0, np.inf)
    )
    return {"c": float(c), "k": float(k), "r2": r_squared(y, c * np.log1p(k * t))}


def growth_ratio(y: np.ndarray) -> float:
    """Growth over the second half of the run divided by growth over the first half:
    1 for linear growth, near 0 for logarithmic growth."""
    mid = len(y) // 2
    return float((y[-1] - y[mid]) / (y[mid] - y[0]))


def run_divergence(config: DivergenceConfig) -> dict:
    """GD on GA and NPO; the ``X^T X`` norms per step, the fits and the theory's constants."""
    x, labels, theta_init = draw_problem(config)
    init_logits = x @ theta_init
    arms = [Arm("GA", "GA", config.lr), Arm("NPO", "NPO", config.lr, config.beta)]

    def observe(theta: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return (logits - init_logits).norm(dim=-1)  # ||X (theta - theta_init)||_2 per arm

    history = unlearn(
        x[None], labels[None], config.n_forget, theta_init[None], arms, config.steps, observe
    )[:, 0]  # [steps+1, 2]
    t = np.arange(config.steps + 1, dtype=np.float64)
    ga, npo = history[:, 0].numpy(), history[:, 1].numpy()
    gram = x @ x.T
    off_diagonal = (gram - torch.diag(torch.diag(gram))).abs().max()
    recorded = recorded_steps(config.steps, config.record_every)
    return {
        "t": recorded,
        "GA": ga[recorded].tolist(),
        "NPO": npo[recorded].tolist(),
        "fits": {
            "GA": {"linear": fit_linear(t, ga), "growth_ratio": growth_ratio(ga)},
            "NPO": {
                "log": fit_log(t, npo),
                "linear": fit_linear(t, npo),
                "growth_ratio": growth_ratio(npo),
            },
        },
        # Lemmas 3-4 with orthogonal x_i: each forget logit moves by eta/n_f ||x_i||^2 per GA
        # step, so ||b_t|| -> eta t ||diag(X X^T)|| / n_f; NPO's grows like sqrt(n_f)/beta log t.
        "theory": {
            "ga_slope": config.lr * float(torch.diag(gram).norm()) / config.n_forget,
            "npo_c": math.sqrt(config.n_forget) / config.beta,
        },
        "max_offdiag_inner_product": float(off_diagonal),
        "config": config_to_dict(config),
    }
