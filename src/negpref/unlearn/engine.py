"""The training step: one batched forward, reference log-probs, eq. 17, one optimizer step.

``Engine`` holds what a step needs (accelerator, model, optimizer, schedule, reference) and
exposes ``precompute_reference`` and ``train_step``; ``negpref.unlearn.run`` drives it and
owns files, checkpoints and callbacks; ``negpref bench step-cost`` times it.

The reference model is frozen and the forget data fixed, so the reference log-probs of every
forget/refusal sequence are computed once before training and looked up per step (TRL's
``precompute_ref_log_probs``). A live reference forward runs only where it must: for the KL
terms and the losses that read reference *logits* (UNDIAL) or activations (RMU), and with
``ref_mode="live"``. With LoRA the reference is the policy with its adapters switched off;
otherwise a frozen copy.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re

import torch

from negpref import losses
from negpref.errors import NegprefError
from negpref.logprobs import SequenceLogps, sequence_logps
from negpref.training.devices import new_accelerator
from negpref.unlearn.config import UnlearnConfig
from negpref.unlearn.dataset import MicroBatch, UnlearnData
from negpref.unlearn.objectives import GroupLogps, Objective, StepLogps


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off for reference and evaluation forwards; the previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def make_accelerator(config: UnlearnConfig, project_dir: str | None = None, trackers=None):
    """CPU, one GPU (bf16 autocast when supported) or the processes ``accelerate launch`` set."""
    use_gpu = torch.cuda.is_available() and not config.cpu
    bf16 = config.mixed_precision == "bf16" or (
        config.mixed_precision == "auto"
        and use_gpu
        and config.dtype == "auto"
        and torch.cuda.is_bf16_supported()
    )
    return new_accelerator(
        cpu=not use_gpu,
        mixed_precision="bf16" if bf16 else "no",
        gradient_accumulation_steps=config.grad_accum,
        log_with=trackers,
        project_dir=project_dir,
    )


def add_lora(model, config: UnlearnConfig):
    from peft import LoraConfig, get_peft_model

    targets = config.lora_target_modules
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on weights but not on biases and norms, as transformers' Trainer does."""
    from transformers.trainer_pt_utils import get_parameter_names

    no_decay = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], no_decay))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _matches(name: str, patterns: list[str]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def check_model_settings(model, config: UnlearnConfig, objective: Objective) -> None:
    """Settings only the loaded model can check, one line each and without side effects, so a
    caller can check them before writing anything. ``Engine`` checks again on the model it
    trains: with ``lora`` the parameter names are known once the adapters exist."""
    if objective.hidden_groups:
        n_blocks = model.config.num_hidden_layers
        if not 0 <= objective.hidden_layer <= n_blocks - 2:
            # the model returns the last block's output only after its final norm
            raise NegprefError(
                f"hidden_layer: {objective.hidden_layer} is not a block whose output can be "
                f"read; this model has {n_blocks} blocks: choose 0..{n_blocks - 2}"
            )
    adapters_pending = config.lora and not hasattr(model, "peft_config")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not adapters_pending and not any(_matches(n, config.trainable_params) for n in trainable):
        raise NegprefError(
            f"trainable_params: {config.trainable_params} match no trainable parameter name "
            f"(e.g. {trainable[:3]})"
        )


def restrict_trainable(model, patterns: list[str]) -> None:
    """Freeze every parameter whose name fully matches none of ``patterns`` (regexes)."""
    for name, param in model.named_parameters():
        if param.requires_grad and not _matches(name, patterns):
            param.requires_grad_(False)


def split_groups(
    out: SequenceLogps, groups: tuple[str, ...], sizes: list[int]
) -> dict[str, GroupLogps]:
    """Cut one batched forward back into its sequence groups (all it computed, per group)."""
    pieces = {
        name: torch.split(value, sizes)
        for name, value in (
            ("logps", out.logps),
            ("n_tokens", out.n_tokens),
            ("token_logps", out.token_logps),
            ("targets", out.targets),
            ("mask", out.mask),
            ("logits", out.logits),
            ("all_logits", out.all_logits),
            ("hidden", out.hidden),
            ("attention_mask", out.attention_mask),
        )
        if value is not None
    }
    return {
        g: GroupLogps(**{name: parts[i] for name, parts in pieces.items()})
        for i, g in enumerate(groups)
    }


class Engine:
    """Model, optimizer, schedule and reference of one run; ``train_step`` is the whole loop body."""

    def __init__(
        self,
        config: UnlearnConfig,
        objective: Objective,
        model,
        tokenizer,
        data: UnlearnData,
        accelerator,
    ):
        from transformers import get_linear_schedule_with_warmup

        self.config, self.objective, self.data = config, objective, data
        self.accelerator, self.tokenizer = accelerator, tokenizer
        self.pad_id = tokenizer.pad_token_id
        if config.lora:
            model = add_lora(model, config)
        check_model_settings(model, config, objective)
        restrict_trainable(model, config.trainable_params)
        self.live_ref_groups = tuple(
            g
            for g in objective.groups
            if g in objective.ref_forward_groups
            or (config.ref_mode == "live" and g in objective.ref_logp_groups)
        )
        self.frozen_ref = None
        if self.live_ref_groups and not config.lora:
            self.frozen_ref = copy.deepcopy(model).requires_grad_(False).eval()
            self.frozen_ref.to(accelerator.device)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr)
        self.effective_batch = config.batch_size * config.grad_accum * accelerator.num_processes
        self.total_steps = max(1, int(config.epochs * data.n_forget // self.effective_batch))
        warmup_steps = min(
            self.total_steps, round(config.warmup * data.n_forget / self.effective_batch)
        )
        # Not passed to accelerator.prepare: its wrapper steps the schedule once per process.
        self.scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, self.total_steps)
        # Its state goes into trainer_state.json, not accelerate's pickled custom objects.
        self.model, self.optimizer = accelerator.prepare(model, optimizer)

    @property
    def precomputed_groups(self) -> tuple[str, ...]:
        """Groups whose reference log-probs come from the once-computed table."""
        return tuple(g for g in self.objective.ref_logp_groups if g not in self.live_ref_groups)

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    @property
    def is_lora(self) -> bool:
        return self.config.lora

    def epoch_of(self, step: int) -> float:
        return step * self.effective_batch / self.data.n_forget

    def epoch_boundary(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) finished a pass over the forget set."""
        return math.floor(self.epoch_of(step)) > math.floor(self.epoch_of(step - 1))

    # --- reference -------------------------------------------------------------------------
    @torch.no_grad()
    def reference_forward(
        self, batch: dict[str, torch.Tensor], keep_logits: bool, hidden_layer: int | None = None
    ):
        """Log-probs under the frozen reference (before training: the policy itself)."""
        if self.frozen_ref is not None:
            model, adapters = self.frozen_ref, contextlib.nullcontext()
        else:
            model = self.unwrapped
            adapters = model.disable_adapter() if self.is_lora else contextlib.nullcontext()
        with self.accelerator.autocast(), eval_mode(model), adapters:
            return sequence_logps(model, batch, keep_logits=keep_logits, hidden_layer=hidden_layer)

    def precompute_reference(self) -> None:
        """Reference log-probs of every sequence the loss compares, once, before any step.

        Sequences are sorted by length to pad little; processes share the work and gather.
        """
        acc = self.accelerator
        for group in self.precomputed_groups:
            encoded = self.data.group(group)
            order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
            with acc.split_between_processes(order, apply_padding=True) as shard:
                values = []
                for start in range(0, len(shard), self.config.batch_size):
                    chunk = [encoded[i] for i in shard[start : start + self.config.batch_size]]
                    batch = self._to_device(
                        MicroBatch({group: chunk}, {}, None).collate((group,), self.pad_id)
                    )
                    values.append(self.reference_forward(batch, keep_logits=False).logps)
                local_values = torch.cat(values).float()
                local_index = torch.tensor(shard, device=local_values.device)
            all_index = acc.gather(local_index).cpu()
            all_values = acc.gather(local_values).cpu()
            ref = torch.empty(len(encoded), dtype=torch.float32)
            ref[all_index] = all_values
            self.data.ref_logps[group] = ref

    # --- one step --------------------------------------------------------------------------
    def _hidden_layer(self, groups: tuple[str, ...]) -> int | None:
        """The block whose activations a forward returns: only where ``groups`` need them."""
        return self.objective.hidden_layer if groups else None

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def micro_loss(self, micro: MicroBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """Loss of one micro-batch: every group through ONE policy forward, then eq. 17."""
        objective, device = self.objective, self.accelerator.device
        groups = objective.groups
        batch = self._to_device(micro.collate(groups, self.pad_id))
        step = split_groups(
            sequence_logps(
                self.model,
                batch,
                keep_logits=objective.needs_logits,
                hidden_layer=self._hidden_layer(objective.hidden_groups),
            ),
            groups,
            micro.sizes(groups),
        )
        if self.live_ref_groups:
            ref_batch = self._to_device(micro.collate(self.live_ref_groups, self.pad_id))
            ref = split_groups(
                self.reference_forward(
                    ref_batch,
                    keep_logits=bool(objective.ref_logit_groups),
                    hidden_layer=self._hidden_layer(objective.ref_hidden_groups),
                ),
                self.live_ref_groups,
                micro.sizes(self.live_ref_groups),
            )
            for g, ref_group in ref.items():
                step[g].ref_logps = ref_group.logps
                step[g].ref_logits = ref_group.logits
                step[g].ref_all_logits = ref_group.all_logits
                step[g].ref_hidden = ref_group.hidden
        for g in self.precomputed_groups:
            step[g].ref_logps = micro.ref_logps[g].to(device)
        weights = micro.weights.to(device) if micro.weights is not None else None
        loss, parts = objective(StepLogps(step, weights))
        stats = {"loss": loss.detach(), **parts, **self._logp_stats(step)}
        return loss, stats, int(batch["attention_mask"].sum())

    def _logp_stats(self, step: dict[str, GroupLogps]) -> dict[str, torch.Tensor]:
        stats = {}
        for g, group in step.items():
            stats[f"logps/{g}"] = group.logps.detach().mean()
            if group.ref_logps is not None:
                stats[f"logps/ref_{g}"] = group.ref_logps.detach().mean()
        forget = step.get("forget")
        if forget is not None and forget.ref_logps is not None:
            weight = losses.npo_weight(forget.logps.detach(), forget.ref_logps, self.objective.beta)
            stats["npo/weight"] = weight.mean()
        if "retain" in step:
            stats["nll/retain"] = self.objective.retain_nll(step["retain"]).detach()
        return stats

    def train_step(self, step_index: int) -> dict[str, float]:
        """Optimizer step ``step_index`` (0-based): its slice of the stream, split by process.

        Returns the step's metrics averaged over all processes; a non-finite loss or gradient
        norm leaves the weights untouched (``metrics["finite"]`` is False).
        """
        acc, cfg = self.accelerator, self.config
        pairs = self.data.stream(step_index * self.effective_batch, self.effective_batch)
        per_process = cfg.batch_size * cfg.grad_accum
        local = pairs[acc.process_index * per_process : (acc.process_index + 1) * per_process]
        lr = self.scheduler.get_last_lr()[0]
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        grad_norm = None
        for a in range(cfg.grad_accum):
            micro = self.data.micro_batch(
                local[a * cfg.batch_size : (a + 1) * cfg.batch_size], self.objective.groups
            )
            # accelerate skips the gradient all-reduce until the last micro-batch and divides
            # the loss by grad_accum: equal micro-batches, so the effective-batch mean.
            with acc.accumulate(self.model):
                loss, stats, n_tokens = self.micro_loss(micro)
                acc.backward(loss)
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm or math.inf)
            tokens += n_tokens
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v.float()
        keys = sorted(sums)
        local_vector = torch.stack([sums[k] for k in keys] + [torch.tensor(float(tokens))])
        total = acc.reduce(local_vector.to(acc.device), reduction="sum").cpu()
        n_micro = cfg.grad_accum * acc.num_processes
        metrics = {k: float(total[i]) / n_micro for i, k in enumerate(keys)}
        metrics["tokens"] = float(total[-1])
        metrics["lr"] = lr
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        finite = math.isfinite(metrics["loss"]) and (
            grad_norm is None or math.isfinite(metrics["grad_norm"])
        )
        if finite:  # (under DeepSpeed the engine has already stepped inside backward)
            self.optimizer.step()
            self.scheduler.step()
            # A finite gradient can still overflow the weights (an infinite learning rate).
            metrics["non_finite_weights"] = not all(torch.isfinite(p).all() for p in self.trainable)
            finite = not metrics["non_finite_weights"]
        self.optimizer.zero_grad(set_to_none=True)
        metrics["finite"] = finite
        return metrics
