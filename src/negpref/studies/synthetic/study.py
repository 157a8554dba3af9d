"""Figure 4 / Figure 10 (methods compared) and Figure 3 (NPO's beta -> 0 limit) of the NPO paper.

Per instance: draw the data (eq. 6), fit the initial model on D and the retrained model on
D_RT by gradient descent (Appendix D), then unlearn from the initial model with every arm
and record, after each step, the forget distance and retain distance (KL from the retrained
model, averaged over the forget / retain set) and the forget KL (KL from the initial model on
the forget set, Appendix C). Results are means and standard deviations over instances.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from negpref.config import config_to_dict, require
from negpref.studies.synthetic.data import (
    DataSpec,
    Instances,
    bernoulli_kl,
    draw_instances,
    fit_logistic,
)
from negpref.studies.synthetic.unlearn import (
    METHODS,
    PAPER_METHODS,
    USES_BETA,
    Arm,
    forget_term,
    recorded_steps,
    unlearn,
)

METRICS = ("forget_distance", "retain_distance", "forget_kl")

# Appendix D, Table 1: (learning rate, beta) by forget term and alpha.
TABLE1: dict[str, dict[float, tuple[float, float | None]]] = {
    "GA": {1.0: (5e-4, None), 0.0: (1e-4, None)},
    "IDK": {1.0: (5e-4, None), 0.0: (1e-4, None)},
    "NPO": {1.0: (5e-3, 1.0), 0.0: (5e-2, 10.0)},
    "DPO": {1.0: (5e-3, 0.1), 0.0: (5e-2, 5.0)},
}


@dataclass
class StudyConfig:
    """Settings shared by ``figure4`` and ``beta-sweep``; defaults are the paper's."""

    alpha: float = field(
        default=1.0,
        metadata={"help": "mean shift of eq. 6: forget x ~ N(alpha*1, I), retain N(-alpha*1, I)"},
    )
    steps: int = field(default=2000, metadata={"help": "unlearning gradient-descent steps"})
    instances: int = field(default=5, metadata={"help": "independent instances (seeds)"})
    seed: int = field(default=0, metadata={"help": "seed of the first instance's data"})
    record_every: int = field(
        default=10, metadata={"help": "write every k-th step to results.json (summaries use all)"}
    )
    threshold: float = field(
        default=0.005, metadata={"help": "forget distance counted as 'unlearned' in the summary"}
    )
    dim: int = field(default=16, metadata={"help": "input dimension d"})
    n_forget: int = field(default=200, metadata={"help": "forget-set size"})
    n_retain: int = field(default=1000, metadata={"help": "retain-set size"})
    width: int = field(default=128, metadata={"help": "number of random ReLU features"})
    fit_steps: int = field(
        default=20000, metadata={"help": "GD steps fitting the initial and retrained models"}
    )
    fit_lr: float = field(default=0.05, metadata={"help": "learning rate of those fits"})
    eval_points: int = field(
        default=0,
        metadata={
            "help": "0: distances averaged over the training forget/retain sets (the paper's "
            "text); N: over N fresh points from each distribution (the authors' code: 1000)"
        },
    )

    def validate(self) -> None:
        require(math.isfinite(self.alpha), "alpha", self.alpha, "must be a finite number")
        for name in ("steps", "instances", "record_every", "dim", "n_forget", "n_retain", "width"):
            value = getattr(self, name)
            require(value >= 1, name, value, "must be at least 1")
        for name in ("fit_steps", "eval_points"):
            value = getattr(self, name)
            require(value >= 0, name, value, "must be non-negative")
        for name in ("threshold", "fit_lr"):
            value = getattr(self, name)
            require(value > 0 and math.isfinite(value), name, value, "must be positive")

    @property
    def data_spec(self) -> DataSpec:
        return DataSpec(
            self.alpha, self.dim, self.n_forget, self.n_retain, self.width, self.eval_points
        )


def _require_positive(name: str, value: float | None) -> None:
    if value is not None:
        require(value > 0 and math.isfinite(value), name, value, "must be a positive number")


