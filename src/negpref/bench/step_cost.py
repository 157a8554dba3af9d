"""Step cost of the unlearning engine on CPU: GA vs NPO, NPO+RT; precomputed vs live reference.

A randomly initialised Llama-architecture model (``--hidden/--layers/--vocab``), or a local HF
safetensors model (``--model DIR``, loaded once; every mode trains its own deep copy), and
random token sequences in ``[3, vocab)`` (no tokenizer needed, no download): forget items, and
for the NPO+RT modes retain items drawn the same way from another seed. ``--modes`` runs a
subset (on a real model every mode holds a model copy and its optimizer state). Every mode is a
real ``UnlearnTrainer`` taking real optimizer steps (the Trainer's ``training_step``, clipping
and AdamW step, as its loop runs them); the repetitions are interleaved (mode A, B, C, A, B, C,
...) so that machine noise hits every mode alike, and the median step time is reported. Peak
memory is the tensor memory of one step: what persists across steps (weights, frozen reference
copy, optimizer state, reference table) plus the highest point of the allocations made during
the step, read from torch's profiler.
"""

from __future__ import annotations

import copy
import statistics
import time
import types

import torch

from negpref.data import Encoded
from negpref.errors import NegprefError
from negpref.models import cpu_native_bf16, tiny_llama
from negpref.threads import cpu_model
from negpref.unlearn import UnlearnConfig
from negpref.unlearn.dataset import UnlearnData
from negpref.unlearn.trainer import UnlearnTrainer

MODES = {
    "ga": dict(method="GA"),
    "npo_precomputed": dict(method="NPO", ref_mode="precomputed"),
    "npo_live": dict(method="NPO", ref_mode="live"),
    "ga_lora": dict(method="GA", lora=True),
    "npo_live_lora": dict(method="NPO", ref_mode="live", lora=True),
    "npo_rt_precomputed": dict(method="NPO+RT", ref_mode="precomputed"),
    "npo_rt_live": dict(method="NPO+RT", ref_mode="live"),
    # bf16 autocast over float32 master weights: what `mixed_precision: auto` picks where the
    # device computes bf16 natively (setup's cpu_native_bf16 says whether this CPU does)
    "ga_bf16": dict(method="GA", mixed_precision="bf16"),
    "npo_precomputed_bf16": dict(method="NPO", ref_mode="precomputed", mixed_precision="bf16"),
}


def add_arguments(parser) -> None:
    parser.add_argument(
        "--model", help="local HF safetensors model directory (default: a random Llama, below)"
    )
    parser.add_argument("--hidden", type=int, default=256, help="random model: hidden size")
    parser.add_argument("--layers", type=int, default=4, help="random model: decoder layers")
    parser.add_argument("--vocab", type=int, default=8192, help="random model: vocabulary size")
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated modes to run (default all: {','.join(MODES)})",
    )
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--items", type=int, default=64, help="forget items (precompute cost)")
    parser.add_argument("--reps", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--seed", type=int, default=0)


def _items(args, vocab: int, seed: int) -> list[Encoded]:
    gen = torch.Generator().manual_seed(seed)
    prompt = 16
    return [
        Encoded(
            input_ids=torch.randint(3, vocab, (args.seq_len,), generator=gen).tolist(),
            answer_mask=[0] * prompt + [1] * (args.seq_len - prompt),
            truncated=False,
        )
        for _ in range(args.items)
    ]


def _data(args, vocab: int) -> UnlearnData:
    return UnlearnData(
        forget=_items(args, vocab, args.seed),
        refusal=[],
        retain=_items(args, vocab, args.seed + 1),  # only the +RT modes read it
        weights=None,
        seed=args.seed,
        truncated={"forget": 0, "refusal": 0, "retain": 0},
    )


def _random_model(args):
    return tiny_llama(
        args.vocab,
        seed=args.seed,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq_len,
    )


def _trainer(args, mode: str, model, pad_id: int) -> UnlearnTrainer:
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
    vocab = model.get_input_embeddings().num_embeddings
    trainer = UnlearnTrainer(
        model,
        config,
        processing_class=types.SimpleNamespace(pad_token_id=pad_id),
        data=_data(args, vocab),
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=trainer.total_steps)
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop
    trainer.model.train()
    return trainer


def train_step(trainer: UnlearnTrainer, step: int) -> dict[str, float]:
    """One optimizer step the way the Trainer's loop takes it (one micro-batch); its figures."""
    pairs = trainer.data.stream(step * trainer.effective_batch, trainer.effective_batch)
    inputs = trainer.collate(pairs)
    with trainer.accelerator.autocast():  # what the Trainer's prepared forward runs under
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


def modes_of(args) -> list[str]:
    """The ``--modes`` list, checked against MODES (order as given, duplicates dropped)."""
    names = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODES]
    if unknown or not names:
        raise NegprefError(
            f"--modes: unknown mode(s) {', '.join(unknown) or '(none given)'}; choose a "
            f"comma-separated subset of {', '.join(MODES)}"
        )
    return list(dict.fromkeys(names))


