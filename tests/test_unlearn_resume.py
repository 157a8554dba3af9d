"""``--resume`` after SIGKILL ends with bitwise the same weights as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_tiny_unlearn_inputs
from negpref.training.checkpoint import latest_checkpoint
from negpref.unlearn import UnlearnConfig, run

TOFU = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"


pytestmark = pytest.mark.usefixtures("one_thread")


# A run whose steps can be slowed through the public callback API, so the test can kill it
# between two checkpoints.
SCRIPT = """
import json, sys, time
import torch
torch.set_num_threads(1)
from negpref.unlearn import UnlearnConfig, run

class Slow:
    def on_step_end(self, state, metrics):
        time.sleep(float(sys.argv[2]))

run(UnlearnConfig(**json.loads(sys.argv[1])), callbacks=[Slow()])
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = write_tiny_unlearn_inputs(tmp_path_factory.mktemp("resume"))
    (root / "script.py").write_text(SCRIPT)
    return root


def launch(root, config, sleep):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        [sys.executable, str(root / "script.py"), json.dumps(config), str(sleep)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def losses(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(m["step"], m["loss"], m["grad_norm"]) for m in map(json.loads, lines)]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full", "lora"])
def test_resume_after_sigkill_is_bitwise_identical(setup, tmp_path, variant):
    root = setup
    config = dict(
        model=str(root / "model"),
        forget=str(root / "forget.jsonl"),
        retain=str(root / "retain.jsonl"),
        method="NPO+RT",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        num_train_epochs=5,
        warmup_epochs=1,
        learning_rate=3e-3,
        save_strategy="steps",
        save_steps=2,
        seed=3,
    )
    if variant == "lora":
        config.update(lora=True, lora_r=4, ref_mode="live", merge=True)
    # 8 items x 5 epochs / effective batch 4 = 10 steps.
    run(UnlearnConfig(**config, output_dir=str(tmp_path / "straight")))

    killed = {**config, "output_dir": str(tmp_path / "killed")}
    proc = launch(root, killed, 0.4)
    out = tmp_path / "killed"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ckpt = latest_checkpoint(out)
        done = len(losses(out)) if (out / "metrics.jsonl").exists() else 0
        if ckpt is not None and ckpt.name == "checkpoint-4" and done >= 5:
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    assert latest_checkpoint(out).name in ("checkpoint-4", "checkpoint-6")

    run(UnlearnConfig(**killed, resume=True))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] in (4, 6) and summary["steps"] == 10
    assert losses(out) == losses(tmp_path / "straight")  # the same curve, step for step
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    initial = load_file(root / "model" / "model.safetensors")
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # training did change weights
