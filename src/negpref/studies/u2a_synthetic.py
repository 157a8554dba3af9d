"""U2A on a problem with a known answer: a softmax policy and an exactly computed ``J``.

The model is a table of next-token logits, one softmax over ``vocab`` tokens per context (a
bigram language model: contexts are prompts, tokens are responses). Half of the tokens are
good (reward +1), half bad (reward -1). ``J(theta)`` is the policy's expected reward,
``mean_c sum_v pi(v|c) r(v)``: exact, no sampling. The candidate negatives are
(context, token) pairs:
- *helpful*: a bad token the model likes; unlearning it moves mass to the other tokens of
  its context, so ``J`` rises;
- *harmful*: a good token reported as negative by mistake; unlearning it lowers ``J``.
U2A should select the helpful ones and beat unlearning all negatives (and random subsets).
``run_synthetic_study`` is ``negpref u2a synthetic``: the check per seed, JSON, figures, report.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from negpref import losses
from negpref.config import config_to_dict, require
from negpref.io import atomic_write_json, check_out_dir, staged_out_dir
from negpref.report import Section, write_html_report
from negpref.threads import single_threaded
from negpref.u2a import FunctionObjective, U2AConfig, run_u2a, weighted_unlearn
from negpref.u2a.report import gains_figure, rounds_figure, settings_section


class TablePolicy(torch.nn.Module):
    """``logits[context]``: a softmax over the vocabulary for each context."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, contexts: torch.Tensor) -> torch.Tensor:
        return self.logits[contexts]


