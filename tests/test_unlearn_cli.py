"""``negpref unlearn`` from the command line: a real run, and every bad input exits 2 cleanly."""

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from negpref.cli import main
from negpref.config import build_config
from negpref.data import load_lines, load_records
from negpref.models import build_tokenizer, save_model, tiny_llama
from negpref.training.checkpoint import latest_checkpoint, read_state
from negpref.unlearn import FORGET_LOSSES, PRESETS, ForgetLoss, Preset, UnlearnConfig, run

TOFU = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def records():
    forget = load_records(TOFU / "forget01.json")[:8]
    retain = load_records(TOFU / "retain90.json")[:8]
    return forget, retain


@pytest.fixture(scope="module")
def files(tmp_path_factory, records):
    """A tiny model directory and JSONL data files, as a user would have them."""
    root = tmp_path_factory.mktemp("unlearn_cli")
    forget, retain = records
    idk = load_lines(TOFU / "idontknow.jsonl")[:5]
    tok = build_tokenizer([r["question"] + " " + r["answer"] for r in forget + retain] + idk, 400)
    save_model(tiny_llama(len(tok), seed=0), tok, root / "model")
    paths = {"root": root, "model": root / "model"}
    for name, recs in (("forget", forget), ("retain", retain)):
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in recs))
    paths["idk"] = root / "idk.txt"
    paths["idk"].write_text("\n".join(idk) + "\n")
    return paths


def args(files, out, *extra):
    return [
        "unlearn",
        "--model",
        str(files["model"]),
        "--forget",
        str(files["forget"]),
        "--out",
        str(out),
        "--per-device-train-batch-size",
        "4",
        "--gradient-accumulation-steps",
        "1",
        "--num-train-epochs",
        "1",
        "--learning-rate",
        "1e-3",
        "--warmup-epochs",
        "0",
        *extra,
    ]


