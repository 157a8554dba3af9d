"""The implicit-gradient machinery of U2A: per-sample gradients and ``H^-1 v``.

``negpref.u2a`` re-exports the public names.
Per-sample gradients are vectorised with ``torch.func`` (functional_call + vmap + grad), one
chunk of candidates at a time; Hessian-vector products use double backward, and conjugate
gradient turns them into ``H^-1 v`` without ever forming ``H``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence

import torch
from torch.func import functional_call, grad, vmap

from negpref.errors import NegprefError
from negpref.u2a.types import ForgetTask, Grads, U2AWarning


def grads_of(value: torch.Tensor, params: list[torch.nn.Parameter]) -> Grads:
    """``d value / d params``; zeros where ``value`` does not depend on a parameter."""
    if not value.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Named parameters that require grad (the LoRA adapters of a peft model)."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not named:
        raise NegprefError("the model has no trainable parameters (all requires_grad=False)")
    return named


def dot(a: Grads, b: Grads) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


# ---------------------------------------------------------------- per-sample gradients


class _TaskLoss(torch.nn.Module):
    """``task.loss(model, batch)`` as a module, so ``functional_call`` can swap its params."""

    def __init__(self, model: torch.nn.Module, task: ForgetTask):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch):
        return self.task.loss(self.model, batch)


@contextlib.contextmanager
def _eager_attention(model):
    """vmap has no batching rule for the fused CPU SDPA kernel (it loops); eager attention
    vectorises. Same maths, so the switch is invisible to the results."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl in (None, "eager") or not hasattr(base, "set_attn_implementation"):
        yield
        return
    base.set_attn_implementation("eager")
    try:
        yield
    finally:
        base.set_attn_implementation(impl)


def per_sample_grads(
    model, task: ForgetTask, indices: Sequence[int], vectorized: bool = True
) -> dict[str, torch.Tensor]:
    """``grad l_k`` for each ``k`` in ``indices``: ``{name: [len(indices), *param.shape]}``.

    Vectorised with ``torch.func`` (functional_call + vmap + grad): one batched call instead
    of one backward per sample. ``vectorized=False`` is the per-sample autograd loop.
    """
    named = trainable(model)
    batch = task.batch(indices)
    if vectorized:
        wrapper = _TaskLoss(model, task)
        params = {f"model.{n}": p.detach() for n, p in named.items()}

        def one_sample(p, sample):
            return functional_call(wrapper, p, ({k: v.unsqueeze(0) for k, v in sample.items()},))

        with _eager_attention(model):
            out = vmap(grad(one_sample), in_dims=(None, 0))(params, batch)
        return {n: out[f"model.{n}"] for n in named}
    rows: list[Grads] = []
    for i in range(len(indices)):
        single = {k: v[i : i + 1] for k, v in batch.items()}
        rows.append(grads_of(task.loss(model, single), list(named.values())))
    return {n: torch.stack([r[j] for r in rows]) for j, n in enumerate(named)}


def implicit_gains(
    model, task: ForgetTask, direction: Grads, chunk: int = 16, vectorized: bool = True
) -> torch.Tensor:
    """``-grad l_k^T direction`` for every candidate ``k`` (``direction = H^-1 grad J``).

    Per-sample gradients live one chunk at a time, so memory is ``chunk x trainable params``.
    """
    names = list(trainable(model))
    gains = torch.empty(len(task), dtype=torch.float64)
    for start in range(0, len(task), chunk):
        indices = list(range(start, min(start + chunk, len(task))))
        try:
            sample_grads = per_sample_grads(model, task, indices, vectorized)
        except (RuntimeError, NotImplementedError) as e:
            if not vectorized:
                raise
            warnings.warn(
                f"vectorised per-sample gradients failed ({str(e).splitlines()[0]}); "
                "falling back to one backward per sample",
                U2AWarning,
                stacklevel=2,
            )
            vectorized = False
            sample_grads = per_sample_grads(model, task, indices, vectorized)
        dots = sum(
            (sample_grads[n].flatten(1).double() @ d.flatten().double())
            for n, d in zip(names, direction)
        )
        gains[start : start + len(indices)] = -dots
    if not bool(torch.isfinite(gains).all()):
        raise NegprefError(
            "marginal gains are not finite (the unlearned model diverged); lower "
            "inner_learning_rate or inner_steps, or raise reg_lambda"
        )
    return gains


# ---------------------------------------------------------------- H^-1 grad J


def conjugate_gradient(
    hvp: Callable[[Grads], Grads],
    b: Grads,
    iters: int,
    tol: float = 1e-10,
    fallback_scale: float | None = None,
) -> Grads:
    """Solve ``H x = b`` for symmetric positive-definite ``H`` given only ``v -> H v``.

    Stops early on convergence, or with a warning on a direction of non-positive curvature
    (``H`` is not positive definite there: the inner problem is not locally convex), returning
    the iterate so far; if that happens before the first step, ``fallback_scale * b`` (a
    scaled-identity ``H^-1``) rather than zero.
    """
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rr = dot(r, r)
    for step in range(iters):
        if rr <= tol * tol:
            break
        hp = hvp(p)
        curvature = dot(p, hp)
        if curvature <= 0:
            fallback = step == 0 and fallback_scale is not None
            warnings.warn(
                "conjugate gradient met non-positive curvature: the inner Hessian is not "
                "positive definite here; raise reg_lambda ("
                + ("using the identity approximation" if fallback else "using the iterate so far")
                + ")",
                U2AWarning,
                stacklevel=2,
            )
            if fallback:
                x = [fallback_scale * t for t in b]
            break
        alpha = rr / curvature
        x = [xi + alpha.to(xi.dtype) * pi for xi, pi in zip(x, p)]
        r = [ri - alpha.to(ri.dtype) * hi for ri, hi in zip(r, hp)]
        rr_new = dot(r, r)
        p = [ri + (rr_new / rr).to(ri.dtype) * pi for ri, pi in zip(r, p)]
        rr = rr_new
    return x


def inner_hvp(
    model,
    task: ForgetTask,
    support: Sequence[int],
    weights: torch.Tensor,
    reg_lambda: float,
    chunk: int = 8,
) -> Callable[[Grads], Grads]:
    """``v -> H v`` for the inner objective ``sum_S w_i l_i + retain + lambda||theta-theta0||^2``
    at the current parameters (double backward; the regulariser adds ``2 lambda v``)."""
    params = list(trainable(model).values())

    def terms():
        for start in range(0, len(support), chunk):
            indices = list(support[start : start + chunk])
            w = weights[start : start + len(indices)]
            yield task.loss(model, task.batch(indices), w) * w.sum()
        yield task.retain_loss(model, 0)

    def hvp(v: Grads) -> Grads:
        out = [2 * reg_lambda * t for t in v]
        with _eager_attention(model):  # the fused SDPA kernel has no double backward
            for value in terms():
                if value is None:
                    continue
                first = torch.autograd.grad(value, params, create_graph=True, allow_unused=True)
                pairs = [(g, t) for g, t in zip(first, v) if g is not None and g.requires_grad]
                if pairs:
                    second = grads_of(sum((g * t).sum() for g, t in pairs), params)
                    out = [o + s for o, s in zip(out, second)]
        return out

    return hvp
