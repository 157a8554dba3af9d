"""MC-PO against DPO on the offline preference task, over seeds (``negpref align compare``).

Per seed: a preference task (``negpref.data.pref_task``), a BPE tokenizer and a tiny Llama
fit by supervised fine-tuning to completions with random opinions (the reference policy,
expected reward about 0); then every variant trains from that same reference on the same
records, batches and evaluation prompts, and differs only in how it picks negatives. The
reward of sampled completions is measured every ``eval_every`` steps.

Figures per variant: final reward (mean, std over seeds), the steps at which it first
reaches the DPO baseline's final reward of the same seed, and the area under its reward
curve. The paired difference to DPO is tested with a paired t-test (scipy).
"""

from __future__ import annotations

import copy
import io
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from negpref.align.config import AlignConfig
from negpref.align.trainer import AlignTrainer, RewardEvaluation
from negpref.config import require
from negpref.data import pref_task
from negpref.data.preference import normalize_records
from negpref.io import atomic_write_bytes, atomic_write_json, staged_out_dir
from negpref.models import tiny_llama
from negpref.report import Section, write_html_report
from negpref.report.style import curve_style
from negpref.rewards import sentiment
from negpref.training.run_log import RunCallback, RunLog

VARIANTS: dict[str, dict] = {
    "dpo": {"method": "dpo"},
    "mcpo": {"method": "mcpo"},
    "mcpo-logp": {"method": "mcpo", "kernel_score": "logp"},
    "mcpo-mh2": {"method": "mcpo", "kernel_steps": 2},
    "nce": {"method": "dpo", "loss": "nce", "num_negatives": 0},
    "onmcpo": {"method": "onmcpo", "generate_every": 10, "gen_max_new_tokens": 24},
}


def _h(help_text: str) -> dict:
    return {"help": help_text}


