"""``UnlearnConfig``: every setting of an unlearning run, documented, YAML- and flag-loadable."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from negpref.config import require
from negpref.conventions import CONVENTIONS, DEFAULT, get_conventions
from negpref.data.qa import PromptFormat, prompt_field, prompt_from_config
from negpref.errors import NegprefError
from negpref.training.config import (
    TRAINING_RESUMABLE_CHANGES,
    NegprefTrainingArguments,
    _help,
)
from negpref.unlearn.objectives import PRESETS, Objective, canonical_preset, forget_loss_for

# Fields that may change between a run and its --resume without changing what it computes.
RESUMABLE_CHANGES = TRAINING_RESUMABLE_CHANGES | {"eval_every", "merge"}


@dataclass
class UnlearnConfig(NegprefTrainingArguments):
    """Settings of ``negpref unlearn`` / ``UnlearnTrainer`` (NPO paper defaults).

    Extends ``NegprefTrainingArguments`` (hence ``transformers.TrainingArguments``): the
    optimisation fields are the Trainer's (``learning_rate``, ``num_train_epochs``,
    ``per_device_train_batch_size``, ``gradient_accumulation_steps``, ``weight_decay``,
    ``max_grad_norm``, ``save_strategy``/``save_steps``, ...), with the NPO paper's defaults.
    """

    # --- TrainingArguments, NPO paper defaults ---
    learning_rate: float = field(default=1e-5, metadata=_help("peak learning rate (AdamW)"))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay"))
    num_train_epochs: float = field(default=10.0, metadata=_help("passes over the forget set"))
    per_device_train_batch_size: int = field(
        default=8, metadata=_help("forget items per micro-batch per process")
    )
    gradient_accumulation_steps: int = field(
        default=4,
        metadata=_help(
            "micro-batches per optimizer step (effective batch = per_device_train_batch_size "
            "x gradient_accumulation_steps x processes)"
        ),
    )
    max_grad_norm: float = field(
        default=1.0, metadata=_help("gradient clipping norm (0 = no clipping)")
    )
    warmup_epochs: float = field(
        default=1.0,
        metadata=_help(
            "linear warm-up length in forget-set epochs, then linear decay to 0 "
            "(warmup_steps > 0 takes precedence)"
        ),
    )
    # --- data ---
    forget: str = field(
        default="",
        metadata=_help(
            "forget set: JSON/JSONL records with question+answer (TOFU) or text; optional "
            "per-record 'weight'. For method SFT: the training set",
            path=True,
            hub=True,
        ),
    )
    retain: str | None = field(
        default=None,
        metadata=_help(
            "retain set (same formats), for the RT and retain-KL terms", path=True, hub=True
        ),
    )
    idk: str | None = field(
        default=None,
        metadata=_help(
            "refusal answers, one per line (e.g. idontknow.jsonl), for IDK/DPO/KTO", path=True
        ),
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
    retain_bound: float | None = field(
        default=None,
        metadata=_help(
            "primal-dual retain constraint L_RT <= retain_bound (PDU preset: 0.3): c_rt is its "
            "multiplier's start value, raised by dual_step_size x (L_RT - retain_bound) after "
            "each optimizer step, never below 0 (none = fixed c_rt)"
        ),
    )
    dual_step_size: float = field(
        default=5.0, metadata=_help("with retain_bound: step size of the multiplier's ascent")
    )
    dual_warmup_epochs: float = field(
        default=5.0,
        metadata=_help("with retain_bound: forget-set epochs before the multiplier moves"),
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
    # --- evaluation during training ---
    eval_every: str = field(
        default="epoch",
        metadata=_help(
            "evaluate at step 0, every N optimizer steps or each forget-set epoch end "
            "('epoch'), and at the last step: the TOFU evaluation of eval_split and any "
            "evaluation callbacks"
        ),
    )
    eval_split: str | None = field(
        default=None,
        metadata=_help(
            "TOFU forget split evaluated during training (forget01, forget05, forget10), read "
            "from eval_data; results in OUT/evals.jsonl, TensorBoard eval/* and summary.json's "
            "peak_forget_quality (none = no TOFU evaluation)"
        ),
    )
    eval_data: str | None = field(
        default=None,
        metadata=_help(
            "folder of TOFU files for eval_split (forgetNN_perturbed.json, "
            "retain_perturbed.json, ...; default $NEGPREF_TOFU_DIR or ../shared/data/tofu)",
            path=True,
        ),
    )
    retain_logs: str | None = field(
        default=None,
        metadata=_help(
            "per-item TOFU eval logs of the retain model (TOFU's or open-unlearning's "
            "format): the forget-quality reference; without it forget_quality is not computed",
            path=True,
        ),
    )
    eval_limit: int = field(
        default=0, metadata=_help("evaluate the first N items of each TOFU set (0 = all)")
    )
    eval_generation: bool = field(
        default=True,
        metadata=_help("generate answers for ROUGE during evaluation (off: log-prob metrics only)"),
    )

    def __post_init__(self):
        self.validate()
        super().__post_init__()

    def validate(self) -> None:
        method = canonical_preset(self.method)
        if method is None:
            raise NegprefError(
                f"method: unknown preset {self.method!r}; choose one of {', '.join(PRESETS)}"
            )
        self.method = method
        get_conventions(self.conventions)
        self.prompt_format()  # a bad fallback_template fails before anything loads
        require(self.max_length >= 1, "max_length", self.max_length, "must be >= 1")
        for name in ("limit", "eval_limit"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        require(
            self.eval_every == "epoch" or (self.eval_every.isdigit() and int(self.eval_every) > 0),
            "eval_every",
            self.eval_every,
            "must be 'epoch' or a number of steps >= 1",
        )
        require(
            0 < self.num_train_epochs < math.inf,
            "num_train_epochs",
            self.num_train_epochs,
            "must be > 0 and finite",
        )
        require(self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs, "must be >= 0")
        for name in ("c_forget", "c_rt", "c_rtkl", "c_fgkl"):
            value = getattr(self, name)
            require(value is None or value >= 0, name, value, "must be >= 0")
        require(self.beta is None or self.beta > 0, "beta", self.beta, "must be > 0")
        for name in ("retain_bound", "dual_step_size", "dual_warmup_epochs"):
            value = getattr(self, name)
            require(value is None or 0 <= value < math.inf, name, value, "must be >= 0 and finite")
        require(self.hidden_layer >= 0, "hidden_layer", self.hidden_layer, "must be >= 0")
        for pattern in self.trainable_params:
            try:
                re.compile(pattern)
            except re.error as e:
                raise NegprefError(f"trainable_params: {pattern!r} is not a regex ({e})") from None

    def resolved(self) -> UnlearnConfig:
        """A copy with every preset-dependent field (None) filled from the preset."""
        self.validate()
        preset = PRESETS[self.method]
        fill = {
            name: getattr(preset, name)
            for name in ("beta", "gamma", "c_forget", "c_rt", "c_rtkl", "c_fgkl", "retain_bound")
            if getattr(self, name) is None
        }
        return self.replace(**fill)

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
            retain_bound=r.retain_bound,
        )
