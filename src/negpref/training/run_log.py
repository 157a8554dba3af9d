"""The files every negpref training run writes while it trains, and when.

``metrics.jsonl``: one line per logged optimizer step (the Trainer's log: loss, grad_norm,
learning_rate, epoch, the method's figures, step_s, tokens_per_s). ``evals.jsonl``: one line per
evaluation (step 0, every ``eval_every`` steps or each data epoch, the last step); its scalars
also reach the trackers as ``eval/<name>`` (TensorBoard). A resumed run keeps the lines up to
its checkpoint and redoes the rest.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path

from transformers import TrainerCallback

from negpref.errors import NegprefError
from negpref.io import append_jsonl, read_jsonl_through


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off for reference and evaluation forwards; the previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@dataclass
class TrainState:
    """What callbacks see: the optimizer step done so far (0 = initial model)."""

    step: int
    epoch: float
    total_steps: int
    out_dir: Path | None  # None on processes other than the main one


class RunLog:
    """``metrics.jsonl`` and ``evals.jsonl``; lines after a resume point dropped."""

    def __init__(self, out: Path, is_main: bool, keep_through: int):
        self.is_main = is_main
        self.metrics_path, self.evals_path = out / "metrics.jsonl", out / "evals.jsonl"
        self.metrics: list[dict] = []
        self.evals: list[dict] = []
        if is_main:
            self.metrics = read_jsonl_through(self.metrics_path, keep_through)
            self.evals = read_jsonl_through(self.evals_path, keep_through)

    def step(self, metrics: dict) -> None:
        self.metrics.append(metrics)
        if self.is_main:
            append_jsonl(self.metrics_path, metrics)

    def evaluation(self, record: dict) -> None:
        self.evals.append(record)
        append_jsonl(self.evals_path, record)


class RunCallback(TrainerCallback):
    """A run directory's logs, evaluations and checkpoint schedule, for any negpref trainer.

    ``callbacks``: objects with optional ``on_evaluate(state, model, tokenizer) -> dict``
    (step 0, every ``eval_every`` steps or each data epoch end, and the last step; main
    process; the model in eval mode) and ``on_step_end(state, metrics)`` (every step).
    With ``save_strategy: epoch`` a checkpoint is written at each data epoch end and at the
    last step; with ``steps`` also at the last step.
    """

    def __init__(self, trainer, run_log: RunLog, callbacks, out: Path):
        if trainer.is_sharded and any(hasattr(cb, "on_evaluate") for cb in callbacks):
            # FSDP / ZeRO-3 gather each layer's weights inside every process's forward, so
            # processes must run the same forwards; evaluations batch and stop per process
            raise NegprefError(
                "evaluation during training is not available under FSDP or DeepSpeed ZeRO-3 "
                "(each process holds a shard of the model); drop the evaluation (--eval-every / eval callbacks) and "
                "evaluate the saved model with `negpref eval` (which splits the work over "
                "processes under accelerate launch)"
            )
        self.trainer, self.run_log, self.callbacks = trainer, run_log, callbacks
        self.out = out
        self.step_start = time.perf_counter()
        self.step_s = float("nan")
        self.saved_step = None
        self.every = int(trainer.args.eval_every) if trainer.args.eval_every != "epoch" else 0

    def _state(self, step: int) -> TrainState:
        return TrainState(step, self.trainer.epoch_of(step), self.trainer.total_steps, self.out)

    def _due(self, step: int, every: int) -> bool:
        """Every ``every`` steps, or at each forget-set epoch end when ``every`` is 0."""
        return step % every == 0 if every > 0 else self.trainer.epoch_boundary(step)

    def evaluate(self, step: int, args, state, control) -> None:
        trainer = self.trainer
        is_main = trainer.accelerator.is_main_process
        for cb in self.callbacks:
            everywhere = getattr(cb, "all_processes", False)
            if not hasattr(cb, "on_evaluate") or not (is_main or everywhere):
                continue
            at = self._state(step)
            if not is_main:
                at = replace(at, out_dir=None)  # only the main process writes
            # evaluations run in the training's precision (bf16 autocast or not)
            with eval_mode(trainer.unwrapped) as m, trainer.accelerator.autocast():
                values = cb.on_evaluate(at, m, trainer.processing_class)
            if not is_main:
                continue
            record = {"step": step, "epoch": trainer.epoch_of(step), **(values or {})}
            self.run_log.evaluation(record)
            scalars = {
                f"eval_{k}": v
                for k, v in record.items()
                if k not in ("step", "epoch") and isinstance(v, (int, float))
            }
            state.log_history.append({**scalars, "step": step})
            # trackers (TensorBoard: eval/...) see it; the step's own log stays due
            should_log = control.should_log
            trainer.callback_handler.on_log(args, state, control, logs=scalars)
            control.should_log = should_log
        trainer.accelerator.wait_for_everyone()

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.evaluate(0, args, state, control)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_s = time.perf_counter() - self.step_start
        step = state.global_step
        last = step >= state.max_steps
        if (args.save_strategy == "epoch" and (last or self.trainer.epoch_boundary(step))) or (
            args.save_strategy == "steps" and last
        ):
            control.should_save = True
        if last or self._due(step, self.every):
            self.evaluate(step, args, state, control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        seconds = self.step_s
        tokens = logs.pop("tokens", 0.0) * args.gradient_accumulation_steps * args.world_size
        metrics = {
            "step": state.global_step,
            **{k: v for k, v in logs.items() if k != "step"},
            "step_s": seconds,
            "tokens_per_s": tokens / seconds,
        }
        self.run_log.step(metrics)
        for cb in self.callbacks:
            if hasattr(cb, "on_step_end"):
                cb.on_step_end(self._state(state.global_step), metrics)

    def on_save(self, args, state, control, **kwargs):
        self.saved_step = state.global_step

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.saved_step == state.global_step:  # the last step's checkpoint is written
            control.should_save = False
