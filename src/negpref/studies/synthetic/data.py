"""The data and model of the NPO paper's synthetic study (Section 4.1, eq. 6).

Forget and retain sets come from Gaussian-logistic models whose label intercepts differ by
+-1, so forget labels lean to 1 and retain labels to 0. The model is a random-feature logistic
regression ``pi_theta(y=1|x) = sigmoid(theta^T ReLU(W x))`` with ``W`` fixed, so every model in
the study is a vector ``theta`` over the same features and its logits are ``features @ theta``.

Tensors carry a leading instance dimension: ``n_instances`` independent draws are stacked so
that the study runs all of them in one batched computation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from negpref.threads import single_threaded

DTYPE = torch.float64


@dataclass(frozen=True)
class DataSpec:
    """Sizes and the mean shift ``alpha`` of eq. 6 (paper: d=16, 200 forget, 1000 retain).

    ``n_eval`` > 0 also draws that many fresh points from each of the forget and retain
    distributions, to measure distances on held-out points as the authors' code does.
    """

    alpha: float = 1.0
    dim: int = 16
    n_forget: int = 200
    n_retain: int = 1000
    width: int = 128
    n_eval: int = 0


@dataclass(frozen=True)
class Instances:
    """``I`` independent draws of the study's data, stacked on dim 0.

    Rows ``[:n_forget]`` of ``features``/``labels`` are the forget set, the rest the retain set.
    ``positive_labels`` are the forget set's "uninformed" answers, Bern(0.5), used as the IDK
    target and as DPO's preferred response. ``eval_features`` (when drawn) holds ``n_eval``
    held-out forget-distribution points followed by ``n_eval`` retain-distribution points.
    """

    x: torch.Tensor  # [I, n_forget + n_retain, dim]
    features: torch.Tensor  # [I, n_forget + n_retain, width], ReLU(W x)
    labels: torch.Tensor  # [I, n_forget + n_retain], 0./1.
    positive_labels: torch.Tensor  # [I, n_forget], 0./1.
    n_forget: int
    eval_features: torch.Tensor | None = None  # [I, 2 n_eval, width]

    @property
    def forget_labels(self) -> torch.Tensor:
        return self.labels[:, : self.n_forget]

    @property
    def retain_labels(self) -> torch.Tensor:
        return self.labels[:, self.n_forget :]


def gaussian_logistic(
    n: int, mean: torch.Tensor, theta: torch.Tensor, intercept: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x ~ N(mean, I)``, ``P(y=1|x) = sigmoid((x - mean)^T theta + intercept)`` (eq. 6)."""
    x = mean + torch.randn(n, mean.numel(), generator=generator, dtype=DTYPE)
    p_one = torch.sigmoid((x - mean) @ theta + intercept)
    return x, torch.bernoulli(p_one, generator=generator)


def draw_instances(spec: DataSpec, n_instances: int, seed: int) -> Instances:
    """Draw ``n_instances`` data sets and random-feature maps. Instance k is the same whatever
    ``n_instances`` and ``n_eval`` are (held-out points come from their own generator), so a
    short run is a prefix of a long one."""
    ones = torch.ones(spec.dim, dtype=DTYPE)
    theta_forget = ones / math.sqrt(spec.dim)
    mean_forget = spec.alpha * ones
    generator = torch.Generator().manual_seed(seed)
    eval_generator = torch.Generator().manual_seed(seed + 2**31)
    xs, feats, labels, positives, eval_feats = [], [], [], [], []
    for _ in range(n_instances):
        weight = torch.randn(spec.width, spec.dim, generator=generator, dtype=DTYPE)
        weight = weight / math.sqrt(spec.dim)  # entries N(0, 1/d)
        x_f, y_f = gaussian_logistic(spec.n_forget, mean_forget, theta_forget, 1.0, generator)
        x_r, y_r = gaussian_logistic(spec.n_retain, -mean_forget, -theta_forget, -1.0, generator)
        half = torch.full((spec.n_forget,), 0.5, dtype=DTYPE)
        positives.append(torch.bernoulli(half, generator=generator))
        x = torch.cat([x_f, x_r])
        xs.append(x)
        feats.append(random_features(x, weight))
        labels.append(torch.cat([y_f, y_r]))
        if spec.n_eval:
            x_ef, _ = gaussian_logistic(spec.n_eval, mean_forget, theta_forget, 1.0, eval_generator)
            x_er, _ = gaussian_logistic(
                spec.n_eval, -mean_forget, -theta_forget, -1.0, eval_generator
            )
            eval_feats.append(random_features(torch.cat([x_ef, x_er]), weight))
    return Instances(
        x=torch.stack(xs),
        features=torch.stack(feats),
        labels=torch.stack(labels),
        positive_labels=torch.stack(positives),
        n_forget=spec.n_forget,
        eval_features=torch.stack(eval_feats) if eval_feats else None,
    )


def random_features(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.relu(x @ weight.T)


def log_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log pi(y|x)`` per sample for a binary model with ``logit = log pi(1|x)/pi(0|x)``."""
    return F.logsigmoid((2 * labels - 1) * logits)


def bernoulli_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``KL(Bern(sigmoid(p)) || Bern(sigmoid(q)))`` elementwise, stable for large logits.

    With ``log(1 - sigmoid(z)) = logsigmoid(z) - z`` the two-term sum collapses to
    ``logsigmoid(p) - logsigmoid(q) - sigmoid(-p) (p - q)``: one log-sigmoid of the policy.
    """
    return (
        F.logsigmoid(p_logits)
        - F.logsigmoid(q_logits)
        - torch.sigmoid(-p_logits) * (p_logits - q_logits)
    )


def cross_entropy_grad(
    theta: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Gradient in ``theta`` of the weighted mean cross-entropy ``sum_n w_n (-log pi(y_n|x_n))``.

    ``theta`` is ``[I, M, width]`` (M models per instance), ``features`` ``[I, N, width]``,
    ``labels`` ``[I, N]``, ``weights`` ``[M, N]`` normalised to sum to 1 per model. The closed
    form ``sum_n w_n (sigmoid(z_n) - y_n) phi_n`` avoids autograd in the 20000-step fits.
    """
    residual = torch.sigmoid(theta @ features.mT) - labels[:, None, :]
    return (residual * weights) @ features


@single_threaded()
def fit_logistic(
    features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, steps: int, lr: float
) -> torch.Tensor:
    """Full-batch gradient descent from ``theta = 0`` on the weighted cross-entropy.

    One model per row of ``weights`` ([M, N], non-negative); returns ``theta`` ``[I, M, width]``.
    With ``weights`` = all ones on D and retain-only, this gives the paper's initial and
    retrained models in a single batched loop (Appendix D: 20000 steps, lr 0.05).
    """
    weights = weights / weights.sum(-1, keepdim=True)
    theta = features.new_zeros(features.shape[0], weights.shape[0], features.shape[-1])
    for _ in range(steps):
        theta -= lr * cross_entropy_grad(theta, features, labels, weights)
    return theta
