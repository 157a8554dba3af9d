"""``run(config) -> UnlearnResult``: load, precompute the reference, train, checkpoint, save.

Reads top to bottom: inputs are checked before anything is written; the run directory gets
``config.yaml``, ``metrics.jsonl`` (one line per optimizer step), ``evals.jsonl`` (callback
results), ``reference_logps.safetensors`` (the precomputed reference), ``checkpoint-N/`` (the
newest ``save_total_limit``), the final model (``model/``; with LoRA ``adapter/`` and, with
``merge``, ``model/``; a LoRA run from a GGUF file also ``base_model/``, which the adapter
names as its base) and ``summary.json``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainerCallback

from negpref.errors import NegprefError
from negpref.io import (
    atomic_write_json,
    atomic_write_text,
    check_out_dir,
    recover_replaced,
    replace_dir,
    run_dir_lock,
    stage_path,
)
from negpref.models import (
    ModelSpec,
    check_lora_targets,
    check_vocabulary,
    ensure_pad_token,
    load_model,
    save_model,
    training_dtype,
)
from negpref.training import checkpoint as ckpt
from negpref.training.run_log import RunCallback, RunLog
from negpref.training.trainer import NonFiniteStep
from negpref.unlearn.config import RESUMABLE_CHANGES, UnlearnConfig
from negpref.unlearn.dataset import (
    UnlearnData,
    build_data,
    count_overlap,
    load_idk,
    load_qa,
    record_fields,
)
from negpref.unlearn.objectives import Objective
from negpref.unlearn.trainer import UnlearnTrainer, check_model_settings

REF_CACHE = "reference_logps.safetensors"
BASE_MODEL_DIR = "base_model"  # a GGUF base, saved for the LoRA adapter to point at


@dataclass
class UnlearnResult:
    model: Any  # the trained model (a peft model with LoRA; merged with merge=True)
    tokenizer: Any
    out_dir: Path
    metrics: list[dict] = field(default_factory=list)  # one dict per optimizer step
    evals: list[dict] = field(default_factory=list)  # callback results with step/epoch
    summary: dict = field(default_factory=dict)


@dataclass
class _Inputs:
    forget: list[dict]
    retain: list[dict] | None
    idk: list[str] | None
    warnings: list[str]


def _load_inputs(config, objective: Objective, forget, retain, idk) -> _Inputs:
    """Records from memory or files, checked against what the objective reads."""
    warnings: list[str] = []
    if forget is None:
        if not config.forget:
            raise NegprefError("forget: required (a JSON/JSONL file of question/answer records)")
        forget = config.forget
    forget = load_qa(forget, "forget records", config.max_length)
    if config.limit:
        forget = forget[: config.limit]
    groups = objective.groups
    if "refusal" in groups:
        if record_fields(forget[0]) != ("question", "answer"):
            raise NegprefError(
                f"method {config.method}: needs question/answer forget records, got text records"
            )
        if idk is None:
            if not config.idk:
                raise NegprefError(
                    f"idk: method {config.method} needs refusal answers, one per line "
                    "(e.g. tofu/idontknow.jsonl)"
                )
            idk = load_idk(config.idk, config.max_length)
        if not idk:
            raise NegprefError("idk: no refusal answers given")
    elif idk is not None or config.idk:
        warnings.append(f"refusal answers are not used by method {config.method}")
        idk = None
    if "retain" in groups:
        if retain is None:
            if not config.retain:
                raise NegprefError(
                    f"retain: method {config.method} (c_rt={config.c_rt}, "
                    f"c_rtkl={config.c_rtkl}) needs a retain set"
                )
            retain = config.retain
        retain = load_qa(retain, "retain records", config.max_length)
        overlap = count_overlap(forget, retain)
        if overlap:
            warnings.append(
                f"{overlap} of {len(forget)} forget records also appear in the retain set; the "
                "retain term will pull them back",
            )
    elif retain is not None or config.retain:
        warnings.append(f"the retain set is not used by method {config.method}")
        retain = None
    return _Inputs(forget, retain, idk, warnings)


def _load_model(config, model, tokenizer, device):
    """The caller's model (copied: theirs stays untouched) or the one named in the config."""
    if model is not None:
        if tokenizer is None:
            raise NegprefError("run(): pass the tokenizer together with the model")
        check_vocabulary(model, tokenizer, "run(model=...)")
        model, tokenizer = copy.deepcopy(model), copy.deepcopy(tokenizer)
        ensure_pad_token(tokenizer)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model.to(device), tokenizer
    if not (config.model or config.gguf):
        raise NegprefError("model: required (a model directory, or gguf: a GGUF file)")
    spec = ModelSpec(
        path=config.model,
        gguf=config.gguf,
        dtype=training_dtype(config.dtype),
        allow_pickle=config.allow_pickle,
        trust_remote_code=config.trust_remote_code,
    )
    return load_model(spec, device)


