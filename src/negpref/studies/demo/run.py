"""``negpref demo``: the whole unlearning study on fictitious authors, on a laptop CPU.

1. A TOFU-like corpus (``negpref.data.fictitious``, one corpus seed) and a BPE tokenizer
   trained on it, shared by every seed.
2. Per seed: a small Llama trained on every record (the *target*) and one trained on the
   retain split only (the *retain* model, unlearning's gold standard). Both learn the
   general-knowledge facts. They are cached, keyed by a hash of everything that determines them.
3. Per seed and method: the forget split unlearned from that seed's target with
   ``negpref.unlearn.run``; the TOFU evaluation (``negpref.eval.TofuEvalCallback``) runs after
   every epoch.
4. Every figure as mean and spread over the seeds, each paper claim judged over the seeds,
   ``summary.json`` and a self-contained ``report.html`` (``negpref.report.demo_report``).

Seeds are independent replicates, run in worker processes (one torch thread each): the
numbers do not depend on how many workers run them. The run is staged and renamed into
``--out`` at the end: a failed run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from negpref import __version__
from negpref.config import config_to_dict, require
from negpref.data.fictitious import (
    FACT_KEYS,
    FORGET_PERCENTS,
    Corpus,
    CorpusConfig,
    corpus_texts,
    forget_author_count,
    general_training_records,
    generate_corpus,
    split_name,
    write_corpus,
)
from negpref.errors import NegprefError
from negpref.io import atomic_write_json, check_out_dir, staged_out_dir
from negpref.threads import single_threaded

DEFAULT_METHODS = ("NPO", "NPO+RT", "GA", "GA+RT", "GA+KL", "IDK+RT", "DPO+RT")
# Three seeds: the default study fits 10 minutes of a 2-core machine with an empty cache.
DEFAULT_SEEDS = (0, 1, 2)
SPLITS = tuple(split_name("forget", p) for p in FORGET_PERCENTS)
CACHE_ENV = "NEGPREF_CACHE_DIR"
CACHE_FORMAT = 2  # bump when cached entries change meaning (2: the tokenizer is its own entry)
MAX_LENGTH = 96  # tokens; the longest corpus question + answer is well under this
EVAL_BATCH = 64
# What the numbers depend on besides the code: the environment recorded in summary.json.
ENVIRONMENT_PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "accelerate",
    "safetensors",
    "numpy",
    "scipy",
    "rouge_score",
    "tensorboard",
)


@dataclass(frozen=True)
class Profile:
    """Sizes of a demo run: the corpus, the model, and both training loops."""

    n_authors: int
    train_phrasings: int
    n_general: int
    vocab_size: int
    hidden_size: int
    layers: int
    heads: int
    train_epochs: int
    train_lr: float
    train_batch: int
    unlearn_epochs: int
    unlearn_lr: float
    unlearn_batch: int
    # NPO/DPO inverse temperature. The paper's 0.1 is for TOFU answers of ~25 words; ours have
    # ~8, so per-answer log-ratios are ~3x smaller and a ~3x larger beta matches them.
    beta: float
    max_new_tokens: int


PROFILES = {
    "default": Profile(
        n_authors=40, train_phrasings=3, n_general=20, vocab_size=1024, hidden_size=96,
        layers=3, heads=4, train_epochs=20, train_lr=5e-3, train_batch=32,
        unlearn_epochs=10, unlearn_lr=5e-4, unlearn_batch=16, beta=0.3, max_new_tokens=32,
    ),
    "quick": Profile(
        n_authors=20, train_phrasings=3, n_general=10, vocab_size=768, hidden_size=64,
        layers=2, heads=4, train_epochs=20, train_lr=8e-3, train_batch=64,
        unlearn_epochs=4, unlearn_lr=1e-3, unlearn_batch=16, beta=0.3, max_new_tokens=24,
    ),
}  # fmt: skip


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class DemoConfig:
    """Settings of ``negpref demo``; sizes left unset come from the profile (default/quick)."""

    out: str = field(default="runs/demo", metadata=_help("run directory (report.html, ...)"))
    overwrite: bool = field(default=False, metadata=_help("replace an existing run directory"))
    quick: bool = field(
        default=False, metadata=_help("a smaller corpus, model and schedule (about a minute)")
    )
    seeds: list[int] = field(
        default_factory=lambda: list(DEFAULT_SEEDS),
        metadata=_help(
            "seeds of the models' initialisation and data order: one replicate of the study each"
        ),
    )
    corpus_seed: int = field(
        default=0, metadata=_help("seed of the fictitious corpus, shared by every seed")
    )
    jobs: int = field(
        default=0,
        metadata=_help("worker processes (0: one per CPU core); the numbers do not depend on it"),
    )
    methods: list[str] = field(
        default_factory=lambda: list(DEFAULT_METHODS),
        metadata=_help("unlearning methods (negpref unlearn presets, any case, comma or space)"),
    )
    split: str = field(
        default="forget10", metadata=_help("forget split (percent of authors)", choices=SPLITS)
    )
    cache_dir: str = field(
        default="",
        metadata=_help(
            f"where trained models are cached (default ${CACHE_ENV} or ~/.cache/negpref)"
        ),
    )
    n_authors: int | None = field(
        default=None, metadata=_help("fictitious authors, 10..48 (profile: 40; quick: 20)")
    )
    train_epochs: int | None = field(
        default=None,
        metadata=_help("epochs of training the target and retain models (profile: 20)"),
    )
    unlearn_epochs: int | None = field(
        default=None, metadata=_help("epochs of unlearning (profile: 10; quick: 4)")
    )
    unlearn_lr: float | None = field(
        default=None, metadata=_help("unlearning learning rate (profile: 5e-4; quick: 1e-3)")
    )
    beta: float | None = field(
        default=None,
        metadata=_help("inverse temperature of NPO, DPO+RT, ... (profile: 0.3, for short answers)"),
    )

    def validate(self) -> None:
        from negpref.unlearn.objectives import PRESETS, canonical_preset

        names = [n.strip() for item in self.methods for n in item.split(",") if n.strip()]
        require(bool(names), "methods", self.methods, "needs at least one method")
        canonical = []
        for name in names:
            preset = canonical_preset(name)
            if preset is None or preset == "SFT":
                choices = ", ".join(p for p in PRESETS if p != "SFT")
                raise NegprefError(f"--methods: unknown method {name!r}; choose from {choices}")
            if preset not in canonical:
                canonical.append(preset)
        self.methods = canonical
        require(bool(self.seeds), "seeds", self.seeds, "needs at least one seed")
        require(len(set(self.seeds)) == len(self.seeds), "seeds", self.seeds, "repeats a seed")
        require(self.jobs >= 0, "jobs", self.jobs, "must be >= 0 (0: one per CPU core)")
        require(self.split in SPLITS, "split", self.split, f"must be one of {', '.join(SPLITS)}")
        for name in ("train_epochs", "unlearn_epochs"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, value, "must be >= 1")
        for name in ("unlearn_lr", "beta"):
            value = getattr(self, name)
            require(value is None or value > 0, name, value, "must be > 0")
        if self.n_authors is not None:
            self.corpus_config().validate()

    def profile(self) -> Profile:
        base = PROFILES["quick" if self.quick else "default"]
        given = {
            k: getattr(self, k)
            for k in ("n_authors", "train_epochs", "unlearn_epochs", "unlearn_lr", "beta")
            if getattr(self, k) is not None
        }
        return dataclasses.replace(base, **given)

    def corpus_config(self) -> CorpusConfig:
        p = self.profile()
        return CorpusConfig(
            n_authors=p.n_authors,
            train_phrasings=p.train_phrasings,
            n_general=p.n_general,
            seed=self.corpus_seed,
        )

    def worker_count(self, tasks: int) -> int:
        """Processes for ``tasks`` tasks: ``jobs``, or one per usable CPU core, at most one
        per task."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, min(self.jobs or cores or 1, tasks))


