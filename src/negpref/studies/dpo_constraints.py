"""Constrained DPO vs constrained RLHF on a small discrete problem (Wipf 2024, Sections 3, 5;
``negpref align constraint-study``).

The problem: ``P`` prompts, ``R`` responses each, a known Bradley-Terry reward ``r*[P, R]`` and
a reference policy ``pi_ref[P, R]``. A policy is ``softmax(log pi_ref + delta)``. The
population losses, exactly (no sampling):

- RLHF (eq. 3): ``E_x[ -E_pi r* + lambda KL(pi || pi_ref) ]``;
- DPO (eq. 6): pairs ``(y1, y2) ~ pi_ref x pi_ref`` (y1 != y2), winner by ``sigma(r1 - r2)``,
  loss ``-log sigma(lambda (h_w - h_l))`` with ``h = log pi/pi_ref = delta - logsumexp``.

Unconstrained, both are minimized by ``pi** ~ pi_ref exp(r*/lambda)`` (eq. 4). Restricted
policy classes (Proposition 3.1), each swept from tight to unconstrained:

- ``dim``: low-dimensional logits ``delta = Phi theta`` with ``d`` fixed random features
  (``Phi`` is ``[P*R, d]``; every delta is reachable at ``d = P*R``);
- ``norm``: ``||delta||_F <= c`` (unconstrained once ``c`` exceeds ``||delta**||``);
- ``steps``: k full-batch gradient steps from ``pi_ref`` (early stopping; one path per loss).

The gap between the two constrained optima is reported as ``KL(pi_RLHF || pi_DPO)``, the
difference of their expected rewards and the RLHF suboptimality of the DPO policy; all vanish
at the unconstrained end. ``penalty_png`` draws Section 5's ``log(gamma + u)`` for several
reference qualities.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize

from negpref.config import config_to_dict, require
from negpref.io import atomic_write_bytes, atomic_write_json, staged_out_dir
from negpref.report import Section, write_html_report


@dataclass
class StudySettings:
    prompts: int = field(default=4, metadata={"help": "prompts of the discrete problem"})
    responses: int = field(default=6, metadata={"help": "responses per prompt"})
    beta: float = field(default=1.0, metadata={"help": "KL strength lambda"})
    reward_scale: float = field(default=2.0, metadata={"help": "std of the BT reward r*"})
    ref_concentration: float = field(
        default=1.0, metadata={"help": "Dirichlet concentration of pi_ref (large: uniform)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of rewards, pi_ref and features"})

    def validate(self) -> None:
        require(self.prompts >= 1, "prompts", self.prompts, "must be >= 1")
        require(self.responses >= 2, "responses", self.responses, "must be >= 2")
        for name in ("beta", "reward_scale", "ref_concentration"):
            require(getattr(self, name) > 0, name, getattr(self, name), "must be positive")


@dataclass
class Problem:
    reward: torch.Tensor  # [P, R] the Bradley-Terry reward r*
    log_ref: torch.Tensor  # [P, R] log pi_ref
    lam: float  # KL strength (beta)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.reward.shape)

    def optimum(self) -> torch.Tensor:
        """log pi** of eq. 4."""
        return torch.log_softmax(self.log_ref + self.reward / self.lam, dim=-1)


def make_problem(
    prompts: int = 4,
    responses: int = 6,
    lam: float = 1.0,
    reward_scale: float = 2.0,
    ref_concentration: float = 1.0,
    seed: int = 0,
) -> Problem:
    """Random rewards ~ N(0, scale^2); pi_ref ~ Dirichlet(concentration) per prompt."""
    rng = np.random.default_rng(seed)
    reward = torch.tensor(rng.normal(0, reward_scale, (prompts, responses)))
    ref = torch.tensor(rng.dirichlet([ref_concentration] * responses, prompts))
    return Problem(reward, torch.log(ref), lam)


def rlhf_loss(problem: Problem, log_pi: torch.Tensor) -> torch.Tensor:
    pi = log_pi.exp()
    kl = (pi * (log_pi - problem.log_ref)).sum(-1)
    return (-(pi * problem.reward).sum(-1) + problem.lam * kl).mean()


def dpo_loss(problem: Problem, log_pi: torch.Tensor) -> torch.Tensor:
    """Population DPO loss: ordered pairs (i wins over j) weighted by pi_ref(i) pi_ref(j) p_ij."""
    h = log_pi - problem.log_ref
    ref = problem.log_ref.exp()
    pair = ref[:, :, None] * ref[:, None, :]
    pair = pair * (1 - torch.eye(problem.shape[1], dtype=pair.dtype))
    p_win = torch.sigmoid(problem.reward[:, :, None] - problem.reward[:, None, :])
    margin = problem.lam * (h[:, :, None] - h[:, None, :])
    return (pair * p_win * F.softplus(-margin)).sum((1, 2)).mean()


LOSSES = {"rlhf": rlhf_loss, "dpo": dpo_loss}


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """Mean over prompts of KL(p || q)."""
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def _policy(problem: Problem, delta: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(problem.log_ref + delta, dim=-1)


def _scipy_fit(objective, x0: np.ndarray, constraints=(), method: str = "L-BFGS-B") -> np.ndarray:
    def fun(x):
        t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        value = objective(t)
        (grad,) = torch.autograd.grad(value, t)
        return value.item(), grad.numpy().astype(np.float64)

    options = {"maxiter": 5000, "ftol": 1e-15}
    if method == "L-BFGS-B":
        options["gtol"] = 1e-10
    result = minimize(fun, x0, jac=True, method=method, constraints=constraints, options=options)
    return result.x


def features(problem: Problem, seed: int = 0) -> torch.Tensor:
    """Random features ``[P*R, P*R]``; the first d columns span the ``dim = d`` class."""
    n = problem.shape[0] * problem.shape[1]
    return torch.tensor(np.random.default_rng(seed).normal(0, 1, (n, n)))


def fit_dim(problem: Problem, loss: str, dim: int, seed: int = 0) -> torch.Tensor:
    """argmin over delta = Phi[:, :dim] theta; returns log pi."""
    phi = features(problem, seed)[:, :dim]

    def objective(theta):
        return LOSSES[loss](problem, _policy(problem, (phi @ theta).reshape(problem.shape)))

    theta = torch.tensor(_scipy_fit(objective, np.zeros(dim)))
    return _policy(problem, (phi @ theta).reshape(problem.shape))


def fit_norm(problem: Problem, loss: str, radius: float) -> torch.Tensor:
    """argmin over ||delta||_F <= radius (inf: unconstrained); returns log pi."""
    p, r = problem.shape

    def objective(x):
        return LOSSES[loss](problem, _policy(problem, x.reshape(p, r)))

    x0 = np.zeros(p * r)
    if math.isinf(radius):
        x = _scipy_fit(objective, x0)
    else:
        ball = {
            "type": "ineq",
            "fun": lambda x: radius**2 - float(x @ x),
            "jac": lambda x: -2 * x,
        }
        x = _scipy_fit(objective, x0, constraints=[ball], method="SLSQP")
    return _policy(problem, torch.tensor(x).reshape(p, r))


def steps_path(problem: Problem, loss: str, levels: list[int], lr: float = 0.5) -> list:
    """log pi after each of ``levels`` full-batch gradient steps on delta from 0 (pi_ref)."""
    delta = torch.zeros(problem.shape, dtype=torch.float64, requires_grad=True)
    policies, done = {}, 0
    for level in sorted(set(levels)):
        for _ in range(level - done):
            value = LOSSES[loss](problem, _policy(problem, delta))
            (grad,) = torch.autograd.grad(value, delta)
            with torch.no_grad():
                delta -= lr * grad * problem.shape[0]  # the loss averages prompts; undo per prompt
        done = level
        policies[level] = _policy(problem, delta.detach())
    return [policies[level] for level in levels]


def gap(problem: Problem, log_rlhf: torch.Tensor, log_dpo: torch.Tensor) -> dict:
    def expected_reward(log_pi):
        return float((log_pi.exp() * problem.reward).sum(-1).mean())

    optimum = problem.optimum()
    return {
        "kl_rlhf_dpo": kl(log_rlhf, log_dpo),
        "kl_dpo_rlhf": kl(log_dpo, log_rlhf),
        "reward_rlhf": expected_reward(log_rlhf),
        "reward_dpo": expected_reward(log_dpo),
        "reward_gap": expected_reward(log_rlhf) - expected_reward(log_dpo),
        "rlhf_suboptimality_of_dpo": float(
            rlhf_loss(problem, log_dpo) - rlhf_loss(problem, log_rlhf)
        ),
        "kl_rlhf_to_optimum": kl(log_rlhf, optimum),
        "kl_dpo_to_optimum": kl(log_dpo, optimum),
    }


def sweep(problem: Problem, kind: str, levels: list[float], seed: int = 0) -> list[dict]:
    """The gap at each constraint level of ``kind`` (dim, norm or steps)."""
    if kind == "steps":  # one gradient path per loss, read off at every level
        steps = [int(k) for k in levels]
        pairs = zip(
            steps_path(problem, "rlhf", steps), steps_path(problem, "dpo", steps), strict=True
        )
    else:
        fit = {
            "dim": lambda loss, d: fit_dim(problem, loss, int(d), seed),
            "norm": lambda loss, c: fit_norm(problem, loss, float(c)),
        }[kind]
        pairs = ((fit("rlhf", level), fit("dpo", level)) for level in levels)
    return [
        {"level": level, **gap(problem, rlhf, dpo)}
        for level, (rlhf, dpo) in zip(levels, pairs, strict=True)
    ]


def default_levels(problem: Problem) -> dict[str, list[float]]:
    p, r = problem.shape
    unconstrained_norm = float(torch.linalg.norm(problem.optimum() - problem.log_ref))
    return {
        "dim": sorted({1, 2, 4, 8, 16, p * r} & set(range(1, p * r + 1))),
        "norm": [c * unconstrained_norm for c in (0.1, 0.25, 0.5, 0.75)] + [math.inf],
        "steps": [1, 3, 10, 30, 100, 300, 1000, 3000, 10000],
    }


def study(problem: Problem, seed: int = 0) -> dict:
    levels = default_levels(problem)
    # tiny tensors: threads only add overhead (and oversubscribe a shared CPU)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sweeps = {kind: sweep(problem, kind, lv, seed) for kind, lv in levels.items()}
    finally:
        torch.set_num_threads(previous)
    return {
        "problem": {
            "prompts": problem.shape[0],
            "responses": problem.shape[1],
            "lambda": problem.lam,
            "reward": problem.reward.tolist(),
            "pi_ref": problem.log_ref.exp().tolist(),
        },
        "sweeps": sweeps,
    }


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def gap_png(result: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {
        "dim": "feature dimension d of delta = Phi theta",
        "norm": "radius ||delta|| <= c (last: none)",
        "steps": "gradient steps from pi_ref",
    }
    sweeps = result["sweeps"]
    fig, axes = plt.subplots(1, len(sweeps), figsize=(4.2 * len(sweeps), 3.4))
    for ax, (kind, rows) in zip(axes, sweeps.items(), strict=True):
        xs = list(range(len(rows)))
        series = {
            "KL(RLHF || DPO)": [r["kl_rlhf_dpo"] for r in rows],
            "|reward gap|": [abs(r["reward_gap"]) for r in rows],
            "RLHF loss(DPO) - RLHF loss(RLHF)": [r["rlhf_suboptimality_of_dpo"] for r in rows],
        }
        for (label, ys), marker in zip(series.items(), "os^", strict=True):
            ax.plot(xs, [max(y, _FLOOR) for y in ys], marker=marker, label=label)
        ax.set_xticks(xs, [_level_label(r["level"]) for r in rows], rotation=45)
        ax.set_yscale("log")
        ax.set_ylabel(f"gap (floored at {_FLOOR:g})")
        ax.set_xlabel(labels[kind])
        ax.set_title(f"constraint: {kind}")
    axes[0].legend(fontsize=7)
    return _png(fig)


_FLOOR = 1e-12  # solver precision: gaps below it are drawn at the floor


def _level_label(level: float) -> str:
    if math.isinf(level):
        return "none"
    return f"{level:g}" if float(level).is_integer() else f"{level:.2f}"


def penalty_png(gammas: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)) -> bytes:
    """Section 5: ``log(gamma + u)``, raw and rescaled to agree at u = 0 and u = 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    u = np.linspace(0, 3, 600)
    fig, (raw, rel) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for g in gammas:
        raw.plot(u, np.log(g + u), label=f"gamma = {g:g}")
        rel.plot(u, (np.log(g + u) - np.log(g)) / (np.log(g + 1) - np.log(g)), label=f"{g:g}")
    rel.plot(u, u, "k--", label="l1: |u|")
    rel.plot(u, (u > 0).astype(float), "k:", label="l0: 1[u != 0]")
    raw.set_title("DPO penalty log(gamma + u)")
    raw.set_xlabel("u = (pi(y_l)/pi(y_w))^lambda")
    rel.set_title("rescaled: small gamma -> l0-like, large -> l1")
    rel.set_xlabel("u")
    rel.set_ylim(-0.1, 3)
    raw.legend(fontsize=7, title="gamma = (pi_ref(y_l)/pi_ref(y_w))^lambda", title_fontsize=7)
    rel.legend(fontsize=7)
    return _png(fig)


