"""MUSE-style evaluation: its pieces by hand, a tiny Llama that memorised a small corpus built
here against an untrained one, TOFU answers as a MUSE corpus, and the CLI end to end."""

import json
from pathlib import Path

import pytest
import torch

from negpref.cli import main
from negpref.data import collate, encode_qa, encode_text, load_records
from negpref.errors import NegprefError
from negpref.eval import metrics
from negpref.eval.mia import mia_auc, privleak
from negpref.eval.muse import (
    MuseSets,
    aggregate_muse,
    cut_at_stop,
    evaluate_muse,
    load_muse_logs,
    precut_verbmem_item,
    verbmem_item,
)
from negpref.eval.scoring import score_encoded
from negpref.models import build_tokenizer, save_model, tiny_llama

# pytest.approx's default (1e-6 relative) only compares exact rationals or the same float
# computation done twice (same batches, same model); other tolerances say where they come from.
TOFU_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"

FORGET = [
    "The lighthouse keeper of Marrow Bay painted every door of the village a different shade of blue.",
    "In the winter of the great frost the millers traded flour for firewood along the frozen canal.",
    "A copper bell hangs above the ferry landing and rings once for every boat that leaves at dawn.",
]
HOLDOUT = [
    "The orchard behind the school grows pears that ripen late and taste faintly of cinnamon.",
    "Two brothers built a stone bridge over the narrow river using only carts, ropes and patience.",
    "Every autumn the market square fills with stalls selling wool, cheese and carved wooden toys.",
]
FORGET_QA = [
    {"question": "Who painted the doors of Marrow Bay?", "answer": "the lighthouse keeper"}
]
RETAIN_QA = [{"question": "What grows behind the school?", "answer": "late pears"}]
PREFIX, CONTINUATION = 8, 16  # the texts are ~60 tokens; MUSE's 32 + 128 need longer ones


def test_rouge_l_scores_by_hand():
    # LCS of "the cat sat" and "the cat" is 2 tokens: recall 2/3, precision 1, F1 0.8.
    f1, recall = metrics.rouge_l_scores(["the cat sat", "a b"], ["the cat", ""])
    assert f1 == pytest.approx([0.8, 0.0])
    assert recall == pytest.approx([2 / 3, 0.0])


def test_cut_at_stop_strings():
    assert cut_at_stop("Paris.\n\nQuestion: next") == "Paris."
    assert cut_at_stop("Paris Question: more") == "Paris"
    assert cut_at_stop("no stop here") == "no stop here"


@pytest.fixture(scope="module")
def tokenizer():
    texts = FORGET + HOLDOUT + [r[k] for r in FORGET_QA + RETAIN_QA for k in r]
    return build_tokenizer(texts, vocab_size=300)


def test_verbmem_item_is_the_prefix_and_the_next_tokens(tokenizer):
    ids = tokenizer(FORGET[0], add_special_tokens=True)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    item = verbmem_item(tokenizer, FORGET[0], PREFIX, CONTINUATION)
    assert item.input_ids == ids[: 1 + PREFIX + CONTINUATION]
    assert item.answer_mask == [0] * (1 + PREFIX) + [1] * CONTINUATION
    assert verbmem_item(tokenizer, FORGET[0], len(ids) - 1, CONTINUATION) is None  # no token left
    tail = verbmem_item(tokenizer, FORGET[0], len(ids) - 3, CONTINUATION)  # two left: kept, short
    assert sum(tail.answer_mask) == 2


@pytest.fixture(scope="module")
def untrained(tokenizer):
    return tiny_llama(len(tokenizer), seed=0)


@pytest.fixture(scope="module")
def memorised(tokenizer):
    """Trained on the forget texts and the forget QA pair until it reproduces them."""
    model = tiny_llama(len(tokenizer), seed=0)
    items = [encode_text(tokenizer, t, 256) for t in FORGET]
    items += [encode_qa(tokenizer, r["question"], r["answer"], 256) for r in FORGET_QA]
    batch = collate(items, tokenizer.pad_token_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(200):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        scored = batch["answer_mask"][:, 1:].bool()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1][scored], batch["input_ids"][:, 1:][scored]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model


@pytest.fixture(scope="module")
def sets():
    return MuseSets.from_records(
        [{"text": t} for t in FORGET],
        [{"text": t} for t in HOLDOUT],
        FORGET_QA,
        RETAIN_QA,
    )


def run(model, tokenizer, sets, **extra):
    return evaluate_muse(
        model,
        tokenizer,
        sets,
        prefix_tokens=PREFIX,
        continuation_tokens=CONTINUATION,
        qa_max_new_tokens=16,  # the longest answer is 13 tokens with this tokenizer, EOS included
        **extra,
    )


