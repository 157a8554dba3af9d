"""Checkpoints of a run: accelerate's state (weights, optimizer, scheduler, RNG) + step.

A checkpoint is written into a ``.partial`` folder and renamed into place, so a kill
mid-save leaves the previous checkpoint as the latest complete one. Only the newest one is
kept. When part of the model is frozen (LoRA), only the trainable tensors are stored: the
frozen base is reloaded from ``--model`` on resume.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from negpref.io import atomic_write_json

STATE_FILE = "trainer_state.json"


def checkpoints_root(out: Path) -> Path:
    return out / "checkpoints"


def latest_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    root = checkpoints_root(out)
    if not root.is_dir():
        return None
    complete = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    return max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))


def keep_trainable_only(models, weights, output_dir) -> None:
    """accelerate save-state hook: drop frozen tensors (the reloadable base) from the weights."""
    for model, state in zip(models, weights, strict=False):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        for name in [k for k in state if k not in trainable]:
            del state[name]


def save_checkpoint(accelerator, out: Path, step: int, trainer_state: dict) -> Path:
    root = checkpoints_root(out)
    final = root / f"step-{step:06d}"
    partial = root / f".step-{step:06d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
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
        for old in root.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: Path, trainable_only: bool) -> dict:
    """Restore accelerate's state from ``checkpoint``; return its trainer state."""
    accelerator.load_state(str(checkpoint), strict=not trainable_only)
    return read_state(checkpoint)