def _check_resume(out: Path, config_dict: dict) -> ckpt.Resumable | None:
    """The checkpoint to continue from, after checking the run used the same settings."""
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        if out.exists() and any(out.iterdir()):
            raise NegprefError(f"resume: {out} holds no negpref run (no config.yaml)")
        return None
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    # A field added after the run started was at its default then.
    defaults = UnlearnConfig().to_config_dict()
    changed = [
        f"{k} ({saved.get(k, defaults.get(k))!r} -> {v!r})"
        for k, v in config_dict.items()
        if k not in RESUMABLE_CHANGES and saved.get(k, defaults.get(k)) != v
    ]
    if changed:
        raise NegprefError(
            f"resume: {out} was started with other settings: {', '.join(changed)}; resume "
            "with the same settings or start a new run"
        )
    return ckpt.resumable_checkpoint(out)


def _reference_cache(trainer: UnlearnTrainer, out: Path, fingerprint: str, progress: bool) -> float:
    """Load the run's precomputed reference, or compute and store it; seconds spent."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    groups = trainer.precomputed_groups
    if not groups:
        return 0.0
    path = out / REF_CACHE
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            if f.metadata().get("fingerprint") == fingerprint and set(groups) <= set(f.keys()):
                trainer.data.ref_logps = {g: f.get_tensor(g) for g in groups}
                return 0.0
    start = time.perf_counter()
    trainer.precompute_reference(progress=progress)
    seconds = time.perf_counter() - start
    if trainer.accelerator.is_main_process:
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(trainer.data.ref_logps, str(tmp), metadata={"fingerprint": fingerprint})
        os.replace(tmp, path)
    return seconds


def _staged(out: Path, name: str, save) -> Path:
    """``save(folder)`` into ``out/.name.partial``, then renamed to ``out/name``."""
    target, stage = out / name, out / f".{name}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    save(stage)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(stage, target)
    return target


def _save_gguf_base(model, tokenizer, out: Path) -> Path:
    """The base of a LoRA run loaded from GGUF, as a model folder (safetensors) in the run.

    An adapter records its base model's path, and a GGUF file's folder is not loadable by
    ``from_pretrained`` (no config.json); the adapter points here instead. Saved before
    training (the base never changes under LoRA); a resumed run keeps the saved one.
    """
    target = out / BASE_MODEL_DIR
    if not (target / "config.json").is_file():
        _staged(out, BASE_MODEL_DIR, lambda d: save_model(model, tokenizer, d))
    return target


def _save_final(
    trainer: UnlearnTrainer, tokenizer, out: Path, final_out: Path, config
) -> tuple[Any, dict[str, str]]:
    """Write the final model into ``out`` (staged, then renamed); paths are ``final_out``'s."""
    model = trainer.unwrapped
    written: dict[str, str] = {}

    def staged(name: str, save) -> None:
        _staged(out, name, save)
        written[f"{name}_dir"] = str(final_out / name)

    is_main = trainer.accelerator.is_main_process
    weights = trainer.full_state_dict() if config.save_model else None
    if config.lora:
        if is_main and config.save_model:
            if config.gguf:  # what peft's AutoPeftModel* will load as the base
                base = (final_out / BASE_MODEL_DIR).resolve()
                model.peft_config[model.active_adapter].base_model_name_or_path = str(base)
                written["base_model_dir"] = str(final_out / BASE_MODEL_DIR)
            staged("adapter", lambda d: save_model(model, tokenizer, d, weights))
        if config.merge:
            model = model.merge_and_unload()
    if is_main and config.save_model and (config.merge or not config.lora):
        staged("model", lambda d: save_model(model, tokenizer, d, weights))
    return model, written


def run(
    config: UnlearnConfig,
    *,
    model=None,
    tokenizer=None,
    forget_records=None,
    retain_records=None,
    idk_answers: Sequence[str] | None = None,
    callbacks: Sequence[Any] = (),
) -> UnlearnResult:
    """Unlearn ``config.forget`` from ``config.model`` (or the given model and records).

    ``forget_records`` / ``retain_records``: a list of dicts, a ``datasets.Dataset`` or
    ``DatasetDict`` (its ``train`` or only split), or a path; they replace the config's files.

    ``callbacks``: ``transformers.TrainerCallback`` objects, or objects with optional
    ``on_evaluate(state, model, tokenizer) -> dict`` (step 0, then every ``eval_every`` steps
    or each epoch end, and the last step; main process) and ``on_step_end(state, metrics)``
    (every step, every process).
    """
    config = config.resolved()
    objective = config.objective()
    if not config.output_dir or config.output_dir == "trainer_output":
        raise NegprefError("output_dir: required (the run directory)")
    out = check_out_dir(config.output_dir, overwrite=config.overwrite, resume=config.resume)
    # --overwrite builds the new run beside the old one and swaps at the end: a killed or
    # failed run leaves the old run whole.
    replacing = config.overwrite and out.is_dir() and any(out.iterdir())
    work = stage_path(out) if replacing else out
    inputs = _load_inputs(config, objective, forget_records, retain_records, idk_answers)
    from accelerate import PartialState

    state = PartialState()
    with _locked(state, out):
        result = _train(config, objective, inputs, work, model, tokenizer, callbacks)
        if replacing and state.is_main_process:
            replace_dir(work, out)
        state.wait_for_everyone()
    result.out_dir = out
    return result


@contextlib.contextmanager
def _locked(state, out: Path):
    """The main process holds the run directory's lock; every process learns if it failed."""
    with contextlib.ExitStack() as stack:
        error = None
        if state.is_main_process:
            try:
                stack.enter_context(run_dir_lock(out))
                recover_replaced(out)
            except NegprefError as e:
                error = str(e)
        if state.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            error = broadcast_object_list([error])[0]
        if error:
            raise NegprefError(error)
        yield


def _evaluation_callbacks(config: UnlearnConfig, callbacks, tokenizer) -> list:
    """The caller's callbacks, plus the TOFU evaluation ``eval_split`` asks for."""
    callbacks = list(callbacks)
    if config.eval_split:
        from negpref.eval import TofuEvalCallback, load_tofu_sets

        sets = load_tofu_sets(config.eval_data, config.eval_split, limit=config.eval_limit or None)
        callbacks.append(
            TofuEvalCallback(
                sets,
                retain_logs=config.retain_logs,
                batch_size=config.per_device_train_batch_size,
                max_length=config.max_length,
                prompt=config.prompt_format(),
                conventions=config.conventions,
                generate=config.eval_generation,
            )
        )
    return callbacks


