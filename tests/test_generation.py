"""negpref.generation: prompt ids, left padding, greedy and sampled generation.

``tests/data/generation_before_merge.json`` holds what the separate implementations produced
at commit 79361f6, before their merge into this module (``negpref.eval.generation``'s greedy
functions, ``negpref.align.generate.generate`` and ``RewardObjective.sample`` of U2A), on the
tiny model below: their results and every ``model.generate`` output (prompt, padding and
generated ids). The merged module must reproduce them token for token.
"""

import json
from pathlib import Path

import pytest
import torch

from negpref.data import encode_qa, pref_task
from negpref.generation import (
    Sampling,
    generate,
    generate_ids,
    greedy_continue,
    greedy_generate,
    greedy_until_eos,
    left_pad,
    prompt_ids,
)
from negpref.models import tiny_llama
from negpref.u2a.objectives import RewardObjective

BEFORE = json.loads(
    (Path(__file__).resolve().parent / "data" / "generation_before_merge.json").read_text()
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return pref_task.task_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    """Peaked logits (initializer_range 0.3) and a scaled-up EOS embedding (tied to its output
    row), so that some rows stop early and others run to max_new_tokens."""
    model = tiny_llama(len(tokenizer), seed=0, initializer_range=0.3)
    with torch.no_grad():
        model.model.embed_tokens.weight[tokenizer.eos_token_id] *= 2
    return model


@pytest.fixture
def recorded(model, monkeypatch):
    """Every ``model.generate`` output of the test, as id lists."""
    calls = []
    original = model.generate

    def recording(**kwargs):
        out = original(**kwargs)
        calls.append(out.tolist())
        return out

    monkeypatch.setattr(model, "generate", recording)
    return calls


PROMPTS = pref_task.prompts()[:5]  # two lengths of prompt, so batches are padded


def test_prompt_ids_are_encode_qa_s_prompt_and_left_pad_right_aligns(tokenizer):
    ids = [prompt_ids(tokenizer, p, 64) for p in PROMPTS]
    assert ids == BEFORE["prompt_ids"]
    encoded = encode_qa(tokenizer, PROMPTS[1], "an answer", 64)
    assert encoded.input_ids[: len(ids[1])] == ids[1] and not any(
        encoded.answer_mask[: len(ids[1])]
    )
    batch = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_greedy_generate_and_continue_reproduce_the_old_outputs(model, tokenizer, recorded):
    before = BEFORE["greedy_generate"]
    got = greedy_generate(model, tokenizer, PROMPTS, batch_size=2, max_new_tokens=6)
    # the same answers, now decoded by greedy_until_eos instead of model.generate
    assert got == before["result"] and recorded == []
    before = BEFORE["greedy_continue"]
    ids = [i[: 3 + j] for j, i in enumerate(BEFORE["prompt_ids"])]
    got = greedy_continue(model, tokenizer, ids, batch_size=3, max_new_tokens=5)
    assert got == before["result"] and recorded == []
    assert "" in got  # a row that emitted EOS at once


def test_rows_leaving_at_eos_give_model_generate_s_tokens(model, tokenizer):
    """greedy_until_eos drops a row from the batch at its EOS; the others' tokens are
    model.generate's (greedy, same batch) up to and including each row's EOS."""
    prompts = [prompt_ids(tokenizer, p, 64) for p in pref_task.prompts()[:8]]
    eos = tokenizer.eos_token_id
    ours = greedy_until_eos(model, prompts, tokenizer.pad_token_id, eos, 12)
    theirs = generate_ids(model, tokenizer, prompts, Sampling(12, 0.0), batch_size=8)
    lengths = set()
    for mine, [row] in zip(ours, theirs, strict=True):
        until_eos = row[: row.index(eos) + 1] if eos in row else row
        assert mine == until_eos
        lengths.add(len(mine))
    assert len(lengths) > 1  # rows did leave at different steps


@pytest.mark.parametrize(
    ("case", "sampling"),
    [("sampled", Sampling(6, 1.0, 0.9, 20, 2)), ("sampled_greedy", Sampling(6, 0.0))],
)
def test_sampled_generate_reproduces_the_old_outputs(model, tokenizer, recorded, case, sampling):
    before = BEFORE[case]
    model.train()
    state = torch.random.get_rng_state()
    got = generate(model, tokenizer, PROMPTS, sampling, 64, batch_size=2, seed=3)
    assert got == before["result"] and recorded == before["generate_outputs"]
    assert model.training  # sampled in eval mode, the caller's mode restored
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's draws untouched


def test_reward_objective_samples_reproduce_the_old_ones(model, tokenizer, recorded):
    before = BEFORE["reward_objective"]
    objective = RewardObjective(
        tokenizer, PROMPTS, lambda p, r: float(len(r)), samples_per_prompt=2, max_new_tokens=6,
        seed=1, batch_size=2, max_length=64,
    )  # fmt: skip
    encoded, texts, rewards = objective.sample(model)
    assert [e.input_ids for e in encoded] == before["input_ids"]
    assert [e.answer_mask for e in encoded] == before["answer_mask"]
    assert [e.truncated for e in encoded] == before["truncated"]
    assert texts == before["texts"] and recorded == before["generate_outputs"]
    assert rewards.tolist() == [float(len(t)) for t in texts]


def test_generate_ids_stop_at_eos_and_depend_only_on_the_seed(model, tokenizer):
    ids = BEFORE["prompt_ids"]
    sampling = Sampling(8, 1.0, num_samples=3)
    first = generate_ids(model, tokenizer, ids, sampling, batch_size=2, seed=7)
    assert first == generate_ids(model, tokenizer, ids, sampling, batch_size=2, seed=7)
    assert first != generate_ids(model, tokenizer, ids, sampling, batch_size=2, seed=8)
    rows = [row for per_prompt in first for row in per_prompt]
    assert len(first) == 5 and all(len(p) == 3 for p in first)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    stopped = [row for row in rows if eos in row]
    assert stopped and len(stopped) < len(rows)  # the model stops some rows, not all
    for row in stopped:
        assert set(row[row.index(eos) + 1 :]) <= {pad}
    assert max(map(len, rows)) == 8 and min(map(len, rows)) > 0
