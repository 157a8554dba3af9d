"""Nothing runs that the user did not ask for, nothing is lost: checkpoints, locks, replacing.

Runs are interrupted in-process by a callback that raises after a step (what a kill leaves on
disk is the same: the checkpoints written so far); SIGKILL itself is covered by
test_unlearn_resume.py.
"""

import errno
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_tiny_unlearn_inputs
from negpref.align import run as align_run
from negpref.align.config import AlignConfig
from negpref.align.trainer import AlignTrainer
from negpref.data import pref_task
from negpref.errors import NegprefError
from negpref.io import recover_replaced, replace_dir, run_dir_lock, stage_path
from negpref.models import save_model, tiny_llama
from negpref.training import checkpoint as ckpt
from negpref.unlearn import UnlearnConfig, run

TOFU = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"

pytestmark = pytest.mark.usefixtures("one_thread")


class Interrupt(Exception):
    pass


class StopAfter:
    """Raises after optimizer step ``step`` (before its checkpoint), as a kill would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, state, metrics):
        if state.step == self.step:
            raise Interrupt


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = write_tiny_unlearn_inputs(tmp_path_factory.mktemp("durability"))
    # 8 records x 2 epochs / effective batch 4 = 4 steps, a checkpoint after each.
    base = dict(
        model=str(root / "model"), forget=str(root / "forget.jsonl"),
        retain=str(root / "retain.jsonl"), method="NPO+RT", per_device_train_batch_size=4,
        gradient_accumulation_steps=1, num_train_epochs=2, learning_rate=3e-3,
        save_strategy="steps", save_steps=1, seed=1,
    )  # fmt: skip
    run(UnlearnConfig(**base, output_dir=str(root / "straight")))
    return root, base


def weights(out: Path) -> dict:
    return load_file(out / "model" / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:  # bitwise: resuming redoes exactly the same steps
        assert torch.equal(wa[name], wb[name]), name


def interrupted(setup, out: Path, after: int = 3) -> dict:
    _, base = setup
    config = {**base, "output_dir": str(out)}
    with pytest.raises(Interrupt):
        run(UnlearnConfig(**config), callbacks=[StopAfter(after)])
    return config


class Payload:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_two_newest_checkpoints_are_kept(setup, tmp_path):
    interrupted(setup, tmp_path / "run")
    names = [p.name for p in ckpt.complete_checkpoints(tmp_path / "run")]
    assert names == ["checkpoint-2", "checkpoint-1"]


@pytest.mark.parametrize(
    "victim",
    [
        "model.safetensors",
        "optimizer.pt",
        "rng_state.pth",
        ckpt.STATE_FILE,
        "scheduler.pt",
        ckpt.TRAINER_STATE_FILE,
        "training_args.bin",
    ],
)  # fmt: skip  (every file of a checkpoint-N, and the pickle negpref no longer writes)
def test_a_planted_pickle_payload_never_runs_on_resume(setup, tmp_path, victim):
    root, _ = setup
    out = tmp_path / "run"
    config = interrupted(setup, out)
    newest = ckpt.latest_checkpoint(out)
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(Payload(marker))
    (newest / victim).write_bytes(payload)
    pickle.loads(payload)  # the payload is live: unpickling it runs the command
    assert marker.exists()
    marker.unlink()
    result = run(UnlearnConfig(**{**config, "resume": True}))
    assert not marker.exists(), f"the payload in {victim} ran"
    # refused as a checkpoint; the older one is used, saying which file and why
    assert result.summary["resumed_from_step"] == 1
    assert any(f"{victim}:" in w and "unusable" in w for w in result.summary["warnings"])
    assert_same_weights(out, root / "straight")


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(setup, tmp_path):
    root, _ = setup
    out = tmp_path / "run"
    config = interrupted(setup, out)
    model_file = ckpt.latest_checkpoint(out) / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:1000])  # power loss mid-write
    result = run(UnlearnConfig(**{**config, "resume": True}))
    assert result.summary["resumed_from_step"] == 1
    assert_same_weights(out, root / "straight")


def test_no_usable_checkpoint_is_one_clear_error(setup, tmp_path):
    out = tmp_path / "run"
    config = interrupted(setup, out)
    for checkpoint in ckpt.complete_checkpoints(out):
        (checkpoint / "optimizer.pt").write_bytes(b"\0" * 10)
    with pytest.raises(NegprefError, match="no usable checkpoint"):
        run(UnlearnConfig(**{**config, "resume": True}))


def test_a_torn_last_metrics_line_is_dropped_on_resume(setup, tmp_path):
    root, _ = setup
    out = tmp_path / "run"
    config = interrupted(setup, out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # the run died mid-line
    run(UnlearnConfig(**{**config, "resume": True}))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    straight = [
        json.loads(x) for x in (root / "straight" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["loss"] for m in lines] == [m["loss"] for m in straight]


def test_a_second_run_on_a_locked_out_dir_is_refused(setup, tmp_path):
    _, base = setup
    out = tmp_path / "run"
    with run_dir_lock(out), pytest.raises(NegprefError, match="another negpref run"):
        run(UnlearnConfig(**base, output_dir=str(out)))
    assert not out.exists()  # refused before anything was written
    run(
        UnlearnConfig(**{**base, "num_train_epochs": 1}, output_dir=str(out))
    )  # the lock went with its holder


def test_overwrite_keeps_the_old_run_until_the_new_one_has_finished(setup, tmp_path):
    _, base = setup
    out = tmp_path / "run"
    run(UnlearnConfig(**{**base, "num_train_epochs": 1}, output_dir=str(out)))
    old = weights(out)
    with pytest.raises(Interrupt):
        run(UnlearnConfig(**base, output_dir=str(out), overwrite=True), callbacks=[StopAfter(3)])
    assert json.loads((out / "summary.json").read_text())["steps"] == 2  # the old run, whole
    assert all(torch.equal(old[k], v) for k, v in weights(out).items())
    result = run(UnlearnConfig(**base, output_dir=str(out), overwrite=True))
    assert result.out_dir == out and result.summary["model_dir"] == str(out / "model")
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert not stage_path(out).exists()


def test_replacing_a_directory_survives_a_kill_between_its_renames(tmp_path):
    out, stage = tmp_path / "run", tmp_path / "stage"
    out.mkdir()
    (out / "old.txt").write_text("old")
    stage.mkdir()
    (stage / "new.txt").write_text("new")
    os.replace(out, tmp_path / ".run.old")  # replace_dir's first rename, then the kill
    recover_replaced(out)
    assert (out / "old.txt").read_text() == "old"
    replace_dir(stage, out)
    assert (out / "new.txt").read_text() == "new" and not (tmp_path / ".run.old").exists()


def test_an_infinite_learning_rate_is_refused():
    with pytest.raises(NegprefError, match="learning_rate"):
        UnlearnConfig(learning_rate=float("inf"), forget="f", output_dir="o").validate()


def test_weights_that_turn_non_finite_stop_the_run_at_the_last_good_checkpoint(
    setup, tmp_path, monkeypatch
):
    _, base = setup
    out = tmp_path / "run"
    real_step = torch.optim.AdamW.step
    steps = []

    def overflowing_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 2:  # an update that overflows, from a finite loss and gradient
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    with pytest.raises(NegprefError, match=r"step 2 made the weights non-finite.*checkpoint-1"):
        run(UnlearnConfig(**base, output_dir=str(out)))
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["checkpoint-1"]
    assert ckpt.verify_checkpoint(ckpt.latest_checkpoint(out)) is None


def test_a_full_disk_during_a_checkpoint_is_one_clear_error(setup, tmp_path, monkeypatch):
    from transformers import Trainer

    _, base = setup
    out = tmp_path / "run"
    real_save = Trainer._save_optimizer_and_scheduler
    calls = []

    def save_optimizer(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 2:  # the weights are written, the optimizer state fills the disk
            Path(output_dir, "optimizer.pt").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", save_optimizer)
    with pytest.raises(
        NegprefError,
        match=r"step 2 could not be written.*No space left.*checkpoint-1.*--resume",
    ):
        run(UnlearnConfig(**base, output_dir=str(out)))
    left = sorted(p.name for p in out.iterdir() if "checkpoint" in p.name)
    assert left == ["checkpoint-1"]  # the partial checkpoint-2 is removed


def test_a_checkpoint_with_non_finite_weights_is_not_resumed_from(setup, tmp_path):
    from safetensors.torch import save_file

    root, _ = setup
    out = tmp_path / "run"
    config = interrupted(setup, out)
    model_file = ckpt.latest_checkpoint(out) / "model.safetensors"
    tensors = load_file(model_file)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(model_file), metadata={"format": "pt"})
    assert f"tensor {name} is not finite" in ckpt.verify_checkpoint(model_file.parent)
    result = run(UnlearnConfig(**{**config, "resume": True}))
    assert result.summary["resumed_from_step"] == 1
    assert any("not finite" in w for w in result.summary["warnings"])
    assert_same_weights(out, root / "straight")


# --- negpref align ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def align_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    tokenizer = pref_task.task_tokenizer()
    save_model(tiny_llama(len(tokenizer), seed=0), tokenizer, root / "policy")
    pref_task.write_task(root / "task", n_records=8, k=3)
    base = dict(
        model=str(root / "policy"), data=str(root / "task" / "train.jsonl"), method="mcpo",
        num_negatives=1, per_device_train_batch_size=2, max_steps=6, learning_rate=3e-3,
        save_strategy="steps", save_steps=2, max_length=64, use_cpu=True, seed=2,
        report_to="none",
    )  # fmt: skip
    align_run.run(AlignConfig(**base, output_dir=str(root / "straight")))
    return root, base


def test_align_resumes_bitwise_from_its_last_checkpoint(align_setup, tmp_path, monkeypatch):
    root, base = align_setup
    out = tmp_path / "run"
    real_loss = AlignTrainer.pair_loss

    def die_in_step_6(self, *args, **kwargs):
        if self.state.global_step == 5:
            raise Interrupt
        return real_loss(self, *args, **kwargs)

    monkeypatch.setattr(AlignTrainer, "pair_loss", die_in_step_6)
    with pytest.raises(Interrupt):
        align_run.run(AlignConfig(**base, output_dir=str(out)))
    monkeypatch.setattr(AlignTrainer, "pair_loss", real_loss)
    assert not out.exists() and ckpt.latest_checkpoint(stage_path(out)).name == "checkpoint-4"
    with pytest.raises(NegprefError, match=r"unfinished run.*--resume"):
        align_run.run(AlignConfig(**base, output_dir=str(out)))  # nothing discarded silently
    summary = align_run.run(AlignConfig(**base, output_dir=str(out), resume=True))
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 6
    assert_same_weights(out, root / "straight")

    def losses(path):
        lines = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return [(m["step"], m["loss"]) for m in lines]

    assert losses(out) == losses(root / "straight")
    with pytest.raises(NegprefError, match="finished run"):
        align_run.run(AlignConfig(**base, output_dir=str(out), resume=True))


def test_align_refuses_a_locked_out_dir(align_setup, tmp_path):
    _, base = align_setup
    out = tmp_path / "run"
    with run_dir_lock(out), pytest.raises(NegprefError, match="another negpref run"):
        align_run.run(AlignConfig(**base, output_dir=str(out)))


def test_a_stage_left_by_a_killed_run_is_swept_by_the_next_one(tmp_path):
    from negpref.io import staged_out_dir

    out = tmp_path / "run"
    stale = stage_path(out)
    stale.mkdir()
    (stale / "half.json").write_text("{")  # a kill mid-run, before any checkpoint
    with staged_out_dir(out) as stage:
        assert stage == stale and not (stage / "half.json").exists()
        (stage / "done.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no stage, no lock file left
    assert (out / "done.json").is_file()
