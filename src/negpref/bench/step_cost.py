"""Step cost of the unlearning engine on CPU: GA vs NPO with precomputed and live reference.

A randomly initialised Llama-architecture model and random token sequences (no tokenizer, no
download). Every mode is a real ``UnlearnTrainer`` taking real optimizer steps (the Trainer's
``training_step``, clipping and AdamW step, as its loop runs them); the
repetitions are interleaved (mode A, B, C, A, B, C, ...) so that machine noise hits every mode
alike, and the median step time is reported. Peak memory is the tensor memory of one step:
what persists across steps (weights, frozen reference copy, optimizer state, reference table)
plus the highest point of the allocations made during the step, read from torch's profiler.
"""

from __future__ import annotations

import statistics
import time
import types

import torch

from negpref.data import Encoded
from negpref.errors import NegprefError
from negpref.models import tiny_llama
from negpref.unlearn import UnlearnConfig
from negpref.unlearn.dataset import UnlearnData
from negpref.unlearn.trainer import UnlearnTrainer

MODES = {
    "ga": dict(method="GA"),
    "npo_precomputed": dict(method="NPO", ref_mode="precomputed"),
    "npo_live": dict(method="NPO", ref_mode="live"),
    "ga_lora": dict(method="GA", lora=True),
    "npo_live_lora": dict(method="NPO", ref_mode="live", lora=True),
}


def add_arguments(parser) -> None:
    parser.add_argument("--hidden", type=int, default=256, help="hidden size")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--items", type=int, default=64, help="forget items (precompute cost)")
    parser.add_argument("--reps", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--seed", type=int, default=0)


def _data(args) -> UnlearnData:
    gen = torch.Generator().manual_seed(args.seed)
    prompt = 16
    items = [
        Encoded(
            input_ids=torch.randint(3, args.vocab, (args.seq_len,), generator=gen).tolist(),
            answer_mask=[0] * prompt + [1] * (args.seq_len - prompt),
            truncated=False,
        )
        for _ in range(args.items)
    ]
    return UnlearnData(
        forget=items,
        refusal=[],
        retain=[],
        weights=None,
        seed=args.seed,
        truncated={"forget": 0, "refusal": 0, "retain": 0},
    )


def _trainer(args, mode: str) -> UnlearnTrainer:
    config = UnlearnConfig(
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        learning_rate=1e-5,
        warmup_epochs=0,
        num_train_epochs=1000,
        output_dir="unused",
        report_to="none",
        seed=args.seed,
        use_cpu=True,
        lora_r=8,
        **MODES[mode],
    )
    model = tiny_llama(
        args.vocab,
        seed=args.seed,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq_len,
    )
    trainer = UnlearnTrainer(
        model, config, processing_class=types.SimpleNamespace(pad_token_id=0), data=_data(args)
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=trainer.total_steps)
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop
    trainer.model.train()
    return trainer


def train_step(trainer: UnlearnTrainer, step: int) -> dict[str, float]:
    """One optimizer step the way the Trainer's loop takes it (one micro-batch); its figures."""
    pairs = trainer.data.stream(step * trainer.effective_batch, trainer.effective_batch)
    inputs = trainer.collate(pairs)
    trainer.training_step(trainer.model, inputs)
    torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return trainer._reduced_step_metrics()


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _persistent_bytes(engine: UnlearnTrainer) -> int:
    """Tensors that live across steps: weights, frozen copy, optimizer state, ref table."""
    models = [engine.unwrapped] + ([engine.frozen_ref] if engine.frozen_ref is not None else [])
    tensors = [t for m in models for t in (*m.parameters(), *m.buffers())]
    tensors += [v for state in engine.optimizer.state.values() for v in state.values()]
    tensors += list(engine.data.ref_logps.values())
    return _tensor_bytes(tensors)


def _step_peak_bytes(engine: UnlearnTrainer, step: int) -> int:
    """Highest level of the allocations made during one step, above where it started."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(engine, step)
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


def check(args) -> None:
    if args.hidden % 64:
        raise NegprefError(f"--hidden: must be a multiple of 64 (the head size), got {args.hidden}")


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    engines = {mode: _trainer(args, mode) for mode in MODES}
    start = time.perf_counter()
    engines["npo_precomputed"].precompute_reference()
    precompute_s = time.perf_counter() - start

    step = {mode: 0 for mode in MODES}

    def take_step(mode: str) -> float:
        t0 = time.perf_counter()
        train_step(engines[mode], step[mode])
        step[mode] += 1
        return time.perf_counter() - t0

    for mode in MODES:  # warm-up: optimizer state allocated, kernels chosen
        take_step(mode)
        take_step(mode)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    order = list(MODES)
    for rep in range(args.reps):
        for mode in order[rep % len(order) :] + order[: rep % len(order)]:
            times[mode].append(take_step(mode))
    median = {mode: statistics.median(t) for mode, t in times.items()}
    peak_mb = {
        mode: round((_persistent_bytes(e) + _step_peak_bytes(e, step[mode])) / 2**20, 2)
        for mode, e in engines.items()
    }
    return {
        "ga_step_s": median["ga"],
        "npo_precomputed_step_s": median["npo_precomputed"],
        "npo_live_step_s": median["npo_live"],
        "ga_lora_step_s": median["ga_lora"],
        "npo_live_lora_step_s": median["npo_live_lora"],
        "precompute_s": precompute_s,
        "precompute_items": args.items,
        "npo_precomputed_over_ga": median["npo_precomputed"] / median["ga"],
        "npo_live_over_ga": median["npo_live"] / median["ga"],
        "peak_mem_mb": peak_mb,
        "npo_live_lora_over_ga_lora_mem": peak_mb["npo_live_lora"] / peak_mb["ga_lora"],
        "npo_live_over_ga_mem": peak_mb["npo_live"] / peak_mb["ga"],
        "setup": {
            "hidden": args.hidden,
            "layers": args.layers,
            "vocab": args.vocab,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "reps": args.reps,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }
