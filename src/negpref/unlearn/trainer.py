"""``UnlearnTrainer``: the unlearning objective (eq. 17) on ``negpref``'s Trainer.

``compute_loss`` runs every sequence group of a micro-batch (forget, refusal, retain) through
ONE policy forward, adds the reference log-probs, and evaluates the objective; the loop,
optimizer and schedule are ``transformers.Trainer``'s (``negpref.training.trainer``).
``negpref.unlearn.run`` drives it and owns the run directory; ``negpref bench step-cost``
times its step.

The reference model is frozen and the forget data fixed, so the reference log-probs of every
forget/refusal sequence are computed once before training and looked up per step (TRL's
``precompute_ref_log_probs``). A live reference forward runs only where it must: for the KL
terms and the losses that read reference *logits* (UNDIAL) or activations (RMU), and with
``ref_mode="live"``. With LoRA the reference is the policy with its adapters switched off;
otherwise a frozen copy.

``train_in_memory`` trains a model in place without a run directory: U2A's inner weighted
unlearning and the studies' fine-tuning (method ``SFT``) go through it.
"""

from __future__ import annotations

import contextlib
import copy
import re
import tempfile
from collections.abc import Sequence

import torch
from transformers import TrainerCallback

from negpref import losses
from negpref.errors import NegprefError
from negpref.logprobs import SequenceLogps, batched_logps, sequence_logps
from negpref.models import add_lora, as_trainable
from negpref.training.run_log import eval_mode
from negpref.training.trainer import NegprefTrainer, plan_steps
from negpref.unlearn.config import UnlearnConfig
from negpref.unlearn.dataset import (
    MicroBatch,
    UnlearnData,
    build_data,
    load_qa,
)
from negpref.unlearn.objectives import GroupLogps, Objective, StepLogps


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


class ForgetStream(torch.utils.data.Dataset):
    """Item ``i`` is the ``(forget index, retain index)`` pair at stream position ``i``."""

    def __init__(self, data: UnlearnData, length: int):
        self.data, self.length = data, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, position: int) -> tuple[int, int]:
        return self.data.stream(position, 1)[0]


