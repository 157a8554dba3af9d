"""Shared prompts in preference training: a DPO step and an MC-PO step (K candidates), with
the prompt encoded once per group (``share_prompt``, the default) vs once per completion.

Each setting is a real ``AlignTrainer`` (offline preference task, chosen + K rejected
candidates per prompt) on its own copy of the same start weights, taking ``--steps`` optimizer
steps per ``train()``; the first ``train()`` is a warm-up, the second is timed (Trainer
callbacks, ``on_train_begin`` to ``on_train_end``). Shared and unshared alternate, so machine
load hits both alike. Positions are what the model runs through in the timed steps, padding
included (a forward pre-hook adds up ``input_ids.numel()``): the policy's training forward and,
for MC-PO, the no-grad scoring of the K candidates each step.
"""

from __future__ import annotations

import copy
import tempfile
import time

import torch

from negpref.align.config import AlignConfig
from negpref.align.trainer import AlignTrainer
from negpref.data import pref_task
from negpref.data.preference import normalize_records
from negpref.threads import cpu_model

SETTINGS = {
    "dpo": dict(method="dpo", num_negatives=1),
    "mcpo": dict(method="mcpo", num_negatives=1),
}


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="HF model directory (default: a tiny random Llama)")
    parser.add_argument("--records", type=int, default=16, help="preference records")
    parser.add_argument("--candidates", type=int, default=8, help="rejected candidates (K)")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    parser.add_argument("--max-length", type=int, default=128, help="max tokens per sequence")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: as is)")
    parser.add_argument("--seed", type=int, default=0, help="seed")


def _model(args):
    from negpref.models import ModelSpec, load_model, tiny_llama

    if args.model:
        return load_model(ModelSpec(args.model, dtype="float32"), "cpu")
    tokenizer = pref_task.task_tokenizer(args.seed)
    return tiny_llama(len(tokenizer), seed=args.seed), tokenizer


class _Positions:
    """Positions run through a model: ``input_ids.numel()`` of every forward."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.count += ids.numel()


def _time_setting(args, model, tokenizer, data, tmp: str, method: str, share: bool) -> dict:
    from transformers import TrainerCallback

    config = AlignConfig(
        **SETTINGS[method],
        share_prompt=share,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        max_length=args.max_length,
        lr_scheduler_type="constant",
        seed=args.seed,
        use_cpu=True,
        output_dir=f"{tmp}/{method}-{share}",
        save_strategy="no",
        report_to="none",
        verbosity="quiet",
        eval_every=str(10**9),  # no reward evaluation inside the timed window
    )
    trainer = AlignTrainer(copy.deepcopy(model), config, data, tokenizer)

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_train_end(self, *a, **k):
            self.seconds = time.perf_counter() - self.start

    timer = Timer()
    trainer.add_callback(timer)
    trainer.train()  # warm-up
    positions = _Positions(trainer.unwrapped)
    trainer.train()
    positions.handle.remove()
    return {"seconds_per_step": timer.seconds / args.steps, "positions": positions.count}


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = _model(args)
    records = pref_task.make_preferences(args.records, args.candidates, args.seed)
    data = normalize_records(records, "pref_task")
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="negpref-bench-") as tmp:
        for method in SETTINGS:
            order = (True, False) if method == "dpo" else (False, True)
            runs = {
                share: _time_setting(args, model, tokenizer, data, tmp, method, share)
                for share in order
            }
            shared, unshared = runs[True], runs[False]
            figures[method] = {
                "shared": shared,
                "unshared": unshared,
                "speedup": unshared["seconds_per_step"] / shared["seconds_per_step"],
                "positions_ratio": shared["positions"] / unshared["positions"],
            }
    return {
        "benchmark": "shared-prompts",
        "model": args.model or "random",
        "parameters": sum(p.numel() for p in model.parameters()),
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "candidates": args.candidates,
        "batch_size": args.batch_size,
        "steps": args.steps,
        **figures,
    }
