"""U2A vs plain unlearning of all negatives: wall time on the same number of inner steps.

Both run on the toy keyword task (``negpref.studies.u2a_toy``: a tiny Llama, 64 candidate negatives)
in one process. U2A runs exactly ``--rounds`` rounds (no early stop), so its inner budget is
``rounds * inner_steps``; plain unlearning takes that many steps on all negatives with the same
minibatch size. Also timed: per-sample gradients vectorised (vmap) vs one backward per sample.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from negpref.u2a import LMForgetTask, implicit_gains, run_u2a, trainable, weighted_unlearn


def add_arguments(parser) -> None:
    parser.add_argument("--rounds", type=int, default=5, help="U2A rounds (default: 5)")
    parser.add_argument("--inner-steps", type=int, default=20, help="inner steps per round")
    parser.add_argument("--objective", choices=["dpo", "reward"], default="dpo")
    parser.add_argument("--hessian", choices=["identity", "cg"], default="identity")
    parser.add_argument("--pretrain-steps", type=int, default=150, help="base model training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: leave torch's default)"
    )


def run(args) -> dict:
    from negpref.studies.u2a_toy import (
        MAX_LENGTH,
        ablation_config,
        make_task,
        objective_for,
        pretrain,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    task = make_task(args.seed)
    t0 = time.perf_counter()
    model, tokenizer = pretrain(task, seed=args.seed, steps=args.pretrain_steps)
    pretrain_s = time.perf_counter() - t0
    forget = LMForgetTask(model, tokenizer, task.negatives, "GA", max_length=MAX_LENGTH)
    cfg = dataclasses.replace(
        ablation_config(),
        rounds=args.rounds,
        inner_steps=args.inner_steps,
        delta=-1e30,
        hessian=args.hessian,
        seed=args.seed,
    )
    params = list(trainable(model).values())
    base_state = [p.detach().clone() for p in params]
    objective = objective_for(args.objective, model, tokenizer, task, args.seed)

    t0 = time.perf_counter()
    result = run_u2a(model, forget, objective, cfg)
    u2a_s = time.perf_counter() - t0
    budget = cfg.inner_steps * (len(result.log) - 1)

    with torch.no_grad():
        for p, saved in zip(params, base_state):
            p.copy_(saved)
    everything = list(range(len(forget)))
    uniform = torch.full((len(everything),), 1.0 / len(everything), dtype=torch.float64)
    generator = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    weighted_unlearn(model, forget, everything, uniform, base_state, cfg, budget, generator)
    plain_s = time.perf_counter() - t0

    direction = [torch.randn_like(p) for p in params]
    timings = {}
    for vectorized in (True, False):
        t0 = time.perf_counter()
        implicit_gains(model, forget, direction, cfg.grad_chunk, vectorized=vectorized)
        timings[vectorized] = time.perf_counter() - t0

    def total(key):
        return sum(r.get(key, 0.0) for r in result.log)

    return {
        "benchmark": "u2a",
        "candidates": len(forget),
        "trainable_params": sum(p.numel() for p in params),
        "rounds": len(result.log) - 1,
        "inner_steps_total": budget,
        "objective": args.objective,
        "hessian": args.hessian,
        "u2a_s": u2a_s,
        "plain_unlearning_s": plain_s,
        "u2a_over_plain": u2a_s / plain_s,
        "u2a_breakdown_s": {
            "marginal_gains": total("gains_s"),
            "inner_unlearning": total("inner_s"),
            "objective_and_grad": total("objective_s"),
        },
        "per_sample_grads_s": {"vmap": timings[True], "loop": timings[False]},
        "per_sample_grads_speedup": timings[False] / timings[True],
        "pretrain_s_excluded": pretrain_s,
        "torch_threads": torch.get_num_threads(),
    }
