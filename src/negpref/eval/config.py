"""``EvalConfig`` and ``AggregateConfig``: the settings of an evaluation job and of a
re-aggregation of saved per-item logs, documented, YAML- and flag-loadable (``negpref.config``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from negpref.config import require
from negpref.conventions import CONVENTIONS, DEFAULT, get_conventions
from negpref.data.qa import PromptFormat, prompt_field, prompt_from_config
from negpref.eval import muse as muse_defaults
from negpref.eval.open_unlearning import FORMATS
from negpref.eval.tofu_logs import DEFAULT_PRIVLEAK_REF_AUC


def _f(help_text: str, **meta) -> dict:
    return {"help": help_text, **meta}


@dataclass
class EvalConfig:
    """Settings of ``negpref eval`` / ``negpref.eval.run``: one model on one benchmark."""

    benchmark: str = field(
        default="tofu", metadata=_f("benchmark to run", choices=["tofu", "muse"])
    )
    split: str = field(
        default="forget10", metadata=_f("TOFU forget split: forget01/05/10/20/30/50/90")
    )
    model: str | None = field(default=None, metadata=_f("model: a local HF directory (or hub id)"))
    gguf: str | None = field(default=None, metadata=_f("GGUF file (path, or name in model)"))
    dtype: str = field(
        default="auto",
        metadata=_f("weights dtype", choices=["auto", "float32", "bfloat16", "float16"]),
    )
    allow_pickle: bool = field(default=False, metadata=_f("allow pickle (.bin) weights"))
    trust_remote_code: bool = field(default=False, metadata=_f("run code shipped with the model"))
    device: str = field(default="auto", metadata=_f("cpu, cuda, cuda:N or auto"))
    data_dir: str | None = field(
        default=None,
        metadata=_f("TOFU-format data folder (default: $NEGPREF_TOFU_DIR, ../shared/data/tofu)"),
    )
    limit: int | None = field(
        default=None, metadata=_f("items per evaluation set (TOFU uses 300; default: all)")
    )
    sample_seed: int | None = field(
        default=None,
        metadata=_f("draw limit items at random with this seed (default: the first ones)"),
    )
    holdout: str | None = field(
        default=None,
        metadata=_f("QA file of non-members for membership inference (default: holdoutNN.json)"),
    )
    retain_logs: str | None = field(
        default=None,
        metadata=_f(
            "retain model's logs (TOFU format or open-unlearning's TOFU_EVAL.json, or a folder "
            "holding one): the forget-quality and PrivLeak reference"
        ),
    )
    privleak_ref_auc: float | None = field(
        default=DEFAULT_PRIVLEAK_REF_AUC,
        metadata=_f("retain AUC for PrivLeak when retain_logs have no MIA scores (null: none)"),
    )
    ref_model: str | None = field(
        default=None, metadata=_f("model before unlearning, for forget / retain KL")
    )
    ref_gguf: str | None = field(default=None, metadata=_f("GGUF file of the reference model"))
    mia_ref_model: str | None = field(
        default=None,
        metadata=_f("model that never saw the forget set (e.g. retain model): reference MIA"),
    )
    mia_gradnorm: bool = field(
        default=False, metadata=_f("also the GradNorm MIA (one backward per scored item)")
    )
    forget_text: str | None = field(
        default=None, metadata=_f("MUSE: forget corpus (records with 'text')")
    )
    holdout_text: str | None = field(
        default=None, metadata=_f("MUSE: holdout corpus (non-members) for PrivLeak")
    )
    qa: str | None = field(
        default=None, metadata=_f("MUSE: forget QA file (question, answer) for knowmem")
    )
    retain_qa: str | None = field(default=None, metadata=_f("MUSE: retain QA file for knowmem"))
    verbmem: str | None = field(
        default=None,
        metadata=_f("MUSE: pre-cut verbmem file (prompt, gt), instead of cutting forget_text"),
    )
    prefix_tokens: int = field(
        default=muse_defaults.PREFIX_TOKENS, metadata=_f("MUSE verbmem: prefix length in tokens")
    )
    continuation_tokens: int = field(
        default=muse_defaults.CONTINUATION_TOKENS,
        metadata=_f("MUSE verbmem: continuation length in tokens (generated and compared)"),
    )
    qa_max_new_tokens: int = field(
        default=muse_defaults.QA_MAX_NEW_TOKENS, metadata=_f("MUSE knowmem: answer length")
    )
    batch_size: int = field(default=8, metadata=_f("sequences per forward / generation batch"))
    max_new_tokens: int = field(default=200, metadata=_f("greedy generation length"))
    max_length: int = field(default=512, metadata=_f("max tokens of question + answer"))
    mia_k: float | None = field(
        default=None,
        metadata=_f(
            "fraction of tokens for Min-K%% / Min-K%%++ (default: 0.2, open-unlearning 0.4)"
        ),
    )
    conventions: str = field(
        default=DEFAULT,
        metadata=_f(
            "npo, or open-unlearning's (Min-K%% without EOS, k=0.4); docs/conventions.md",
            choices=list(CONVENTIONS),
        ),
    )
    system_prompt: str | None = prompt_field("system_prompt")
    chat_template: bool = prompt_field("chat_template")
    fallback_template: str = prompt_field("fallback_template")
    generation: bool = field(
        default=True,
        metadata=_f("greedy generation for ROUGE (off: probabilities only)"),
    )
    log_format: str = field(
        default="tofu",
        metadata=_f(
            "per-item logs as TOFU's logs.json or open-unlearning's TOFU_EVAL.json + "
            "TOFU_SUMMARY.json",
            choices=list(FORMATS),
        ),
    )
    out: str | None = field(default=None, metadata=_f("output folder (logs, aggregate.json)"))
    overwrite: bool = field(default=False, metadata=_f("replace an existing out folder"))

    def validate(self) -> None:
        require(bool(self.model or self.gguf), "model", self.model, "give a model to evaluate")
        require(bool(self.out), "out", self.out, "give an output folder")
        require(self.limit is None or self.limit >= 1, "limit", self.limit, "must be >= 1")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1")
        require(self.max_length >= 8, "max_length", self.max_length, "must be >= 8")
        require(self.mia_k is None or 0 < self.mia_k <= 1, "mia_k", self.mia_k, "must be in (0, 1]")
        _check_ref_auc(self.privleak_ref_auc)
        muse = self.benchmark == "muse"
        require(
            not muse or bool(self.forget_text or self.verbmem),
            "forget_text",
            self.forget_text,
            "MUSE needs a forget corpus (or verbmem records)",
        )
        require(self.prefix_tokens >= 1, "prefix_tokens", self.prefix_tokens, "must be >= 1")
        require(
            self.continuation_tokens >= 1,
            "continuation_tokens",
            self.continuation_tokens,
            "must be >= 1",
        )
        require(
            self.qa_max_new_tokens >= 1, "qa_max_new_tokens", self.qa_max_new_tokens, "must be >= 1"
        )
        require(
            not muse or self.log_format == "tofu",
            "log_format",
            self.log_format,
            "MUSE logs have one format (muse_logs.json)",
        )
        get_conventions(self.conventions)
        self.prompt_format()  # a bad fallback_template fails before the model loads

    def prompt_format(self) -> PromptFormat:
        return prompt_from_config(self)


def _check_ref_auc(value: float | None) -> None:
    ok = value is None or 0 <= value < 1
    require(ok, "privleak_ref_auc", value, "must be in [0, 1) (PrivLeak divides by 1 - AUC)")


@dataclass
class AggregateConfig:
    """Settings of ``negpref eval aggregate`` / ``negpref.eval.run_aggregate``."""

    logs: str | None = field(
        default=None,
        metadata=_f("logs to aggregate (TOFU format or open-unlearning's TOFU_EVAL.json)"),
    )
    retain_logs: str | None = field(
        default=None,
        metadata=_f("retain model's logs (either format): the forget-quality reference"),
    )
    privleak_ref_auc: float | None = field(
        default=DEFAULT_PRIVLEAK_REF_AUC,
        metadata=_f("retain AUC for PrivLeak when retain_logs have no MIA scores (null: none)"),
    )
    out: str | None = field(default=None, metadata=_f("also write aggregate.json to this folder"))
    overwrite: bool = field(default=False, metadata=_f("replace an existing out folder"))

    def validate(self) -> None:
        require(bool(self.logs), "logs", self.logs, "give a logs JSON file")
        _check_ref_auc(self.privleak_ref_auc)