def _train(config, objective, inputs, out, model, tokenizer, callbacks):
    """The run, in ``out`` (the run directory, or its stage when replacing an old run)."""
    from accelerate import PartialState
    from transformers import set_seed

    state = PartialState()
    is_main = state.is_main_process
    config_dict = config.to_config_dict()
    resumable = _check_resume(out, config_dict) if config.resume else None
    resume_from = resumable.checkpoint if resumable is not None else None
    set_seed(config.seed)
    device = config.device
    model, tokenizer = _load_model(config, model, tokenizer, device)
    if config.lora:
        check_lora_targets(model, config.lora_target_modules, "lora_target_modules")
    check_model_settings(model, config, objective)  # before anything is written
    prompt = config.prompt_format()
    data: UnlearnData = build_data(
        tokenizer,
        inputs.forget,
        inputs.retain,
        inputs.idk,
        config.max_length,
        config.seed,
        prompt,
    )
    callbacks = _evaluation_callbacks(config, callbacks, tokenizer)
    warnings = inputs.warnings + (resumable.skipped if resumable is not None else [])
    for group, n in data.truncated.items():
        if n:
            warnings.append(
                f"{n} {group} sequences truncated to max_length {config.max_length} tokens",
            )
    if is_main:
        for message in warnings:
            print(f"negpref unlearn: warning: {message}", file=sys.stderr)
    fingerprint = data.fingerprint()

    if is_main:
        if out == stage_path(Path(config.output_dir)):
            shutil.rmtree(out, ignore_errors=True)  # a stage left by a killed --overwrite run
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(config_dict, sort_keys=False))
        for partial in ckpt.incomplete_checkpoints(out):  # a save a kill interrupted
            shutil.rmtree(partial, ignore_errors=True)
    state.wait_for_everyone()

    if is_main and config.lora and config.gguf and config.save_model:
        _save_gguf_base(model, tokenizer, out)
    state.wait_for_everyone()
    run_log = RunLog(out, is_main, keep_through=ckpt.step_of(resume_from) if resume_from else -1)
    hf_callbacks = [c for c in callbacks if isinstance(c, TrainerCallback)]
    negpref_callbacks = [c for c in callbacks if not isinstance(c, TrainerCallback)]
    trainer = UnlearnTrainer(
        model,
        config.replace(output_dir=str(out)),
        processing_class=tokenizer,
        data=data,
        callbacks=hf_callbacks,
    )
    progress = config.verbosity != "quiet"
    precompute_s = _reference_cache(trainer, out, fingerprint, progress)
    trainer.add_callback(RunCallback(trainer, run_log, negpref_callbacks, out))

    train_start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except NonFiniteStep as e:
        raise _non_finite_error(trainer, run_log, e, out, config) from None
    train_s = time.perf_counter() - train_start

    model, written = _save_final(trainer, tokenizer, out, Path(config.output_dir), config)
    from negpref.eval.callback import peak_forget_quality

    peak = peak_forget_quality(run_log.evals)
    summary = {
        "method": config.method,
        "objective": {
            "forget_loss": objective.forget_loss.description,
            **{k: getattr(config, k) for k in ("c_forget", "c_rt", "c_rtkl", "c_fgkl", "beta")},
        },
        "conventions": config.conventions,
        "prompt_format": prompt.describe(tokenizer),
        "steps": trainer.total_steps,
        "num_train_epochs": config.num_train_epochs,
        "effective_batch": trainer.effective_batch,
        "processes": trainer.accelerator.num_processes,
        "distributed": str(trainer.accelerator.distributed_type.value),
        "device": str(trainer.args.device),
        "mixed_precision": trainer.accelerator.mixed_precision,
        "n_forget": data.n_forget,
        "n_retain": len(data.retain),
        "truncated": data.truncated,
        "ref_mode": config.ref_mode,
        "live_reference_groups": list(trainer.live_ref_groups),
        "precompute_s": precompute_s,
        "train_s": train_s,
        "resumed_from_step": ckpt.step_of(resume_from) if resume_from is not None else None,
        "final_metrics": run_log.metrics[-1] if run_log.metrics else {},
        "peak_forget_quality": _peak_summary(peak, out),
        "warnings": warnings,
        **written,
    }
    if is_main:
        atomic_write_json(out / "summary.json", summary)
    state.wait_for_everyone()
    return UnlearnResult(model, tokenizer, out, run_log.metrics, run_log.evals, summary)


def _peak_summary(peak: dict | None, out: Path) -> dict | None:
    """The evaluation of highest forget quality and the checkpoint holding that model."""
    if peak is None:
        return None
    checkpoint = out / f"{ckpt.PREFIX}{peak['step']}"
    return {
        "step": peak["step"],
        "epoch": peak.get("epoch"),
        "forget_quality": peak["forget_quality"],
        "model_utility": peak.get("model_utility"),
        "checkpoint": checkpoint.name if (checkpoint / ckpt.STATE_FILE).is_file() else None,
    }


def _non_finite_error(trainer, run_log: RunLog, error: NonFiniteStep, out: Path, config):
    """Stop at a non-finite step, naming the newest checkpoint whose weights are finite."""
    good = ckpt.latest_checkpoint(out)
    step = error.step
    # The failed step's figures (a NaN loss, ...) are the last metrics.jsonl line: the diagnosis.
    figures = {k: v for k, v in error.metrics.items() if k != "tokens"}
    run_log.step({"step": step, **figures})
    if (
        not error.applied
        and config.save_strategy != "no"
        and step > 1
        and (good is None or ckpt.step_of(good) != step - 1)
    ):  # the bad step was not applied: the weights in memory are step - 1's
        good = trainer.save_checkpoint_now()
    where = f"last good checkpoint: {good}" if good is not None else "no checkpoint was written"
    return NegprefError(f"{error}, {where}; lower learning_rate or check the data and model")
