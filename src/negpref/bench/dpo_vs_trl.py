"""Our DPO trainer vs TRL's DPOTrainer: equal losses, throughput (tokens/s), peak memory.

Both train the same start weights on the same preference records (the offline preference
task, one rejected completion each), in the same order (sequential), with the same optimizer
(AdamW, constant learning rate, clipping at 1.0), reference log-probs precomputed once
(TRL: ``precompute_ref_log_probs=True``), DPO sigmoid loss, fp32 on CPU / bf16 on a GPU, and
gradient checkpointing off in both (``--gradient-checkpointing on``: on in both; ``defaults``:
each trainer's default, ours off and TRL's on -- the losses are the same either way, but TRL
then trades recomputation time for activation memory). ``--lora``: both train LoRA adapters
of one peft ``LoraConfig`` (r=8, alpha=16, dropout 0, every linear layer but the head), seeded
alike (``set_seed(--seed)`` right before each trainer is built, where TRL sets it too), and
the reference is the base model with the adapters off in both.

Every trainer's round runs in its own fresh Python process (``sys.executable``; a JSON spec in,
a JSON result out): it loads the start weights from a safetensors directory (``--model DIR``,
or the random Llama below saved once into a temporary directory, tokenizer beside it), builds
the trainer (which computes the reference log-probs, both trainers in ``__init__``), trains
``--steps`` steps and reports its losses, tokens, seconds and memory. So every round starts
from the SAME initial weights (no state passes between rounds or trainers), and one trainer's
freed memory cannot hide in the other's figures.

Rounds alternate between the two trainers (ours first in even rounds, TRL first in odd ones)
so that machine load hits both alike. Round 0 is the equal-results check: from the same start
weights and batches, the per-step losses must agree; it is also the warm-up (file caches) and
is left out of the throughput unless it is the only round. Throughput counts the
attention-mask tokens of the policy forward (chosen + rejected), the quantity TRL logs as
``num_tokens``; a trainer's time runs from ``on_train_begin`` to ``on_train_end`` of
``train()`` (both are ``transformers.Trainer`` subclasses).

Memory, per process (the largest over all rounds: each is a fresh process from the same
start): ``baseline_rss_mb`` is the resident set size right before ``train()`` (model loaded,
trainer built, reference log-probs computed); the high-water mark is then reset (writing
"5" to ``/proc/self/clear_refs``, Linux) and ``peak_rss_mb`` is ``VmHWM`` from
``/proc/self/status`` after ``train()``: the whole process's peak during training. Where
clear_refs is not writable the peak is ``getrusage(RUSAGE_SELF).ru_maxrss``, the lifetime
peak (``peak_rss_method`` says which). On CUDA ``cuda_peak_allocated_mb`` is
``torch.cuda.max_memory_allocated`` over ``train()``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from negpref.align.config import AlignConfig
from negpref.align.trainer import AlignTrainer
from negpref.data import format_prompt, pref_task
from negpref.data.preference import normalize_records
from negpref.errors import NegprefError
from negpref.threads import cpu_model

LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0)  # target: every linear layer but the head


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="HF model directory (default: a random Llama, below)")
    parser.add_argument("--hidden-size", type=int, default=256, help="random model width")
    parser.add_argument("--layers", type=int, default=4, help="random model depth")
    parser.add_argument("--records", type=int, default=64, help="preference records")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per trainer")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    parser.add_argument("--learning-rate", type=float, default=1e-5, help="AdamW lr")
    parser.add_argument("--max-length", type=int, default=128, help="max tokens per sequence")
    parser.add_argument("--seed", type=int, default=0, help="seed")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: as is)")
    parser.add_argument(
        "--gradient-checkpointing",
        choices=("off", "on", "defaults"),
        default="off",
        help="off/on in both trainers, or each trainer's default (ours off, TRL's on)",
    )
    parser.add_argument(
        "--lora",
        action="store_true",
        help="both trainers train LoRA adapters (r 8, alpha 16, every linear layer but the head)",
    )


def _save_random_model(args, out_dir: str) -> None:
    """The random Llama and the task tokenizer, saved as a safetensors model directory."""
    from negpref.models import save_model, tiny_llama

    tokenizer = pref_task.task_tokenizer(args.seed)
    heads = max(1, args.hidden_size // 64)
    model = tiny_llama(
        len(tokenizer),
        seed=args.seed,
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
    )
    save_model(model, tokenizer, out_dir)


# -- memory of this process -----------------------------------------------------------------


def _status_mb(field: str) -> float | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in MiB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_mb() -> float:
    rss = _status_mb("VmRSS")
    if rss is None:
        import psutil  # an accelerate dependency

        rss = psutil.Process().memory_info().rss / 2**20
    return rss


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark to the current RSS; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mb("VmHWM") is not None
    except OSError:
        return False


def _peak_rss_mb(reset: bool) -> tuple[float, str]:
    if reset:
        return _status_mb("VmHWM"), "VmHWM after a clear_refs reset before train()"
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes / kB
    return peak_mb, "ru_maxrss (lifetime peak: /proc/self/clear_refs not writable)"


# -- one trainer's round, in a child process ------------------------------------------------


def _our_trainer(args, model, tokenizer, data, out_dir: str, cuda: bool):
    from transformers import set_seed

    config = AlignConfig(
        beta=args.beta,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        max_length=args.max_length,
        seed=args.seed,
        use_cpu=not cuda,
        gradient_checkpointing=args.gradient_checkpointing == "on",
        output_dir=out_dir,
        save_strategy="no",
        report_to="none",
        verbosity="quiet",
        lora=args.lora,
        lora_r=LORA["r"],
        lora_alpha=LORA["lora_alpha"],
        lora_dropout=LORA["lora_dropout"],
        lora_target_modules=["all-linear"],
    )
    set_seed(args.seed)  # the LoRA adapters' initialisation, as TRL seeds it before peft
    ours = AlignTrainer(model, config, data, tokenizer)
    n = len(data.records)  # TRL's sequential sampler: records in order, wrapping around
    ours.train_dataset.stream = [i % n for i in range(args.steps * args.batch_size)]
    return ours


def _trl_trainer(args, model, tokenizer, records, out_dir: str, cuda: bool):
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    rows = [
        {"prompt": format_prompt(tokenizer, r["prompt"]), "chosen": " " + r["chosen"],
         "rejected": " " + r["rejected"][0]}
        for r in records
    ]  # fmt: skip
    if getattr(tokenizer, "chat_template", None):  # the template already ends the prompt
        rows = [{**r, "chosen": r["chosen"][1:], "rejected": r["rejected"][1:]} for r in rows]
    config = DPOConfig(
        output_dir=out_dir,
        beta=args.beta,
        loss_type=["sigmoid"],
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        max_length=args.max_length,
        precompute_ref_log_probs=True,
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing != "off",
    )
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(**LORA, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log line on stdout
    return trainer


def child_round(spec: dict) -> dict:
    """One trainer's round in this (fresh) process: the figures the parent collects."""
    import argparse

    from transformers import TrainerCallback

    from negpref.models import ModelSpec, load_model

    args = argparse.Namespace(**spec["args"])
    torch.set_num_threads(spec["threads"])
    cuda = torch.cuda.is_available()
    # training: float32 masters, whatever the CPU
    model, tokenizer = load_model(ModelSpec(spec["model_dir"], dtype="float32"), "cpu")
    parameters = sum(p.numel() for p in model.parameters())  # the base model's
    records = pref_task.make_preferences(args.records, 1, args.seed)
    out_dir = spec["out_dir"]
    if spec["trainer"] == "ours":
        trainer = _our_trainer(
            args, model, tokenizer, normalize_records(records, "pref_task"), out_dir, cuda
        )
        tokens = lambda: trainer.tokens  # noqa: E731
    else:
        trainer = _trl_trainer(args, model, tokenizer, records, out_dir, cuda)
        tokens = lambda: trainer._total_train_tokens  # noqa: E731

    class RoundTimer(TrainerCallback):
        seconds = 0.0

        def on_train_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_train_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.start

    timer = RoundTimer()
    trainer.add_callback(timer)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start_tokens = tokens()
    baseline = _rss_mb()
    reset = _reset_peak_rss()
    trainer.train()
    peak, method = _peak_rss_mb(reset)
    return {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "tokens": tokens() - start_tokens,
        "seconds": timer.seconds,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak,
        "peak_rss_method": method,
        "cuda_peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "parameters": parameters,
        "trainable_parameters": sum(
            p.numel() for p in trainer.model.parameters() if p.requires_grad
        ),
        "threads": torch.get_num_threads(),
    }


