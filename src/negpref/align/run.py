"""``negpref align`` end to end: load, train, write the run directory.

``OUT/`` holds ``config.json``, ``metrics.jsonl`` (one line per logged step and evaluation),
``summary.json``, ``report.html``, ``model/`` (``save_pretrained``; the adapter under LoRA)
and, for OnMC-PO, ``generations/round_NNNN.jsonl``. The directory appears only when the run
succeeds (staged, then renamed).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from negpref.align.config import AlignConfig
from negpref.align.trainer import AlignTrainer, History, reward_eval
from negpref.config import config_to_dict
from negpref.data.pref_task import reward_function
from negpref.data.preference import FieldNames, PreferenceData, load_preferences
from negpref.data.records import PROMPT, load_records
from negpref.errors import NegprefError
from negpref.io import atomic_write_json, check_out_dir, staged_out_dir
from negpref.models import ModelSpec, load_model, save_model
from negpref.training.checkpoint import Resumable, read_state, resumable_checkpoint

# Fields that may differ between a run and its --resume without changing what it computes.
RESUMABLE_CHANGES = frozenset({"resume", "overwrite", "save_every", "save_total_limit", "out"})

CURVES = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen")


def load_data(config: AlignConfig) -> PreferenceData:
    if not config.data:
        raise NegprefError("--data: give a preference file (JSON, JSONL, Parquet or dataset dir)")
    fields = FieldNames(config.prompt_field, config.chosen_field, config.rejected_field)
    return load_preferences(config.data, fields, config.num_candidates, config.max_length)


def eval_prompts(config: AlignConfig, data: PreferenceData) -> list:
    if config.eval_data:
        rows = load_records(
            config.eval_data,
            required=("prompt",),
            what="evaluation prompts",
            kinds={"prompt": PROMPT},
            max_length=config.max_length,
        )
        prompts = [r["prompt"] for r in rows]
    else:
        seen, prompts = set(), []
        for r in data.records:
            key = json.dumps(r.prompt, sort_keys=True)
            if key not in seen:
                seen.add(key)
                prompts.append(r.prompt)
    return prompts[: config.eval_prompts]


def curves_png(history: History) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [*CURVES, "eval/reward"]
    # at most three panels a row: a page-wide figure keeps each panel ~350 px wide
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, grid = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    axes = grid.flatten()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax, key in zip(axes, panels, strict=False):
        rows = history.evals if key.startswith("eval/") else history.steps
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def summarize(trainer: AlignTrainer, data: PreferenceData) -> dict:
    last = {k: v for k, v in trainer.history.steps[-1].items() if k != "mcpo/drawn_index"}
    seconds = trainer.train_seconds
    return {
        "steps": trainer.step,
        "num_tokens": trainer.tokens,
        "train_seconds": seconds,
        "tokens_per_second": trainer.tokens / seconds if seconds else None,
        "final": last,
        "evals": trainer.history.evals,
        "data": {
            "source": data.source,
            **data.stats,
            "dropped_candidates": data.dropped_candidates,
            "dropped_records": data.dropped_records,
        },
    }


def write_report(path, config: AlignConfig, summary: dict, history: History) -> None:
    from negpref.report import Section, write_html_report

    final = summary["final"]
    rows = [[k, v] for k, v in final.items() if isinstance(v, float)]
    evals = [[e["step"], e.get("eval/reward")] for e in history.evals]
    sections = [
        Section(
            "Run",
            [f"method {config.method}, loss {config.loss}, beta {config.beta}, "
             f"{summary['steps']} steps, {summary['data']['records']} records"],
            tables=[(["metric (last step)", "value"], rows)]
            + ([(["step", "eval/reward"], evals)] if evals else []),
            figures=[(curves_png(history), "training curves")],
        )
    ]  # fmt: skip
    write_html_report(path, f"negpref align: {config.method}", sections)


def run(config: AlignConfig, model=None, tokenizer=None) -> dict:
    """Train per ``config``; ``model``/``tokenizer`` default to loading ``config.model``."""
    if not config.out:
        raise NegprefError("--out: give a run directory")
    # before minutes of loading, not after
    check_out_dir(config.out, config.overwrite, resume=config.resume)
    data = load_data(config)
    eval_fn = None
    if config.eval_reward:
        eval_fn = reward_eval(
            reward_function(config.eval_reward), eval_prompts(config, data), config
        )
    if model is None:
        if not (config.model or config.gguf):
            raise NegprefError("--model: give the policy model directory (or --gguf FILE)")
        model, tokenizer = load_model(ModelSpec(config.model, config.gguf, config.dtype))
    with staged_out_dir(config.out, config.overwrite, resume=config.resume) as stage:
        checkpoint = _resume_point(config, stage) if config.resume else None
        atomic_write_json(stage / "config.json", config_to_dict(config))
        trainer = AlignTrainer(config, model, tokenizer, data, run_dir=stage, eval_fn=eval_fn)
        if checkpoint is not None:
            trainer.load_checkpoint(checkpoint.checkpoint)
            for line in checkpoint.skipped:
                print(f"negpref align: warning: {line}", file=sys.stderr)
        history = trainer.train()
        if config.save_model:
            save_model(trainer.unwrapped_model(), tokenizer, stage / "model")
        summary = summarize(trainer, data)
        summary["resumed_from_step"] = (
            read_state(checkpoint.checkpoint)["step"] if checkpoint else None
        )
        atomic_write_json(stage / "summary.json", summary)
        write_report(stage / "report.html", config, summary, history)
    return summary


def _resume_point(config: AlignConfig, stage: Path) -> Resumable | None:
    """The checkpoint a killed run of the same settings left in its stage (None: start anew)."""
    if (Path(config.out) / "summary.json").is_file():
        raise NegprefError(f"--resume: {config.out} is a finished run; nothing to resume")
    saved_path = stage / "config.json"
    if not saved_path.is_file():
        return None
    saved = json.loads(saved_path.read_text(encoding="utf-8"))
    changed = [
        f"{k} ({saved.get(k)!r} -> {v!r})"
        for k, v in config_to_dict(config).items()
        if k not in RESUMABLE_CHANGES and saved.get(k) != v
    ]
    if changed:
        raise NegprefError(
            f"--resume: {config.out} was started with other settings: {', '.join(changed)}; "
            "resume with the same settings or start a new run"
        )
    return resumable_checkpoint(stage)
