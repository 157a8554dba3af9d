"""U2A — Unlearning to Align: choose and weight the negative samples worth unlearning.

The bi-level problem of the U2A paper (eq. 8)::

    min_{w in simplex}  g(w) = -J(theta*(w)) + beta * sum_i sqrt(w_i)
    s.t. theta*(w) = argmin_theta  sum_i w_i l_i(theta) + lambda ||theta - theta_0||^2

``J`` is an alignment objective (higher is better), ``l_i`` the unlearning loss of negative
sample ``i`` (GA, NPO, ... from ``negpref.losses``). By the implicit function theorem
(Appendix C.3) the marginal gain of sample ``k`` is (eq. 9)::

    gain_k = -grad J^T H^-1 grad l_k - (beta/2) w_k^(-1/2),   H = sum_i w_i hess l_i + 2 lambda I

``run_u2a`` is Algorithm 1: top-M initialisation with uniform weights, then per round the
inner unlearning, top-N additions by marginal gain, exponentiated-gradient (mirror descent)
steps on the simplex restricted to the support (eq. 12), and an early stop when ``g`` improves
by less than ``delta``. The task (candidates + loss) and the objective ``J`` are small
protocols (``negpref.u2a.types``), so the same loop runs a softmax policy with an exact ``J``
(``negpref.studies.u2a_synthetic``) and a LoRA language model with a DPO- or reward-based ``J``
(``negpref.u2a.objectives``).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from negpref.errors import NegprefError
from negpref.io import atomic_write_json
from negpref.u2a.config import U2AConfig
from negpref.u2a.implicit import (
    conjugate_gradient,
    dot,
    grads_of,
    implicit_gains,
    inner_hvp,
    trainable,
)
from negpref.u2a.types import AlignmentObjective, ForgetTask, Grads, U2AWarning


@dataclass
class FunctionObjective:
    """``J`` given as a differentiable function of the model (exact, in-memory problems)."""

    fn: Callable[[torch.nn.Module], torch.Tensor]

    def value_and_grad(self, model, params):
        value = self.fn(model)
        return value.item(), grads_of(value, params)


def inverse_hvp(
    grad_j: Grads, cfg: U2AConfig, hvp: Callable[[Grads], Grads] | None = None
) -> Grads:
    """``H^-1 grad J``. ``identity``: the paper's diagonal assumption ``hess l_i = I/gamma``
    (Appendix D), so ``H = (sum w_i)/gamma I + 2 lambda I = (1/gamma + 2 lambda) I``;
    ``cg``: conjugate gradient on Hessian-vector products of the inner objective (falling
    back to the identity form where the Hessian is indefinite from the first direction)."""
    scale = 1.0 / (1.0 / cfg.gamma + 2 * cfg.reg_lambda)
    if cfg.hessian == "identity":
        return [scale * g for g in grad_j]
    if hvp is None:
        raise ValueError("hessian='cg' needs a Hessian-vector product")
    return conjugate_gradient(hvp, grad_j, cfg.cg_iters, fallback_scale=scale)


# ---------------------------------------------------------------- weights on the simplex


def sparsity_gradient(weights: torch.Tensor, beta: float) -> torch.Tensor:
    """``d/dw beta * sum sqrt(w) = beta / (2 sqrt(w))``."""
    return beta / (2 * weights.sqrt())


def mirror_descent_step(weights: torch.Tensor, grad_g: torch.Tensor, step: float) -> torch.Tensor:
    """Eq. 12: ``w_i <- w_i exp(-eta grad_i) / sum_j w_j exp(-eta grad_j)``, in log space so
    that large ``eta * grad`` cannot turn the normaliser into 0 or inf."""
    return torch.softmax(weights.double().log() - step * grad_g.double(), dim=0)


def floor_weights(weights: torch.Tensor, min_weight: float) -> torch.Tensor:
    """Weights that underflowed below ``min_weight`` are raised to it and all renormalised:
    ``w^(-1/2)`` must stay finite and every support member keeps a say."""
    low = weights < min_weight
    if bool(low.any()):
        warnings.warn(
            f"{int(low.sum())} of {len(weights)} weights underflowed below {min_weight:g}; "
            "floored and renormalised (lower md_step_size for a gentler update)",
            U2AWarning,
            stacklevel=2,
        )
        weights = weights.clamp(min=min_weight)
        weights = weights / weights.sum()
    return weights


def update_weights(weights: torch.Tensor, gains: torch.Tensor, cfg: U2AConfig) -> torch.Tensor:
    """Mirror descent on ``g`` restricted to the support, with ``theta`` fixed (eq. 10-12).

    ``dg/dw_k = -gain_k + beta / (2 sqrt(w_k))`` where ``gain_k`` is the implicit term.
    """
    for _ in range(cfg.md_steps):
        grad_g = -gains + sparsity_gradient(weights, cfg.beta)
        weights = floor_weights(
            mirror_descent_step(weights, grad_g, cfg.md_step_size), cfg.min_weight
        )
    return weights


def entropy(weights: torch.Tensor) -> float:
    w = weights[weights > 0].double()
    return float(-(w * w.log()).sum())


def top_new(gains: torch.Tensor, support: Sequence[int], count: int) -> list[int]:
    """The ``count`` highest-gain candidates outside ``support``.

    Outside the support ``w_k = 0`` and eq. 9's ``-(beta/2) w_k^(-1/2)`` is the same
    (infinite) constant for every candidate, so it cannot change their order: the ranking is
    by the implicit term alone (the authors' code adds one shared ``(beta/2)(0+1e-8)^(-1/2)``).
    """
    masked = gains.clone()
    masked[list(support)] = -math.inf
    available = len(gains) - len(support)
    return masked.topk(min(count, available)).indices.tolist()


# ---------------------------------------------------------------- inner problem


def weighted_unlearn(
    model,
    task: ForgetTask,
    support: Sequence[int],
    weights: torch.Tensor,
    theta0: Grads,
    cfg: U2AConfig,
    steps: int,
    generator: torch.Generator | None = None,
) -> float:
    """``steps`` optimizer steps on ``sum_S w_i l_i + retain + lambda ||theta - theta0||^2``.

    A task with an ``unlearn`` method (``LMForgetTask``: language models) trains on the
    unlearning engine, ``UnlearnTrainer``, seeded by one draw from ``generator`` (so a resumed
    run draws the same); its docstring states how that objective relates to eq. 8. Other tasks
    (the closed-form synthetic problem) take plain steps here: each sees a minibatch ``B``
    drawn without replacement from ``S``; ``|S|/|B| * sum_B w_i l_i`` is an unbiased estimate
    of the weighted sum (exact when ``|B| = |S|``). Returns the last step's objective.
    """
    engine = getattr(task, "unlearn", None)
    if engine is not None:
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        return engine(model, support, weights, theta0, cfg, steps, seed)
    params = list(trainable(model).values())
    if cfg.inner_optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=cfg.inner_learning_rate, weight_decay=0.0)
    else:
        optimizer = torch.optim.SGD(params, lr=cfg.inner_learning_rate)
    support = list(support)
    weights = weights.double()
    size = min(cfg.batch_size, len(support))
    order: list[int] = []
    last = float("nan")
    for step in range(steps):
        if len(order) < size:
            order += torch.randperm(len(support), generator=generator).tolist()
        picked, order = order[:size], order[size:]
        w = weights[picked]
        forget = task.loss(model, task.batch([support[i] for i in picked]), w)
        loss = forget * (w.sum() * len(support) / size)
        loss = loss + cfg.reg_lambda * sum(((p - p0) ** 2).sum() for p, p0 in zip(params, theta0))
        retain = task.retain_loss(model, step)
        if retain is not None:
            loss = loss + retain
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        last = loss.item()
    return last


# ---------------------------------------------------------------- Algorithm 1


@dataclass
class U2AResult:
    selected: list[int]  # candidate indices, in order of selection
    weights: list[float]  # simplex weights of ``selected``
    log: list[dict]  # one record per round (round 0: the model before unlearning)
    initial_gains: list[float]  # implicit marginal gain of every candidate at theta_0
    objective_initial: float  # J(theta_0)
    objective_final: float  # J of the returned model
    stop_reason: str


@dataclass
class _Accepted:
    """The last accepted round, restored when the next one fails the early-stop test."""

    support: list[int]
    weights: torch.Tensor
    params: Grads
    objective: float


def _clamped(value: int, n: int, name: str) -> int:
    if value > n:
        warnings.warn(
            f"{name} {value} is larger than the candidate set ({n}); using {n}",
            U2AWarning,
            stacklevel=3,
        )
    return min(value, n)


def _grow(weights: torch.Tensor, added: int) -> torch.Tensor:
    """Newcomers enter with the weight a uniform vector would give them and the old weights
    shrink to make room: eq. 12 moves mass multiplicatively, so a zero weight never grows."""
    size = len(weights) + added
    new = torch.full((added,), 1.0 / size, dtype=torch.float64)
    return torch.cat([weights * (len(weights) / size), new])


_ROUND_TENSORS, _ROUND_STATE = "round.safetensors", "round.json"


def _save_round(state_dir: Path, params, theta0, grad_j, state: dict) -> None:
    """The accepted round's tensors, then its JSON (written last: it marks the round saved)."""
    from safetensors.torch import save_file

    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, values in (("param", params), ("theta0", theta0), ("grad_j", grad_j)):
        tensors.update({f"{name}.{i}": v.detach().contiguous() for i, v in enumerate(values)})
    tmp = state_dir / f".{_ROUND_TENSORS}.tmp"
    save_file(tensors, str(tmp), metadata={"round": str(state["round"])})
    os.replace(tmp, state_dir / _ROUND_TENSORS)
    atomic_write_json(state_dir / _ROUND_STATE, state)


def _load_round(state_dir: Path) -> tuple[dict, dict] | None:
    """The saved round (tensors, state), or None; a torn or mismatched pair is an error."""
    from safetensors import safe_open

    if not (state_dir / _ROUND_STATE).is_file():
        return None
    try:
        state = json.loads((state_dir / _ROUND_STATE).read_text(encoding="utf-8"))
        with safe_open(str(state_dir / _ROUND_TENSORS), framework="pt") as f:
            if f.metadata().get("round") != str(state["round"]):
                raise ValueError("tensors and state are of different rounds")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # torn, truncated or foreign files: never resume from them
        raise NegprefError(
            f"resume: the saved U2A round in {state_dir} is unreadable ({e}); start a new run"
        ) from None
    return tensors, state


def run_u2a(
    model,
    task: ForgetTask,
    objective: AlignmentObjective,
    cfg: U2AConfig,
    on_round: Callable[[dict], None] | None = None,
    state_dir: Path | None = None,
) -> U2AResult:
    """Algorithm 1. ``model`` is unlearned in place and left at the returned state.

    With ``state_dir`` every accepted round is saved there (safetensors + JSON) and a run
    whose ``state_dir`` holds a saved round continues after it, as if never stopped.

    Round ``t``: marginal gains at ``theta_{t-1}`` -> top-M (t = 1, uniform weights) or top-N
    new samples -> mirror descent on the support with ``theta`` fixed -> inner unlearning from
    ``theta_{t-1}`` -> ``J`` and ``g`` at ``theta_t``. If ``g`` improved by no more than
    ``delta`` the round is rejected and the previous one returned (Algorithm 1, line 11).
    """
    cfg.validate()
    n = len(task)
    if n == 0:
        raise NegprefError("the candidate set of negative samples is empty; nothing to select")
    init_size = _clamped(cfg.init_size, n, "init_size")
    per_round = _clamped(cfg.per_round, n, "per_round")
    params = list(trainable(model).values())
    theta0 = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(cfg.seed)

    started = time.perf_counter()
    objective_value, grad_j = objective.value_and_grad(model, params)
    if float(dot(grad_j, grad_j)) == 0.0:
        raise NegprefError(
            "the alignment objective has zero gradient with respect to the trainable "
            "parameters: it does not depend on them (check the objective, its data and which "
            "parameters are trainable; a reward that is equal for every sampled response also "
            "gives a zero estimate)"
        )
    g_value = -objective_value
    log = [
        {
            "round": 0,
            "set_size": 0,
            "objective": objective_value,
            "g": g_value,
            "objective_s": time.perf_counter() - started,
        }
    ]
    if on_round:
        on_round(log[0])
    support: list[int] = []
    weights = torch.empty(0, dtype=torch.float64)
    accepted: _Accepted | None = None
    initial_gains: torch.Tensor | None = None
    stop_reason = "max rounds"
    first_round = 1
    saved = _load_round(state_dir) if state_dir is not None else None
    if saved is not None:
        tensors, state = saved
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(tensors[f"param.{i}"])
        theta0 = [tensors[f"theta0.{i}"] for i in range(len(params))]
        grad_j = [tensors[f"grad_j.{i}"] for i in range(len(params))]
        support, weights = state["support"], torch.tensor(state["weights"], dtype=torch.float64)
        initial_gains = torch.tensor(state["initial_gains"], dtype=torch.float64)
        objective_value, g_value, log = state["objective"], state["g"], state["log"]
        generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        accepted = _Accepted(
            list(support), weights.clone(), [p.detach().clone() for p in params], objective_value
        )
        first_round = state["round"] + 1
    for round_index in range(first_round, cfg.rounds + 1):
        if len(support) == n:
            stop_reason = "all candidates selected"
            break
        t0 = time.perf_counter()
        hvp = (
            inner_hvp(model, task, support, weights, cfg.reg_lambda, cfg.batch_size)
            if cfg.hessian == "cg"
            else None
        )
        gains = implicit_gains(model, task, inverse_hvp(grad_j, cfg, hvp), cfg.grad_chunk)
        if initial_gains is None:
            initial_gains = gains
        added = top_new(gains, support, init_size if not support else per_round)
        if support:
            weights = update_weights(_grow(weights, len(added)), gains[support + added], cfg)
        else:
            weights = torch.full((len(added),), 1.0 / len(added), dtype=torch.float64)
        support = support + added
        t1 = time.perf_counter()
        inner_loss = weighted_unlearn(
            model, task, support, weights, theta0, cfg, cfg.inner_steps, generator
        )
        t2 = time.perf_counter()
        objective_value, grad_j = objective.value_and_grad(model, params)
        g_new = -objective_value + cfg.beta * float(weights.sqrt().sum())
        early = round_index >= 2 and g_value - g_new <= cfg.delta
        record = {
            "round": round_index,
            "set_size": len(support),
            "added": added,
            "top_gains": gains[added[:5]].tolist(),
            "objective": objective_value,
            "g": g_new,
            "g_improvement": g_value - g_new,
            "weights_entropy": entropy(weights),
            "inner_loss": inner_loss,
            "accepted": not early,
            "gains_s": t1 - t0,
            "inner_s": t2 - t1,
            "objective_s": time.perf_counter() - t2,
        }
        log.append(record)
        if on_round:
            on_round(record)
        if early:
            support, weights, objective_value = (
                accepted.support,
                accepted.weights,
                accepted.objective,
            )
            with torch.no_grad():
                for p, saved in zip(params, accepted.params):
                    p.copy_(saved)
            stop_reason = "early stop"
            break
        g_value = g_new
        accepted = _Accepted(
            list(support), weights.clone(), [p.detach().clone() for p in params], objective_value
        )
        if state_dir is not None:
            _save_round(state_dir, params, theta0, grad_j, {
                "round": round_index, "support": support, "weights": weights.tolist(),
                "initial_gains": initial_gains.tolist(), "objective": objective_value,
                "g": g_value, "log": log, "generator": generator.get_state().tolist(),
            })  # fmt: skip
    return U2AResult(
        selected=list(support),
        weights=weights.tolist(),
        log=log,
        initial_gains=initial_gains.tolist(),
        objective_initial=log[0]["objective"],
        objective_final=objective_value,
        stop_reason=stop_reason,
    )
