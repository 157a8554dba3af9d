"""Running ``negpref demo``: the per-seed tasks in worker processes, then the summary, the
report and ``summary.json``, staged and renamed into ``--out`` at the end."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from negpref.config import config_to_dict
from negpref.data.fictitious import (
    FACT_KEYS,
    Corpus,
    forget_author_count,
    general_training_records,
    generate_corpus,
    write_corpus,
)
from negpref.errors import NegprefError
from negpref.io import atomic_write_json, check_out_dir, staged_out_dir
from negpref.studies.demo.findings import (
    SPREAD,
    VERDICT_RULE,
    best_with_utility_kept,
    over_seeds,
    paper_findings,
)
from negpref.studies.demo.models import (
    DONE,
    cache_entry,
    default_cache_dir,
    model_entries,
    prepare_tokenizer,
    train_model,
)
from negpref.studies.demo.settings import (
    EVAL_BATCH,
    MAX_LENGTH,
    DemoConfig,
    command_line,
    environment,
    retain_split_of,
)
from negpref.threads import single_threaded


def _say(message: str) -> None:
    print(f"negpref demo: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _without_load_bars():
    """transformers' per-file load/save bars drown the demo's own progress; off meanwhile."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _train_log(path: Path) -> dict:
    log = _read_json(path)
    return {k: v for k, v in log.items() if k != "loss_per_step"}


# --------------------------------------------------------------------- per-seed tasks


@dataclass(frozen=True)
class RunContext:
    """What every task of one run shares (sent to the worker processes)."""

    config: DemoConfig
    corpus: Corpus
    corpus_dir: str
    tokenizer_dir: str
    cache_dir: str
    run_dir: str

    def seed_dir(self, seed: int) -> Path:
        return Path(self.run_dir) / "seeds" / f"seed-{seed}"

    def eval_options(self) -> dict:
        return dict(
            batch_size=EVAL_BATCH,
            max_new_tokens=self.config.profile().max_new_tokens,
            max_length=MAX_LENGTH,
            # the committed figures were computed one sequence per answer and with
            # model.generate: the same code path keeps them bit for bit on the same CPU
            share_prompts=False,
            drop_finished_rows=False,
        )


def _load(path: Path):
    from negpref.models import ModelSpec, load_model

    # float32 on every CPU (auto would load bf16 weights where bf16 is native): one set of figures
    return load_model(ModelSpec(path=str(path), dtype="float32"), "cpu")


@single_threaded()
def model_task(ctx: RunContext, seed: int, role: str) -> dict:
    """Train (or take from the cache) the ``role`` model of ``seed`` and evaluate it: writes
    ``seeds/seed-N/{role}_logs.json``; returns where the model is and its training log."""
    from negpref.eval import evaluate_tofu, load_tofu_sets
    from negpref.models import ModelSpec, load_tokenizer, save_model

    config, corpus = ctx.config, ctx.corpus
    train_split = "full" if role == "target" else retain_split_of(config.split)
    records = corpus.files[train_split] + general_training_records(corpus)
    entry = model_entries(config, corpus, seed, Path(ctx.cache_dir))[role]

    def build(stage: Path) -> None:
        _say(f"seed {seed}: training the {role} model on {len(records)} records")
        tokenizer = load_tokenizer(ModelSpec(path=ctx.tokenizer_dir))
        model, log = train_model(records, tokenizer, config.profile(), seed, stage / "run")
        save_model(model, tokenizer, stage / "model")
        shutil.rmtree(stage / "run")
        atomic_write_json(stage / DONE, log)

    with _without_load_bars():
        entry, cached = cache_entry(entry, build)
        model, tokenizer = _load(entry / "model")
    sets = load_tofu_sets(ctx.corpus_dir, config.split)
    logs = evaluate_tofu(model, tokenizer, sets, **ctx.eval_options())
    ctx.seed_dir(seed).mkdir(parents=True, exist_ok=True)
    atomic_write_json(ctx.seed_dir(seed) / f"{role}_logs.json", logs)
    return {
        "dir": str(entry / "model"),
        "cached": cached,
        "train": _train_log(entry / DONE),
        "parameters": sum(t.numel() for t in model.parameters()),
        "vocab_size": len(tokenizer),
    }