@dataclass
class Figure4Config(StudyConfig):
    """Figure 4 and Figure 10: the paper's methods with Table 1's learning rates and betas."""

    methods: list[str] = field(
        default_factory=lambda: list(PAPER_METHODS),
        metadata={"help": f"methods to run, from: {', '.join(METHODS)}"},
    )
    lr: float | None = field(
        default=None, metadata={"help": "learning rate for every method (default: Table 1)"}
    )
    beta: float | None = field(
        default=None, metadata={"help": "beta for NPO/DPO methods (default: Table 1)"}
    )

    def validate(self) -> None:
        super().validate()
        _require_positive("lr", self.lr)
        _require_positive("beta", self.beta)
        require(len(self.methods) > 0, "methods", self.methods, "name at least one method")
        for method in self.methods:
            require(
                method in METHODS,
                "methods",
                method,
                f"unknown method; choose from {', '.join(METHODS)}",
            )
        require(
            len(set(self.methods)) == len(self.methods),
            "methods",
            self.methods,
            "names a method twice",
        )
        if self.alpha not in TABLE1["GA"]:
            rule = "Table 1 gives learning rates for alpha 0 and 1 only; pass --lr"
            require(self.lr is not None, "lr", self.lr, rule)
            if any(forget_term(m) in USES_BETA for m in self.methods):
                rule = "Table 1 gives betas for alpha 0 and 1 only; pass --beta"
                require(self.beta is not None, "beta", self.beta, rule)

    def arms(self) -> list[Arm]:
        arms = []
        for method in self.methods:
            term = forget_term(method)
            lr, beta = TABLE1[term].get(self.alpha, (None, None))
            lr = self.lr if self.lr is not None else lr
            beta = (self.beta if self.beta is not None else beta) if term in USES_BETA else None
            arms.append(Arm(method, method, lr, beta))
        return arms


@dataclass
class BetaSweepConfig(StudyConfig):
    """Figure 3: NPO at several betas and GA, all at one learning rate, approaching GA as beta->0.

    The authors' code for this figure uses betas 0.01..1 at lr 5e-4 for 10000 steps.
    """

    steps: int = field(default=10000, metadata={"help": "unlearning gradient-descent steps"})
    betas: list[float] = field(
        default_factory=lambda: [0.01, 0.1, 0.2, 0.5, 1.0], metadata={"help": "NPO betas"}
    )
    lr: float = field(default=5e-4, metadata={"help": "learning rate of every trajectory"})

    def validate(self) -> None:
        super().validate()
        _require_positive("lr", self.lr)
        require(len(self.betas) > 0, "betas", self.betas, "name at least one beta")
        for beta in self.betas:
            _require_positive("betas", beta)

    def arms(self) -> list[Arm]:
        npo = [Arm(f"NPO beta={beta:g}", "NPO", self.lr, beta) for beta in self.betas]
        return [*npo, Arm("GA", "GA", self.lr)]


