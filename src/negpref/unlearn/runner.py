"""``run(config) -> UnlearnResult``: load, precompute the reference, train, checkpoint, save.

Reads top to bottom: inputs are checked before anything is written; the run directory gets
``config.yaml``, ``metrics.jsonl`` (one line per optimizer step), ``evals.jsonl`` (callback
results), ``reference_logps.safetensors`` (the precomputed reference), ``checkpoints/``,
the final model (``model/``; with LoRA ``adapter/`` and, with ``merge``, ``model/``; a LoRA
run from a GGUF file also ``base_model/``, which the adapter names as its base) and
``summary.json``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from negpref.config import config_to_dict
from negpref.errors import NegprefError
from negpref.io import (
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    check_out_dir,
    read_jsonl_through,
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
)
from negpref.training import checkpoint as ckpt
from negpref.unlearn.config import RESUMABLE_CHANGES, UnlearnConfig
from negpref.unlearn.dataset import (
    UnlearnData,
    build_data,
    count_overlap,
    load_idk,
    load_qa,
    record_fields,
)
from negpref.unlearn.engine import Engine, check_model_settings, eval_mode, make_accelerator
from negpref.unlearn.objectives import Objective

REF_CACHE = "reference_logps.safetensors"
BASE_MODEL_DIR = "base_model"  # a GGUF base, saved for the LoRA adapter to point at


@dataclass
class TrainState:
    """What callbacks see: the optimizer step done so far (0 = initial model)."""

    step: int
    epoch: float
    total_steps: int
    out_dir: Path


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
            raise NegprefError("--forget: required (a JSON/JSONL file of question/answer records)")
        forget = config.forget
    forget = load_qa(forget, "forget records", config.max_length)
    if config.limit:
        forget = forget[: config.limit]
    groups = objective.groups
    if "refusal" in groups:
        if record_fields(forget[0]) != ("question", "answer"):
            raise NegprefError(
                f"--method {config.method}: needs question/answer forget records, got text records"
            )
        if idk is None:
            if not config.idk:
                raise NegprefError(
                    f"--idk: method {config.method} needs refusal answers, one per line "
                    "(e.g. tofu/idontknow.jsonl)"
                )
            idk = load_idk(config.idk, config.max_length)
        if not idk:
            raise NegprefError("--idk: no refusal answers given")
    elif idk is not None or config.idk:
        warnings.append(f"refusal answers are not used by method {config.method}")
        idk = None
    if "retain" in groups:
        if retain is None:
            if not config.retain:
                raise NegprefError(
                    f"--retain: method {config.method} (c_rt={config.c_rt}, "
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
        raise NegprefError("--model: required (a model directory, or --gguf FILE)")
    spec = ModelSpec(
        path=config.model,
        gguf=config.gguf,
        # bf16 weights would round lr-1e-5 updates away: keep float32 masters, autocast instead.
        dtype="float32" if config.dtype == "auto" else config.dtype,
        allow_pickle=config.allow_pickle,
        trust_remote_code=config.trust_remote_code,
    )
    return load_model(spec, device)


def _check_resume(out: Path, config_dict: dict) -> ckpt.Resumable | None:
    """The checkpoint to continue from, after checking the run used the same settings."""
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        if out.exists() and any(out.iterdir()):
            raise NegprefError(f"--resume: {out} holds no negpref run (no config.yaml)")
        return None
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    # A field added after the run started was at its default then.
    defaults = config_to_dict(UnlearnConfig())
    changed = [
        f"{k} ({saved.get(k, defaults[k])!r} -> {v!r})"
        for k, v in config_dict.items()
        if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != v
    ]
    if changed:
        raise NegprefError(
            f"--resume: {out} was started with other settings: {', '.join(changed)}; resume "
            "with the same settings or start a new run"
        )
    return ckpt.resumable_checkpoint(out)


def _reference_cache(engine: Engine, out: Path, fingerprint: str, is_main: bool) -> float:
    """Load the run's precomputed reference, or compute and store it; seconds spent."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    groups = engine.precomputed_groups
    if not groups:
        return 0.0
    path = out / REF_CACHE
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            if f.metadata().get("fingerprint") == fingerprint and set(groups) <= set(f.keys()):
                engine.data.ref_logps = {g: f.get_tensor(g) for g in groups}
                return 0.0
    start = time.perf_counter()
    engine.precompute_reference()
    seconds = time.perf_counter() - start
    if is_main:
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(engine.data.ref_logps, str(tmp), metadata={"fingerprint": fingerprint})
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
    engine: Engine, tokenizer, out: Path, final_out: Path, config
) -> tuple[Any, dict[str, str]]:
    """Write the final model into ``out`` (staged, then renamed); paths are ``final_out``'s."""
    model = engine.unwrapped
    written: dict[str, str] = {}

    def staged(name: str, save) -> None:
        _staged(out, name, save)
        written[f"{name}_dir"] = str(final_out / name)

    is_main = engine.accelerator.is_main_process
    if config.lora:
        if is_main and config.save_model:
            if config.gguf:  # what peft's AutoPeftModel* will load as the base
                base = (final_out / BASE_MODEL_DIR).resolve()
                model.peft_config[model.active_adapter].base_model_name_or_path = str(base)
                written["base_model_dir"] = str(final_out / BASE_MODEL_DIR)
            staged("adapter", lambda d: save_model(model, tokenizer, d))
        if config.merge:
            model = model.merge_and_unload()
    if is_main and config.save_model and (config.merge or not config.lora):
        staged("model", lambda d: save_model(model, tokenizer, d))
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

    ``callbacks``: objects with optional ``on_evaluate(state, model, tokenizer) -> dict``
    (step 0, then every ``eval_every`` steps or each epoch end, and the last step; main
    process) and ``on_step_end(state, metrics)`` (every step, every process).
    """
    config = config.resolved()
    objective = config.objective()
    if not config.out:
        raise NegprefError("--out: required (the run directory)")
    out = check_out_dir(config.out, overwrite=config.overwrite, resume=config.resume)
    # --overwrite builds the new run beside the old one and swaps at the end: a killed or
    # failed run leaves the old run whole.
    replacing = config.overwrite and out.is_dir() and any(out.iterdir())
    work = stage_path(out) if replacing else out
    inputs = _load_inputs(config, objective, forget_records, retain_records, idk_answers)
    accelerator = make_accelerator(config, project_dir=str(work), trackers=["tensorboard"])
    with _locked(accelerator, out):
        result = _train(config, objective, inputs, accelerator, work, model, tokenizer, callbacks)
        if replacing and accelerator.is_main_process:
            replace_dir(work, out)
        accelerator.wait_for_everyone()
    accelerator.end_training()  # closes the trackers (and, with several processes, the group)
    result.out_dir = out
    return result


@contextlib.contextmanager
def _locked(accelerator, out: Path):
    """The main process holds the run directory's lock; every process learns if it failed."""
    with contextlib.ExitStack() as stack:
        error = None
        if accelerator.is_main_process:
            try:
                stack.enter_context(run_dir_lock(out))
                recover_replaced(out)
            except NegprefError as e:
                error = str(e)
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            error = broadcast_object_list([error])[0]
        if error:
            raise NegprefError(error)
        yield


