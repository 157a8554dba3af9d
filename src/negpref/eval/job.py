"""``negpref.eval.run`` and ``run_aggregate``: the jobs behind ``negpref eval``.

``run(EvalConfig)`` checks every input (output folder, evaluation sets, retain logs) before the
model loads, evaluates the benchmark (TOFU or MUSE), and writes the per-item logs (in the
chosen format) and ``aggregate.json`` to ``out``, which is replaced only at the end.
``run_aggregate(AggregateConfig)`` recomputes the aggregates from saved per-item logs.
Both return the aggregate, with the run's settings under ``run`` (``run`` only).
"""

from __future__ import annotations

import os
import time

from negpref.config import config_to_dict
from negpref.errors import NegprefError
from negpref.eval.config import AggregateConfig, EvalConfig
from negpref.eval.shards import Shards
from negpref.eval.tofu_logs import META_KEY
from negpref.io import atomic_write_json, check_out_dir, staged_out_dir


def run_aggregate(config: AggregateConfig) -> dict:
    from negpref.eval.tofu_logs import aggregate, check_retain_logs, load_logs

    config.validate()
    logs = load_logs(config.logs, "logs")
    retain_logs = None
    if config.retain_logs:
        retain_logs = load_logs(config.retain_logs, "retain_logs")
        check_retain_logs(logs, retain_logs, f"retain_logs {config.retain_logs}")
    result = aggregate(logs, retain_logs, config.privleak_ref_auc)
    if config.out:
        with staged_out_dir(config.out, config.overwrite) as stage:
            atomic_write_json(stage / "aggregate.json", result)
    return result


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _check_attack_nonmembers(config: EvalConfig, have_nonmembers: bool, how: str) -> None:
    """The reference / GradNorm attacks score members against non-members: refuse them
    without any, rather than load a second model for nothing."""
    asked = [
        name
        for name, on in (
            ("mia_ref_model", config.mia_ref_model),
            ("mia_gradnorm", config.mia_gradnorm),
        )
        if on
    ]
    if asked and not have_nonmembers:
        raise NegprefError(
            f"{' and '.join(asked)}: membership inference needs non-members; give {how}"
        )


