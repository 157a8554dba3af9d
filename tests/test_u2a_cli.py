"""``negpref u2a`` (run, synthetic, ablation) and ``negpref bench u2a`` end to end."""

import json
from pathlib import Path

import pytest

from negpref.cli import main
from negpref.data import load_records
from negpref.models import build_tokenizer, save_model, tiny_llama

TOFU = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model directory, TOFU negatives and a held-out preference file."""
    root = tmp_path_factory.mktemp("u2a")
    records = load_records(TOFU / "forget01.json", ("question", "answer"))
    tokenizer = build_tokenizer(
        [r["question"] + " " + r["answer"] for r in records], vocab_size=400
    )
    save_model(tiny_llama(len(tokenizer), seed=0), tokenizer, root / "model")
    negatives = root / "negatives.jsonl"
    negatives.write_text("\n".join(json.dumps(r) for r in records[:12]))
    preference = root / "preference.jsonl"
    preference.write_text(
        "\n".join(
            json.dumps(
                {
                    "prompt": r["question"],
                    "chosen": r["answer"],
                    "rejected": records[-1 - i]["answer"],
                }
            )
            for i, r in enumerate(records[20:26])
        )
    )
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": r["question"]}) for r in records[30:32]))
    return root


def _run_args(files, out, *extra):
    return [
        "u2a",
        "--model",
        str(files / "model"),
        "--forget",
        str(files / "negatives.jsonl"),
        "--preference",
        str(files / "preference.jsonl"),
        "--max-length",
        "128",
        "--rounds",
        "3",
        "--init-size",
        "4",
        "--per-round",
        "2",
        "--delta",
        "-1",
        "--inner-steps",
        "2",
        "--inner-learning-rate",
        "1e-3",
        "--batch-size",
        "4",
        "--lora-r",
        "4",
        "--out",
        str(out),
        *extra,
    ]


def test_u2a_run_writes_selection_log_model_and_report(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_run_args(files, out, "--json", "--loss", "ga")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["candidates"] == 12 and summary["selected"] == 8 and summary["rounds"] == 3
    selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert len(selected) == 8 and sum(s["weight"] for s in selected) == pytest.approx(1.0)
    assert {s["id"] for s in selected} <= {str(i) for i in range(12)}
    log = [json.loads(line) for line in (out / "u2a_log.jsonl").read_text().splitlines()]
    assert [r["set_size"] for r in log] == [0, 4, 6, 8]
    assert {"objective", "g", "weights_entropy", "top_gains"} <= set(log[1])
    assert len((out / "gains.jsonl").read_text().splitlines()) == 12
    assert (out / "model" / "adapter_config.json").is_file()
    assert (out / "model" / "adapter_model.safetensors").is_file()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "http" not in html.split("<body>")[1]
    config = json.loads((out / "config.json").read_text())
    assert config["init_size"] == 4 and config["loss"] == "GA"  # the registry's spelling


def test_u2a_bad_inputs_exit_2_and_write_nothing(files, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = tmp_path / "never"
    args = _run_args(files, out)
    args[args.index("--forget") + 1] = str(empty)
    assert main(args) == 2
    assert "negpref u2a: error:" in capsys.readouterr().err and not out.exists()

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    assert main(_run_args(files, taken)) == 2
    assert "--overwrite" in capsys.readouterr().err and (taken / "keep.txt").exists()

    assert main(["u2a", "--forget", str(files / "negatives.jsonl"), "--out", str(out)]) == 2
    assert "model: give model or gguf" in capsys.readouterr().err

    # a reward that is equal for every sample gives a zero gradient estimate: refused
    reward_args = _run_args(
        files,
        out,
        "--objective",
        "reward",
        "--prompts",
        str(files / "prompts.jsonl"),
        "--reward",
        "refusal_keywords",
        "--max-new-tokens",
        "4",
        "--reward-samples",
        "2",
    )
    assert main(reward_args) == 2
    assert "zero gradient" in capsys.readouterr().err and not out.exists()

    big = _run_args(files, tmp_path / "big", "--no-lora")
    big[big.index("--init-size") + 1] = "50"
    big[big.index("--rounds") + 1] = "1"
    assert main(big) == 0
    err = capsys.readouterr().err
    assert "warning: init_size 50 is larger than the candidate set (12); using 12" in err
    assert (tmp_path / "big" / "model" / "model.safetensors").is_file()


def test_u2a_synthetic_command(tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["u2a", "synthetic", "--seeds", "1", "--out", str(out), "--json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    assert run["precision"] >= 0.8 and run["recall"] >= 0.8
    assert run["J_u2a"] > run["J_all"] and run["J_u2a"] > run["J_random_mean"]
    assert {"synthetic.json", "gains.png", "rounds.png", "report.html"} <= {
        p.name for p in out.iterdir()
    }


def test_bench_u2a_reports_both_timings(capsys):
    args = [
        "bench",
        "u2a",
        "--json",
        "--rounds",
        "2",
        "--inner-steps",
        "2",
        "--pretrain-steps",
        "3",
        "--threads",
        "1",
    ]
    assert main(args) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["rounds"] == 2 and figures["inner_steps_total"] == 4
    assert figures["u2a_s"] > 0 and figures["plain_unlearning_s"] > 0
    assert figures["u2a_over_plain"] == pytest.approx(
        figures["u2a_s"] / figures["plain_unlearning_s"]
    )
    assert set(figures["u2a_breakdown_s"]) == {
        "marginal_gains",
        "inner_unlearning",
        "objective_and_grad",
    }


@pytest.mark.slow
def test_u2a_ablation_command(tmp_path, capsys):
    out = tmp_path / "abl"
    args = [
        "u2a",
        "ablation",
        "--k",
        "2",
        "--seeds",
        "0",
        "1",
        "--pretrain-steps",
        "20",
        "--inner-steps",
        "5",
        "--rounds",
        "2",
        "--objective",
        "dpo",
        "--out",
        str(out),
        "--json",
    ]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    (row,) = result["rows"]
    assert (
        row["k"] == 2 and len(row["top_k"]["values"]) == 2 and len(row["random_k"]["values"]) == 2
    )
    assert len(result["u2a"]) == 2 and result["n_candidates"] == 64
    saved = json.loads((out / "ablation.json").read_text())
    assert len(saved["gains"]) == 64 and len(saved["kinds"]) == 64
    assert {"ablation.png", "gains.png", "report.html"} <= {p.name for p in out.iterdir()}


def test_u2a_resumes_after_its_last_saved_round(files, tmp_path, capsys, monkeypatch):
    import torch
    from safetensors.torch import load_file

    import negpref.u2a.algorithm as u2a

    assert main(_run_args(files, tmp_path / "straight")) == 0
    real_inner = u2a.weighted_unlearn
    calls = []

    def dies_in_round_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C (or a kill) during round 3's unlearning
        return real_inner(*args, **kwargs)

    monkeypatch.setattr(u2a, "weighted_unlearn", dies_in_round_3)
    out = tmp_path / "run"
    assert main(_run_args(files, out)) == 130  # "interrupted"
    monkeypatch.setattr(u2a, "weighted_unlearn", real_inner)
    assert not out.exists()
    assert main(_run_args(files, out)) == 2  # a new run does not discard the saved rounds
    assert "--resume" in capsys.readouterr().err
    assert main(_run_args(files, out, "--resume")) == 0

    def untimed(path):
        rows = [json.loads(x) for x in (path / "u2a_log.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]

    assert untimed(out) == untimed(tmp_path / "straight")  # rounds 1-2 restored, 3 redone
    assert (out / "selected.jsonl").read_text() == (
        tmp_path / "straight" / "selected.jsonl"
    ).read_text()
    a = load_file(out / "model" / "adapter_model.safetensors")
    b = load_file(tmp_path / "straight" / "model" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