def check(args) -> None:
    modes_of(args)
    if not args.model and args.hidden % 64:
        raise NegprefError(f"--hidden: must be a multiple of 64 (the head size), got {args.hidden}")


def _ratio(figures: dict, a: str, b: str) -> float | None:
    """``figures[a] / figures[b]``, or None when either mode was not run."""
    if a in figures and b in figures:
        return figures[a] / figures[b]
    return None


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = modes_of(args)
    if args.model:
        from negpref.models import ModelSpec, load_model

        base, tokenizer = load_model(ModelSpec(args.model, dtype="float32"), "cpu")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    else:
        base, pad_id = _random_model(args), 0
    parameters = sum(p.numel() for p in base.parameters())
    vocab = base.get_input_embeddings().num_embeddings
    config = base.config.to_dict()
    # every mode trains its own copy; the last one takes the loaded model itself
    engines = {
        mode: _trainer(args, mode, copy.deepcopy(base) if i < len(modes) - 1 else base, pad_id)
        for i, mode in enumerate(modes)
    }
    del base
    precompute_s = {}
    for mode, engine in engines.items():
        if engine.precomputed_groups:
            start = time.perf_counter()
            engine.precompute_reference()
            precompute_s[mode] = time.perf_counter() - start

    step = {mode: 0 for mode in modes}

    def take_step(mode: str) -> float:
        t0 = time.perf_counter()
        train_step(engines[mode], step[mode])
        step[mode] += 1
        return time.perf_counter() - t0

    for mode in modes:  # warm-up: optimizer state allocated, kernels chosen
        take_step(mode)
        take_step(mode)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for rep in range(args.reps):
        for mode in modes[rep % len(modes) :] + modes[: rep % len(modes)]:
            times[mode].append(take_step(mode))
    median = {mode: statistics.median(t) for mode, t in times.items()}
    peak_mb = {
        mode: round((_persistent_bytes(e) + _step_peak_bytes(e, step[mode])) / 2**20, 2)
        for mode, e in engines.items()
    }
    return {
        **{f"{mode}_step_s": median[mode] for mode in modes},
        "precompute_s": precompute_s.get("npo_precomputed"),
        "precompute_s_by_mode": precompute_s,
        "precompute_items": args.items,
        "npo_precomputed_over_ga": _ratio(median, "npo_precomputed", "ga"),
        "npo_live_over_ga": _ratio(median, "npo_live", "ga"),
        "npo_rt_precomputed_over_ga": _ratio(median, "npo_rt_precomputed", "ga"),
        "npo_rt_live_over_npo_rt_precomputed": _ratio(median, "npo_rt_live", "npo_rt_precomputed"),
        "ga_bf16_over_ga": _ratio(median, "ga_bf16", "ga"),
        "npo_precomputed_bf16_over_npo_precomputed": _ratio(
            median, "npo_precomputed_bf16", "npo_precomputed"
        ),
        # the reference precompute is a no-grad forward pass over the items
        "precompute_bf16_over_float32": _ratio(
            precompute_s, "npo_precomputed_bf16", "npo_precomputed"
        ),
        "peak_mem_mb": peak_mb,
        "npo_live_lora_over_ga_lora_mem": _ratio(peak_mb, "npo_live_lora", "ga_lora"),
        "npo_live_over_ga_mem": _ratio(peak_mb, "npo_live", "ga"),
        "setup": {
            "model": args.model or "random",
            "parameters": parameters,
            "hidden": config.get("hidden_size"),
            "layers": config.get("num_hidden_layers"),
            "vocab": vocab,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "items": args.items,
            "reps": args.reps,
            "modes": modes,
            "threads": torch.get_num_threads(),
            "cpu_model": cpu_model(),
            "cpu_native_bf16": cpu_native_bf16(),
            "torch": torch.__version__,
        },
    }