def fails(argv, capsys, *fragments):
    """Exit 2 with one error line naming the problem."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("negpref unlearn: error: "), err
    for fragment in fragments:
        assert fragment in err[-1], err[-1]
    return err[-1]


def test_cli_run_writes_a_complete_run_directory(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(args(files, out, "--method", "npo+rt", "--retain", str(files["retain"]), "--json"))
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "NPO+RT" and summary["steps"] == 2
    assert summary["final_metrics"]["logps/forget"] < summary["final_metrics"]["logps/ref_forget"]
    names = {p.name for p in out.iterdir()}
    assert {
        "config.yaml",
        "metrics.jsonl",
        "evals.jsonl",
        "summary.json",
        "model",
        "checkpoint-2",
        "reference_logps.safetensors",
    } <= names
    assert latest_checkpoint(out) == out / "checkpoint-2"  # the last step's, marked complete
    assert not [n for n in names if n.startswith(".")]  # no staging leftovers
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    # The saved config replays the run.
    replay = build_config(UnlearnConfig, None, **yaml.safe_load((out / "config.yaml").read_text()))
    assert replay.method == "NPO+RT" and replay.c_rt == 1.0


def test_cli_conventions_and_prompt_format_are_recorded(files, tmp_path, capsys):
    out = tmp_path / "ou"
    extra = ("--method", "GA+RT", "--retain", str(files["retain"]), "--no-chat-template")
    extra += ("--conventions", "open-unlearning", "--system-prompt", "Be brief.", "--json")
    assert main(args(files, out, *extra)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["conventions"] == "open-unlearning"
    assert summary["prompt_format"] == {
        "system_prompt": "Be brief.",
        "chat_template": False,
        "fallback_template": "Question: {question}\nAnswer:",
        "template_used": "fallback",
    }
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["conventions"], saved["system_prompt"], saved["chat_template"]) == (
        "open-unlearning",
        "Be brief.",
        False,
    )
    fails(args(files, tmp_path / "bad", "--fallback-template", "Q:"), capsys, "{question}")


def test_cli_lora_merge(files, tmp_path, capsys):
    out = tmp_path / "lora"
    assert main(args(files, out, "--method", "GA", "--lora", "--lora-r", "2", "--merge")) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "model" / "model.safetensors").is_file()
    ckpt = latest_checkpoint(out)
    stored = load_file(ckpt / "adapter_model.safetensors")
    assert stored and all("lora_" in k for k in stored)  # frozen base not duplicated
    assert not (ckpt / "model.safetensors").exists()


def test_bad_data_files(files, tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "nope.json"
    fails(args(files, out, "--forget", str(missing)), capsys, "nope.json", "not found")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    fails(args(files, out, "--forget", str(empty)), capsys, "empty")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", "answer": "a"}\n{"question": "q2", "answer": }\n')
    fails(args(files, out, "--forget", str(broken)), capsys, "broken.jsonl:2", "malformed")
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text('{"question": "q", "answer": "a"}\n{"question": "q2"}\n')
    fails(args(files, out, "--forget", str(no_answer)), capsys, "no_answer.jsonl:2", "answer")
    fails(args(files, out, "--method", "DPO"), capsys, "idk: ")
    fails(args(files, out, "--method", "NPO+RT"), capsys, "retain: ")
    fails(
        args(files, out, "--method", "NPO+RT", "--retain", str(no_answer)),
        capsys,
        "no_answer.jsonl:2",
    )
    assert not out.exists()  # nothing written for input errors


def test_bad_model_and_options(files, tmp_path, capsys):
    out = tmp_path / "out"
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((files["model"] / "config.json").read_text())
    fails(args(files, out, "--model", str(no_weights)), capsys, "no model weights")
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((files["model"] / f).read_bytes())
    fails(args(files, out, "--model", str(no_tok)), capsys, "no tokenizer")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (pickled / f).write_bytes((files["model"] / f).read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    fails(args(files, out, "--model", str(pickled)), capsys, "pickle", "--allow-pickle")
    fails(args(files, out, "--method", "XYZ"), capsys, "unknown preset 'XYZ'", "NPO+RT")
    fails(args(files, out, "--learning-rate", "-1"), capsys, "learning_rate: ")
    with pytest.raises(SystemExit) as exit_info:
        main(args(files, out, "--no-such-option", "1"))
    assert exit_info.value.code == 2
    assert not out.exists()


def test_existing_output_needs_overwrite_and_overlap_warns(files, tmp_path, capsys, records):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    fails(args(files, out), capsys, "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"

    forget, retain = records
    overlapping = tmp_path / "retain_overlap.jsonl"
    overlapping.write_text("".join(json.dumps(r) + "\n" for r in retain + forget[:3]))
    assert (
        main(args(files, out, "--overwrite", "--method", "GA+RT", "--retain", str(overlapping)))
        == 0
    )
    err = capsys.readouterr().err
    assert "3 of 8 forget records also appear in the retain set" in err
    assert not (out / "keep.txt").exists()
    assert json.loads((out / "summary.json").read_text())["warnings"]


def test_tokenizer_without_pad_token_is_handled(files, tmp_path, capsys):
    from transformers import AutoTokenizer

    model_dir = tmp_path / "nopad"
    tok = AutoTokenizer.from_pretrained(files["model"])
    tok.pad_token = None
    save_model(tiny_llama(len(tok), seed=0, pad_token_id=None), tok, model_dir)
    assert AutoTokenizer.from_pretrained(model_dir).pad_token is None
    assert main(args(files, tmp_path / "out", "--model", str(model_dir))) == 0


def test_nan_weights_stop_at_step_1(files, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(files["model"])
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    nan_dir = tmp_path / "nan_model"
    save_model(model, AutoTokenizer.from_pretrained(files["model"]), nan_dir)
    fails(
        args(files, tmp_path / "out", "--method", "GA", "--model", str(nan_dir)),
        capsys,
        "non-finite loss",
        "at step 1",
        "no checkpoint",
    )


def test_nan_mid_run_keeps_the_last_good_checkpoint(files, tmp_path, records, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from negpref.errors import NegprefError

    calls = []

    def breaks_at_step_3(step, beta, gamma):
        calls.append(1)
        value = -step["forget"].logps.mean() * 1e-3
        return value * math.nan if len(calls) == 3 else value

    monkeypatch.setitem(FORGET_LOSSES, "breaks", ForgetLoss(breaks_at_step_3, ("forget",)))
    monkeypatch.setitem(PRESETS, "BREAKS", Preset("breaks"))
    out = tmp_path / "nan_run"
    cfg = UnlearnConfig(
        method="breaks",
        output_dir=str(out),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        warmup_epochs=0,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=10,
    )
    model = AutoModelForCausalLM.from_pretrained(files["model"])
    tok = AutoTokenizer.from_pretrained(files["model"])
    with pytest.raises(NegprefError, match=r"non-finite loss.* at step 3 .*checkpoint-2"):
        run(cfg, model=model, tokenizer=tok, forget_records=records[0])
    good = latest_checkpoint(out)
    assert good.name == "checkpoint-2" and read_state(good)["step"] == 2
    weights = load_file(good / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [1, 2, 3] and math.isnan(lines[-1]["loss"])
    assert not (out / "model").exists() and not (out / "summary.json").exists()


def test_resume_refuses_other_settings(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(files, out)) == 0
    fails(
        args(files, out, "--resume", "--learning-rate", "1e-4"),
        capsys,
        "other settings",
        "learning_rate (0.001 -> 0.0001)",
    )


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_method_presets_load(path):
    text = yaml.safe_load(path.read_text())
    if "compute_environment" in text:  # an accelerate launcher file, not a method preset
        assert text["distributed_type"] in {"MULTI_CPU", "MULTI_GPU", "DEEPSPEED", "FSDP", "NO"}
        return
    ns = argparse.Namespace(config=path)
    cfg = build_config(UnlearnConfig, ns)
    assert cfg.resolved().objective().forget_loss in FORGET_LOSSES.values()
    for name in ("forget", "retain", "idk"):  # resolved against the YAML file's folder
        value = getattr(cfg, name)
        assert not value or Path(value).is_file(), (name, value)


def test_bench_step_cost_reports_every_mode(capsys):
    argv = [
        "bench",
        "step-cost",
        "--json",
        "--hidden",
        "64",
        "--layers",
        "1",
        "--vocab",
        "256",
        "--batch",
        "2",
        "--seq-len",
        "24",
        "--items",
        "4",
        "--reps",
        "1",
        "--threads",
        "1",
    ]
    assert main(argv) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("ga_step_s", "npo_precomputed_step_s", "npo_live_step_s", "precompute_s"):
        assert figures[key] > 0, key
    peak = figures["peak_mem_mb"]
    assert set(peak) == {"ga", "npo_precomputed", "npo_live", "ga_lora", "npo_live_lora",
                         "npo_rt_precomputed", "npo_rt_live", "ga_bf16",
                         "npo_precomputed_bf16"}  # fmt: skip
    # Without LoRA a live reference is a second copy of the model; with LoRA it is not.
    model_mb = (256 * 64 + 64 * 64 * 4 + 3 * 64 * 256 + 3 * 64) * 4 / 2**20
    assert peak["npo_live"] - peak["ga"] >= 0.9 * model_mb
    assert peak["npo_live_lora"] - peak["ga_lora"] < 0.5 * model_mb


def metrics_of(out):
    """metrics.jsonl without its wall-clock figures (step_s, tokens_per_s)."""
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in ln.items() if k not in ("step_s", "tokens_per_s")} for ln in lines]


def test_yaml_config_with_relative_paths_and_its_saved_config_replay(
    files, tmp_path, capsys, monkeypatch
):
    # "1e-5" without a dot is a string to YAML 1.1; the field's type makes it a float.
    (files["root"] / "run.yaml").write_text(
        "model: model\nforget: forget.jsonl\nretain: retain.jsonl\nmethod: NPO+RT\n"
        "learning_rate: 1e-5\nper_device_train_batch_size: 4\ngradient_accumulation_steps: 1\n"
        "num_train_epochs: 1\nwarmup_epochs: 0\n"
    )
    monkeypatch.chdir(tmp_path)  # the paths resolve against the YAML file, not here
    out = tmp_path / "first"
    config = str(files["root"] / "run.yaml")
    assert main(["unlearn", "--config", config, "--output-dir", str(out)]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["learning_rate"] == 1e-5
    assert (saved["model"], saved["forget"]) == (str(files["model"]), str(files["forget"]))
    lines = metrics_of(out)
    assert [ln["step"] for ln in lines] == [1, 2] and lines[0]["learning_rate"] == 1e-5
    other = tmp_path / "replay"
    assert main(["unlearn", "--config", str(out / "config.yaml"), "--output-dir", str(other)]) == 0
    # Same settings, seed and data order on the same machine: the same numbers, bit for bit.
    assert metrics_of(other) == lines
    assert yaml.safe_load((other / "config.yaml").read_text()) == {
        **saved,
        "output_dir": str(other),
    }


def test_unlearn_help_renders(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--learning-rate", "--num-train-epochs", "--output-dir", "--out", "--forget"):
        assert flag in text, flag
