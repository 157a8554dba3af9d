"""The demo's trained models: a BPE tokenizer per corpus and a target and a retain model per
seed, trained with the engine's SFT preset and cached under a key of everything that decides
them (corpus, sizes, seed, versions, CPU, training code)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from negpref import __version__
from negpref.data.fictitious import Corpus, corpus_texts
from negpref.io import atomic_write_json
from negpref.studies.demo.settings import (
    CACHE_ENV,
    CACHE_FORMAT,
    MAX_LENGTH,
    DemoConfig,
    Profile,
    retain_split_of,
)
from negpref.threads import cpu_model


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
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "format": CACHE_FORMAT,
    }


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
        learning_rate=p.train_lr,
        num_train_epochs=p.train_epochs,
        per_device_train_batch_size=p.train_batch,
        gradient_accumulation_steps=1,
        warmup_epochs=1.0,
        max_length=MAX_LENGTH,
        seed=seed,
        use_cpu=True,
        mixed_precision="no",  # figures independent of the CPU (no bf16 on AMX)
        output_dir=str(work_dir),
        save_strategy="no",
        verbosity="quiet",  # the demo reports its own progress
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


DONE = "train.json"  # written last into a cache entry: its presence means complete


def cache_entry(entry: Path, build) -> tuple[Path, bool]:
    """``entry`` if complete, else ``build(stage_dir)`` into a staging dir renamed to ``entry``."""
    if (entry / DONE).is_file():
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
        atomic_write_json(stage / DONE, {"vocab_size": len(tokenizer)})

    entry, _ = cache_entry(cache_dir / f"demo-tokenizer-{key}", build)
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