# -------------------------------------------------------------------------- evaluation


def _scalars(record: dict) -> dict:
    """The numbers of one evaluation (nested counts and the logs path left out)."""
    return {k: v for k, v in record.items() if v is None or isinstance(v, (int, float))}


def _forget_ratios(logs: dict) -> list[float]:
    from negpref.eval.tofu_files import FORGET_FILE

    return [v for v in logs[FORGET_FILE]["truth_ratio"].values()]


def _generations(logs: dict) -> dict[str, dict[str, list]]:
    """Eval file -> item key -> [question, generation, answer]."""
    return {file: per_metric.get("generated_text", {}) for file, per_metric in logs.items()}


def pick_samples(sets, logs_by_model: dict[str, dict], per_set: int = 2) -> dict[str, list[dict]]:
    """The same few questions of each set, with every model's greedy answer."""
    from negpref.eval.tofu_files import EVAL_FILES

    chosen = {
        "forget": [("forget", k) for k in sets.forget.keys[:per_set]],
        "retain": [("retain", k) for k in sets.retain.keys[:per_set]],
        "general": [
            (kind, getattr(sets, kind).keys[0])
            for kind in ("real_authors", "world_facts")
            if getattr(sets, kind) is not None
        ],
    }
    generations = {name: _generations(logs) for name, logs in logs_by_model.items()}
    samples: dict[str, list[dict]] = {}
    for group, items in chosen.items():
        samples[group] = []
        for kind, key in items:
            file = EVAL_FILES[kind]
            first = next(iter(generations.values()))[file][key]
            samples[group].append(
                {
                    "question": first[0],
                    "answer": first[2],
                    "generations": {n: g[file][key][1] for n, g in generations.items()},
                }
            )
    return samples


def _method_dir(method: str) -> str:
    return method.lower().replace("+", "_")


def unlearn_method(
    method: str, ctx: RunContext, seed: int, target, tokenizer, sets, retain_logs: dict
) -> dict:
    """Unlearn the forget split from ``seed``'s target with one method, evaluating after
    every epoch."""
    from negpref import unlearn
    from negpref.eval import TofuEvalCallback, peak_forget_quality

    config, corpus = ctx.config, ctx.corpus
    p = config.profile()
    run_dir = Path(ctx.run_dir)
    method_dir = ctx.seed_dir(seed) / "methods" / _method_dir(method)
    unlearn_config = unlearn.UnlearnConfig(
        method=method,
        beta=p.beta,
        learning_rate=p.unlearn_lr,
        num_train_epochs=p.unlearn_epochs,
        per_device_train_batch_size=p.unlearn_batch,
        gradient_accumulation_steps=1,
        max_length=MAX_LENGTH,
        seed=seed,
        use_cpu=True,
        mixed_precision="no",  # figures independent of the CPU (no bf16 on AMX)
        output_dir=str(method_dir),
        save_strategy="no",
        verbosity="quiet",  # the demo reports its own progress
        save_model=False,
    )
    groups = unlearn_config.objective().groups
    callback = TofuEvalCallback(
        sets, retain_logs=retain_logs, ref_model=target, **ctx.eval_options()
    )
    start = time.perf_counter()
    result = unlearn.run(
        unlearn_config,
        model=target,
        tokenizer=tokenizer,
        forget_records=corpus.files[config.split],
        retain_records=corpus.files[retain_split_of(config.split)] if "retain" in groups else None,
        idk_answers=corpus.idk_answers if "refusal" in groups else None,
        callbacks=[callback],
    )
    seconds = time.perf_counter() - start
    evals = result.evals
    peak = peak_forget_quality(evals[1:]) or evals[-1]  # step 0 is the target itself

    def logs_at(record: dict) -> dict:
        return _read_json(method_dir / record["logs_path"])

    target_utility = evals[0]["model_utility"]
    return {
        "forget_quality": peak.get("forget_quality"),
        "model_utility": peak.get("model_utility"),
        "forget_truth_ratio": peak.get("forget_truth_ratio"),
        "forget_kl": peak.get("forget_kl"),
        "peak_epoch": round(peak["epoch"], 3),
        "peak_step": peak["step"],
        "final": _scalars(evals[-1]),
        "utility_kept": _scalars(best_with_utility_kept(evals, target_utility) or {}) or None,
        "epochs": [
            {**_scalars(e), "logs_path": str((method_dir / e["logs_path"]).relative_to(run_dir))}
            for e in evals
        ],
        "steps": result.summary["steps"],
        "seconds": seconds,
        "_peak_forget_ratios": _forget_ratios(logs_at(peak)),
        "_final_logs": logs_at(evals[-1]),
    }