class _DualAscent(TrainerCallback):
    """Moves the retain constraint's multiplier after every optimizer step."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.dual_step()


class UnlearnTrainer(NegprefTrainer):
    """Unlearn ``forget_dataset`` from ``model``: a ``transformers.Trainer``.

    ``UnlearnTrainer(model, args, forget_dataset=..., retain_dataset=..., refusal_answers=...,
    processing_class=tokenizer)`` then ``train()``: datasets are anything ``load_qa`` reads
    (a ``datasets.Dataset``, a list of dicts, a file path). ``data`` (an encoded
    ``UnlearnData``) replaces the three. The number of optimizer steps is
    ``num_train_epochs`` passes over the forget set at the effective batch
    (``per_device_train_batch_size x gradient_accumulation_steps x processes``), rounded down;
    warm-up is ``warmup_epochs`` of them unless ``warmup_steps`` is set.

    ``proximal_lambda > 0`` adds ``proximal_lambda * ||theta - anchor||^2`` to every
    micro-batch's loss (U2A's inner regulariser, eq. 8), ``theta`` the trainable parameters in
    ``model.parameters()`` order and ``anchor`` ``proximal_anchor`` (same order and shapes;
    default: their values when the trainer is built). The Trainer divides each micro-batch's
    loss by ``gradient_accumulation_steps``, so a step's objective holds the term once. The
    parameters are compared as the module holds them: not under FSDP/DeepSpeed sharding.
    ``dropout=False`` runs the policy forward in eval mode: the loss is then the deterministic
    function of the weights that U2A's marginal gains differentiate.
    """

    def __init__(
        self,
        model,
        args: UnlearnConfig,
        forget_dataset=None,
        retain_dataset=None,
        refusal_answers=None,
        processing_class=None,
        callbacks=None,
        data: UnlearnData | None = None,
        proximal_lambda: float = 0.0,
        proximal_anchor: Sequence[torch.Tensor] | None = None,
        dropout: bool = True,
    ):
        if processing_class is None:
            raise NegprefError("UnlearnTrainer: pass the tokenizer as processing_class")
        args = args.resolved()
        objective = args.objective()
        self.objective, self.pad_id = objective, processing_class.pad_token_id
        # the retain weight; with a retain bound, the multiplier that dual_step moves
        self.retain_weight, self._step_retain_losses = objective.c_rt, []
        if objective.retain_bound is not None:
            callbacks = [*(callbacks or []), _DualAscent(self)]
        if data is None:
            data = build_data(
                processing_class,
                load_qa(forget_dataset, "forget records", args.max_length),
                load_qa(retain_dataset, "retain records", args.max_length)
                if retain_dataset is not None
                else None,
                list(refusal_answers) if refusal_answers is not None else None,
                args.max_length,
                args.seed,
                args.prompt_format(),
            )
        self.data = data
        model = as_trainable(model)  # a model dequantised from GGUF trains as a plain one
        if args.lora and not hasattr(model, "peft_config"):
            model = add_lora(model, args)
        check_model_settings(model, args, objective)
        restrict_trainable(model, args.trainable_params)
        self.proximal_lambda, self.dropout = float(proximal_lambda), dropout
        self.proximal_params, self.proximal_anchor = self._proximal(
            model, proximal_lambda, proximal_anchor
        )
        self.live_ref_groups = tuple(
            g
            for g in objective.groups
            if g in objective.ref_forward_groups
            or (args.ref_mode == "live" and g in objective.ref_logp_groups)
        )
        self.frozen_ref = None
        if self.live_ref_groups and not args.lora:
            self.frozen_ref = copy.deepcopy(model).requires_grad_(False).eval()
        self.run_name_for_progress = f"unlearn {args.method}"
        effective_batch, total_steps = plan_steps(args, data.n_forget)
        warmup = args.warmup_steps or min(
            total_steps, round(args.warmup_epochs * data.n_forget / effective_batch)
        )
        super().__init__(
            model=model,
            args=args.replace(warmup_steps=warmup),
            n_items=data.n_forget,
            train_dataset=ForgetStream(data, total_steps * effective_batch),
            data_collator=self.collate,
            processing_class=processing_class,
            callbacks=callbacks,
        )
        self.fingerprint = data.fingerprint()
        if self.frozen_ref is not None:
            self.frozen_ref.to(self.args.device)
        self.proximal_anchor = [a.to(self.args.device) for a in self.proximal_anchor]

    @staticmethod
    def _proximal(model, strength: float, anchor) -> tuple[list, list]:
        """The trainable parameters and the anchor of the proximal term (both empty when off)."""
        if not strength >= 0:
            raise NegprefError(f"proximal_lambda: must be >= 0, got {strength}")
        if strength == 0:
            return [], []
        params = [p for p in model.parameters() if p.requires_grad]
        if anchor is None:
            return params, [p.detach().clone() for p in params]
        anchor = [a.detach() for a in anchor]
        shapes = [tuple(p.shape) for p in params]
        if [tuple(a.shape) for a in anchor] != shapes:
            raise NegprefError(
                f"proximal_anchor: {len(anchor)} tensors do not match the {len(params)} "
                "trainable parameters in model.parameters() order and shape; pass one per "
                "trainable parameter"
            )
        return params, anchor

    # --- data -------------------------------------------------------------------------------
    @property
    def precomputed_groups(self) -> tuple[str, ...]:
        """Groups whose reference log-probs come from the once-computed table."""
        return tuple(g for g in self.objective.ref_logp_groups if g not in self.live_ref_groups)

    def collate(self, pairs: list[tuple[int, int]]) -> dict:
        """One micro-batch: every group padded into one batch for ONE policy forward."""
        groups = self.objective.groups
        micro: MicroBatch = self.data.micro_batch(pairs, groups)
        inputs = {
            "policy": micro.collate(groups, self.pad_id),
            "sizes": micro.sizes(groups),
            "ref_logps": {g: micro.ref_logps[g] for g in self.precomputed_groups},
        }
        if self.live_ref_groups:
            inputs["reference"] = micro.collate(self.live_ref_groups, self.pad_id)
            inputs["reference_sizes"] = micro.sizes(self.live_ref_groups)
        if micro.weights is not None:
            inputs["weights"] = micro.weights
        return inputs

    def checkpoint_state(self) -> dict:
        state = {**super().checkpoint_state(), "fingerprint": self.fingerprint}
        if self.objective.retain_bound is not None:
            state["retain_weight"] = self.retain_weight
        return state

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        if self.objective.retain_bound is not None:
            self.retain_weight = float(state["retain_weight"])

    def dual_step(self) -> None:
        """The multiplier's ascent on the retain constraint after an optimizer step, from the
        step's mean retain NLL over its micro-batches and processes; none in the warm-up."""
        losses_of_step, self._step_retain_losses = self._step_retain_losses, []
        step = self.state.global_step  # the step just taken, 1-based
        if not losses_of_step or self.epoch_of(step - 1) < self.args.dual_warmup_epochs:
            return
        mean = self.accelerator.reduce(torch.stack(losses_of_step).mean(), "mean").item()
        violation = mean - self.objective.retain_bound
        self.retain_weight = max(0.0, self.retain_weight + self.args.dual_step_size * violation)

    # --- reference --------------------------------------------------------------------------
    @contextlib.contextmanager
    def reference_model(self):
        """The frozen reference, in eval mode: a frozen copy, or the policy with its LoRA
        adapters off (before training: the policy itself)."""
        if self.frozen_ref is not None:
            model, adapters = self.frozen_ref, contextlib.nullcontext()
        else:
            model = self.unwrapped
            adapters = model.disable_adapter() if self.args.lora else contextlib.nullcontext()
        with eval_mode(model), adapters, self.whole_weights(model):
            yield model

    @torch.no_grad()
    def reference_forward(
        self, batch: dict[str, torch.Tensor], keep_logits: bool, hidden_layer: int | None = None
    ):
        """Log-probs under the frozen reference of one batch (a live reference forward)."""
        with self.reference_model() as model, self.accelerator.autocast():
            return sequence_logps(model, batch, keep_logits=keep_logits, hidden_layer=hidden_layer)

    def precompute_reference(self, progress: bool = False) -> None:
        """Reference log-probs of every sequence the loss compares, once, before any step;
        processes share the work (``batched_logps`` on consecutive shards of the length-sorted
        sequences, so every batch is one a single process runs too) and gather."""
        acc = self.accelerator
        for group in self.precomputed_groups:
            encoded = self.data.group(group)
            # Shards of the length-sorted order: any process count pads and batches alike.
            order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
            with acc.split_between_processes(order, apply_padding=True) as shard:
                with self.reference_model() as model:
                    local_values, _ = batched_logps(
                        model,
                        [encoded[i] for i in shard],
                        self.pad_id,
                        self.args.per_device_train_batch_size,
                        self.args.device,
                        acc.autocast,
                        progress=progress and acc.is_main_process,
                        desc=f"reference log-probs ({group})",
                    )
                local_index = torch.tensor(shard)
            all_index = acc.gather(local_index.to(self.args.device)).cpu()
            all_values = acc.gather(local_values.to(self.args.device)).cpu()
            ref = torch.empty(len(encoded), dtype=torch.float32)
            ref[all_index] = all_values
            self.data.ref_logps[group] = ref

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        """``Trainer.train``, after the reference log-probs (unless already computed or loaded)."""
        if any(g not in self.data.ref_logps for g in self.precomputed_groups):
            self.precompute_reference(progress=self.args.verbosity != "quiet")
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    # --- one micro-batch --------------------------------------------------------------------
    def _hidden_layer(self, groups: tuple[str, ...]) -> int | None:
        """The block whose activations a forward returns: only where ``groups`` need them."""
        return self.objective.hidden_layer if groups else None

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.args.device) for k, v in batch.items()}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Eq. 17 on one micro-batch: every group through ONE policy forward."""
        objective = self.objective
        groups = objective.groups
        with contextlib.nullcontext() if self.dropout else eval_mode(model):
            policy = sequence_logps(
                model,
                inputs["policy"],
                keep_logits=objective.needs_logits,
                hidden_layer=self._hidden_layer(objective.hidden_groups),
            )
        step = split_groups(policy, groups, inputs["sizes"])
        if self.live_ref_groups:
            ref = split_groups(
                self.reference_forward(
                    inputs["reference"],
                    keep_logits=bool(objective.ref_logit_groups),
                    hidden_layer=self._hidden_layer(objective.ref_hidden_groups),
                ),
                self.live_ref_groups,
                inputs["reference_sizes"],
            )
            for g, ref_group in ref.items():
                step[g].ref_logps = ref_group.logps
                step[g].ref_logits = ref_group.logits
                step[g].ref_all_logits = ref_group.all_logits
                step[g].ref_hidden = ref_group.hidden
        for g in self.precomputed_groups:
            step[g].ref_logps = inputs["ref_logps"][g]
        loss, parts = objective(StepLogps(step, inputs.get("weights")), c_rt=self.retain_weight)
        if objective.retain_bound is not None:
            self._step_retain_losses.append(parts["loss/retain"])
            parts["dual/retain_weight"] = torch.tensor(self.retain_weight)
        if self.proximal_lambda:
            proximal = sum(
                ((p - a) ** 2).sum() for p, a in zip(self.proximal_params, self.proximal_anchor)
            )
            loss = loss + self.proximal_lambda * proximal
            parts["loss/proximal"] = proximal.detach()
        tokens = inputs["policy"]["attention_mask"].sum().float()
        self.store_metrics({"loss": loss.detach(), **parts, **self._logp_stats(step)})
        self.store_metrics({"tokens": tokens})
        return (loss, step) if return_outputs else loss

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


# Settings of a training with no run directory: nothing written, tracked or printed, every
# step's figures in ``trainer.state.log_history``, no autocast (the caller's dtype, as its own
# gradient computations see the model).
IN_MEMORY = {
    "save_strategy": "no",
    "save_model": False,
    "report_to": "none",
    "verbosity": "quiet",
    "logging_steps": 1,
    "disable_tqdm": True,
    "mixed_precision": "no",
}


def train_in_memory(model, tokenizer, data: UnlearnData, **options) -> UnlearnTrainer:
    """Train ``model`` in place on ``data`` with ``UnlearnTrainer``; returns the trainer.

    ``options`` are ``UnlearnConfig`` fields (over ``IN_MEMORY``; ``use_cpu`` defaults to where
    the model is) and the trainer's ``proximal_lambda`` / ``proximal_anchor`` / ``dropout``.
    The reference log-probs the method reads must be in ``data.ref_logps``. Transformers' Trainer writes
    nothing with these settings, but wants an ``output_dir``: a temporary folder, removed after.
    The model's train/eval mode is restored after training.
    """
    trainer_options = {
        k: options.pop(k) for k in ("proximal_lambda", "proximal_anchor", "dropout") if k in options
    }
    options.setdefault("use_cpu", next(model.parameters()).device.type == "cpu")
    was_training = model.training
    with tempfile.TemporaryDirectory(prefix="negpref-train-") as out:
        config = UnlearnConfig(**{**IN_MEMORY, **options, "output_dir": out})
        trainer = UnlearnTrainer(
            model, config, processing_class=tokenizer, data=data, **trainer_options
        )
        try:
            trainer.train()
        finally:
            model.train(was_training)
    return trainer


def last_logged(trainer: UnlearnTrainer, key: str = "loss") -> float:
    """The last logged value of ``key`` (with ``logging_steps=1``: the last step's)."""
    return next(
        (row[key] for row in reversed(trainer.state.log_history) if key in row), float("nan")
    )