def _train(config, objective, inputs, accelerator, out, model, tokenizer, callbacks):
    """The run, in ``out`` (the run directory, or its stage when replacing an old run)."""
    config_dict = config_to_dict(config)
    resumable = _check_resume(out, config_dict) if config.resume else None
    resume_from = resumable.checkpoint if resumable is not None else None
    from accelerate.utils import set_seed

    set_seed(config.seed)
    model, tokenizer = _load_model(config, model, tokenizer, accelerator.device)
    if config.lora:
        check_lora_targets(model, config.lora_target_modules, "--lora-target-modules")
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
    warnings = inputs.warnings + (resumable.skipped if resumable is not None else [])
    for group, n in data.truncated.items():
        if n:
            warnings.append(
                f"{n} {group} sequences truncated to --max-length {config.max_length} tokens",
            )
    if accelerator.is_main_process:
        for message in warnings:
            print(f"negpref unlearn: warning: {message}", file=sys.stderr)
    fingerprint = data.fingerprint()

    is_main = accelerator.is_main_process
    if is_main:
        if out == stage_path(Path(config.out)):
            shutil.rmtree(out, ignore_errors=True)  # a stage left by a killed --overwrite run
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(config_dict, sort_keys=False))
    accelerator.wait_for_everyone()

    if is_main and config.lora and config.gguf and config.save_model:
        _save_gguf_base(model, tokenizer, out)
    accelerator.wait_for_everyone()
    engine = Engine(config, objective, model, tokenizer, data, accelerator)
    if engine.is_lora:
        accelerator.register_save_state_pre_hook(ckpt.keep_trainable_only)
    precompute_s = _reference_cache(engine, out, fingerprint, is_main)

    start_step = 0
    if resume_from is not None:
        state = ckpt.load_checkpoint(accelerator, resume_from, trainable_only=engine.is_lora)
        engine.scheduler.load_state_dict(state["scheduler"])
        if state["fingerprint"] != fingerprint:
            raise NegprefError(
                f"--resume: the data differ from the run's (fingerprint {fingerprint} vs "
                f"{state['fingerprint']}); resume with the same files and seed"
            )
        start_step = state["step"]
    log = _RunLog(out, accelerator, keep_through=start_step if resume_from is not None else -1)
    state = TrainState(start_step, engine.epoch_of(start_step), engine.total_steps, out)

    def trainer_state(step: int) -> dict:
        return {
            "step": step,
            "epoch": engine.epoch_of(step),
            "data_position": step * engine.effective_batch,
            "seed": config.seed,
            "fingerprint": fingerprint,
            "scheduler": engine.scheduler.state_dict(),
        }

    def evaluate() -> None:
        if is_main:
            for cb in callbacks:
                if hasattr(cb, "on_evaluate"):
                    with eval_mode(engine.unwrapped) as m:
                        values = cb.on_evaluate(state, m, tokenizer)
                    log.evaluation({"step": state.step, "epoch": state.epoch, **(values or {})})
        accelerator.wait_for_everyone()

    train_start = time.perf_counter()
    if start_step == 0:
        evaluate()
    bar = _progress_bar(engine, config, start_step, is_main)
    engine.model.train()
    for step in range(start_step + 1, engine.total_steps + 1):
        t0 = time.perf_counter()
        metrics = engine.train_step(step - 1)
        seconds = time.perf_counter() - t0
        finite, tokens = metrics.pop("finite"), metrics.pop("tokens")
        weights_finite = not metrics.pop("non_finite_weights", False)
        metrics = {
            "step": step,
            "epoch": round(engine.epoch_of(step), 6),
            **metrics,
            "step_s": seconds,
            "tokens_per_s": tokens / seconds,
        }
        log.step(metrics)
        if not finite:
            _stop_non_finite(
                accelerator, engine, out, step, metrics, weights_finite, trainer_state, config
            )
        state.step, state.epoch = step, engine.epoch_of(step)
        for cb in callbacks:
            if hasattr(cb, "on_step_end"):
                cb.on_step_end(state, metrics)
        bar.update(1)
        bar.set_postfix({k: f"{metrics[m]:.4g}" for k, m in _BAR_FIELDS if m in metrics})
        last = step == engine.total_steps
        if last or _due(engine, step, config.eval_every):
            evaluate()
        if config.save_every >= 0 and (last or _due(engine, step, config.save_every)):
            ckpt.save_checkpoint(
                accelerator,
                engine.unwrapped,
                out,
                step,
                trainer_state(step),
                config.save_total_limit,
            )
    bar.close()
    train_s = time.perf_counter() - train_start

    model, written = _save_final(engine, tokenizer, out, Path(config.out), config)
    summary = {
        "method": config.method,
        "objective": {
            "forget_loss": objective.forget_loss.description,
            **{k: getattr(config, k) for k in ("c_forget", "c_rt", "c_rtkl", "c_fgkl", "beta")},
        },
        "conventions": config.conventions,
        "prompt_format": prompt.describe(tokenizer),
        "steps": engine.total_steps,
        "epochs": config.epochs,
        "effective_batch": engine.effective_batch,
        "processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "n_forget": data.n_forget,
        "n_retain": len(data.retain),
        "truncated": data.truncated,
        "ref_mode": config.ref_mode,
        "live_reference_groups": list(engine.live_ref_groups),
        "precompute_s": precompute_s,
        "train_s": train_s,
        "resumed_from_step": start_step if resume_from is not None else None,
        "final_metrics": log.metrics[-1] if log.metrics else {},
        "warnings": warnings,
        **written,
    }
    if is_main:
        atomic_write_json(out / "summary.json", summary)
    accelerator.wait_for_everyone()
    return UnlearnResult(model, tokenizer, out, log.metrics, log.evals, summary)


