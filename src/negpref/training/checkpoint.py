"""Checkpoints of a training run: accelerate's state (weights, optimizer, RNG) + a JSON state.

Guarantees, each tested:
- **Atomic**: a checkpoint is written into a ``.partial`` folder and renamed into place; a kill
  or a full disk mid-save leaves the previous checkpoints as they were (the partial folder is
  removed, or swept by the next save).
- **Finite**: a checkpoint whose trainable tensors are not all finite is never written, so a
  checkpoint called good is good.
- **Kept**: the newest ``keep`` (default 2) complete checkpoints stay on disk.
- **Verified on load, nothing executed**: before resuming, every file of the checkpoint is read
  back -- safetensors fully, ``.bin``/``.pkl`` files with ``torch.load(weights_only=True)`` -- and a
  checkpoint that is truncated, non-finite or holds anything but tensors and plain data is
  skipped for the previous one, saying why. negpref registers no custom (pickled) objects with
  accelerate: schedules and counters live in ``trainer_state.json``; a planted
  ``custom_checkpoint_*.pkl`` is never read.
When part of the model is frozen (LoRA), only the trainable tensors are stored: the frozen base
is reloaded from the model the run names.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from negpref.errors import NegprefError
from negpref.io import atomic_write_json

STATE_FILE = "trainer_state.json"
_PICKLED = (".bin", ".pkl", ".pt", ".pth")


def checkpoints_root(out: Path) -> Path:
    return out / "checkpoints"


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def complete_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints (those with a state file), newest first."""
    root = checkpoints_root(out)
    if not root.is_dir():
        return []
    complete = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(complete, key=_step_of, reverse=True)


def latest_checkpoint(out: Path) -> Path | None:
    found = complete_checkpoints(out)
    return found[0] if found else None


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))


def keep_trainable_only(models, weights, output_dir) -> None:
    """accelerate save-state hook: drop frozen tensors (the reloadable base) from the weights."""
    for model, state in zip(models, weights, strict=False):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        for name in [k for k in state if k not in trainable]:
            del state[name]


def non_finite_parameters(model) -> list[str]:
    """Names of trainable parameters holding a NaN or an infinity."""
    return [
        n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()
    ]


def save_checkpoint(
    accelerator, model, out: Path, step: int, trainer_state: dict, keep: int = 2
) -> Path:
    """Write checkpoint ``step`` of ``model`` atomically; keep the newest ``keep``."""
    bad = non_finite_parameters(model)
    if bad:
        raise NegprefError(
            f"checkpoint at step {step} not written: {len(bad)} parameters are not finite "
            f"(first: {bad[0]}); lower the learning rate or check the data"
        )
    root = checkpoints_root(out)
    final = root / f"step-{step:06d}"
    partial = root / f".step-{step:06d}.partial"
    try:
        if accelerator.is_main_process:
            for stale in root.glob(".step-*.partial"):  # left by a killed save
                shutil.rmtree(stale, ignore_errors=True)
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        # accelerate warns about tied weights it de-duplicates; reloading restores the tie.
        tied_warnings = logging.getLogger("accelerate.utils.other")
        level = tied_warnings.level
        tied_warnings.setLevel(logging.ERROR)
        try:
            accelerator.save_state(str(partial), safe_serialization=True)
        finally:
            tied_warnings.setLevel(level)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            atomic_write_json(partial / STATE_FILE, trainer_state)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
    except (OSError, RuntimeError) as e:  # a full disk surfaces as either
        shutil.rmtree(partial, ignore_errors=True)
        previous = latest_checkpoint(out)
        kept = f"the last complete checkpoint is {previous}" if previous else "no checkpoint"
        raise NegprefError(
            f"checkpoint at step {step} could not be written to {root} ({_reason(e)}); {kept}; "
            "free disk space, then rerun with --resume"
        ) from None
    if accelerator.is_main_process:
        for old in complete_checkpoints(out)[max(keep, 1) :]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def verify_checkpoint(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from, or None. Reads every file; executes nothing."""
    from accelerate.utils.other import load as safe_torch_load  # weights_only=True + numpy RNG
    from safetensors import safe_open

    path = checkpoint / STATE_FILE
    try:
        state = read_state(checkpoint)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            return f"{STATE_FILE} holds no step"
        for path in sorted(checkpoint.iterdir()):
            if path.name.startswith("custom_checkpoint_"):
                return f"{path.name}: negpref writes no pickled objects; it was put there"
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                        if not torch.isfinite(f.get_tensor(key)).all():
                            return f"{path.name}: tensor {key} is not finite"
            elif path.suffix in _PICKLED:
                safe_torch_load(path, map_location="cpu")
    except Exception as e:  # any failure to read back means: do not resume from here
        return f"{path.name}: {type(e).__name__}: {_reason(e)}"
    return None


@dataclass
class Resumable:
    checkpoint: Path
    skipped: list[str]  # one line per newer checkpoint that failed verification


def resumable_checkpoint(out: Path) -> Resumable | None:
    """The newest checkpoint that verifies, with what was skipped on the way (or None)."""
    skipped = []
    for checkpoint in complete_checkpoints(out):
        problem = verify_checkpoint(checkpoint)
        if problem is None:
            return Resumable(checkpoint, skipped)
        skipped.append(f"checkpoint {checkpoint} is unusable ({problem}); using an older one")
    if skipped:
        raise NegprefError(
            f"--resume: no usable checkpoint in {checkpoints_root(out)}: "
            + "; ".join(skipped)
            + "; start a new run"
        )
    return None


def load_checkpoint(accelerator, checkpoint: Path, trainable_only: bool) -> dict:
    """Restore accelerate's state from a verified ``checkpoint``; return its trainer state."""
    accelerator.load_state(str(checkpoint), strict=not trainable_only)
    return read_state(checkpoint)
