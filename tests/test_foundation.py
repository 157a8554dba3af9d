"""Records, tokenization, log-probs, model loading, configs and output directories."""

import argparse
import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from conftest import rounding_bound
from negpref.config import add_config_arguments, build_config
from negpref.data import collate, encode_qa, encode_text, load_lines, load_records
from negpref.errors import NegprefError
from negpref.io import check_out_dir, staged_out_dir
from negpref.logprobs import sequence_logps
from negpref.models import ModelSpec, build_tokenizer, load_model, save_model, tiny_llama

TOFU = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"


@pytest.fixture(scope="module")
def forget01():
    return load_records(TOFU / "forget01.json", ("question", "answer"))


@pytest.fixture(scope="module")
def tokenizer(forget01):
    return build_tokenizer([r["question"] + " " + r["answer"] for r in forget01], vocab_size=400)


def test_load_records_formats_and_errors(tmp_path, forget01):
    assert len(forget01) == 40 and set(forget01[0]) == {"question", "answer"}
    array = tmp_path / "a.json"
    array.write_text(json.dumps(forget01[:3]))
    assert load_records(array, ("question", "answer")) == forget01[:3]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n\n{"question": "q2", answer}\n')
    with pytest.raises(NegprefError, match=r"bad.jsonl:3:20: malformed JSON"):
        load_records(bad)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"question": "q", "answer": "a"}\n{"question": "q2"}\n')
    with pytest.raises(NegprefError, match=r"missing.jsonl:2: missing field\(s\) answer"):
        load_records(missing, ("question", "answer"))
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    with pytest.raises(NegprefError, match="empty"):
        load_records(empty)
    with pytest.raises(NegprefError, match="not found"):
        load_records(tmp_path / "nope.json")
    assert load_lines(TOFU / "idontknow.jsonl")[0] == "I'm not certain about that."


def test_encode_qa_masks_exactly_the_answer_and_eos(tokenizer, forget01):
    record = forget01[0]
    enc = encode_qa(tokenizer, record["question"], record["answer"], max_length=256)
    answer_ids = [i for i, m in zip(enc.input_ids, enc.answer_mask) if m]
    assert answer_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer_ids[:-1]).strip() == record["answer"]
    prompt_ids = [i for i, m in zip(enc.input_ids, enc.answer_mask) if not m]
    assert prompt_ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(prompt_ids[1:]) == f"Question: {record['question']}\nAnswer:"
    assert not enc.truncated


def test_encode_qa_truncates_answers_and_refuses_prompts_without_room(tokenizer, forget01):
    record = forget01[0]
    full = encode_qa(tokenizer, record["question"], record["answer"], max_length=256)
    n_prompt = full.answer_mask.index(1)
    short = encode_qa(tokenizer, record["question"], record["answer"], max_length=n_prompt + 3)
    assert short.truncated and len(short.input_ids) == n_prompt + 3 and sum(short.answer_mask) == 3
    with pytest.raises(NegprefError, match="max-length"):
        encode_qa(tokenizer, record["question"], record["answer"], max_length=n_prompt)


def test_chat_template_is_used_when_present(forget01):
    tok = build_tokenizer([r["question"] + " " + r["answer"] for r in forget01], vocab_size=400)
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    enc = encode_qa(tok, "Who?", "Nobody.", max_length=64)
    prompt = tok.decode([i for i, m in zip(enc.input_ids, enc.answer_mask) if not m])
    assert prompt == "<s>user: Who?\n<s>assistant: "
    answer = tok.decode([i for i, m in zip(enc.input_ids, enc.answer_mask) if m])
    assert answer == "Nobody.</s>"


def test_encode_text_scores_every_token_after_bos(tokenizer):
    enc = encode_text(tokenizer, "The full name of the author", max_length=64)
    assert enc.answer_mask[0] == 0 and all(enc.answer_mask[1:])