def fit_initial_and_retrained(
    instances: Instances, steps: int, lr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``theta`` of the initial model (trained on D) and the retrained one (on D_RT only)."""
    n = instances.labels.shape[1]
    weights = torch.ones(2, n, dtype=instances.features.dtype)
    weights[1, : instances.n_forget] = 0
    theta = fit_logistic(instances.features, instances.labels, weights, steps, lr)
    return theta[:, 0], theta[:, 1]


def distance_metrics(instances: Instances, ref_theta: torch.Tensor, retr_theta: torch.Tensor):
    """An ``observe`` for ``unlearn``: ``[I, M, 3]`` in METRICS order, averaged over the
    training forget / retain sets, or over the held-out points when ``instances`` has them."""
    held_out = instances.eval_features is not None
    features = instances.eval_features if held_out else instances.features
    n_forget = features.shape[1] // 2 if held_out else instances.n_forget
    ref_logits = (ref_theta[:, None, :] @ features.mT)[..., :n_forget]
    retr_logits = retr_theta[:, None, :] @ features.mT

    def observe(theta: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if held_out:
            logits = theta @ features.mT
        to_retrained = bernoulli_kl(retr_logits, logits)
        forget_kl = bernoulli_kl(ref_logits, logits[..., :n_forget]).mean(-1)
        forget_distance = to_retrained[..., :n_forget].mean(-1)
        retain_distance = to_retrained[..., n_forget:].mean(-1)
        return torch.stack([forget_distance, retain_distance, forget_kl], dim=-1)

    return observe


def _first_step(curve: torch.Tensor, threshold: float) -> int | None:
    hits = torch.nonzero(curve <= threshold)
    return int(hits[0]) if len(hits) else None


def summarize(history: torch.Tensor, threshold: float) -> dict:
    """Headline numbers of one arm from its full-resolution curves ``[steps+1, I, 3]``: the
    mean curves over instances, and per instance the first step at the forget threshold."""
    forget, retain, forget_kl = history.mean(1).unbind(-1)
    reached = _first_step(forget, threshold)
    per_instance = [_first_step(curve, threshold) for curve in history[..., 0].T]
    return {
        "steps_to_threshold": reached,
        "steps_to_threshold_per_instance": per_instance,
        "retain_distance_at_threshold": None if reached is None else float(retain[reached]),
        "min_forget_distance": float(forget.min()),
        "min_forget_distance_step": int(forget.argmin()),
        "min_forget_distance_per_instance": history[..., 0].min(0).values.tolist(),
        "min_retain_distance": float(retain.min()),
        "min_forget_plus_retain": float((forget + retain).min()),
        "final_forget_distance": float(forget[-1]),
        "final_retain_distance": float(retain[-1]),
        "max_retain_distance": float(retain.max()),
        "final_forget_kl": float(forget_kl[-1]),
    }


def run_study(config: StudyConfig, arms: list[Arm]) -> dict:
    """Run the arms on ``config.instances`` instances; return the results.json content."""
    started, cpu_started = time.perf_counter(), time.process_time()
    instances = draw_instances(config.data_spec, config.instances, config.seed)
    ref_theta, retr_theta = fit_initial_and_retrained(instances, config.fit_steps, config.fit_lr)
    fitted = time.perf_counter()
    observe = distance_metrics(instances, ref_theta, retr_theta)
    history = unlearn(
        instances.features,
        instances.labels,
        instances.n_forget,
        ref_theta,
        arms,
        config.steps,
        observe,
        positive_labels=instances.positive_labels,
    )  # [steps+1, I, M, 3]
    finished, cpu = time.perf_counter(), time.process_time() - cpu_started
    mean = history.mean(1)
    std = history.std(1, correction=1 if config.instances > 1 else 0)
    recorded = recorded_steps(config.steps, config.record_every)
    methods, hyper, summary = {}, {}, {}
    for m, arm in enumerate(arms):
        curves = {}
        for k, metric in enumerate(METRICS):
            curves[metric] = mean[recorded, m, k].tolist()
            curves[f"{metric}_std"] = std[recorded, m, k].tolist()
        methods[arm.label] = curves
        hyper[arm.label] = {"method": arm.method, "lr": arm.lr, "beta": arm.beta}
        summary[arm.label] = summarize(history[:, :, m], config.threshold)
    return {
        "alpha": config.alpha,
        "steps": recorded,
        "record_every": config.record_every,
        "instances": config.instances,
        "initial": {
            "forget_distance": float(mean[0, 0, 0]),
            "retain_distance": float(mean[0, 0, 1]),
        },
        "methods": methods,
        "hyperparameters": hyper,
        "summary": summary,
        "config": config_to_dict(config),
        "timing_s": {
            "fit": fitted - started,
            "unlearn": finished - fitted,
            "total": finished - started,
            "cpu": cpu,
        },
    }


def gap_to(results: dict, label: str, reference: str = "GA") -> float:
    """Mean over recorded steps of the distance between two trajectories in the
    (log forget distance, log retain distance) plane: how far ``label`` runs from GA's path."""
    a, b = results["methods"][label], results["methods"][reference]
    points = [
        torch.log(torch.tensor([c["forget_distance"], c["retain_distance"]], dtype=torch.float64))
        for c in (a, b)
    ]
    return float((points[0] - points[1]).norm(dim=0).mean())


def run_figure4(config: Figure4Config) -> dict:
    return run_study(config, config.arms())


def run_beta_sweep(config: BetaSweepConfig) -> dict:
    """The sweep's runs, with each NPO trajectory's gap to GA's added to its summary."""
    results = run_study(config, config.arms())
    for label, summary in results["summary"].items():
        if label != "GA":
            summary["gap_to_GA"] = gap_to(results, label)
    return results