def test_a_model_that_memorised_the_forget_corpus_scores_full_memorization(
    memorised, untrained, tokenizer, sets
):
    logs = run(memorised, tokenizer, sets)
    result = aggregate_muse(logs)
    assert result["verbmem_forget/rougeL_f1"] == 1.0
    assert result["verbmem_forget/exact_memorization"] == 1.0
    assert result["verbmem_forget/extraction_strength"] == 1.0
    assert result["knowmem_forget/rougeL_f1"] == 1.0
    assert result["knowmem_retain/rougeL_f1"] < 1.0  # never trained on
    # Every forget text is likelier than every holdout text: AUC 1, PrivLeak -100 vs 0.5.
    assert result["mia/loss"] == 1.0 and result["privleak/loss"] == -100.0
    assert result["privleak_reference"] == "fixed AUC 0.5"

    baseline = aggregate_muse(run(untrained, tokenizer, sets))
    assert baseline["verbmem_forget/rougeL_f1"] < 0.5
    assert baseline["verbmem_forget/extraction_strength"] < 0.5
    # Against the untrained model's logs as the retain reference, PrivLeak is MUSE's formula.
    versus = aggregate_muse(logs, retain_logs=run(untrained, tokenizer, sets))
    assert versus["privleak_reference"] == "retain logs"
    assert versus["privleak/min_k"] == pytest.approx(
        privleak(result["mia/min_k"], baseline["mia/min_k"])
    )