# Fields that decide nothing about the numbers: left out of the recorded command line.
_PLACE_FIELDS = ("out", "overwrite", "cache_dir", "jobs")


def command_line(config: DemoConfig) -> str:
    """The ``negpref demo`` command that reproduces ``config``'s numbers (defaults left out)."""
    defaults = DemoConfig()
    words = ["negpref", "demo"]
    for f in dataclasses.fields(DemoConfig):
        value = getattr(config, f.name)
        if f.name in _PLACE_FIELDS or value == getattr(defaults, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            words += [flag, *(str(v) for v in value)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def _cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def environment(jobs: int) -> dict:
    """Package versions, threads and CPU the numbers were computed with (``summary.json``).

    Same versions, threads and CPU give bitwise the same numbers. Another CPU can take other
    kernels (torch's vectorised ones follow ``cpu_capability``; MKL picks its own per CPU), whose
    different summation orders change the last bits, and a small model amplifies them.
    """
    import torch

    return {
        "negpref": __version__,
        "python": platform.python_version(),
        "packages": {name: metadata.version(name) for name in ENVIRONMENT_PACKAGES},
        # run_demo and every task run under single_threaded(): what they all use
        "torch_threads": torch.get_num_threads(),
        "jobs": jobs,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": _cpu_model(),
        "machine": platform.machine(),
        "system": platform.system(),
    }


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


def retain_split_of(split: str) -> str:
    """``forget10`` -> ``retain90``: the complement TOFU trains the retain model on."""
    return split_name("retain", 100 - int(split.removeprefix("forget")))


def _say(message: str) -> None:
    print(f"negpref demo: {message}", file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "negpref"


def _digest(payload: dict) -> str:
    text = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _versions() -> dict:
    """What a cached model depends on besides its settings and code: versions and the CPU
    (another CPU's kernels train a different model from the same seed)."""
    import tokenizers
    import torch
    import transformers

    return {
        "negpref": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "format": CACHE_FORMAT,
    }


# ------------------------------------------------------------------------------ models

# Modules whose code decides what a trained model is: a change to any of them retrains.
_TRAINING_CODE = (
    "negpref.unlearn",
    "negpref.models",
    "negpref.logprobs",
    "negpref.losses",
    "negpref.data.qa",
)


def _code_digest() -> str:
    import importlib

    sources = []
    for name in _TRAINING_CODE:
        module = importlib.import_module(name)
        paths = (
            sorted(Path(module.__file__).parent.glob("*.py"))
            if Path(module.__file__).name == "__init__.py"
            else [Path(module.__file__)]
        )
        sources += [p.read_text(encoding="utf-8") for p in paths]
    return hashlib.sha256("\n".join(sources).encode("utf-8")).hexdigest()[:16]


def _model_overrides(p: Profile) -> dict:
    return dict(
        hidden_size=p.hidden_size,
        intermediate_size=4 * p.hidden_size,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.heads,
        max_position_embeddings=MAX_LENGTH,
    )


def train_model(records: list[dict], tokenizer, p: Profile, seed: int, work_dir: Path):
    """Fine-tune a fresh small Llama on ``records`` (the engine's SFT preset): model, log."""
    from negpref import unlearn
    from negpref.models import tiny_llama

    model = tiny_llama(len(tokenizer), seed, **_model_overrides(p))
    config = unlearn.UnlearnConfig(
        method="SFT",
        lr=p.train_lr,
        epochs=p.train_epochs,
        batch_size=p.train_batch,
        grad_accum=1,
        warmup=1.0,
        max_length=MAX_LENGTH,
        seed=seed,
        cpu=True,
        out=str(work_dir),
        save_every=-1,
        save_model=False,
    )
    result = unlearn.run(config, model=model, tokenizer=tokenizer, forget_records=records)
    losses = [m["loss"] for m in result.metrics]
    log = {
        "records": len(records),
        "steps": len(losses),
        "epochs": p.train_epochs,
        "train_s": result.summary["train_s"],
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "loss_per_step": losses,
    }
    return result.model, log


_DONE = "train.json"  # written last into a cache entry: its presence means complete


def _cached(entry: Path, build) -> tuple[Path, bool]:
    """``entry`` if complete, else ``build(stage_dir)`` into a staging dir renamed to ``entry``."""
    if (entry / _DONE).is_file():
        return entry, True
    entry.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.partial-"))
    try:
        build(stage)
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(stage, entry)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return entry, False


_TRAINING_FIELDS = (
    "vocab_size",
    "hidden_size",
    "layers",
    "heads",
    "train_epochs",
    "train_lr",
    "train_batch",
)


def _corpus_key(corpus: Corpus) -> str:
    """The generated corpus itself (it also makes the tokenizer): a new generator retrains."""
    return _digest({"files": corpus.files, "idk": corpus.idk_answers})


def prepare_tokenizer(corpus: Corpus, p: Profile, cache_dir: Path) -> Path:
    """The BPE tokenizer of ``corpus`` (trained or from the cache): one for every seed."""
    from negpref.models import build_tokenizer

    key = _digest({"corpus": _corpus_key(corpus), "vocab": p.vocab_size, **_versions()})

    def build(stage: Path) -> None:
        tokenizer = build_tokenizer(corpus_texts(corpus), p.vocab_size)
        tokenizer.save_pretrained(stage)
        atomic_write_json(stage / _DONE, {"vocab_size": len(tokenizer)})

    entry, _ = _cached(cache_dir / f"demo-tokenizer-{key}", build)
    return entry


def model_entries(config: DemoConfig, corpus: Corpus, seed: int, cache_dir: Path) -> dict:
    """Cache entry of the target and the retain model of ``seed``: role -> directory."""
    p = config.profile()
    base_key = _digest(
        {
            "corpus": _corpus_key(corpus),
            "training": {k: getattr(p, k) for k in _TRAINING_FIELDS},
            "seed": seed,
            "versions": _versions(),
            "code": _code_digest(),
        }
    )
    retain_key = _digest({"base": base_key, "retain": corpus.files[retain_split_of(config.split)]})
    return {
        "target": cache_dir / f"demo-target-{base_key}",
        "retain": cache_dir / f"demo-retain-{retain_key}",
    }


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
        )


def _load(path: Path):
    from negpref.models import ModelSpec, load_model

    return load_model(ModelSpec(path=str(path)), "cpu")


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
        atomic_write_json(stage / _DONE, log)

    with _without_load_bars():
        entry, cached = _cached(entry, build)
        model, tokenizer = _load(entry / "model")
    sets = load_tofu_sets(ctx.corpus_dir, config.split)
    logs = evaluate_tofu(model, tokenizer, sets, **ctx.eval_options())
    ctx.seed_dir(seed).mkdir(parents=True, exist_ok=True)
    atomic_write_json(ctx.seed_dir(seed) / f"{role}_logs.json", logs)
    return {
        "dir": str(entry / "model"),
        "cached": cached,
        "train": _train_log(entry / _DONE),
        "parameters": sum(t.numel() for t in model.parameters()),
        "vocab_size": len(tokenizer),
    }


# -------------------------------------------------------------------------- evaluation


def _scalars(record: dict) -> dict:
    """The numbers of one evaluation (nested counts and the logs path left out)."""
    return {k: v for k, v in record.items() if v is None or isinstance(v, (int, float))}


def _forget_ratios(logs: dict) -> list[float]:
    from negpref.eval.tofu_logs import FORGET_FILE

    return [v for v in logs[FORGET_FILE]["truth_ratio"].values()]


def _generations(logs: dict) -> dict[str, dict[str, list]]:
    """Eval file -> item key -> [question, generation, answer]."""
    return {file: per_metric.get("generated_text", {}) for file, per_metric in logs.items()}


def pick_samples(sets, logs_by_model: dict[str, dict], per_set: int = 2) -> dict[str, list[dict]]:
    """The same few questions of each set, with every model's greedy answer."""
    from negpref.eval.tofu_logs import EVAL_FILES

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
        lr=p.unlearn_lr,
        epochs=p.unlearn_epochs,
        batch_size=p.unlearn_batch,
        grad_accum=1,
        max_length=MAX_LENGTH,
        seed=seed,
        cpu=True,
        out=str(method_dir),
        save_every=-1,
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


# ----------------------------------------------------------------------------- findings


KEPT_UTILITY = 0.9  # "utility kept": at least 90% of the target model's model utility


def _npo_family(name: str) -> bool:
    return "NPO" in name.upper()


def _value(record: dict, key: str) -> float:
    value = record.get(key)
    return 0.0 if value is None else float(value)


def best_with_utility_kept(epochs: list[dict], target_utility: float) -> dict | None:
    """The unlearning epoch of highest forget quality among those that keep at least
    ``KEPT_UTILITY`` of the target's model utility (ties: higher utility); None if none does."""
    kept = [
        e
        for e in epochs
        if e["step"] > 0 and _value(e, "model_utility") >= KEPT_UTILITY * target_utility
    ]
    if not kept:
        return None
    return max(kept, key=lambda e: (_value(e, "forget_quality"), _value(e, "model_utility")))


def _utility_lost_epoch(epochs: list[dict], target_utility: float) -> float | None:
    """First epoch whose model utility is below half the target's (None: never)."""
    return next(
        (e["epoch"] for e in epochs if _value(e, "model_utility") < 0.5 * target_utility), None
    )


def paper_findings(summary: dict) -> list[dict]:
    """The NPO paper's qualitative claims (Section 5.2), each checked against this run."""
    methods = summary["methods"]
    target_mu = summary["target"]["model_utility"]
    findings = []

    def add(claim: str, holds: bool, evidence: str) -> None:
        findings.append({"claim": claim, "holds": bool(holds), "evidence": evidence})

    def kept(name: str) -> tuple[float, float]:
        best = methods[name].get("utility_kept")
        return (
            (0.0, 0.0) if best is None else (best["forget_quality"] or 0.0, best["model_utility"])
        )

    npo = [n for n in methods if _npo_family(n)]
    baselines = [n for n in methods if not _npo_family(n)]

    def peak(name: str) -> tuple[float, float]:
        m = methods[name]
        return _value(m, "forget_quality"), _value(m, "model_utility")

    if npo and baselines:
        best_npo, best_base = max(npo, key=peak), max(baselines, key=peak)
        add(
            "NPO-based methods give the best forget quality / model utility trade-off "
            "(each method at its peak-forget-quality epoch, as the paper's Figure 5)",
            peak(best_npo) > peak(best_base),
            f"{best_npo}: forget quality {peak(best_npo)[0]:.3g}, utility "
            f"{peak(best_npo)[1]:.3g}; best baseline {best_base}: {peak(best_base)[0]:.3g}, "
            f"utility {peak(best_base)[1]:.3g}",
        )
        best_npo, best_base = max(npo, key=kept), max(baselines, key=kept)
        add(
            "... and against early-stopped baselines (each method at its best epoch that keeps "
            f"{KEPT_UTILITY:.0%} of the target's utility; not in the paper)",
            kept(best_npo) > kept(best_base),
            f"{best_npo}: forget quality {kept(best_npo)[0]:.3g}, utility "
            f"{kept(best_npo)[1]:.3g}; best baseline {best_base}: {kept(best_base)[0]:.3g}, "
            f"utility {kept(best_base)[1]:.3g}",
        )
    for name in ("GA", "GA+RT"):
        if name not in methods:
            continue
        m, final = methods[name], methods[name]["final"]
        add(
            f"{name} collapses: model utility is lost",
            _value(final, "model_utility") <= 0.5 * target_mu,
            f"model utility {target_mu:.3g} (target) -> {_value(final, 'model_utility'):.3g} "
            f"after the last epoch; forget KL {_value(final, 'forget_kl'):.3g}",
        )
        add(
            f"{name}'s forget quality peaks, then falls (below a tenth of its peak)",
            _value(final, "forget_quality") <= _value(m, "forget_quality") / 10,
            f"forget quality {_value(m, 'forget_quality'):.3g} at epoch {m['peak_epoch']:.1f}, "
            f"{_value(final, 'forget_quality'):.3g} after the last epoch",
        )
    for name in ("NPO", "NPO+RT"):
        if name not in methods:
            continue
        m, final = methods[name], methods[name]["final"]
        add(
            f"{name}'s forget quality reaches a plateau and stays (no collapse)",
            _value(final, "forget_quality") >= min(_value(m, "forget_quality") / 10, 0.05),
            f"forget quality {_value(m, 'forget_quality'):.3g} at epoch {m['peak_epoch']:.1f}, "
            f"{_value(final, 'forget_quality'):.3g} after the last epoch (model utility "
            f"{_value(final, 'model_utility'):.3g})",
        )
    if "GA" in methods and "NPO" in methods:
        lost = {n: _utility_lost_epoch(methods[n]["epochs"], target_mu) for n in ("GA", "NPO")}
        add(
            "NPO loses model utility more slowly than GA",
            lost["GA"] is not None and (lost["NPO"] is None or lost["NPO"] > lost["GA"]),
            "first epoch below half the target's utility: "
            + ", ".join(f"{n} {'never' if e is None else f'{e:.1f}'}" for n, e in lost.items()),
        )
        ga_kl, npo_kl = (_value(methods[n]["final"], "forget_kl") for n in ("GA", "NPO"))
        add(
            "GA's forget KL explodes while NPO's stays moderate",
            ga_kl > 3 * npo_kl,
            f"forget KL after the last epoch: GA {ga_kl:.3g}, NPO {npo_kl:.3g}",
        )
    if "NPO" in methods and "NPO+RT" in methods:
        with_rt, without = (_value(methods[n]["final"], "model_utility") for n in ("NPO+RT", "NPO"))
        add(
            "the retain term preserves model utility (NPO+RT above NPO)",
            with_rt > without,
            f"model utility after the last epoch: NPO+RT {with_rt:.3g}, NPO {without:.3g}",
        )
    return findings


# ------------------------------------------------------------------------ over the seeds

SPREAD = "mean and sample standard deviation (n - 1) over the seeds; min, max and each seed's value"
VERDICT_RULE = (
    "holds: the claim holds in every seed; does not hold: in no seed; "
    "mixed: in some seeds (how many is shown)"
)
REFERENCE_FIGURES = ("forget_quality", "model_utility", "forget_truth_ratio")
PEAK_FIGURES = ("forget_quality", "model_utility", "forget_truth_ratio", "forget_kl", "peak_epoch")
FINAL_FIGURES = ("forget_quality", "model_utility", "forget_kl")
KEPT_FIGURES = ("forget_quality", "model_utility", "epoch")
CURVE_FIGURES = ("forget_quality", "model_utility", "forget_kl")


def spread(values: list) -> dict:
    """``SPREAD`` of one figure; a seed without the figure (None) is left out of the statistics
    but kept in ``values``."""
    known = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return {
        "mean": statistics.fmean(known) if known else None,
        "std": statistics.stdev(known) if len(known) > 1 else (0.0 if known else None),
        "min": min(known, default=None),
        "max": max(known, default=None),
        "values": list(values),
    }


def _spreads(records: list[dict | None], keys: tuple[str, ...]) -> dict:
    return {k: spread([None if r is None else r.get(k) for r in records]) for k in keys}


def verdict(holding: int, seeds: int) -> str:
    """``VERDICT_RULE``."""
    if holding == seeds:
        return "holds"
    return "does not hold" if holding == 0 else "mixed"


def judge_findings(per_seed: list[dict]) -> list[dict]:
    """Each paper claim over the seeds: its verdict and every seed's outcome and evidence."""
    outcomes: dict[str, list[dict]] = {}
    for run in per_seed:
        for f in run["findings"]:
            outcomes.setdefault(f["claim"], []).append(
                {"seed": run["seed"], "holds": f["holds"], "evidence": f["evidence"]}
            )
    judged = []
    for claim, seeds in outcomes.items():
        holding = sum(o["holds"] for o in seeds)
        judged.append(
            {
                "claim": claim,
                "verdict": verdict(holding, len(seeds)),
                "holds_in": holding,
                "seeds": len(seeds),
                "per_seed": seeds,
            }
        )
    return judged


def _epoch_curves(runs: list[dict]) -> list[dict]:
    """Per epoch: the figures of ``CURVE_FIGURES`` over the seeds (every seed has the same
    epochs: same schedule, same forget set)."""
    return [
        {"epoch": epochs[0]["epoch"], "step": epochs[0]["step"], **_spreads(epochs, CURVE_FIGURES)}
        for epochs in zip(*(run["epochs"] for run in runs), strict=True)
    ]


def over_seeds(per_seed: list[dict]) -> dict:
    """The figures of every model over the seeds (``SPREAD``) and the judged findings."""
    methods = {}
    for name in per_seed[0]["methods"]:
        runs = [s["methods"][name] for s in per_seed]
        methods[name] = {
            **_spreads(runs, PEAK_FIGURES),
            "final": _spreads([r["final"] for r in runs], FINAL_FIGURES),
            "utility_kept": _spreads([r["utility_kept"] for r in runs], KEPT_FIGURES),
            "epochs": _epoch_curves(runs),
            "seconds": spread([r["seconds"] for r in runs]),
        }
    return {
        "target": _spreads([s["target"] for s in per_seed], REFERENCE_FIGURES),
        "retain": _spreads([s["retain"] for s in per_seed], REFERENCE_FIGURES),
        "methods": methods,
        "findings": judge_findings(per_seed),
    }


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
    from negpref.report.demo_report import build_demo_report

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