@dataclass
class CompareSettings:
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        metadata=_h("seeds (task, model init, data order, sampling)"),
    )
    variants: list[str] = field(
        default_factory=lambda: ["dpo", "mcpo", "mcpo-logp"],
        metadata=_h(f"variants to train, from: {', '.join(VARIANTS)}"),
    )
    steps: int = field(default=60, metadata=_h("optimizer steps per variant"))
    eval_every: int = field(default=10, metadata=_h("steps between reward evaluations"))
    records: int = field(
        default=96, metadata=_h("preference records (prompt, chosen, K candidates)")
    )
    k: int = field(default=4, metadata=_h("rejected candidates per record"))
    batch_size: int = field(default=16, metadata=_h("prompts per step"))
    learning_rate: float = field(
        default=1e-3, metadata=_h("AdamW learning rate of preference optimization")
    )
    beta: float = field(
        default=1.0, metadata=_h("DPO beta (0.1 collapses 2 of 3 seeds at lr 1e-3)")
    )
    kernel_temperature: float = field(default=1.0, metadata=_h("MC-PO kernel temperature"))
    sft_steps: int = field(
        default=150, metadata=_h("supervised steps that make the reference policy")
    )
    sft_learning_rate: float = field(
        default=3e-3, metadata=_h("learning rate of the supervised steps")
    )
    eval_samples: int = field(
        default=8, metadata=_h("sampled completions per prompt at each evaluation")
    )
    max_new_tokens: int = field(default=24, metadata=_h("generation length at evaluation"))
    # Tiny models on a shared CPU: one thread measured 15x faster than two (83 ms vs 1.28 s
    # per SFT step on a loaded 2-core machine); the previous setting is restored afterwards.
    threads: int = field(default=1, metadata=_h("torch CPU threads during the comparison"))

    def validate(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        require(not unknown, "variants", unknown, f"must be among {', '.join(VARIANTS)}")
        require("dpo" in self.variants, "variants", self.variants, "must include the dpo baseline")
        require(bool(self.seeds), "seeds", self.seeds, "must name at least one seed")
        for name in ("steps", "eval_every", "records", "k", "batch_size", "threads"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")


def sft(model, tokenizer, examples: list[dict], steps: int, lr: float, seed: int, batch=32):
    """Token-mean NLL on question/answer pairs (the engine's SFT preset, ``steps`` steps of
    ``batch`` examples): the reference policy of the comparison."""
    from negpref.unlearn import UnlearnConfig, run

    with tempfile.TemporaryDirectory(prefix="negpref-sft-") as tmp:
        config = UnlearnConfig(
            method="SFT",
            learning_rate=lr,
            max_steps=steps,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=1,
            warmup_epochs=0,
            weight_decay=0.01,  # torch's AdamW default, which the study's own loop used
            lr_scheduler_type="constant",
            max_length=128,
            seed=seed,
            use_cpu=True,
            mixed_precision="no",  # figures independent of the CPU (no bf16 on AMX)
            output_dir=f"{tmp}/sft",
            save_strategy="no",
            save_model=False,
            report_to="none",
            verbosity="quiet",
        )
        result = run(config, model=model, tokenizer=tokenizer, forget_records=examples)
    return result.model.eval()


def _config(settings: CompareSettings, variant: str, seed: int) -> AlignConfig:
    return AlignConfig(
        **{
            "beta": settings.beta,
            "per_device_train_batch_size": settings.batch_size,
            "learning_rate": settings.learning_rate,
            "max_steps": settings.steps,
            "seed": seed,
            "kernel_temperature": settings.kernel_temperature,
            "eval_every": str(settings.eval_every),
            "eval_samples": settings.eval_samples,
            "eval_max_new_tokens": settings.max_new_tokens,
            "max_length": 128,
            "use_cpu": True,
            "mixed_precision": "no",  # figures independent of the CPU
            "save_strategy": "no",
            "report_to": "none",
            "verbosity": "quiet",
            **VARIANTS[variant],
        }
    )


def run_seed(settings: CompareSettings, seed: int) -> dict:
    tokenizer = pref_task.task_tokenizer(seed)
    data = normalize_records(
        pref_task.make_preferences(settings.records, settings.k, seed), f"task(seed={seed})"
    )
    start = time.perf_counter()
    reference = sft(
        tiny_llama(len(tokenizer), seed=seed),
        tokenizer,
        pref_task.make_sft(4 * settings.records, seed + 1),
        settings.sft_steps,
        settings.sft_learning_rate,
        seed,
    )
    out = {"sft_seconds": time.perf_counter() - start, "variants": {}}
    prompts = pref_task.prompts()
    for variant in settings.variants:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="negpref-compare-") as tmp:
            config = _config(settings, variant, seed).replace(output_dir=tmp)
            evaluate = RewardEvaluation(sentiment, prompts, config)
            trainer = AlignTrainer(copy.deepcopy(reference), config, data, tokenizer)
            log = RunLog(Path(tmp), is_main=True, keep_through=-1)
            trainer.add_callback(RunCallback(trainer, log, [evaluate], Path(tmp)))
            trainer.train()
        out["variants"][variant] = {
            "steps": [e["step"] for e in log.evals],
            "reward": [e["reward"] for e in log.evals],
            "hardest_hit_rate": _mean(h.get("mcpo/hardest_hit_rate") for h in log.metrics),
            "seconds": time.perf_counter() - start,
        }
    return out


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _stats(values: list[float]) -> dict:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    mean = sum(finite) / n if n else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def steps_to_reach(steps: list[int], rewards: list[float], target: float) -> float:
    """First evaluated step with reward >= target (inf if never)."""
    return next((s for s, r in zip(steps, rewards, strict=True) if r >= target), math.inf)


def auc(steps: list[int], rewards: list[float]) -> float:
    """Mean reward over training: trapezoid area under the curve divided by its length."""
    area = sum(
        (steps[i + 1] - steps[i]) * (rewards[i + 1] + rewards[i]) / 2 for i in range(len(steps) - 1)
    )
    return area / (steps[-1] - steps[0])


def aggregate(per_seed: dict[int, dict], baseline: str = "dpo") -> dict:
    from scipy import stats

    variants = next(iter(per_seed.values()))["variants"]
    table = {}
    for name in variants:
        finals, reach, areas, diffs = [], [], [], []
        for result in per_seed.values():
            v, base = result["variants"][name], result["variants"].get(baseline)
            finals.append(v["reward"][-1])
            areas.append(auc(v["steps"], v["reward"]))
            if base is not None:
                reach.append(steps_to_reach(v["steps"], v["reward"], base["reward"][-1]))
                diffs.append(v["reward"][-1] - base["reward"][-1])
        row = {
            "final_reward": _stats(finals),
            "reward_auc": _stats(areas),
            "steps_to_baseline_final": _stats(reach),
            "reached_baseline": sum(math.isfinite(r) for r in reach),
        }
        if name != baseline and len(diffs) > 1 and any(diffs):
            row["final_minus_baseline"] = _stats(diffs)
            row["paired_t_pvalue"] = float(stats.ttest_1samp(diffs, 0.0).pvalue)
        table[name] = row
    return table


def plot(per_seed: dict[int, dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = next(iter(per_seed.values()))["variants"]
    for i, name in enumerate(names):
        curves = torch.tensor([r["variants"][name]["reward"] for r in per_seed.values()])
        steps = next(iter(per_seed.values()))["variants"][name]["steps"]
        mean, std = curves.mean(0), curves.std(0) if len(curves) > 1 else torch.zeros(len(steps))
        ax.plot(steps, mean, label=name, **curve_style(i, len(steps)))
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("reward of sampled completions")
    ax.set_title(f"offline preference task, {len(per_seed)} seeds (mean ± std)")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def run_compare(settings: CompareSettings) -> tuple[dict, bytes]:
    previous = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        per_seed = {seed: run_seed(settings, seed) for seed in settings.seeds}
    finally:
        torch.set_num_threads(previous)
    result = {
        "settings": settings.__dict__,
        "summary": aggregate(per_seed),
        "per_seed": per_seed,
    }
    return result, plot(per_seed)


def write_compare(settings: CompareSettings, out, overwrite: bool = False) -> dict:
    """``run_compare`` into ``out``, all at once: ``compare.json``, ``compare.png`` and
    ``report.html``; returns the JSON's content."""
    with staged_out_dir(out, overwrite) as stage:
        result, png = run_compare(settings)
        atomic_write_json(stage / "compare.json", result)
        atomic_write_bytes(stage / "compare.png", png)
        columns = ["variant", "final reward", "std", "steps to DPO final", "std", "reached",
                   "reward AUC", "p (paired t vs DPO)"]  # fmt: skip
        rows = [
            [name, r["final_reward"]["mean"], r["final_reward"]["std"],
             r["steps_to_baseline_final"]["mean"], r["steps_to_baseline_final"]["std"],
             f"{r['reached_baseline']}/{len(settings.seeds)}", r["reward_auc"]["mean"],
             r.get("paired_t_pvalue", "")]
            for name, r in result["summary"].items()
        ]  # fmt: skip
        write_html_report(
            stage / "report.html",
            "MC-PO vs DPO on the offline preference task",
            [Section("Summary", tables=[(columns, rows)], figures=[(png, "reward curves")])],
        )
    return result


def summary_lines(result: dict) -> list[str]:
    """Per variant: final reward and steps to the DPO baseline's final reward over the seeds."""
    seeds = len(result["settings"]["seeds"])
    return [
        f"{name}: final reward {r['final_reward']['mean']:.3f} ± {r['final_reward']['std']:.3f}, "
        f"steps to DPO final {r['steps_to_baseline_final']['mean']:.1f} "
        f"± {r['steps_to_baseline_final']['std']:.1f} "
        f"({r['reached_baseline']}/{seeds} seeds)"
        for name, r in result["summary"].items()
    ]
