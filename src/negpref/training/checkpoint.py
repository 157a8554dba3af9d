"""Checkpoints of a training run: transformers' ``checkpoint-N`` folders, verified and marked.

The Trainer writes each ``checkpoint-N`` (weights as safetensors, ``optimizer.pt``,
``scheduler.pt``, ``rng_state.pth``, ``trainer_state.json``); negpref adds, last, a marker
``negpref_state.json`` holding the run's data fingerprint. Guarantees, each tested:
- **Complete or ignored**: a checkpoint without its marker (a kill or a full disk mid-save) is
  not resumed from and is removed by the next resume.
- **Finite**: the non-finite guard (``negpref.training.trainer``) stops a run before a
  non-finite update, so no checkpoint holds non-finite weights.
- **Kept**: the newest ``save_total_limit`` (default 2) checkpoints stay on disk.
- **Verified on load, nothing executed**: before resuming, every file of the checkpoint is read
  back -- safetensors fully, ``.bin``/``.pkl``/``.pt``/``.pth`` files with
  ``torch.load(weights_only=True)`` -- and a checkpoint that is truncated, non-finite or holds
  anything but tensors and plain data is skipped for the previous one, saying why. negpref
  writes no pickled objects (no ``training_args.bin``), so a planted one makes the checkpoint
  unusable rather than run.
With LoRA only the adapter is stored: the frozen base is reloaded from the model the run names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from negpref.errors import NegprefError
from negpref.io import atomic_write_json

STATE_FILE = "negpref_state.json"
TRAINER_STATE_FILE = "trainer_state.json"
PREFIX = "checkpoint-"
_PICKLED = (".bin", ".pkl", ".pt", ".pth")


def step_of(path: Path) -> int:
    return int(path.name.removeprefix(PREFIX))


def _checkpoint_dirs(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    found = [p for p in out.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=step_of, reverse=True)


def complete_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints (those with negpref's marker), newest first."""
    return [p for p in _checkpoint_dirs(out) if (p / STATE_FILE).is_file()]


def incomplete_checkpoints(out: Path) -> list[Path]:
    return [p for p in _checkpoint_dirs(out) if not (p / STATE_FILE).is_file()]


def latest_checkpoint(out: Path) -> Path | None:
    found = complete_checkpoints(out)
    return found[0] if found else None


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))


def mark_complete(checkpoint: Path, state: dict) -> None:
    """Write the marker that makes ``checkpoint`` resumable (after everything else)."""
    atomic_write_json(checkpoint / STATE_FILE, {"step": step_of(checkpoint), **state})


def write_error(error: BaseException, out: Path, step: int) -> NegprefError:
    """The one-line error for a checkpoint that could not be written (a full disk, ...)."""
    previous = latest_checkpoint(out)
    kept = f"the last complete checkpoint is {previous}" if previous else "no checkpoint"
    return NegprefError(
        f"checkpoint at step {step} could not be written to {out} ({_reason(error)}); {kept}; "
        "free disk space, then rerun with --resume"
    )


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
        if not isinstance(state, dict) or state.get("step") != step_of(checkpoint):
            return f"{STATE_FILE} does not hold this checkpoint's step"
        path = checkpoint / TRAINER_STATE_FILE
        json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(checkpoint.iterdir()):
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
            f"resume: no usable checkpoint in {out}: " + "; ".join(skipped) + "; start a new run"
        )
    return None
