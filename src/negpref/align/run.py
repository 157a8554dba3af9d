"""``negpref align`` end to end: load, train, write the run directory.

``OUT/`` holds ``config.json``, ``metrics.jsonl`` (one line per logged step),
``evals.jsonl`` (one line per reward evaluation), ``summary.json``, ``report.html``,
``model/`` (``save_pretrained``; the adapter under LoRA), ``checkpoint-N/`` folders,
``tensorboard/`` and, for OnMC-PO, ``generations/round_NNNN.jsonl``. The directory appears only
when the run succeeds (staged, then renamed); a killed run's stage is continued by ``resume``.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

from negpref.align.config import AlignConfig
from negpref.align.trainer import AlignTrainer, RewardEvaluation
from negpref.config import config_to_dict
from negpref.data.preference import FieldNames, PreferenceData, load_preferences
from negpref.data.records import PROMPT, load_records
from negpref.errors import NegprefError
from negpref.io import atomic_write_json, check_out_dir, staged_out_dir
from negpref.models import ModelSpec, load_model, save_model, training_dtype
from negpref.rewards import reward_function
from negpref.training import checkpoint as ckpt
from negpref.training.checkpoint import Resumable, resumable_checkpoint
from negpref.training.config import TRAINING_RESUMABLE_CHANGES
from negpref.training.run_log import RunCallback, RunLog

# Fields that may differ between a run and its --resume without changing what it computes.
RESUMABLE_CHANGES = TRAINING_RESUMABLE_CHANGES | {"eval_every"}

CURVES = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen")


def load_data(config: AlignConfig) -> PreferenceData:
    if not config.data:
        raise NegprefError("data: give a preference file (JSON, JSONL, Parquet or dataset dir)")
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


def curves_png(steps: list[dict], evals: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [*CURVES, "reward"]
    # at most three panels a row: a page-wide figure keeps each panel ~350 px wide
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, grid = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    axes = grid.flatten()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax, key in zip(axes, panels, strict=False):
        rows = evals if key == "reward" else steps
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


def summarize(trainer: AlignTrainer, run_log: RunLog, data: PreferenceData) -> dict:
    last = run_log.metrics[-1] if run_log.metrics else {}
    seconds = sum(m["step_s"] for m in run_log.metrics)
    return {
        "steps": trainer.state.global_step,
        "num_tokens": last.get("num_tokens", 0),
        "train_seconds": seconds,
        "tokens_per_second": last.get("num_tokens", 0) / seconds if seconds else None,
        "final": last,
        "evals": run_log.evals,
        "data": {
            "source": data.source,
            **data.stats,
            "dropped_candidates": data.dropped_candidates,
            "dropped_records": data.dropped_records,
        },
    }


def write_report(path, config: AlignConfig, summary: dict, run_log: RunLog) -> None:
    from negpref.report import Section, write_html_report

    final = summary["final"]
    rows = [[k, v] for k, v in final.items() if isinstance(v, float)]
    evals = [[e["step"], e.get("reward")] for e in run_log.evals]
    sections = [
        Section(
            "Run",
            [f"method {config.method}, loss {config.loss}, beta {config.beta}, "
             f"{summary['steps']} steps, {summary['data']['records']} records"],
            tables=[(["metric (last step)", "value"], rows)]
            + ([(["step", "reward"], evals)] if evals else []),
            figures=[(curves_png(run_log.metrics, run_log.evals), "training curves")],
        )
    ]  # fmt: skip
    write_html_report(path, f"negpref align: {config.method}", sections)


def run(config: AlignConfig, model=None, tokenizer=None) -> dict:
    """Train per ``config``; ``model``/``tokenizer`` default to loading ``config.model``."""
    from negpref.training.trainer import NonFiniteStep

    out = config.output_dir
    if not out or out == "trainer_output":
        raise NegprefError("output_dir: give a run directory")
    # before minutes of loading, not after
    check_out_dir(out, config.overwrite, resume=config.resume)
    data = load_data(config)
    callbacks = []
    if config.eval_reward:
        callbacks.append(
            RewardEvaluation(
                reward_function(config.eval_reward, "eval_reward"),
                eval_prompts(config, data),
                config,
            )
        )
    if model is None:
        if not (config.model or config.gguf):
            raise NegprefError("model: give the policy model directory (or gguf: a GGUF file)")
        spec = ModelSpec(
            config.model,
            config.gguf,
            training_dtype(config.dtype),
            allow_pickle=config.allow_pickle,
            trust_remote_code=config.trust_remote_code,
        )
        model, tokenizer = load_model(spec)
    from accelerate import PartialState

    processes = PartialState()
    with staged_out_dir(out, config.overwrite, config.resume, processes) as stage:
        checkpoint = _resume_point(config, stage) if config.resume else None
        resume_from = checkpoint.checkpoint if checkpoint is not None else None
        if processes.is_main_process:
            for partial in ckpt.incomplete_checkpoints(stage):  # a save a kill interrupted
                shutil.rmtree(partial, ignore_errors=True)
            atomic_write_json(stage / "config.json", config_to_dict(config))
        trainer = AlignTrainer(
            model, config.replace(output_dir=str(stage)), data, tokenizer, run_dir=stage
        )
        run_log = RunLog(stage, trainer.accelerator.is_main_process, _step(resume_from))
        trainer.add_callback(RunCallback(trainer, run_log, callbacks, stage))
        for line in checkpoint.skipped if checkpoint is not None else []:
            print(f"negpref align: warning: {line}", file=sys.stderr)
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except NonFiniteStep as e:
            good = ckpt.latest_checkpoint(stage)
            where = f"last good checkpoint: {good}" if good else "no checkpoint was written"
            raise NegprefError(
                f"{e}, {where}; lower learning_rate or check the data and model"
            ) from None
        summary = summarize(trainer, run_log, data)
        summary["resumed_from_step"] = _step(resume_from) if resume_from else None
        summary["processes"] = processes.num_processes
        summary["distributed"] = str(trainer.accelerator.distributed_type.value)
        weights = trainer.full_state_dict() if config.save_model else None
        if processes.is_main_process:
            if config.save_model:
                save_model(trainer.unwrapped, tokenizer, stage / "model", weights)
            atomic_write_json(stage / "summary.json", summary)
            write_report(stage / "report.html", config, summary, run_log)
    return summary


def _step(checkpoint: Path | None) -> int:
    return ckpt.step_of(checkpoint) if checkpoint is not None else -1


def _resume_point(config: AlignConfig, stage: Path) -> Resumable | None:
    """The checkpoint a killed run of the same settings left in its stage (None: start anew)."""
    if (Path(config.output_dir) / "summary.json").is_file():
        raise NegprefError(f"resume: {config.output_dir} is a finished run; nothing to resume")
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
            f"resume: {config.output_dir} was started with other settings: "
            f"{', '.join(changed)}; resume with the same settings or start a new run"
        )
    return resumable_checkpoint(stage)
