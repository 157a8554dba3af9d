"""``negpref eval``: evaluate a model on TOFU, or re-aggregate saved per-item logs.

negpref eval --benchmark tofu --split forget10 --model DIR --out DIR [--limit 300]
negpref eval ... --retain-logs TOFU_EVAL.json --log-format open-unlearning
negpref eval aggregate --logs RUN.json --retain-logs RETAIN.json --json
negpref eval --benchmark muse --forget-text F --holdout-text H --qa Q --model DIR --out DIR

Logs are read in TOFU's format or open-unlearning's (TOFU_EVAL.json), detected automatically.
negpref eval --alignment ...   (alignment metrics, ``negpref.eval.alignment``)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field

from negpref.config import add_config_arguments, build_config, config_to_dict, require
from negpref.conventions import CONVENTIONS, DEFAULT, get_conventions
from negpref.data.qa import PromptFormat, prompt_field, prompt_from_config
from negpref.errors import NegprefError
from negpref.eval import alignment
from negpref.eval import muse as muse_defaults
from negpref.eval.open_unlearning import FORMATS
from negpref.eval.tofu_logs import DEFAULT_PRIVLEAK_REF_AUC, META_KEY


def _f(help_text: str, **meta) -> dict:
    return {"help": help_text, **meta}


@dataclass
class EvalConfig:
    benchmark: str = field(
        default="tofu", metadata=_f("benchmark to run", choices=["tofu", "muse"])
    )
    split: str = field(
        default="forget10", metadata=_f("TOFU forget split: forget01/05/10/20/30/50/90")
    )
    model: str | None = field(default=None, metadata=_f("model: a local HF directory (or hub id)"))
    gguf: str | None = field(default=None, metadata=_f("GGUF file (path, or name in --model)"))
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
        metadata=_f("draw --limit items at random with this seed (default: the first ones)"),
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
        metadata=_f("retain AUC for PrivLeak when --retain-logs have no MIA scores (null: none)"),
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
        metadata=_f("MUSE: pre-cut verbmem file (prompt, gt), instead of cutting --forget-text"),
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
        metadata=_f("greedy generation for ROUGE (--no-generation: probabilities only)"),
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
    overwrite: bool = field(default=False, metadata=_f("replace an existing --out folder"))

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
            "MUSE needs a forget corpus (or --verbmem records)",
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
        self.prompt_format()  # a bad --fallback-template fails before the model loads

    def prompt_format(self) -> PromptFormat:
        return prompt_from_config(self)


def _check_ref_auc(value: float | None) -> None:
    ok = value is None or 0 <= value < 1
    require(ok, "privleak_ref_auc", value, "must be in [0, 1) (PrivLeak divides by 1 - AUC)")


@dataclass
class AggregateConfig:
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
        metadata=_f("retain AUC for PrivLeak when --retain-logs have no MIA scores (null: none)"),
    )
    out: str | None = field(default=None, metadata=_f("also write aggregate.json to this folder"))
    overwrite: bool = field(default=False, metadata=_f("replace an existing --out folder"))

    def validate(self) -> None:
        require(bool(self.logs), "logs", self.logs, "give a logs JSON file")
        _check_ref_auc(self.privleak_ref_auc)


def register(sub) -> None:
    parser = sub.add_parser(
        "eval",
        help="evaluate a model (TOFU, alignment) or re-aggregate saved logs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        conflict_handler="resolve",
    )
    add_config_arguments(parser, EvalConfig)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--alignment",
        action="store_true",
        help="alignment metrics instead of a benchmark (negpref.eval.alignment)",
    )
    alignment.add_arguments(parser)
    parser.set_defaults(func=run_eval)

    commands = parser.add_subparsers(dest="eval_command", metavar="COMMAND")
    agg = commands.add_parser(
        "aggregate",
        help="recompute model utility / forget quality from saved per-item logs",
        description="Recompute TOFU's aggregates from per-item logs (ours or TOFU's published).",
    )
    add_config_arguments(agg, AggregateConfig)
    agg.add_argument("--json", action="store_true", help="print the results as JSON")
    agg.set_defaults(func=run_aggregate)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _print(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        if not isinstance(value, dict):
            print(f"{key:>28}: {value if not isinstance(value, float) else f'{value:.6g}'}")


def run_aggregate(args) -> int:
    from negpref.eval.tofu_logs import aggregate, check_retain_logs, load_logs
    from negpref.io import atomic_write_json, staged_out_dir

    config = build_config(AggregateConfig, args)
    logs = load_logs(config.logs, "--logs")
    retain_logs = None
    if config.retain_logs:
        retain_logs = load_logs(config.retain_logs, "--retain-logs")
        check_retain_logs(logs, retain_logs, f"--retain-logs {config.retain_logs}")
    result = aggregate(logs, retain_logs, config.privleak_ref_auc)
    if config.out:
        with staged_out_dir(config.out, config.overwrite) as stage:
            atomic_write_json(stage / "aggregate.json", result)
    _print(result, args.json)
    return 0


def _check_attack_nonmembers(config: EvalConfig, have_nonmembers: bool, how: str) -> None:
    """The reference / GradNorm attacks score members against non-members: refuse them
    without any, rather than load a second model for nothing."""
    asked = [
        f
        for f, on in (
            ("--mia-ref-model", config.mia_ref_model),
            ("--mia-gradnorm", config.mia_gradnorm),
        )
        if on
    ]
    if asked and not have_nonmembers:
        raise NegprefError(
            f"{' and '.join(asked)}: membership inference needs non-members; give {how}"
        )


def _load_models(config: EvalConfig):
    """The evaluated model and tokenizer, the KL reference and the MIA reference (or None)."""
    from negpref.models import ModelSpec, load_model

    device = _device(config.device)
    spec = dict(
        dtype=config.dtype,
        allow_pickle=config.allow_pickle,
        trust_remote_code=config.trust_remote_code,
    )
    model, tokenizer = load_model(ModelSpec(config.model or "", config.gguf, **spec), device)
    ref_model = mia_ref_model = None
    if config.ref_model or config.ref_gguf:
        ref_model, _ = load_model(
            ModelSpec(config.ref_model or "", config.ref_gguf, **spec), device
        )
    if config.mia_ref_model:
        mia_ref_model, _ = load_model(ModelSpec(config.mia_ref_model, None, **spec), device)
    return model, tokenizer, ref_model, mia_ref_model


def run_eval(args) -> int:
    if args.alignment:
        return int(alignment.main(args) or 0)
    config = build_config(EvalConfig, args)
    if config.benchmark == "muse":
        return run_muse(config, args.json)

    from negpref.eval.tofu import evaluate_tofu, load_tofu_sets
    from negpref.eval.tofu_logs import (
        aggregate,
        check_logs,
        check_retain_logs_match_sets,
        load_logs,
        write_logs,
    )
    from negpref.io import atomic_write_json, check_out_dir, staged_out_dir

    # Everything a user can get wrong is checked before the model loads.
    check_out_dir(config.out, overwrite=config.overwrite)
    sets = load_tofu_sets(
        config.data_dir, config.split, config.limit, config.sample_seed, config.holdout
    )
    retain_logs = None
    if config.retain_logs:
        retain_logs = load_logs(config.retain_logs, "--retain-logs")
        check_logs(retain_logs, f"--retain-logs {config.retain_logs}")
        check_retain_logs_match_sets(retain_logs, sets, f"--retain-logs {config.retain_logs}")
    _check_attack_nonmembers(config, sets.holdout is not None, "--holdout FILE (or holdoutNN.json)")

    model, tokenizer, ref_model, mia_ref_model = _load_models(config)
    start = time.perf_counter()
    logs = evaluate_tofu(
        model,
        tokenizer,
        sets,
        batch_size=config.batch_size,
        max_new_tokens=config.max_new_tokens,
        max_length=config.max_length,
        ref_model=ref_model,
        mia_k=config.mia_k,
        progress=not args.json,
        prompt=config.prompt_format(),
        conventions=config.conventions,
        generate=config.generation,
        mia_ref_model=mia_ref_model,
        gradnorm=config.mia_gradnorm,
    )
    seconds = time.perf_counter() - start
    result = aggregate(logs, retain_logs, config.privleak_ref_auc)
    result["run"] = {
        "config": config_to_dict(config),
        "sets": {
            kind: s.source
            for kind, s in {**sets.present(), "holdout": sets.holdout}.items()
            if s is not None
        },
        "prompt_format": logs[META_KEY]["prompt_format"],
        "eval_seconds": seconds,
    }
    with staged_out_dir(config.out, config.overwrite) as stage:
        write_logs(stage, logs, result, config.log_format)
        atomic_write_json(stage / "aggregate.json", result)
    _print(result, args.json)
    return 0


def run_muse(config: EvalConfig, as_json: bool) -> int:
    """``--benchmark muse``: MUSE logs (``muse_logs.json``) and their aggregate."""
    from negpref.eval import muse
    from negpref.io import atomic_write_json, check_out_dir, staged_out_dir

    check_out_dir(config.out, overwrite=config.overwrite)
    sets = muse.load_muse_sets(
        config.forget_text,
        config.holdout_text,
        config.qa,
        config.retain_qa,
        config.verbmem,
        limit=config.limit,
        seed=config.sample_seed,
    )
    retain_logs = muse.load_muse_logs(config.retain_logs) if config.retain_logs else None
    _check_attack_nonmembers(config, sets.holdout_text is not None, "--holdout-text FILE")
    model, tokenizer, _, mia_ref_model = _load_models(config)
    start = time.perf_counter()
    logs = muse.evaluate_muse(
        model,
        tokenizer,
        sets,
        prefix_tokens=config.prefix_tokens,
        continuation_tokens=config.continuation_tokens,
        qa_max_new_tokens=config.qa_max_new_tokens,
        batch_size=config.batch_size,
        mia_k=config.mia_k,
        prompt=config.prompt_format(),
        conventions=config.conventions,
        mia_ref_model=mia_ref_model,
        gradnorm=config.mia_gradnorm,
        progress=not as_json,
    )
    result = muse.aggregate_muse(logs, retain_logs, config.privleak_ref_auc)
    result["run"] = {
        "config": config_to_dict(config),
        "sets": sets.sources,
        "prompt_format": logs[META_KEY]["prompt_format"],
        "eval_seconds": time.perf_counter() - start,
    }
    with staged_out_dir(config.out, config.overwrite) as stage:
        atomic_write_json(stage / muse.LOGS_FILE, logs)
        atomic_write_json(stage / "aggregate.json", result)
    _print(result, as_json)
    return 0