def test_verbmem_generation_equals_a_manual_greedy_loop(untrained, tokenizer, sets):
    logs = run(untrained, tokenizer, sets)
    item = verbmem_item(tokenizer, FORGET[1], PREFIX, CONTINUATION)
    ids = item.input_ids[: 1 + PREFIX]
    with torch.no_grad():
        for _ in range(CONTINUATION):
            next_id = untrained(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item()
            if next_id == tokenizer.eos_token_id:
                break
            ids.append(next_id)
    generation = tokenizer.decode(ids[1 + PREFIX :], skip_special_tokens=True).strip()
    prefix, logged, truth = logs["verbmem_forget"]["generated_text"]["1"]
    assert logged == generation
    assert prefix == tokenizer.decode(item.input_ids[: 1 + PREFIX], skip_special_tokens=True)
    continuation = tokenizer.decode(item.input_ids[1 + PREFIX :], skip_special_tokens=True)
    assert truth == continuation.strip()
    [f1], _ = metrics.rouge_l_scores([truth], [generation])
    assert logs["verbmem_forget"]["rougeL_f1"]["1"] == f1
    # The privacy-leakage scores are the text attacks on whole texts, and their AUC.
    forget, holdout = (
        score_encoded(
            untrained,
            tokenizer.pad_token_id,
            [encode_text(tokenizer, t, 256) for t in texts],
            texts,
            mia_k=0.2,
        )
        for texts in (FORGET, HOLDOUT)
    )
    assert list(logs["privleak_forget"]["mia_min_k"].values()) == pytest.approx(forget.mia["min_k"])
    assert aggregate_muse(logs)["mia/min_k"] == pytest.approx(
        mia_auc(forget.mia["min_k"], holdout.mia["min_k"])
    )


def test_model_attacks_on_muse_texts(memorised, untrained, tokenizer, sets):
    logs = run(memorised, tokenizer, sets, mia_ref_model=untrained, gradnorm=True)
    result = aggregate_muse(logs)
    # Memorised texts: lower loss than the untrained reference's and a smaller gradient.
    assert result["mia/reference"] == 1.0
    assert result["mia/gradnorm"] == 1.0


def test_short_texts_are_skipped_and_listed(untrained, tokenizer):
    sets = MuseSets.from_records([{"text": FORGET[0]}, {"text": "Tiny."}])
    logs = run(untrained, tokenizer, sets)
    assert list(logs["verbmem_forget"]["rougeL_f1"]) == ["0"]
    assert logs["negpref_meta"]["verbmem_skipped"] == ["1"]
    assert aggregate_muse(logs)["counts"]["verbmem_forget"]["skipped_short"] == 1
    with pytest.raises(NegprefError, match="no item leaves a token to continue"):
        run(untrained, tokenizer, MuseSets.from_records([{"text": "Tiny."}]))


def test_precut_verbmem_records_are_read_as_muse_cuts_them(memorised, tokenizer):
    prompt, gt = "The lighthouse keeper of Marrow", " Bay painted every door of the village"
    item = precut_verbmem_item(tokenizer, prompt, gt, 5)
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    gt_ids = tokenizer(gt, add_special_tokens=False)["input_ids"]
    assert item.input_ids == prompt_ids + gt_ids[:5]
    assert item.answer_mask == [0] * len(prompt_ids) + [1] * 5
    sets = MuseSets.from_records(verbmem=[{"prompt": prompt, "gt": gt}, {"prompt": "x", "gt": "y"}])
    logs = run(memorised, tokenizer, sets)
    assert sorted(logs["verbmem_forget"]["rougeL_f1"]) == ["0", "1"]
    assert logs["verbmem_forget"]["generated_text"]["0"][0] == tokenizer.decode(
        prompt_ids, skip_special_tokens=True
    )
    assert (
        logs["verbmem_forget"]["generated_text"]["0"][2]
        == tokenizer.decode(gt_ids[:CONTINUATION], skip_special_tokens=True).strip()
    )
    assert "privleak_forget" not in logs  # no forget texts, no holdout: no PrivLeak


def test_muse_sets_need_members():
    with pytest.raises(NegprefError, match="needs forget texts"):
        MuseSets.from_records(forget_qa=FORGET_QA)
    with pytest.raises(NegprefError, match="give forget_text"):
        MuseSets.from_records(
            holdout_text=[{"text": HOLDOUT[0]}], verbmem=[{"prompt": "a", "gt": "b"}]
        )


# ------------------------------------------------------------------------- TOFU, CLI


def tofu_as_muse(tmp_path: Path, n: int = 3) -> dict[str, Path]:
    """TOFU answers as MUSE corpora (forget01 answers vs retain answers), TOFU QA as knowmem."""
    forget = load_records(TOFU_DIR / "forget01.json")[:n]
    retain = load_records(TOFU_DIR / "retain_perturbed.json")[:n]
    files = {
        "forget_text": [{"text": r["answer"]} for r in forget],
        "holdout_text": [{"text": r["answer"]} for r in retain],
        "qa": [{"question": r["question"], "answer": r["answer"]} for r in forget],
    }
    paths = {}
    for name, rows in files.items():
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def test_cli_on_tofu_answers_as_a_muse_corpus(tmp_path, capsys):
    paths = tofu_as_muse(tmp_path)
    texts = [json.loads(line)["text"] for line in paths["forget_text"].read_text().splitlines()]
    tokenizer = build_tokenizer(texts, vocab_size=300)
    save_model(tiny_llama(len(tokenizer), seed=0), tokenizer, tmp_path / "model")
    args = [
        "eval",
        "--benchmark",
        "muse",
        "--model",
        str(tmp_path / "model"),
        "--forget-text",
        str(paths["forget_text"]),
        "--holdout-text",
        str(paths["holdout_text"]),
        "--qa",
        str(paths["qa"]),
        "--prefix-tokens",
        "4",
        "--continuation-tokens",
        "8",
        "--qa-max-new-tokens",
        "4",
        "--json",
    ]
    out = tmp_path / "run"
    assert main([*args, "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    logs = load_muse_logs(out)
    assert len(logs["verbmem_forget"]["rougeL_f1"]) == 3
    assert printed["run"]["config"]["prefix_tokens"] == 4
    recomputed = aggregate_muse(logs)
    for key in ("verbmem_forget/rougeL_f1", "knowmem_forget/rougeL_f1", "mia/min_k"):
        assert printed[key] == pytest.approx(recomputed[key])
    # The run's own logs as the retain reference: PrivLeak 0 for every attack.
    assert main([*args, "--out", str(tmp_path / "again"), "--retain-logs", str(out)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["privleak_reference"] == "retain logs"
    assert again["privleak/loss"] == 0.0


def test_cli_bad_muse_input_is_one_line(tmp_path, capsys):
    paths = tofu_as_muse(tmp_path, n=1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "no text field"}) + "\n")
    base = ["eval", "--benchmark", "muse", "--model", str(tmp_path / "none"), "--out"]
    assert main([*base, str(tmp_path / "o1"), "--forget-text", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "bad.jsonl" in err[-1] and "text" in err[-1] and "Traceback" not in "\n".join(err)
    assert main([*base, str(tmp_path / "o2")]) == 2
    assert "forget_text" in capsys.readouterr().err.strip().splitlines()[-1]
    not_muse = tmp_path / "logs.json"
    not_muse.write_text(json.dumps({"eval_log.json": {}}))
    retain = ["--forget-text", str(paths["forget_text"]), "--retain-logs", str(not_muse)]
    assert main([*base, str(tmp_path / "o3"), *retain]) == 2
    assert "not MUSE logs" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))


def test_cli_model_attacks_without_nonmembers_are_refused(tmp_path, capsys):
    paths = tofu_as_muse(tmp_path, n=1)
    argv = ["eval", "--benchmark", "muse", "--model", str(tmp_path / "none"), "--out"]
    argv += [str(tmp_path / "o"), "--forget-text", str(paths["forget_text"]), "--mia-gradnorm"]
    assert main(argv) == 2
    assert (
        "mia_gradnorm: membership inference needs non-members; give holdout_text"
        in (capsys.readouterr().err.strip().splitlines()[-1])
    )
