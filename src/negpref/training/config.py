"""``NegprefTrainingArguments``: the fields every negpref training verb shares.

It extends ``transformers.TrainingArguments``, so every Trainer field keeps its name, meaning
and flag (``learning_rate``, ``per_device_train_batch_size``, ``gradient_accumulation_steps``,
``num_train_epochs``, ``bf16``, ``report_to``, ``save_total_limit``, ``deepspeed``, ``fsdp``,
...), as in TRL's configs. negpref adds the model to load, LoRA, run-directory safety and
progress output, and changes a few defaults (marked below) to what a reproducible,
resumable, pickle-free negpref run needs. ``UnlearnConfig`` and ``AlignConfig`` extend it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from negpref.config import require
from negpref.errors import NegprefError
from negpref.models import native_bf16

# Fields a ``resume`` may change without changing what the run computes (verbs add theirs).
TRAINING_RESUMABLE_CHANGES = frozenset(
    {
        "resume",
        "overwrite",
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "output_dir",
        "verbosity",
        "report_to",
    }
)


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class NegprefTrainingArguments(TrainingArguments):
    """Shared settings of negpref's training verbs (``transformers.TrainingArguments`` +)."""

    # --- changed TrainingArguments defaults ---
    output_dir: str | None = field(
        default=None,
        metadata=_help("run directory (flag also --out)", path=True, aliases=["--out"]),
    )
    seed: int = field(default=0, metadata=_help("seed of data order, pairing and initialisation"))
    logging_steps: float = field(
        default=1, metadata=_help("log every N optimizer steps (one metrics.jsonl line each)")
    )
    report_to: str | list[str] | None = field(
        default_factory=lambda: ["tensorboard"],
        metadata=_help("trackers (TensorBoard in OUT/tensorboard by default; 'none' = off)"),
    )
    save_strategy: str = field(
        default="epoch",
        metadata=_help(
            "checkpoint at each data epoch end ('epoch': a pass over the forget set or the "
            "preference data), every save_steps steps ('steps') or never ('no'); always at the "
            "last step unless 'no'",
            choices=["epoch", "steps", "no"],
        ),
    )
    save_total_limit: int | None = field(
        default=2,
        metadata=_help("checkpoints kept (newest first); resume falls back to an older one"),
    )
    optim: str = field(
        default="adamw_torch",
        metadata=_help("optimizer (transformers' names); AdamW, as the NPO paper"),
    )
    remove_unused_columns: bool = field(
        default=False, metadata=_help("(negpref collates its own columns)")
    )
    # --- model ---
    model: str = field(
        default="",
        metadata=_help(
            "local HF model directory (safetensors), or a hub id if online", path=True, hub=True
        ),
    )
    gguf: str | None = field(
        default=None,
        metadata=_help("GGUF file (path, or name inside --model) to load instead", path=True),
    )
    dtype: str = field(
        default="auto",
        metadata=_help(
            "weights dtype; auto = float32 masters (bf16 weights would round small updates away)",
            choices=["auto", "float32", "bfloat16", "float16"],
        ),
    )
    mixed_precision: str = field(
        default="auto",
        metadata=_help(
            "bf16 autocast of every forward (training, reference precompute, scoring, "
            "evaluation): auto = on where the device computes bf16 natively (a bf16 GPU, or a "
            "CPU with AMX-BF16 / AVX512-BF16; $NEGPREF_CPU_BF16=0/1 overrides) and dtype is "
            "auto; bf16 = on anywhere (emulated bf16 is slower than float32); no = off",
            choices=["auto", "bf16", "no"],
        ),
    )
    allow_pickle: bool = field(
        default=False, metadata=_help("allow loading pickle (.bin) weights, which can run code")
    )
    trust_remote_code: bool = field(
        default=False, metadata=_help("run model code shipped with the checkpoint")
    )
    # --- LoRA ---
    lora: bool = field(
        default=False,
        metadata=_help("train LoRA adapters (peft); the reference is the base with adapters off"),
    )
    lora_r: int = field(default=8, metadata=_help("LoRA rank"))
    lora_alpha: float = field(default=16.0, metadata=_help("LoRA alpha"))
    lora_dropout: float = field(default=0.0, metadata=_help("LoRA dropout"))
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata=_help("module names to adapt ('all-linear' = every linear layer but the head)"),
    )
    merge: bool = field(
        default=False, metadata=_help("with lora, also save the adapter merged into the model")
    )
    # --- run directory and output ---
    overwrite: bool = field(default=False, metadata=_help("replace an existing run directory"))
    resume: bool = field(
        default=False, metadata=_help("continue the run in output_dir from its last checkpoint")
    )
    save_model: bool = field(
        default=True,
        metadata=_help("write the final model to OUT/model (off: keep it in memory only)"),
    )
    verbosity: str = field(
        default="normal",
        metadata=_help(
            "progress: quiet = none, normal = a bar on a terminal or a line every 30 s, "
            "verbose = a line every step (flags --quiet / --verbose)",
            choices=["quiet", "normal", "verbose"],
        ),
    )

    def __post_init__(self):
        self._check_shared()
        device = "cpu" if self.use_cpu or not torch.cuda.is_available() else "cuda"
        bf16 = self.mixed_precision == "bf16" or (
            self.mixed_precision == "auto" and self.dtype == "auto" and native_bf16(device)
        )
        self.bf16 = self.bf16 or bf16
        if not torch.cuda.is_available():  # pinned memory only speeds copies to a GPU
            self.dataloader_pin_memory = False
        if self.output_dir is None:
            self.output_dir = "trainer_output"  # TrainingArguments' own default, never used
        super().__post_init__()

    def _check_shared(self) -> None:
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(
            0 < self.learning_rate < math.inf,
            "learning_rate",
            self.learning_rate,
            "must be > 0 and finite",
        )
        for name in ("weight_decay", "max_grad_norm", "lora_dropout"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        require(self.lora_r >= 1, "lora_r", self.lora_r, "must be >= 1")
        require(
            self.save_total_limit is None or self.save_total_limit >= 1,
            "save_total_limit",
            self.save_total_limit,
            "must be >= 1",
        )
        require(not self.merge or self.lora, "merge", self.merge, "needs lora")
        require(
            not (self.overwrite and self.resume), "resume", self.resume, "conflicts with overwrite"
        )

    def replace(self, **changes):
        """A copy with ``changes`` (no second ``__post_init__``: the values are checked)."""
        new = copy.copy(self)
        for name, value in changes.items():
            if not hasattr(new, name):
                raise NegprefError(f"{name}: not a field of {type(self).__name__}")
            setattr(new, name, value)
        return new

    def to_config_dict(self) -> dict:
        """Every field as plain data (enums as their values), for config.yaml."""
        values = self.to_dict()
        return {k: v for k, v in values.items() if not k.startswith("_")}