def child_main(spec_path: str) -> None:
    """Entry point of a round's process: the spec file in, ``spec["result"]`` out."""
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = child_round(spec)
    except NegprefError as e:  # a settings error: the parent raises it as it is
        result = {"error": str(e)}
    Path(spec["result"]).write_text(json.dumps(result))


def _run_child(spec: dict, tmp: str) -> dict:
    """``child_round(spec)`` in a fresh Python process; its error output in ours if it fails."""
    name = f"{spec['trainer']}-{spec['round']}"
    spec = {**spec, "result": f"{tmp}/{name}.result.json", "out_dir": f"{tmp}/{name}"}
    spec_path = Path(tmp) / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    src = str(Path(__file__).resolve().parents[2])  # the negpref this process imported
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
    }
    code = "import sys; from negpref.bench.dpo_vs_trl import child_main; child_main(sys.argv[1])"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(spec_path)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise NegprefError(
            f"dpo-vs-trl: the {spec['trainer']} round {spec['round']} process failed "
            f"(exit {proc.returncode}):\n{tail}"
        )
    result = json.loads(Path(spec["result"]).read_text())
    if "error" in result:
        raise NegprefError(result["error"])
    return result


def check(args) -> None:
    heads = max(1, args.hidden_size // 64)  # as the random model below is built
    if args.hidden_size % heads or (args.hidden_size // heads) % 2:
        raise NegprefError(
            f"--hidden-size: must be an even number below 64 or a multiple of 64, got "
            f"{args.hidden_size}"
        )


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="negpref-bench-") as tmp:
        model_dir = args.model
        if not model_dir:
            model_dir = f"{tmp}/start"
            _save_random_model(args, model_dir)
        plain = {k: v for k, v in vars(args).items() if isinstance(v, str | int | float | None)}
        spec = {"args": plain, "model_dir": model_dir, "threads": threads}
        results: dict[str, list[dict]] = {"ours": [], "trl": []}
        for r in range(args.rounds):
            order = ("ours", "trl") if r % 2 == 0 else ("trl", "ours")
            for name in order:
                results[name].append(_run_child({**spec, "trainer": name, "round": r}, tmp))
    return _figures(args, results, threads, cuda)


def _figures(args, results: dict[str, list[dict]], threads: int, cuda: bool) -> dict:
    figures = {}
    for name, rounds in results.items():
        timed = rounds[1:] if len(rounds) > 1 else rounds  # round 0: the warm-up
        tokens, seconds = sum(r["tokens"] for r in timed), sum(r["seconds"] for r in timed)
        top = max(rounds, key=lambda r: r["peak_rss_mb"])
        figures[name] = {
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_second": tokens / seconds,
            "round_seconds": [r["seconds"] for r in rounds],
            "peak_rss_mb": top["peak_rss_mb"],
            "baseline_rss_mb": top["baseline_rss_mb"],
            "peak_rss_above_baseline_mb": top["peak_rss_mb"] - top["baseline_rss_mb"],
            "peak_rss_method": top["peak_rss_method"],
            "cuda_peak_allocated_mb": max(r["cuda_peak_allocated_mb"] for r in rounds)
            if cuda
            else None,
            "trainable_parameters": rounds[0]["trainable_parameters"],
        }
    ours, trl = results["ours"][0], results["trl"][0]
    diffs = [abs(a - b) for a, b in zip(ours["losses"], trl["losses"], strict=True)]
    speedup = figures["ours"]["tokens_per_second"] / figures["trl"]["tokens_per_second"]
    return {
        "benchmark": "dpo-vs-trl",
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({threads} threads)",
        "cpu_model": cpu_model(),
        "threads": threads,
        "model": args.model or "random",
        "lora": args.lora,
        "parameters": ours["parameters"],
        "records": args.records,
        "batch_size": args.batch_size,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "gradient_checkpointing": args.gradient_checkpointing,
        "equal_results": {
            "steps": len(diffs),
            "max_abs_loss_diff": max(diffs),
            "ours_losses": ours["losses"],
            "trl_losses": trl["losses"],
        },
        "ours": figures["ours"],
        "trl": figures["trl"],
        "speedup": speedup,
        "target_speedup": 1.2,
        "meets_target": speedup >= 1.2,
    }
