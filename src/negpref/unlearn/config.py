"""``UnlearnConfig``: every setting of an unlearning run, documented, YAML- and flag-loadable."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from negpref.config import require
from negpref.conventions import CONVENTIONS, DEFAULT, get_conventions
from negpref.data.qa import PromptFormat, prompt_field, prompt_from_config
from negpref.errors import NegprefError
from negpref.unlearn.objectives import PRESETS, Objective, canonical_preset, forget_loss_for

# Fields that may change between a run and its --resume without changing what it computes.
RESUMABLE_CHANGES = frozenset(
    {"resume", "overwrite", "save_every", "save_total_limit", "eval_every", "out", "merge"}
)


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class UnlearnConfig:
    """Settings of ``negpref unlearn`` / ``negpref.unlearn.run`` (NPO paper defaults)."""

    # --- model ---
    model: str = field(
        default="", metadata=_help("local HF model directory (safetensors), or a hub id if online")
    )
    gguf: str | None = field(
        default=None, metadata=_help("GGUF file (path, or name inside --model) to load instead")
    )
    dtype: str = field(
        default="auto",
        metadata=_help(
            "weights dtype; auto = float32 weights with bf16 autocast on a bf16 GPU, float32 on "
            "CPU",
            choices=["auto", "float32", "bfloat16", "float16"],
        ),
    )
    mixed_precision: str = field(
        default="auto",
        metadata=_help(
            "autocast: auto = bf16 on a bf16 GPU with --dtype auto, else none; bf16 = bf16 "
            "autocast on any device (CPUs with AVX512-BF16/AMX run it natively); no = none",
            choices=["auto", "bf16", "no"],
        ),
    )
    allow_pickle: bool = field(
        default=False, metadata=_help("allow loading pickle (.bin) weights, which can run code")
    )
    trust_remote_code: bool = field(
        default=False, metadata=_help("run model code shipped with the checkpoint")
    )
    cpu: bool = field(default=False, metadata=_help("train on the CPU even if a GPU is available"))
    # --- data ---
    forget: str = field(
        default="",
        metadata=_help(
            "forget set: JSON/JSONL records with question+answer (TOFU) or text; optional "
            "per-record 'weight'. For method SFT: the training set"
        ),
    )
    retain: str | None = field(
        default=None, metadata=_help("retain set (same formats), for the RT and retain-KL terms")
    )
    idk: str | None = field(
        default=None,
        metadata=_help("refusal answers, one per line (e.g. idontknow.jsonl), for IDK/DPO/KTO"),
    )
    limit: int = field(default=0, metadata=_help("use only the first N forget records (0 = all)"))
    max_length: int = field(
        default=512, metadata=_help("max tokens per sequence; longer answers are truncated")
    )
    system_prompt: str | None = prompt_field("system_prompt")
    chat_template: bool = prompt_field("chat_template")
    fallback_template: str = prompt_field("fallback_template")
    # --- objective ---
    method: str = field(
        default="NPO", metadata=_help("method preset: " + ", ".join(PRESETS) + " (any case)")
    )
    beta: float | None = field(
        default=None,
        metadata=_help(
            "the method's first hyperparameter (preset default): inverse temperature (0.1; "
            "SimNPO 2.5), WGA's exponent of p (1), SatImp's beta1 (5), UNDIAL's strength (10)"
        ),
    )
    gamma: float | None = field(
        default=None,
        metadata=_help(
            "the method's second hyperparameter (preset default): SimNPO margin (0; under "
            "--conventions open-unlearning their delta, margin before beta: gamma = beta * "
            "delta), SatImp's beta2 (1), CE-U's answer tokens left out at the start (1)"
        ),
    )
    c_forget: float | None = field(
        default=None, metadata=_help("weight of the forget loss (preset default 1)")
    )
    c_rt: float | None = field(
        default=None, metadata=_help("weight of the retain NLL term L_RT (+RT presets: 1)")
    )
    c_rtkl: float | None = field(
        default=None, metadata=_help("weight of the retain KL term K_RT (+KL presets: 1)")
    )
    c_fgkl: float | None = field(
        default=None, metadata=_help("weight of the forget KL term K_FG, subtracted (default 0)")
    )
    conventions: str = field(
        default=DEFAULT,
        metadata=_help(
            "loss reductions: the NPO paper's, or open-unlearning's (GA / retain NLL token "
            "mean over the batch, retain KL(ref||policy) over every position, SimNPO delta); "
            "docs/conventions.md",
            choices=list(CONVENTIONS),
        ),
    )
    hidden_layer: int = field(
        default=7,
        metadata=_help(
            "RMU: the decoder block (0-based, model.layers.N) whose output is steered; 0..blocks-2"
        ),
    )
    trainable_params: list[str] = field(
        default_factory=lambda: [".*"],
        metadata=_help(
            "regexes: train only parameters whose full name matches one (others frozen); "
            "WMDP's RMU: 'model\\.layers\\.(5|6|7)\\.mlp\\.down_proj\\.weight'"
        ),
    )
    ref_mode: str = field(
        default="precomputed",
        metadata=_help(
            "reference log-probs: computed once before training, or a reference forward every "
            "step (KL terms always run the reference live on the sequences they need)",
            choices=["precomputed", "live"],
        ),
    )
    # --- optimisation ---
    lr: float = field(default=1e-5, metadata=_help("peak learning rate (AdamW)"))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay"))
    epochs: float = field(default=10.0, metadata=_help("passes over the forget set"))
    batch_size: int = field(default=8, metadata=_help("forget items per micro-batch per process"))
    grad_accum: int = field(
        default=4,
        metadata=_help(
            "micro-batches per optimizer step (effective batch = "
            "batch_size x grad_accum x processes)"
        ),
    )
    warmup: float = field(
        default=1.0, metadata=_help("linear warm-up length in epochs, then linear decay to 0")
    )
    max_grad_norm: float = field(
        default=1.0, metadata=_help("gradient clipping norm (0 = no clipping)")
    )
    seed: int = field(default=0, metadata=_help("seed of data order, pairing and initialisation"))
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
        default=False, metadata=_help("with --lora, also save the adapter merged into the model")
    )
    # --- output ---
    out: str = field(default="", metadata=_help("run directory"))
    overwrite: bool = field(default=False, metadata=_help("replace an existing run directory"))
    resume: bool = field(
        default=False, metadata=_help("continue the run in --out from its last checkpoint")
    )
    save_every: int = field(
        default=0,
        metadata=_help(
            "checkpoint every N optimizer steps and at the end (0 = each epoch end, -1 = never)"
        ),
    )
    save_total_limit: int = field(
        default=2,
        metadata=_help("checkpoints kept (newest first); resume falls back to an older one"),
    )
    eval_every: int = field(
        default=0, metadata=_help("run evaluation callbacks every N steps (0 = each epoch end)")
    )
    save_model: bool = field(
        default=True,
        metadata=_help("write the final model to OUT/model (off: keep it in memory only)"),
    )

    def validate(self) -> None:
        method = canonical_preset(self.method)
        if method is None:
            raise NegprefError(
                f"--method: unknown preset {self.method!r}; choose one of {', '.join(PRESETS)}"
            )
        self.method = method
        get_conventions(self.conventions)
        self.prompt_format()  # a bad --fallback-template fails before anything loads
        for name in ("batch_size", "grad_accum", "max_length"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        for name in ("limit", "eval_every"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        require(self.save_every >= -1, "save_every", self.save_every, "must be >= -1")
        require(0 < self.epochs < math.inf, "epochs", self.epochs, "must be > 0 and finite")
        require(math.isfinite(self.lr) and self.lr > 0, "lr", self.lr, "must be finite and > 0")
        require(self.save_total_limit >= 1, "save_total_limit", self.save_total_limit, ">= 1")
        for name in ("weight_decay", "warmup", "max_grad_norm", "lora_dropout"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        for name in ("c_forget", "c_rt", "c_rtkl", "c_fgkl"):
            value = getattr(self, name)
            require(value is None or value >= 0, name, value, "must be >= 0")
        require(self.beta is None or self.beta > 0, "beta", self.beta, "must be > 0")
        require(self.lora_r >= 1, "lora_r", self.lora_r, "must be >= 1")
        require(self.hidden_layer >= 0, "hidden_layer", self.hidden_layer, "must be >= 0")
        for pattern in self.trainable_params:
            try:
                re.compile(pattern)
            except re.error as e:
                raise NegprefError(f"trainable_params: {pattern!r} is not a regex ({e})") from None
        require(not self.merge or self.lora, "merge", self.merge, "needs --lora")
        require(
            not (self.overwrite and self.resume),
            "resume",
            self.resume,
            "conflicts with --overwrite",
        )

    def resolved(self) -> UnlearnConfig:
        """A copy with every preset-dependent field (None) filled from the preset."""
        self.validate()
        preset = PRESETS[self.method]
        fill = {
            name: getattr(preset, name)
            for name in ("beta", "gamma", "c_forget", "c_rt", "c_rtkl", "c_fgkl")
            if getattr(self, name) is None
        }
        return dataclasses.replace(self, **fill)

    def prompt_format(self) -> PromptFormat:
        return prompt_from_config(self)

    def objective(self) -> Objective:
        r = self.resolved()
        conventions = get_conventions(r.conventions)
        return Objective(
            forget_loss=forget_loss_for(PRESETS[r.method].forget_loss, conventions),
            c_forget=r.c_forget,
            c_rt=r.c_rt,
            c_rtkl=r.c_rtkl,
            c_fgkl=r.c_fgkl,
            beta=r.beta,
            gamma=r.gamma,
            conventions=conventions,
            hidden_layer=r.hidden_layer,
        )