_BAR_FIELDS = (("loss", "loss"), ("logp_fg", "logps/forget"), ("nll_rt", "nll/retain"))


def _progress_bar(engine: Engine, config, start_step: int, is_main: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=engine.total_steps,
        initial=start_step,
        desc=f"unlearn {config.method}",
        disable=not is_main or None,
        dynamic_ncols=True,
    )


def _due(engine: Engine, step: int, every: int) -> bool:
    """Every ``every`` steps, or at each epoch end when ``every`` is 0."""
    return step % every == 0 if every > 0 else engine.epoch_boundary(step)


class _RunLog:
    """``metrics.jsonl``, ``evals.jsonl`` and TensorBoard; lines after a resume point dropped."""

    def __init__(self, out: Path, accelerator, keep_through: int):
        self.accelerator = accelerator
        self.metrics_path, self.evals_path = out / "metrics.jsonl", out / "evals.jsonl"
        self.metrics: list[dict] = []
        self.evals: list[dict] = []
        if accelerator.is_main_process:
            self.metrics = read_jsonl_through(self.metrics_path, keep_through)
            self.evals = read_jsonl_through(self.evals_path, keep_through)
        if accelerator.log_with:
            accelerator.init_trackers("tensorboard")

    def step(self, metrics: dict) -> None:
        self.metrics.append(metrics)
        if self.accelerator.is_main_process:
            append_jsonl(self.metrics_path, metrics)
            if self.accelerator.log_with:
                scalars = {k: v for k, v in metrics.items() if k != "step"}
                self.accelerator.log(scalars, step=metrics["step"])

    def evaluation(self, record: dict) -> None:
        self.evals.append(record)
        append_jsonl(self.evals_path, record)


def _stop_non_finite(
    accelerator, engine, out, step, metrics, weights_finite, trainer_state, config
) -> None:
    """Stop at a non-finite step, naming the newest checkpoint whose weights are finite."""
    good = ckpt.latest_checkpoint(out)
    if (
        weights_finite
        and config.save_every >= 0
        and step > 1
        and (good is None or good.name != f"step-{step - 1:06d}")
    ):  # the bad step was not applied: the weights in memory are step - 1's
        good = ckpt.save_checkpoint(
            accelerator, engine.unwrapped, out, step - 1, trainer_state(step - 1),
            config.save_total_limit,
        )  # fmt: skip
    where = f"last good checkpoint: {good}" if good is not None else "no checkpoint was written"
    bad = [k for k in ("loss", "grad_norm") if not math.isfinite(metrics[k])]
    values = ", ".join(f"{k}={metrics[k]}" for k in bad)
    if weights_finite:
        what = f"non-finite {' and '.join(bad)} at step {step} ({values}); the step was not applied"
    else:
        what = f"step {step} made the weights non-finite (lr={metrics['lr']:g})"
    raise NegprefError(f"{what}, {where}; lower --lr or check the data and model")
