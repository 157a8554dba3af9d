"""``negpref.u2a.run``: a whole U2A job on a causal LM, from a ``U2ARunConfig`` to its outputs.

Reads and checks every input before the model loads, runs Algorithm 1 (``run_u2a``) with every
accepted round saved in the staging folder (a killed run continues with ``resume``), and writes
``selected.jsonl``, ``u2a_log.jsonl``, ``gains.jsonl``, the model (LoRA adapters or all weights),
``config.json``, ``summary.json`` and ``report.html`` to ``out``. Progress goes to stderr, one
line per round, and so does each correction U2A makes on its own (``U2AWarning``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from negpref.config import config_to_dict
from negpref.errors import NegprefError
from negpref.io import append_jsonl, atomic_write_json, check_out_dir, staged_out_dir
from negpref.u2a import algorithm
from negpref.u2a.config import U2AConfig, U2ARunConfig, needs_retain
from negpref.u2a.types import U2AWarning


@dataclass
class U2ARun:
    summary: dict  # what summary.json holds
    result: algorithm.U2AResult
    out: Path


@contextlib.contextmanager
def _warnings_to_stderr(collected: list[str]):
    """U2A's corrections (clamps, renormalisations) as one line each, kept for the summary;
    other libraries' warnings go through unchanged."""
    with warnings.catch_warnings():
        default = warnings.showwarning

        def show(message, category, *args, **kwargs):
            if not issubclass(category, U2AWarning):
                return default(message, category, *args, **kwargs)
            collected.append(str(message))
            print(f"negpref u2a: warning: {message}", file=sys.stderr)

        warnings.simplefilter("always", U2AWarning)
        warnings.showwarning = show
        yield


def _progress(record: dict) -> None:
    print(
        f"negpref u2a: round {record['round']}: {record['set_size']} selected, "
        f"J {record['objective']:.4g}, g {record['g']:.4g}",
        file=sys.stderr,
    )


def _load_inputs(cfg: U2ARunConfig) -> dict:
    """Negatives, retain set and the objective's data, all checked (no model needed)."""
    from negpref.data.records import PROMPT, load_records
    from negpref.u2a.objectives import load_negatives

    inputs = {"negatives": load_negatives(cfg.forget, cfg.max_length)}
    inputs["retain"] = (
        load_negatives(cfg.retain, cfg.max_length) if needs_retain(cfg.loss) else None
    )
    if cfg.objective == "dpo":
        inputs["pairs"] = load_records(
            cfg.preference,
            ("prompt", "chosen", "rejected"),
            "preference pairs",
            kinds={"prompt": PROMPT},
            max_length=cfg.max_length,
        )
        return inputs
    rows = load_records(
        cfg.prompts,
        what="prompts",
        kinds={"prompt": PROMPT, "question": PROMPT},
        max_length=cfg.max_length,
    )
    for i, r in enumerate(rows):
        if not (r.get("prompt") or r.get("question")):
            raise NegprefError(f"{rows.where(i)}: needs a `prompt` (or `question`) field")
    inputs["prompts"] = [r.get("prompt") or r.get("question") for r in rows]
    return inputs


def _load_model(cfg: U2ARunConfig):
    """The model with its trainable parameters (LoRA adapters, or all weights) and tokenizer."""
    from transformers import set_seed

    from negpref.models import ModelSpec, check_lora_targets, load_model, training_dtype

    spec = ModelSpec(cfg.model, cfg.gguf or None, training_dtype(cfg.dtype))
    model, tokenizer = load_model(spec, cfg.device)
    set_seed(cfg.seed)  # the LoRA initialisation and any sampling follow the seed
    if not cfg.lora:
        model.requires_grad_(True)
        return model, tokenizer
    from peft import LoraConfig, get_peft_model

    check_lora_targets(model, cfg.lora_target_modules, "lora_target_modules")
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules=cfg.lora_target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora), tokenizer
    except ValueError as e:
        raise NegprefError(f"lora_target_modules {cfg.lora_target_modules}: {e}") from None


def _objective(cfg: U2ARunConfig, model, tokenizer, inputs: dict):
    from negpref.rewards import RewardModel, reward_function
    from negpref.u2a.objectives import NegDPOObjective, RewardObjective

    if cfg.objective == "dpo":
        return NegDPOObjective(
            model, tokenizer, inputs["pairs"], cfg.dpo_beta, cfg.max_length, cfg.batch_size
        )
    reward = (
        # texts past 512 tokens are cut, as U2A's reward model scorer always did
        RewardModel(cfg.reward_model, cfg.device, max_length=512)
        if cfg.reward_model
        else reward_function(cfg.reward, "reward")
    )
    return RewardObjective(
        tokenizer,
        inputs["prompts"],
        reward,
        cfg.reward_samples,
        cfg.max_new_tokens,
        cfg.seed,
        cfg.batch_size,
        cfg.max_length,
    )


def _write(stage: Path, cfg: U2ARunConfig, result, negatives, model, tokenizer, collected):
    from negpref.models import save_model
    from negpref.report import write_html_report
    from negpref.u2a.report import run_sections

    ids = [n["id"] for n in negatives]
    summary = {
        "candidates": len(negatives),
        "selected": len(result.selected),
        "objective_initial": result.objective_initial,
        "objective_final": result.objective_final,
        "stop_reason": result.stop_reason,
        "rounds": len(result.log) - 1,
        "warnings": collected,
    }
    for i, w in zip(result.selected, result.weights):
        append_jsonl(
            stage / "selected.jsonl",
            {"id": ids[i], "index": i, "weight": w, "initial_gain": result.initial_gains[i]},
        )
    for record in result.log:
        append_jsonl(stage / "u2a_log.jsonl", record)
    for i, gain in enumerate(result.initial_gains):
        append_jsonl(stage / "gains.jsonl", {"id": ids[i], "index": i, "initial_gain": gain})
    save_model(model, tokenizer, stage / "model")
    settings = config_to_dict(cfg)
    atomic_write_json(stage / "config.json", settings)
    atomic_write_json(stage / "summary.json", summary)
    write_html_report(stage / "report.html", "negpref u2a", run_sections(result, ids, settings))
    return summary


def run(cfg: U2ARunConfig) -> U2ARun:
    """The U2A job of ``cfg`` (module docstring); ``cfg.out`` is replaced only at the end."""
    from negpref.u2a.objectives import LMForgetTask

    cfg.validate()
    out = check_out_dir(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume)
    collected: list[str] = []
    with (
        _warnings_to_stderr(collected),
        staged_out_dir(out, cfg.overwrite, resume=cfg.resume) as stage,
    ):
        inputs = _load_inputs(cfg)  # every input file is read and checked before the model
        model, tokenizer = _load_model(cfg)
        task = LMForgetTask(
            model,
            tokenizer,
            inputs["negatives"],
            cfg.loss,
            cfg.npo_beta,
            cfg.max_length,
            inputs["retain"],
            cfg.retain_weight,
            cfg.batch_size,
        )
        objective = _objective(cfg, model, tokenizer, inputs)
        settings = U2AConfig(
            **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(U2AConfig)}
        )
        # Rounds are saved in the stage: a killed run continues with resume.
        result = algorithm.run_u2a(
            model, task, objective, settings, _progress, state_dir=stage / "checkpoints"
        )
        summary = _write(stage, cfg, result, inputs["negatives"], model, tokenizer, collected)
    return U2ARun(summary, result, out)
