"""What a ``negpref demo`` run is: its settings, the profiles' sizes, and the environment and
command line recorded with its numbers."""

from __future__ import annotations

import dataclasses
import os
import platform
import shlex
from dataclasses import dataclass, field
from importlib import metadata

from negpref import __version__
from negpref.config import require
from negpref.data.fictitious import FORGET_PERCENTS, CorpusConfig, split_name
from negpref.errors import NegprefError
from negpref.threads import cpu_model

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
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "system": platform.system(),
    }


def retain_split_of(split: str) -> str:
    """``forget10`` -> ``retain90``: the complement TOFU trains the retain model on."""
    return split_name("retain", 100 - int(split.removeprefix("forget")))
