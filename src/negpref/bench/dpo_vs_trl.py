"""Our DPO trainer vs TRL's DPOTrainer: equal losses, throughput (tokens/s), peak memory.

Both train the same model copy on the same preference records (the offline preference task,
one rejected completion each), in the same order (sequential), with the same optimizer
(AdamW, constant learning rate, clipping at 1.0), reference log-probs precomputed once
(TRL: ``precompute_ref_log_probs=True``), DPO sigmoid loss, fp32 on CPU / bf16 on a GPU, and
gradient checkpointing off in both (``--gradient-checkpointing on``: on in both; ``defaults``:
each trainer's default, ours off and TRL's on -- the losses are the same either way, but TRL
then trades recomputation time for activation memory).

Rounds alternate between the two trainers (ours first in even rounds, TRL first in odd ones)
so that machine load hits both alike. Round 0 is the equal-results check: from the same start
weights and batches, the per-step losses must agree; it is also the warm-up and is left out
of the throughput unless it is the only round. Throughput counts the attention-mask tokens of
the policy forward (chosen + rejected), the quantity TRL logs as ``num_tokens``; a trainer's
time runs from ``on_train_begin`` to ``on_train_end`` of a round: both are ``transformers.Trainer``
subclasses, and each round is one ``train()`` of ``--steps`` steps from the weights the
previous round left.

Peak memory (rounds after the first, like throughput): CUDA's peak allocated bytes on a GPU;
on CPU the peak resident set size above the round's starting RSS, sampled every millisecond
(an approximation: the CPU allocator keeps freed memory, so the later trainer in a round can
look lighter).
"""

from __future__ import annotations

import copy
import tempfile
import threading
import time

import torch

from negpref.align.config import AlignConfig
from negpref.align.trainer import AlignTrainer
from negpref.data import format_prompt, pref_task
from negpref.data.preference import normalize_records
from negpref.errors import NegprefError


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


class PeakMemory:
    """Peak memory of a block: CUDA allocated bytes, or sampled RSS above the start on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        import psutil  # an accelerate dependency

        process = psutil.Process()
        self._start = process.memory_info().rss
        self._peak = self._start
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self._peak = max(self._peak, process.memory_info().rss)
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = self._peak - self._start


def _model(args):
    from negpref.models import ModelSpec, load_model, tiny_llama

    if args.model:
        return load_model(ModelSpec(args.model), "cpu")
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
    return model, tokenizer


def _trl_trainer(args, model, tokenizer, records, out_dir: str, cuda: bool):
    from datasets import Dataset
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
    return DPOTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )


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
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model, tokenizer = _model(args)
    records = pref_task.make_preferences(args.records, 1, args.seed)
    data = normalize_records(records, "pref_task")
    with tempfile.TemporaryDirectory(prefix="negpref-bench-") as tmp:
        return _rounds(args, model, tokenizer, records, data, tmp, cuda, device)


def _rounds(args, model, tokenizer, records, data, tmp: str, cuda: bool, device) -> dict:
    from transformers import PrinterCallback, TrainerCallback

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
        output_dir=f"{tmp}/ours",
        save_strategy="no",
        report_to="none",
        verbosity="quiet",
    )
    ours = AlignTrainer(copy.deepcopy(model), config, data, tokenizer)
    n = len(data.records)  # TRL's sequential sampler: records in order, wrapping around
    ours.train_dataset.stream = [i % n for i in range(args.steps * args.batch_size)]

    class RoundTimer(TrainerCallback):
        seconds = 0.0

        def on_train_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_train_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.start

    timer = RoundTimer()
    ours.add_callback(timer)
    figures = {
        name: {"tokens": 0, "seconds": 0.0, "peak_memory_mb": 0.0} for name in ("ours", "trl")
    }
    trl = _trl_trainer(args, copy.deepcopy(model), tokenizer, records, f"{tmp}/trl", cuda)
    trl.add_callback(timer)
    trl.remove_callback(PrinterCallback)  # it prints every log line on stdout
    losses = {}

    def run_ours(r):
        start_tokens = ours.tokens
        ours.train()
        if r == 0:
            losses["ours"] = [h["loss"] for h in ours.state.log_history if "loss" in h]
        return ours.tokens - start_tokens, timer.seconds

    def run_trl(r):
        start_tokens = trl._total_train_tokens
        trl.train()
        if r == 0:
            losses["trl"] = [h["loss"] for h in trl.state.log_history if "loss" in h]
        return trl._total_train_tokens - start_tokens, timer.seconds

    for r in range(args.rounds):
        order = (("ours", run_ours), ("trl", run_trl))
        for name, fn in order if r % 2 == 0 else order[::-1]:
            with PeakMemory(device) as mem:
                tokens, seconds = fn(r)
            fig = figures[name]
            if r > 0 or args.rounds == 1:  # round 0 also allocates optimizer state
                fig["peak_memory_mb"] = max(fig["peak_memory_mb"], mem.peak_bytes / 2**20)
                fig["tokens"] += tokens
                fig["seconds"] += seconds
    for fig in figures.values():
        fig["tokens_per_second"] = fig["tokens"] / fig["seconds"]
    diffs = [abs(a - b) for a, b in zip(losses["ours"], losses["trl"], strict=True)]
    speedup = figures["ours"]["tokens_per_second"] / figures["trl"]["tokens_per_second"]
    return {
        "benchmark": "dpo-vs-trl",
        "device": torch.cuda.get_device_name()
        if cuda
        else f"cpu ({torch.get_num_threads()} threads)",
        "parameters": sum(p.numel() for p in model.parameters()),
        "records": n,
        "batch_size": args.batch_size,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "gradient_checkpointing": args.gradient_checkpointing,
        "equal_results": {
            "steps": len(diffs),
            "max_abs_loss_diff": max(diffs),
            "ours_losses": losses["ours"],
            "trl_losses": losses["trl"],
        },
        "ours": figures["ours"],
        "trl": figures["trl"],
        "speedup": speedup,
        "target_speedup": 1.2,
        "meets_target": speedup >= 1.2,
    }
