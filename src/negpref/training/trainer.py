"""``NegprefTrainer``: ``transformers.Trainer`` plus what every negpref run guarantees.

Every language-model training in negpref (unlearning, alignment, U2A's inner unlearning, the
studies' fine-tuning) is a subclass of this class with its own ``compute_loss``; the loop,
optimizer (AdamW, no decay on biases and norms), schedule, gradient accumulation, devices,
DDP/FSDP/DeepSpeed, callbacks, trackers and ``checkpoint-N`` folders are transformers'.

On top of it:
- **The dataset is the data order.** The train dataset holds the run's items in the order they
  are trained (a seeded stream, ``negpref.unlearn.dataset``), read sequentially; accelerate
  shards each global batch over processes, so any process count sees the same global batches
  and a checkpoint's step number alone restores the position.
- **Per-step metrics.** ``compute_loss`` hands its figures to ``store_metrics``; ``log``
  averages them over the step's micro-batches and processes and merges them into the step's
  log line (TRL's pattern), which reaches ``metrics.jsonl``, TensorBoard and the progress line.
- **Non-finite guard.** Before the optimizer steps, a non-finite loss or gradient raises
  ``NonFiniteStep`` (weights, optimizer and schedule untouched); after it, non-finite weights
  raise too. A checkpoint is therefore only ever written from finite weights.
- **Nothing pickled.** ``training_args.bin`` (a pickled object) is not written; the run's
  settings are in ``training_args.json`` and the caller's ``config.yaml``. Checkpoints are
  loaded with ``weights_only=True`` (transformers) after ``negpref.training.checkpoint``
  verified every file.
- **Output a person can follow** (``ProgressLog``): a bar on a terminal, plain periodic lines
  (step, loss, rate, ETA) otherwise, nothing with ``verbosity: quiet``.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from negpref.errors import NegprefError
from negpref.training import checkpoint as ckpt

TRAINING_ARGS_JSON = "training_args.json"
TENSORBOARD_DIR = "tensorboard"


class NonFiniteStep(NegprefError):
    """A step whose loss, gradient or resulting weights are not finite.

    ``applied`` says whether the optimizer had stepped (the weights in memory are then bad);
    ``step`` is the 1-based optimizer step; ``metrics`` its figures (for the run's log).
    """

    def __init__(
        self, step: int, applied: bool, values: dict[str, float], metrics: dict | None = None
    ):
        self.step, self.applied, self.values = step, applied, values
        self.metrics = metrics or {}
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        if applied:
            what = f"step {step} made the weights non-finite ({shown})"
        else:
            what = f"non-finite {' and '.join(values)} at step {step} ({shown}); not applied"
        super().__init__(what)


def plan_steps(args, n_items: int) -> tuple[int, int]:
    """``(effective batch, optimizer steps)`` of a run over ``n_items`` data items.

    The effective batch is ``per_device_train_batch_size x gradient_accumulation_steps x
    processes``; the steps are ``max_steps`` when set, else ``num_train_epochs`` passes over the
    data rounded down (every step is a full batch of the seeded stream), at least 1.
    """
    effective = (
        args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    )
    if args.max_steps > 0:
        return effective, args.max_steps
    return effective, max(1, int(args.num_train_epochs * n_items // effective))


class NegprefTrainer(Trainer):
    """``Trainer`` with a fixed data order, per-step metrics, a finite guard and no pickles.

    Subclasses implement ``compute_loss(model, inputs, return_outputs, num_items_in_batch)``
    returning the micro-batch's *mean* loss (the Trainer divides by gradient accumulation) and
    call ``store_metrics`` with its figures; they pass ``n_items`` (the data items one epoch
    covers) and may extend ``checkpoint_state`` / ``load_checkpoint_state`` with what their
    next step depends on beyond the Trainer's own state (JSON only).
    """

    #: words for the progress line, e.g. "unlearn NPO"
    run_name_for_progress = "train"

    def __init__(self, *args, n_items: int, **kwargs):
        train_args = kwargs.pop("args")
        self.n_items = n_items
        self.effective_batch, self.total_steps = plan_steps(train_args, n_items)
        # The Trainer sees one pass over a stream of exactly total_steps global batches.
        train_args = train_args.replace(max_steps=self.total_steps)
        super().__init__(*args, args=train_args, **kwargs)
        # Our losses are per-micro-batch means: let the Trainer scale them for accumulation.
        self.model_accepts_loss_kwargs = False
        self._step_metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._loss_finite = True
        self.remove_callback(ProgressCallback)
        self.remove_callback(PrinterCallback)
        self.add_callback(ProgressLog(self))
        self.add_callback(_FiniteGuard(self))
        self.add_callback(_MarkCheckpoint(self))
        from transformers.integrations import TensorBoardCallback

        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
                callback.logging_dir = os.path.join(self.args.output_dir, TENSORBOARD_DIR)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        _fsdp_on_cpu(self)

    @property
    def unwrapped(self):
        """The model being trained, without DDP/FSDP/DeepSpeed wrappers."""
        return self.accelerator.unwrap_model(self.model)

    @property
    def is_sharded(self) -> bool:
        """Each process holds a shard of the weights (FSDP, DeepSpeed ZeRO-3): every forward
        and gather must then run on every process alike."""
        plugin = self.accelerator.state.deepspeed_plugin if self.is_deepspeed_enabled else None
        return self.is_fsdp_enabled or (plugin is not None and plugin.zero_stage == 3)

    @contextlib.contextmanager
    def whole_weights(self, model):
        """``model`` ready for a no-grad forward outside the training step.

        Under ZeRO-3 the weights are partitioned from the moment they load, but DeepSpeed's
        gather hooks come with its engine, which the Trainer builds in ``train()``: before
        that (the reference precompute) each module gathers its own parameters for its
        forward and frees them after, so one module's weights are whole at a time, as in a
        ZeRO-3 step. Every process must run the same forwards (a collective per module).
        """
        zero3_before_engine = (
            self.is_deepspeed_enabled and self.is_sharded and self.deepspeed is None
        )
        if not zero3_before_engine:
            yield model
            return
        import deepspeed

        gathers, hooks = {}, []

        def gather(module, args):
            gathers[module] = deepspeed.zero.GatheredParameters(list(module.parameters(False)))
            gathers[module].__enter__()

        def release(module, args, output):
            gathers.pop(module).__exit__(None, None, None)

        for module in model.modules():
            if next(module.parameters(False), None) is not None:
                hooks += [
                    module.register_forward_pre_hook(gather),
                    module.register_forward_hook(release),
                ]
        try:
            yield model
        finally:
            for hook in hooks:
                hook.remove()

    def full_state_dict(self) -> dict | None:
        """The trained weights whole, for ``save_model``; None where the model holds them.

        Under FSDP and ZeRO-3 every process must call this (they gather the shards to the
        main process, which gets the whole weights on the CPU).
        """
        if not self.is_sharded:
            return None
        return self.accelerator.get_state_dict(self.model_wrapped)

    # --- data order and epochs -------------------------------------------------------------
    def epoch_of(self, step: int) -> float:
        """Passes over the data after optimizer step ``step``."""
        return step * self.effective_batch / self.n_items

    def epoch_boundary(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) finished a pass over the data."""
        return math.floor(self.epoch_of(step)) > math.floor(self.epoch_of(step - 1))

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

    # --- metrics ----------------------------------------------------------------------------
    def store_metrics(self, metrics: dict[str, torch.Tensor]) -> None:
        """Figures of one micro-batch (scalars), averaged into the step's log line."""
        loss = metrics.get("loss")
        if loss is not None and not torch.isfinite(loss).all():
            self._loss_finite = False
        for key, value in metrics.items():
            self._step_metrics[key].append(value.detach().float().reshape(()))

    def _reduced_step_metrics(self) -> dict[str, float]:
        """Mean of each stored figure over micro-batches and processes; the store is emptied."""
        if not self._step_metrics:
            return {}
        keys = sorted(self._step_metrics)
        local = torch.stack([torch.stack(self._step_metrics[k]).mean() for k in keys])
        self._step_metrics.clear()
        total = self.accelerator.reduce(local.to(self.accelerator.device), reduction="mean")
        return {k: float(v) for k, v in zip(keys, total.cpu(), strict=True)}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.update(self._reduced_step_metrics())
        self.state.epoch = round(self.epoch_of(self.state.global_step), 6)
        super().log(logs, start_time)

    def floating_point_ops(self, inputs) -> int:
        ids = _first_input_ids(inputs)
        return 6 * ids.numel() * self.model.num_parameters() if ids is not None else 0

    # --- checkpoints --------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        """JSON state a resumed run needs beyond the Trainer's (in ``negpref_state.json``)."""
        step = self.state.global_step
        return {
            "epoch": self.epoch_of(step),
            "data_position": step * self.effective_batch,
            "seed": self.args.seed,
        }

    def load_checkpoint_state(self, state: dict) -> None:
        """Restore what ``checkpoint_state`` saved; called before the Trainer resumes."""

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        if resume_from_checkpoint is not None:
            self.load_checkpoint_state(ckpt.read_state(Path(resume_from_checkpoint)))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def save_checkpoint_now(self) -> Path:
        """A complete checkpoint of the current step (outside the Trainer's schedule)."""
        self._save_checkpoint(self.model_wrapped, trial=None)
        return self._mark(self.state.global_step)

    def _mark(self, step: int) -> Path:
        checkpoint = Path(self.args.output_dir) / f"{ckpt.PREFIX}{step}"
        if self.accelerator.is_main_process:
            ckpt.mark_complete(checkpoint, self.checkpoint_state())
        self.accelerator.wait_for_everyone()
        return checkpoint

    # --- files ------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError) as e:  # a full disk surfaces as either
            partial = Path(self.args.output_dir) / f"{ckpt.PREFIX}{self.state.global_step}"
            shutil.rmtree(partial, ignore_errors=True)
            raise ckpt.write_error(e, Path(self.args.output_dir), self.state.global_step) from None

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            pickled = os.path.join(output_dir, "training_args.bin")
            if os.path.exists(pickled):
                os.remove(pickled)
            with open(os.path.join(output_dir, TRAINING_ARGS_JSON), "w", encoding="utf-8") as f:
                f.write(self.args.to_json_string())


def _fsdp_on_cpu(trainer: NegprefTrainer) -> None:
    """FSDP for CPU processes, as an accelerate config with ``distributed_type: FSDP`` asks.

    accelerate runs CPU processes as ``MULTI_CPU`` and drops the FSDP plugin there, though
    torch's FSDP2 (``fully_shard``) shards on CPU over gloo; this puts the plugin back, read
    from the same environment accelerate's launcher sets.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    wanted = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not wanted or state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise NegprefError(
            f"fsdp_version: {plugin.fsdp_version}; FSDP on CPU processes needs FSDP2: set "
            "fsdp_config.fsdp_version: 2 in the accelerate config"
        )
    if trainer.accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(trainer.accelerator.mixed_precision)
    # AcceleratorState copies PartialState's fields each time it is built: set both
    PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True


def _first_input_ids(inputs):
    if isinstance(inputs, dict):
        if isinstance(inputs.get("input_ids"), torch.Tensor):
            return inputs["input_ids"]
        for value in inputs.values():
            found = _first_input_ids(value)
            if found is not None:
                return found
    return None


class _MarkCheckpoint(TrainerCallback):
    """The marker that makes a checkpoint resumable, written after the Trainer's files."""

    def __init__(self, trainer: NegprefTrainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        self.trainer._mark(state.global_step)


class _FiniteGuard(TrainerCallback):
    """Raise ``NonFiniteStep`` before a non-finite update, or after one that broke weights."""

    def __init__(self, trainer: NegprefTrainer):
        self.trainer = trainer

    def _all_processes(self, ok: bool) -> bool:
        acc = self.trainer.accelerator
        flag = torch.tensor(float(ok), device=acc.device)
        return bool(acc.reduce(flag, reduction="sum").item() == acc.num_processes)

    def _trainable(self):
        return [p for p in self.trainer.model.parameters() if p.requires_grad]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        grads_ok = all(
            torch.isfinite(p.grad).all() for p in self._trainable() if p.grad is not None
        )
        loss_ok, trainer._loss_finite = trainer._loss_finite, True
        if not self._all_processes(bool(grads_ok) and loss_ok):
            bad = {}
            if not loss_ok:
                bad["loss"] = float("nan")
            if not grads_ok:
                bad["grad_norm"] = float("nan")
            raise NonFiniteStep(
                state.global_step + 1,
                applied=False,
                values=bad or {"loss": 0},
                metrics=trainer._reduced_step_metrics(),
            )

    def on_optimizer_step(self, args, state, control, **kwargs):
        ok = all(torch.isfinite(p).all() for p in self._trainable())
        if not self._all_processes(bool(ok)):
            lr = self.trainer.lr_scheduler.get_last_lr()[0]
            raise NonFiniteStep(
                state.global_step + 1,
                applied=True,
                values={"lr": lr},
                metrics=self.trainer._reduced_step_metrics(),
            )


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLog(TrainerCallback):
    """Progress a person can follow, on a terminal or in a log file.

    ``verbosity``: ``quiet`` prints nothing; ``normal`` shows a bar on a terminal and, when
    stdout is not one, a plain line at most every ``line_every_s`` seconds (and the last
    step); ``verbose`` prints a plain line every step. The figures shown are the step's.
    """

    FIELDS = (("loss", "loss"), ("logps/forget", "logp_fg"), ("nll/retain", "nll_rt"))
    line_every_s = 30.0

    def __init__(self, trainer: NegprefTrainer):
        self.trainer = trainer
        self.bar = None
        self.start = self.first_step = None
        self.last_line = -math.inf

    @property
    def verbosity(self) -> str:
        return getattr(self.trainer.args, "verbosity", "normal")

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.first_step = time.perf_counter(), state.global_step
        if not state.is_world_process_zero or self.verbosity != "normal" or not _is_tty():
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=state.max_steps,
            initial=state.global_step,
            desc=self.trainer.run_name_for_progress,
            dynamic_ncols=True,
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        shown = {name: logs[key] for key, name in self.FIELDS if key in logs}
        if self.bar is not None:
            self.bar.n = state.global_step
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})
            return
        now = time.perf_counter()
        last = state.global_step >= state.max_steps
        due = self.verbosity == "verbose" or now - self.last_line >= self.line_every_s
        if self.verbosity == "quiet" or not (due or last):
            return
        self.last_line = now
        done = state.global_step - self.first_step
        rate = done / max(now - self.start, 1e-9)
        eta = (state.max_steps - state.global_step) / rate if rate > 0 else math.inf
        figures = " ".join(f"{k} {v:.4g}" for k, v in shown.items())
        print(
            f"{self.trainer.run_name_for_progress}: step {state.global_step}/{state.max_steps} "
            f"{figures} {1 / rate if rate > 0 else math.inf:.3g} s/step "
            f"ETA {_format_eta(eta)}",
            file=sys.stderr,
            flush=True,
        )

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.n = state.global_step
            self.bar.close()
            self.bar = None


def _is_tty() -> bool:
    return sys.stderr.isatty()
