"""TOFU evaluation during unlearning: a callback the engine calls at step 0 and then every
epoch or N steps, so a run yields the evolution curves (NPO paper Figure 6) and the step of
peak forget quality.

Each evaluation writes its per-item logs (TOFU format) to ``<out_dir>/evals/step_NNNNNN.json``;
``aggregate_eval_dir`` recomputes the curve from those files (against any retain logs).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from negpref.conventions import NPO, Conventions
from negpref.data import DEFAULT_PROMPT, PromptFormat
from negpref.eval.shards import Shards
from negpref.eval.tofu import TofuSets, evaluate_tofu
from negpref.eval.tofu_logs import (
    aggregate,
    as_tofu_logs,
    check_logs,
    check_retain_logs_match_sets,
    load_logs,
)
from negpref.io import atomic_write_json

EVALS_DIR = "evals"
_STEP_FILE = re.compile(r"step_(\d+)\.json")


def step_logs_path(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / EVALS_DIR / f"step_{step:06d}.json"


class TofuEvalCallback:
    """Evaluates the model under training on ``sets`` and returns TOFU's aggregates.

    ``retain_logs`` (a logs dict or a path to one, TOFU's or open-unlearning's format) is the
    forget-quality reference; without it ``forget_quality`` is None. ``ref_model`` (the model
    before unlearning) adds ``forget_kl`` and ``retain_kl``. ``prompt``, ``conventions``,
    ``mia_k``, ``generate``, ``mia_ref_model`` and ``gradnorm`` (the reference / GradNorm
    attacks; GradNorm leaves the run's accumulated ``.grad`` alone), ``share_prompts`` and
    ``drop_finished_rows`` are passed to ``evaluate_tofu``. The engine calls
    ``on_evaluate(state, model, tokenizer)``; ``state`` needs ``step`` and, to save per-item
    logs, ``out_dir`` (``epoch`` is recorded if present).

    Under several processes the engine calls it on every one (``all_processes``): the
    evaluation is split over them (``Shards.of_processes``) and the logs are written where
    ``state.out_dir`` is set (the main process).
    """

    all_processes = True

    def __init__(
        self,
        sets: TofuSets,
        retain_logs: dict | str | os.PathLike | None = None,
        ref_model=None,
        batch_size: int = 8,
        max_new_tokens: int = 200,
        max_length: int = 512,
        mia_k: float | None = None,
        prompt: PromptFormat = DEFAULT_PROMPT,
        conventions: Conventions | str = NPO,
        generate: bool = True,
        mia_ref_model=None,
        gradnorm: bool = False,
        share_prompts: bool = True,
        drop_finished_rows: bool = True,
    ):
        if retain_logs is not None and not isinstance(retain_logs, dict):
            retain_logs = load_logs(retain_logs, "retain logs")
        if retain_logs is not None:
            retain_logs = as_tofu_logs(retain_logs, "retain logs")
            check_logs(retain_logs, "retain logs")
            check_retain_logs_match_sets(retain_logs, sets, "retain logs")
        self.sets = sets
        self.retain_logs = retain_logs
        self.ref_model = ref_model
        self.options = dict(
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            max_length=max_length,
            mia_k=mia_k,
            prompt=prompt,
            conventions=conventions,
            generate=generate,
            mia_ref_model=mia_ref_model,
            gradnorm=gradnorm,
            share_prompts=share_prompts,
            drop_finished_rows=drop_finished_rows,
        )

    def on_evaluate(self, state, model, tokenizer) -> dict:
        logs = evaluate_tofu(
            model,
            tokenizer,
            self.sets,
            ref_model=self.ref_model,
            shards=Shards.of_processes(),
            **self.options,
        )
        result = {"step": int(getattr(state, "step", 0))}
        if getattr(state, "epoch", None) is not None:
            result["epoch"] = state.epoch
        out_dir = getattr(state, "out_dir", None)
        if out_dir is not None:
            path = step_logs_path(out_dir, result["step"])
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, logs)
            # relative to the run directory, so the record survives moving the run
            result["logs_path"] = str(path.relative_to(out_dir))
        result.update(aggregate(logs, self.retain_logs))
        return result


def aggregate_eval_dir(
    out_dir: str | os.PathLike, retain_logs: dict | str | os.PathLike | None = None
) -> list[dict]:
    """Re-aggregate every ``evals/step_*.json`` of a run, in step order."""
    if retain_logs is not None and not isinstance(retain_logs, dict):
        retain_logs = load_logs(retain_logs, "retain logs")
    found = sorted(
        (int(m.group(1)), p)
        for p in (Path(out_dir) / EVALS_DIR).glob("step_*.json")
        if (m := _STEP_FILE.fullmatch(p.name))
    )
    return [
        {
            "step": step,
            "logs_path": str(p.relative_to(out_dir)),
            **aggregate(load_logs(p, "eval logs"), retain_logs),
        }
        for step, p in found
    ]


def peak_forget_quality(evals: list[dict]) -> dict | None:
    """The evaluation with the highest forget quality; ties go to the higher model utility,
    then the earlier step. None when no evaluation has a forget quality."""
    scored = [e for e in evals if e.get("forget_quality") is not None]
    if not scored:
        return None

    def rank(e: dict):
        utility = e.get("model_utility")
        return (e["forget_quality"], utility if utility is not None else -1.0, -e.get("step", 0))

    return max(scored, key=rank)