def run_constraint_study(settings: StudySettings, out, overwrite: bool = False) -> dict:
    """The study of ``settings`` into ``out``, all at once: ``constraint_study.json``,
    ``constraint_gap.png``, ``penalty.png`` and ``report.html``; returns the JSON's content."""
    problem = make_problem(
        settings.prompts,
        settings.responses,
        settings.beta,
        settings.reward_scale,
        settings.ref_concentration,
        settings.seed,
    )
    with staged_out_dir(out, overwrite) as stage:
        result = {"settings": config_to_dict(settings), **study(problem, settings.seed)}
        gap_image, penalty_image = gap_png(result), penalty_png()
        atomic_write_json(stage / "constraint_study.json", result)
        atomic_write_bytes(stage / "constraint_gap.png", gap_image)
        atomic_write_bytes(stage / "penalty.png", penalty_image)
        columns = ["constraint", "level", "KL(RLHF||DPO)", "reward gap", "RLHF subopt. of DPO"]
        rows = [
            [kind, r["level"], r["kl_rlhf_dpo"], r["reward_gap"], r["rlhf_suboptimality_of_dpo"]]
            for kind, sweep_rows in result["sweeps"].items()
            for r in sweep_rows
        ]
        write_html_report(
            stage / "report.html",
            "Constrained DPO vs constrained RLHF",
            [
                Section(
                    "Proposition 3.1",
                    ["Gap between the constrained RLHF and DPO optima; the last level of each "
                     "sweep is unconstrained."],
                    tables=[(columns, rows)],
                    figures=[(gap_image, "gap vs constraint level")],
                ),
                Section("Section 5: noise-adaptive penalty",
                        figures=[(penalty_image, "log(gamma + u)")]),
            ],
        )  # fmt: skip
    return result


def summary_lines(result: dict) -> list[str]:
    """Per constraint: the gap at its tightest and at its loosest (unconstrained) level."""
    lines = []
    for kind, sweep_rows in result["sweeps"].items():
        tight, loose = sweep_rows[0], sweep_rows[-1]
        lines.append(
            f"{kind}: KL(RLHF||DPO) {tight['kl_rlhf_dpo']:.3g} at {tight['level']:g} -> "
            f"{loose['kl_rlhf_dpo']:.3g} at {loose['level']:g}"
        )
    return lines