@single_threaded()
def method_task(ctx: RunContext, seed: int, method: str) -> dict:
    """One method on one seed: its target from the cache, its retain logs from the run."""
    from negpref.eval import load_tofu_sets

    entry = model_entries(ctx.config, ctx.corpus, seed, Path(ctx.cache_dir))["target"]
    with _without_load_bars():
        target, tokenizer = _load(entry / "model")
    sets = load_tofu_sets(ctx.corpus_dir, ctx.config.split)
    retain_logs = _read_json(ctx.seed_dir(seed) / "retain_logs.json")
    _say(f"seed {seed}: unlearning {ctx.config.split} with {method}")
    return unlearn_method(method, ctx, seed, target, tokenizer, sets, retain_logs)


# ---------------------------------------------------------------------------------- run


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[Callable]:
    """``run(fn, tasks) -> [fn(*task) for task in tasks]`` in ``workers`` spawned processes
    (in this one when 1), results in task order."""
    if workers == 1:
        yield lambda fn, tasks: [fn(*task) for task in tasks]
        return
    # spawn: a fresh interpreter per worker, no forked torch thread pools
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:

        def run(fn, tasks):
            futures = [pool.submit(fn, *task) for task in tasks]
            try:
                return [f.result() for f in futures]
            except BaseException:
                pool.shutdown(cancel_futures=True)  # the running tasks end, no new one starts
                raise

        yield run


def seed_summary(ctx: RunContext, seed: int, models: dict, methods: dict) -> dict:
    """One seed's study, as a single-seed demo reports it, with its paper findings."""
    from negpref.eval import aggregate

    logs = {role: _read_json(ctx.seed_dir(seed) / f"{role}_logs.json") for role in models}
    summary = {
        "seed": seed,
        "target": _scalars(aggregate(logs["target"], logs["retain"])),
        "retain": _scalars(aggregate(logs["retain"], logs["retain"])),
        "methods": {
            name: {k: v for k, v in m.items() if not k.startswith("_")}
            for name, m in methods.items()
        },
        "forget_truth_ratios": {
            "retain": _forget_ratios(logs["retain"]),
            "target": _forget_ratios(logs["target"]),
            **{name: m["_peak_forget_ratios"] for name, m in methods.items()},
        },
        "models": {
            role: {k: info[k] for k in ("dir", "cached", "train")} for role, info in models.items()
        },
    }
    summary["findings"] = paper_findings(summary)
    return summary