def test_batched_logps_equal_single_sequence_logps(tokenizer, forget01):
    model = tiny_llama(len(tokenizer))
    encoded = [encode_qa(tokenizer, r["question"], r["answer"], 128) for r in forget01[:5]]
    batch = collate(encoded, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 5
    with torch.no_grad():
        together = sequence_logps(model, batch)
        alone = [sequence_logps(model, collate([e], tokenizer.pad_token_id)) for e in encoded]
    # A sum of n same-sign fp32 token log-probs is exact to n * eps relative. Measured 0
    # batched vs alone, 9.3e-8 relative vs the float64 sum by hand (was atol=1e-4, rtol=1e-5)
    rtol = rounding_bound(torch.float32, together.n_tokens.max().item(), 1.0)
    torch.testing.assert_close(
        together.logps, torch.cat([a.logps for a in alone]), atol=0, rtol=rtol
    )
    assert together.n_tokens.tolist() == [sum(e.answer_mask) for e in encoded]
    # the summed log-prob is the sum of token log-probs of the answer, computed by hand
    e = encoded[0]
    with torch.no_grad():
        logits = model(torch.tensor([e.input_ids])).logits[0].log_softmax(-1)
    by_hand = sum(
        logits[t - 1, e.input_ids[t]].item() for t in range(1, len(e.input_ids)) if e.answer_mask[t]
    )
    assert together.logps[0].item() == pytest.approx(by_hand, rel=rtol)


def test_model_directory_checks_and_round_trip(tmp_path, tokenizer):
    model = tiny_llama(len(tokenizer))
    save_model(model, tokenizer, tmp_path / "m")
    loaded, loaded_tok = load_model(ModelSpec(path=str(tmp_path / "m")))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded_tok.pad_token_id == tokenizer.pad_token_id

    with pytest.raises(NegprefError, match=r"no config\.json"):
        load_model(ModelSpec(path=str(tmp_path)))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(NegprefError, match="--allow-pickle"):
        load_model(ModelSpec(path=str(pickled)))
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((tmp_path / "m" / f).read_bytes())
    with pytest.raises(NegprefError, match="no tokenizer"):
        load_model(ModelSpec(path=str(no_tok)))


@dataclasses.dataclass
class _Cfg:
    lr: float = dataclasses.field(default=1e-5, metadata={"help": "learning rate"})
    epochs: int = 10
    methods: list[str] = dataclasses.field(default_factory=lambda: ["NPO"])
    lora: bool = False
    name: str | None = None

    def validate(self):
        if self.lr <= 0:
            raise NegprefError(f"--lr: must be positive, got {self.lr}")


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, _Cfg)
    return parser.parse_args(argv)


def test_config_precedence_defaults_yaml_flags(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("lr: 0.001\nepochs: 3\nmethods: [GA, NPO+RT]\n")
    cfg = build_config(_Cfg, _parse(["--config", str(yaml_file), "--epochs", "5", "--lora"]))
    assert (cfg.lr, cfg.epochs, cfg.methods, cfg.lora, cfg.name) == (
        0.001,
        5,
        ["GA", "NPO+RT"],
        True,
        None,
    )
    assert build_config(_Cfg, _parse([])) == _Cfg()


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr_typo: 1\n", "unknown field 'lr_typo'"),
        ("epochs: three\n", "field 'epochs' must be int"),
        ("- 1\n", "expected a mapping"),
        ("lr: -1\n", "--lr: must be positive"),
    ],
)
def test_config_errors_name_the_field(tmp_path, text, message):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(text)
    with pytest.raises(NegprefError, match=message):
        build_config(_Cfg, _parse(["--config", str(yaml_file)]))


def test_out_dir_is_never_clobbered(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("old run")
    with pytest.raises(NegprefError, match="--overwrite"):
        check_out_dir(out)
    with pytest.raises(RuntimeError), staged_out_dir(out, overwrite=True) as stage:
        (stage / "half.txt").write_text("half")
        raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert (out / "keep.txt").read_text() == "old run"
    with staged_out_dir(out, overwrite=True) as stage:
        (stage / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]


def test_outputs_get_the_usual_file_modes(tmp_path):
    from negpref.io import atomic_write_text

    old = os.umask(0o022)
    try:
        with staged_out_dir(tmp_path / "run") as stage:
            atomic_write_text(stage / "results.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "run" / "results.json").stat().st_mode) == 0o644


def test_json_output_is_the_result_alone_whatever_a_library_prints(monkeypatch, capsys):
    # DeepSpeed's logger, for one, prints its accelerator notice to stdout when accelerate
    # imports it (on every save_pretrained once deepspeed is installed)
    from negpref.bench import step_cost
    from negpref.cli import main

    def chatty_run(args):
        print("[WARNING] a library writing to stdout")
        return {"figure": 1.5}

    monkeypatch.setattr(step_cost, "run", chatty_run)
    assert main(["bench", "step-cost", "--json"]) == 0
    out, err = capsys.readouterr()
    assert out == '{"figure": 1.5}\n'
    assert "a library writing to stdout" in err
    # without --json the same chatter stays on stdout, beside the result
    assert main(["bench", "step-cost"]) == 0
    out, _ = capsys.readouterr()
    assert "a library writing to stdout" in out and '{"figure": 1.5}' in out


def test_json_output_stays_clean_of_worker_processes_output(tmp_path):
    # a worker process inherits file descriptor 1: under --json it must land on stderr too
    import subprocess
    import sys

    script = tmp_path / "chatty.py"
    script.write_text(
        "import os, subprocess, sys\n"
        "from negpref.bench import step_cost\n"
        "from negpref.cli import main\n"
        "def run(args):\n"
        "    subprocess.run([sys.executable, '-c', 'print(\"worker noise\")'], check=True)\n"
        "    os.write(1, b'native noise\\n')\n"
        "    return {'figure': 2}\n"
        "step_cost.run = run\n"
        "sys.exit(main(['bench', 'step-cost', '--json']))\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == '{"figure": 2}\n'
    assert "worker noise" in done.stderr and "native noise" in done.stderr
