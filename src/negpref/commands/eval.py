"""``negpref eval``: evaluate a model on TOFU, or re-aggregate saved per-item logs.

negpref eval --benchmark tofu --split forget10 --model DIR --out DIR [--limit 300]
negpref eval aggregate --logs RUN.json --retain-logs RETAIN.json --json
negpref eval --alignment ...   (alignment metrics, ``negpref.eval.alignment``)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field

from negpref.config import add_config_arguments, build_config, config_to_dict, require
from negpref.eval import alignment


def _f(help_text: str, **meta) -> dict:
    return {"help": help_text, **meta}


@dataclass
class EvalConfig:
    benchmark: str = field(default="tofu", metadata=_f("benchmark to run", choices=["tofu"]))
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
        default=None, metadata=_f("retain model's logs JSON: the forget-quality reference")
    )
    ref_model: str | None = field(
        default=None, metadata=_f("model before unlearning, for forget / retain KL")
    )
    ref_gguf: str | None = field(default=None, metadata=_f("GGUF file of the reference model"))
    batch_size: int = field(default=8, metadata=_f("sequences per forward / generation batch"))
    max_new_tokens: int = field(default=200, metadata=_f("greedy generation length"))
    max_length: int = field(default=512, metadata=_f("max tokens of question + answer"))
    mia_k: float = field(default=0.2, metadata=_f("fraction of tokens for Min-K%% / Min-K%%++"))
    out: str | None = field(default=None, metadata=_f("output folder (logs.json, aggregate.json)"))
    overwrite: bool = field(default=False, metadata=_f("replace an existing --out folder"))

    def validate(self) -> None:
        require(bool(self.model or self.gguf), "model", self.model, "give a model to evaluate")
        require(bool(self.out), "out", self.out, "give an output folder")
        require(self.limit is None or self.limit >= 1, "limit", self.limit, "must be >= 1")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1")
        require(self.max_length >= 8, "max_length", self.max_length, "must be >= 8")
        require(0 < self.mia_k <= 1, "mia_k", self.mia_k, "must be in (0, 1]")


@dataclass
class AggregateConfig:
    logs: str | None = field(default=None, metadata=_f("logs JSON to aggregate (TOFU format)"))
    retain_logs: str | None = field(
        default=None, metadata=_f("retain model's logs JSON: the forget-quality reference")
    )
    out: str | None = field(default=None, metadata=_f("also write aggregate.json to this folder"))
    overwrite: bool = field(default=False, metadata=_f("replace an existing --out folder"))

    def validate(self) -> None:
        require(bool(self.logs), "logs", self.logs, "give a logs JSON file")


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
    result = aggregate(logs, retain_logs)
    if config.out:
        with staged_out_dir(config.out, config.overwrite) as stage:
            atomic_write_json(stage / "aggregate.json", result)
    _print(result, args.json)
    return 0


def run_eval(args) -> int:
    if args.alignment:
        return int(alignment.main(args) or 0)

    from negpref.eval.tofu import evaluate_tofu, load_tofu_sets
    from negpref.eval.tofu_logs import (
        aggregate,
        check_logs,
        check_retain_logs_match_sets,
        load_logs,
    )
    from negpref.io import atomic_write_json, check_out_dir, staged_out_dir
    from negpref.models import ModelSpec, load_model

    config = build_config(EvalConfig, args)
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

    device = _device(config.device)
    spec = dict(
        dtype=config.dtype,
        allow_pickle=config.allow_pickle,
        trust_remote_code=config.trust_remote_code,
    )
    model, tokenizer = load_model(ModelSpec(config.model or "", config.gguf, **spec), device)
    ref_model = None
    if config.ref_model or config.ref_gguf:
        ref_model, _ = load_model(
            ModelSpec(config.ref_model or "", config.ref_gguf, **spec), device
        )

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
    )
    seconds = time.perf_counter() - start
    result = aggregate(logs, retain_logs)
    result["run"] = {
        "config": config_to_dict(config),
        "sets": {
            kind: s.source
            for kind, s in {**sets.present(), "holdout": sets.holdout}.items()
            if s is not None
        },
        "eval_seconds": seconds,
    }
    with staged_out_dir(config.out, config.overwrite) as stage:
        atomic_write_json(stage / "logs.json", logs)
        atomic_write_json(stage / "aggregate.json", result)
    _print(result, args.json)
    return 0