@single_threaded()
def run_demo(config: DemoConfig) -> dict:
    """Run the study into ``config.out``; return the summary (also in ``summary.json``).

    One torch thread per process: the demo's half-million-parameter model gains nothing from
    a second intra-op thread and loses to its synchronisation; the cores go to the seeds.
    """
    from negpref.eval import load_tofu_sets
    from negpref.studies.demo.report import build_demo_report

    config.validate()
    check_out_dir(config.out, overwrite=config.overwrite)
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    _check_writable(cache_dir, "--cache-dir")
    start = time.perf_counter()
    p = config.profile()
    corpus = generate_corpus(config.corpus_config())
    model_tasks = [(seed, role) for seed in config.seeds for role in ("target", "retain")]
    method_tasks = [(seed, method) for seed in config.seeds for method in config.methods]
    workers = config.worker_count(len(method_tasks))
    with _without_load_bars(), staged_out_dir(config.out, overwrite=config.overwrite) as stage:
        corpus_dir = write_corpus(corpus, stage / "corpus")
        ctx = RunContext(
            config=config,
            corpus=corpus,
            corpus_dir=str(corpus_dir),
            tokenizer_dir=str(prepare_tokenizer(corpus, p, cache_dir)),
            cache_dir=str(cache_dir),
            run_dir=str(stage),
        )
        _say(
            f"{len(config.seeds)} seeds x ({len(config.methods)} methods + target and retain "
            f"models) in {workers} worker process{'es' if workers > 1 else ''}"
        )
        with worker_pool(workers) as run:
            models = run(model_task, [(ctx, *task) for task in model_tasks])
            models_s = time.perf_counter() - start
            methods = run(method_task, [(ctx, *task) for task in method_tasks])
        unlearn_s = time.perf_counter() - start - models_s
        models_of = dict(zip(model_tasks, models, strict=True))
        methods_of = dict(zip(method_tasks, methods, strict=True))
        per_seed = [
            seed_summary(
                ctx,
                seed,
                {role: models_of[seed, role] for role in ("target", "retain")},
                {name: methods_of[seed, name] for name in config.methods},
            )
            for seed in config.seeds
        ]
        sets = load_tofu_sets(corpus_dir, config.split)
        first = config.seeds[0]
        n_forget_authors = forget_author_count(
            corpus.config.n_authors, int(config.split.removeprefix("forget"))
        )
        target_info = models_of[first, "target"]
        summary = {
            "command": command_line(config),
            "environment": environment(workers),
            "config": config_to_dict(config),
            "profile": vars(p),
            "split": config.split,
            "seeds": list(config.seeds),
            "spread": SPREAD,
            "verdict_rule": VERDICT_RULE,
            "corpus": {
                "seed": config.corpus_seed,
                "n_authors": corpus.config.n_authors,
                "facts_per_author": len(FACT_KEYS),
                "train_phrasings": corpus.config.train_phrasings,
                "n_train_records": len(corpus.files["full"]),
                "n_general_records": len(general_training_records(corpus)),
                "n_forget_authors": n_forget_authors,
                "n_forget_records": len(corpus.files[config.split]),
                "n_forget_eval": len(sets.forget),
                "dir": "corpus",
            },
            "model": {
                "description": (
                    f"Llama architecture, {p.layers} layers, hidden size {p.hidden_size}, "
                    f"{target_info['parameters'] / 1e6:.2f}M parameters, BPE vocabulary of "
                    f"{target_info['vocab_size']}"
                ),
                "parameters": target_info["parameters"],
            },
            **over_seeds(per_seed),
            "per_seed": per_seed,
            "timing": {
                "cached": all(m["cached"] for m in models),
                "models_s": models_s,
                "unlearn_s": unlearn_s,
                "total_s": time.perf_counter() - start,
            },
        }
        first_dir = ctx.seed_dir(first)
        samples = pick_samples(
            sets,
            {
                "target": _read_json(first_dir / "target_logs.json"),
                "retain": _read_json(first_dir / "retain_logs.json"),
                **{name: methods_of[first, name]["_final_logs"] for name in config.methods},
            },
        )
        build_demo_report(summary, samples, stage / "report.html")
        atomic_write_json(stage / "samples.json", samples)
        atomic_write_json(stage / "summary.json", summary)
    return summary


def _check_writable(path: Path, option: str) -> None:
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise NegprefError(f"{option} {path}: {probe} is not a writable directory")