def _launched() -> bool:
    """Whether this process is one of several (``accelerate launch`` or ``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _processes(config: EvalConfig):
    """accelerate's state of the processes the evaluation is split over, None in a plain
    run; each process evaluates on its own device."""
    if not _launched():
        return None
    from accelerate import PartialState

    return PartialState(cpu=_device(config.device) == "cpu")


def _load_models(config: EvalConfig, processes=None):
    """The evaluated model and tokenizer, the KL reference and the MIA reference (or None)."""
    from negpref.models import ModelSpec, load_model

    device = str(processes.device) if processes is not None else _device(config.device)
    spec = dict(
        dtype=config.dtype,
        allow_pickle=config.allow_pickle,
        trust_remote_code=config.trust_remote_code,
    )
    model, tokenizer = load_model(ModelSpec(config.model or "", config.gguf, **spec), device)
    ref_model = mia_ref_model = None
    if config.ref_model or config.ref_gguf:
        ref_model, _ = load_model(
            ModelSpec(config.ref_model or "", config.ref_gguf, **spec), device
        )
    if config.mia_ref_model:
        mia_ref_model, _ = load_model(ModelSpec(config.mia_ref_model, None, **spec), device)
    return model, tokenizer, ref_model, mia_ref_model


def run(config: EvalConfig, progress: bool = True) -> dict:
    """Evaluate ``config.model`` on ``config.benchmark`` (module docstring); ``progress``
    shows progress bars."""
    config.validate()
    if config.benchmark == "muse":
        return _run_muse(config, progress)

    from negpref.eval.tofu import evaluate_tofu, load_tofu_sets
    from negpref.eval.tofu_logs import (
        aggregate,
        check_logs,
        check_retain_logs_match_sets,
        load_logs,
        write_logs,
    )

    # Everything a user can get wrong is checked before the model loads.
    check_out_dir(config.out, overwrite=config.overwrite)
    sets = load_tofu_sets(
        config.data_dir, config.split, config.limit, config.sample_seed, config.holdout
    )
    retain_logs = None
    if config.retain_logs:
        where = f"retain_logs {config.retain_logs}"
        retain_logs = load_logs(config.retain_logs, "retain_logs")
        check_logs(retain_logs, where)
        check_retain_logs_match_sets(retain_logs, sets, where)
    _check_attack_nonmembers(config, sets.holdout is not None, "holdout (or holdoutNN.json)")

    processes = _processes(config)
    model, tokenizer, ref_model, mia_ref_model = _load_models(config, processes)
    start = time.perf_counter()
    logs = evaluate_tofu(
        model,
        tokenizer,
        sets,
        batch_size=config.batch_size,
        max_new_tokens=config.max_new_tokens,
        max_length=config.max_length,
        ref_model=ref_model,
        mia_k=config.mia_k,
        progress=progress,
        prompt=config.prompt_format(),
        conventions=config.conventions,
        generate=config.generation,
        mia_ref_model=mia_ref_model,
        gradnorm=config.mia_gradnorm,
        shards=Shards.of_processes(),
    )
    seconds = time.perf_counter() - start
    result = aggregate(logs, retain_logs, config.privleak_ref_auc)
    result["run"] = {
        "config": config_to_dict(config),
        "sets": {
            kind: s.source
            for kind, s in {**sets.present(), "holdout": sets.holdout}.items()
            if s is not None
        },
        "prompt_format": logs[META_KEY]["prompt_format"],
        "eval_seconds": seconds,
        "processes": processes.num_processes if processes is not None else 1,
    }
    with staged_out_dir(config.out, config.overwrite, processes=processes) as stage:
        if processes is None or processes.is_main_process:
            write_logs(stage, logs, result, config.log_format)
            atomic_write_json(stage / "aggregate.json", result)
    return result


def _run_muse(config: EvalConfig, progress: bool) -> dict:
    """``benchmark: muse``: MUSE logs (``muse_logs.json``) and their aggregate."""
    from negpref.eval import muse

    if _launched():
        raise NegprefError(
            "benchmark muse: the MUSE evaluation runs in one process; run `negpref eval` "
            "without accelerate launch / torchrun (TOFU's is split over processes)"
        )
    check_out_dir(config.out, overwrite=config.overwrite)
    sets = muse.load_muse_sets(
        config.forget_text,
        config.holdout_text,
        config.qa,
        config.retain_qa,
        config.verbmem,
        limit=config.limit,
        seed=config.sample_seed,
    )
    retain_logs = muse.load_muse_logs(config.retain_logs) if config.retain_logs else None
    _check_attack_nonmembers(config, sets.holdout_text is not None, "holdout_text")
    model, tokenizer, _, mia_ref_model = _load_models(config)
    start = time.perf_counter()
    logs = muse.evaluate_muse(
        model,
        tokenizer,
        sets,
        prefix_tokens=config.prefix_tokens,
        continuation_tokens=config.continuation_tokens,
        qa_max_new_tokens=config.qa_max_new_tokens,
        batch_size=config.batch_size,
        mia_k=config.mia_k,
        prompt=config.prompt_format(),
        conventions=config.conventions,
        mia_ref_model=mia_ref_model,
        gradnorm=config.mia_gradnorm,
        progress=progress,
    )
    result = muse.aggregate_muse(logs, retain_logs, config.privleak_ref_auc)
    result["run"] = {
        "config": config_to_dict(config),
        "sets": sets.sources,
        "prompt_format": logs[META_KEY]["prompt_format"],
        "eval_seconds": time.perf_counter() - start,
    }
    with staged_out_dir(config.out, config.overwrite) as stage:
        atomic_write_json(stage / muse.LOGS_FILE, logs)
        atomic_write_json(stage / "aggregate.json", result)
    return result