def token_logps(model, contexts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return model(contexts).log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


class TokenForgetTask:
    """Negatives ``(context_i, token_i)``; ``l_i`` is GA (``log pi``) or NPO, per sample."""

    def __init__(self, model, contexts, tokens, loss: str = "GA", npo_beta: float = 1.0):
        self.contexts, self.tokens, self.loss_name, self.npo_beta = contexts, tokens, loss, npo_beta
        with torch.no_grad():
            self.ref_logps = token_logps(model, contexts, tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return {
            "contexts": self.contexts[idx],
            "tokens": self.tokens[idx],
            "ref_logps": self.ref_logps[idx],
        }

    def loss(self, model, batch, weights=None):
        logps = token_logps(model, batch["contexts"], batch["tokens"])
        if self.loss_name == "NPO":
            return losses.npo(logps, batch["ref_logps"], self.npo_beta, weights)
        return losses.ga(logps, weights)

    def retain_loss(self, model, step: int):
        return None


@dataclass
class SyntheticProblem:
    model: TablePolicy
    task: TokenForgetTask
    objective: FunctionObjective
    helpful: list[int]  # candidate indices whose unlearning raises J
    base_logits: torch.Tensor

    def reset(self) -> None:
        with torch.no_grad():
            self.model.logits.copy_(self.base_logits)

    def objective_value(self) -> float:
        with torch.no_grad():
            return float(self.objective.fn(self.model))


def make_problem(
    seed: int = 0,
    contexts: int = 20,
    vocab: int = 8,
    n_helpful: int = 20,
    n_harmful: int = 20,
    loss: str = "GA",
) -> SyntheticProblem:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(contexts, vocab, generator=gen, dtype=torch.float64)
    reward = torch.where(torch.arange(vocab) < vocab // 2, 1.0, -1.0).double()
    model = TablePolicy(logits)
    probs = logits.softmax(-1)
    # helpful: each context's most likely bad token; harmful: a good token of another context
    helpful_ctx = torch.randperm(contexts, generator=gen)[:n_helpful]
    bad_tokens = probs[helpful_ctx, vocab // 2 :].argmax(-1) + vocab // 2
    harmful_ctx = torch.randint(contexts, (n_harmful,), generator=gen)
    good_tokens = torch.randint(vocab // 2, (n_harmful,), generator=gen)
    ctx = torch.cat([helpful_ctx, harmful_ctx])
    tok = torch.cat([bad_tokens, good_tokens])
    order = torch.randperm(len(tok), generator=gen)  # hide where the answer is
    task = TokenForgetTask(model, ctx[order], tok[order], loss)
    helpful = [i for i, j in enumerate(order.tolist()) if j < n_helpful]
    objective = FunctionObjective(lambda m: (m.logits.softmax(-1) * reward).sum(-1).mean())
    return SyntheticProblem(model, task, objective, helpful, logits.clone())


def default_config() -> U2AConfig:
    """Full-batch SGD inner steps; ``lambda`` small enough that unlearning moves the logits by
    O(1) (so gains saturate and spreading weight pays), ``beta`` on the scale of ``J``."""
    return U2AConfig(
        rounds=10,
        init_size=4,
        per_round=4,
        delta=0.0,
        reg_lambda=0.02,
        beta=0.02,
        md_step_size=1.0,
        md_steps=5,
        inner_steps=50,
        inner_learning_rate=0.2,
        inner_optimizer="sgd",
        batch_size=64,
        grad_chunk=64,
    )


def unlearn_subset(problem: SyntheticProblem, indices: Sequence[int], cfg: U2AConfig, steps: int):
    """Uniform-weight unlearning of ``indices`` from the base model; returns ``J``."""
    problem.reset()
    theta0 = [problem.base_logits]
    weights = torch.full((len(indices),), 1.0 / len(indices), dtype=torch.float64)
    generator = torch.Generator().manual_seed(cfg.seed)
    weighted_unlearn(problem.model, problem.task, indices, weights, theta0, cfg, steps, generator)
    return problem.objective_value()


def evaluate(seed: int = 0, cfg: U2AConfig | None = None, random_draws: int = 10, **kw) -> dict:
    """U2A vs unlearning all negatives vs random subsets of U2A's size, same inner budget."""
    cfg = cfg or default_config()
    with single_threaded():
        problem = make_problem(seed=seed, **kw)
        n = len(problem.task)
        j_base = problem.objective_value()
        result = run_u2a(problem.model, problem.task, problem.objective, cfg)
        j_u2a = problem.objective_value()
        steps = cfg.inner_steps * sum(1 for r in result.log[1:] if r["accepted"])
        selected, helpful = set(result.selected), set(problem.helpful)
        j_all = unlearn_subset(problem, range(n), cfg, steps)
        j_oracle = unlearn_subset(problem, sorted(helpful), cfg, steps)
        rng = random.Random(seed)
        j_random = [
            unlearn_subset(problem, rng.sample(range(n), len(selected)), cfg, steps)
            for _ in range(random_draws)
        ]
    hits = len(selected & helpful)
    gains = torch.tensor(result.initial_gains)
    is_helpful = torch.zeros(n, dtype=torch.bool)
    is_helpful[list(helpful)] = True
    return {
        "seed": seed,
        "n_candidates": n,
        "n_helpful": len(helpful),
        "selected": len(selected),
        "precision": hits / len(selected),
        "recall": hits / len(helpful),
        "weight_on_helpful": sum(
            w for i, w in zip(result.selected, result.weights) if i in helpful
        ),
        "rounds": len(result.log) - 1,
        "stop_reason": result.stop_reason,
        "inner_steps_budget": steps,
        "J_base": j_base,
        "J_u2a": j_u2a,
        "J_all": j_all,
        "J_random_mean": sum(j_random) / len(j_random),
        "J_random_max": max(j_random),
        "J_helpful_only": j_oracle,
        "gain_auc": _auc(gains, is_helpful),
        "initial_gains": result.initial_gains,
        "helpful": sorted(helpful),
        "selected_indices": result.selected,
        "weights": result.weights,
        "log": result.log,
    }


def _auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a helpful negative has a higher initial gain than a harmful one."""
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    return float(wins.mean())


SYNTHETIC_KEYS = (
    "seed", "selected", "precision", "recall", "weight_on_helpful", "gain_auc", "J_base",
    "J_u2a", "J_all", "J_random_mean", "J_random_max", "J_helpful_only", "inner_steps_budget",
)  # fmt: skip


def synthetic_report(results: list[dict], settings: dict) -> tuple[list[Section], dict[str, bytes]]:
    """Sections and PNGs of ``negpref u2a synthetic`` (figures of the first seed)."""
    first = results[0]
    helpful = set(first["helpful"])
    groups = {
        "helpful (a bad token the policy likes)": sorted(helpful),
        "harmful (a good token reported)": [
            i for i in range(first["n_candidates"]) if i not in helpful
        ],
    }
    figures = {
        "gains.png": gains_figure(first["initial_gains"], groups),
        "rounds.png": rounds_figure(first["log"]),
    }
    section = Section(
        "U2A on a softmax policy with an exact objective",
        [
            f"{first['n_candidates']} candidates: {first['n_helpful']} helpful negatives (a bad "
            "token the policy likes) and the rest harmful (a good token reported by mistake). "
            "J = exact expected reward. Baselines unlearn all candidates, random subsets of "
            "U2A's size, or exactly the helpful ones, with uniform weights and U2A's total number "
            "of inner steps.",
        ],
        tables=[(list(SYNTHETIC_KEYS), [[r[k] for k in SYNTHETIC_KEYS] for r in results])],
        figures=[
            (figures["gains.png"], f"initial marginal gains (seed {first['seed']})"),
            (figures["rounds.png"], f"objective per round (seed {first['seed']})"),
        ],
    )
    return [section, settings_section(settings)], figures


@dataclass
class U2ASyntheticConfig:
    """Settings of ``negpref u2a synthetic``."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "problem seeds"})
    out: str = field(default="", metadata={"help": "output directory"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing out directory"})

    def validate(self) -> None:
        require(bool(self.out), "out", self.out, "give an output directory")
        require(bool(self.seeds), "seeds", self.seeds, "give at least one seed")


def run_synthetic_study(config: U2ASyntheticConfig) -> dict:
    """``evaluate`` per seed; writes ``synthetic.json``, the figures and ``report.html`` to
    ``config.out``; returns the summary (``SYNTHETIC_KEYS`` of every run)."""
    config.validate()
    check_out_dir(config.out, config.overwrite)  # before the work, not after it
    results = [evaluate(seed) for seed in config.seeds]
    settings = config_to_dict(default_config())
    sections, figures = synthetic_report(results, settings)
    with staged_out_dir(config.out, config.overwrite) as stage:
        atomic_write_json(stage / "synthetic.json", {"runs": results, "config": settings})
        for name, png in figures.items():
            (stage / name).write_bytes(png)
        write_html_report(stage / "report.html", "negpref u2a synthetic", sections)
    return {"runs": [{k: r[k] for k in SYNTHETIC_KEYS} for r in results]}
