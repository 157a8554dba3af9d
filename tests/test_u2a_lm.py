"""U2A on causal LMs: negatives, unlearning losses, DPO / reward objectives, LoRA run."""

import json
from pathlib import Path

import pytest
import torch

from conftest import perturb, reordered_grad_atol, rounding_bound
from negpref import losses
from negpref.data import collate, encode_qa, load_records
from negpref.errors import NegprefError
from negpref.logprobs import sequence_logps
from negpref.models import build_tokenizer, tiny_llama
from negpref.u2a import U2AConfig, per_sample_grads, run_u2a, trainable, weighted_unlearn
from negpref.u2a.objectives import (
    LMForgetTask,
    NegDPOObjective,
    RewardObjective,
    _leave_one_out_baseline,
    load_negatives,
)
from negpref.unlearn.trainer import UnlearnTrainer

TOFU = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def forget01():
    return load_records(TOFU / "forget01.json", ("question", "answer"))


@pytest.fixture(scope="module")
def tokenizer(forget01):
    return build_tokenizer([r["question"] + " " + r["answer"] for r in forget01], vocab_size=400)


@pytest.fixture
def model(tokenizer):
    return tiny_llama(len(tokenizer), seed=0)


def _negatives(records, n=6):
    return [
        {"id": str(i), "prompt": r["question"], "response": r["answer"]}
        for i, r in enumerate(records[:n])
    ]


def test_load_negatives_accepts_three_schemas(tmp_path):
    tofu = load_negatives(TOFU / "forget01.json")
    assert len(tofu) == 40 and tofu[0]["id"] == "0" and set(tofu[0]) == {"id", "prompt", "response"}
    path = tmp_path / "neg.jsonl"
    rows = [
        {"id": "a", "prompt": "p1", "response": "bad one"},
        {"prompt": "p2", "rejected": ["bad two", "bad three"], "chosen": "good"},
        {
            "prompt": [{"role": "user", "content": "p3"}],
            "rejected": [{"role": "assistant", "content": "bad four"}],
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    got = load_negatives(path)
    assert [g["id"] for g in got] == ["a", "1/0", "1/1", "2"]
    assert [g["response"] for g in got] == ["bad one", "bad two", "bad three", "bad four"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "c"}\n')
    with pytest.raises(NegprefError, match=r"bad\.jsonl:1: a negative sample needs fields"):
        load_negatives(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(NegprefError, match="empty"):
        load_negatives(empty)


def test_forget_losses_are_negpref_losses(model, tokenizer, forget01):
    negatives = _negatives(forget01)
    ga = LMForgetTask(model, tokenizer, negatives, "GA", max_length=128)
    npo = LMForgetTask(model, tokenizer, negatives, "NPO", npo_beta=0.5, max_length=128)
    batch = ga.batch([0, 2, 5])
    logps = sequence_logps(model, batch).logps
    weights = torch.tensor([0.2, 0.3, 0.5])
    assert ga.loss(model, batch, weights).item() == pytest.approx(losses.ga(logps, weights).item())
    # at theta_0 every NPO term is (2/beta) log 2
    assert npo.loss(model, npo.batch([0, 2, 5])).item() == pytest.approx(
        4 * torch.log(torch.tensor(2.0)).item()
    )
    with pytest.raises(NegprefError, match="needs a retain set"):
        LMForgetTask(model, tokenizer, negatives, "GA+RT")
    # the unlearning registry's names, in any case; U2A's old names and the methods without a
    # per-sample form (KL terms, refusal answers) are refused with the list of names
    assert LMForgetTask(model, tokenizer, negatives, "npo", max_length=128).method == "NPO"
    for name in ("graddiff", "npo_rt", "NPO+KL", "IDK+RT"):
        with pytest.raises(NegprefError, match=r"loss: must be one of GA, GA\+RT, NPO, NPO\+RT"):
            LMForgetTask(model, tokenizer, negatives, name)
    retain = _negatives(forget01[10:], 4)
    gd = LMForgetTask(
        model, tokenizer, negatives, "GA+RT", max_length=128, retain=retain, batch_size=2
    )
    out = sequence_logps(
        model,
        collate([encode_qa(tokenizer, r["prompt"], r["response"], 128) for r in retain[2:4]], 0),
    )
    assert gd.retain_loss(model, 1).item() == pytest.approx(
        losses.nll(out.logps, out.n_tokens).item()
    )


def test_inner_unlearning_is_one_engine_step_of_the_weighted_preset(
    model, tokenizer, forget01, monkeypatch
):
    """weighted_unlearn on an LM task: UnlearnTrainer with the NPO+RT preset, the simplex
    weights as record weights, U2A's proximal term and no dropout, equal to a hand-computed SGD
    step."""
    for module in model.modules():  # dropout that only a train-mode forward would apply
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    model.train()
    retain = _negatives(forget01[10:], 1)  # one retain record: every retain partner is it
    task = LMForgetTask(
        model, tokenizer, _negatives(forget01), "NPO+RT", npo_beta=0.5, max_length=128,
        retain=retain, retain_weight=0.7,
    )  # fmt: skip
    params = list(trainable(model).values())
    theta0 = [p.detach().clone() for p in params]
    perturb(model)  # theta != theta0: the proximal term and NPO's log-ratio are not 0
    support, weights = [4, 1, 3], torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    cfg = U2AConfig(inner_optimizer="sgd", inner_learning_rate=0.05, reg_lambda=0.3, batch_size=8)

    batch = task.batch(support)
    model.eval()
    forget = sequence_logps(model, batch).logps
    kept = sequence_logps(model, collate(task.retain, tokenizer.pad_token_id))
    model.train()
    proximal = sum(((p - p0) ** 2).sum() for p, p0 in zip(params, theta0))
    # eq. 8 with |B| = |S| and sum(w) = 1: sum_S w_i l_i + c_rt L_RT + lambda ||theta-theta0||^2
    npo = (2 / 0.5) * torch.nn.functional.softplus(0.5 * (forget - batch["ref_logps"]))
    hand = (weights.float() * npo).sum() + 0.7 * (-kept.logps / kept.n_tokens).mean()
    hand = hand + 0.3 * proximal
    assert proximal.item() > 0 and (forget - batch["ref_logps"]).abs().min().item() > 0
    grads = torch.autograd.grad(hand, params)
    expected = [p.detach() - 0.05 * g for p, g in zip(params, grads)]

    steps = []
    engine_loss = UnlearnTrainer.compute_loss

    def spy(self, *args, **kwargs):
        steps.append(self.args.optim)
        return engine_loss(self, *args, **kwargs)

    monkeypatch.setattr(UnlearnTrainer, "compute_loss", spy)
    generator = torch.Generator().manual_seed(3)
    loss = weighted_unlearn(model, task, support, weights, theta0, cfg, 1, generator)
    assert steps == ["sgd"]  # one micro-batch, one optimizer step, on the engine
    assert model.training  # the caller's mode is restored
    # the engine forwards forget and retain sequences in one padded batch, the hand computation
    # separately: sums of <= 128 token log-probs through a 64-wide model in another order,
    # eps * 64 * 128 * |loss| = 7.8e-2 at a loss of 80; measured 0 (bitwise)
    bound = rounding_bound(torch.float32, 64 * 128, hand.item())
    assert loss == pytest.approx(hand.item(), rel=0, abs=bound)
    # the step is lr * a reordered gradient: 8.6e-5; measured 1.2e-7 (one rounding of |p| ~ 1)
    atol = 0.05 * reordered_grad_atol(grads, 64, 128)
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=atol)


def test_proximal_anchor_must_match_the_trainable_parameters(model, tokenizer, forget01):
    from negpref.unlearn.dataset import build_data
    from negpref.unlearn.trainer import train_in_memory

    data = build_data(tokenizer, forget01[:2], None, None, 64, 0)
    with pytest.raises(NegprefError, match=r"proximal_anchor: 1 tensors do not match the \d+ "):
        train_in_memory(
            model, tokenizer, data, method="SFT", max_steps=1, proximal_lambda=1.0,
            proximal_anchor=[torch.zeros(2)],
        )  # fmt: skip
    with pytest.raises(NegprefError, match="proximal_lambda: must be >= 0"):
        train_in_memory(model, tokenizer, data, method="SFT", max_steps=1, proximal_lambda=-1.0)


def test_lm_per_sample_grads_vmap_equals_loop_with_lora(model, tokenizer, forget01):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    with torch.no_grad():  # LoRA's B starts at zero; move it so every factor has a gradient
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    for loss in ("GA", "NPO"):
        task = LMForgetTask(lora, tokenizer, _negatives(forget01, 5), loss, max_length=128)
        fast = per_sample_grads(lora, task, [4, 0, 2], vectorized=True)
        slow = per_sample_grads(lora, task, [4, 0, 2], vectorized=False)
        assert set(fast) == set(trainable(lora)) and len(fast) == 8
        # tiny_llama is 64 wide, sequences <= 128 tokens: 5.9e-3 at gradients up to 6.0;
        # measured 2.6e-6 (was rtol=1e-4, atol=1e-6)
        atol = reordered_grad_atol(slow.values(), 64, 128)
        for name in fast:
            torch.testing.assert_close(fast[name], slow[name], rtol=0, atol=atol)
    assert lora.get_base_model().config._attn_implementation == "sdpa"  # restored after vmap


def test_neg_dpo_objective_value_and_chunk_invariant_gradient(model, tokenizer, forget01):
    pairs = [
        {"prompt": r["question"], "chosen": r["answer"], "rejected": forget01[-1 - i]["answer"]}
        for i, r in enumerate(forget01[:5])
    ]
    params = list(trainable(model).values())
    small = NegDPOObjective(model, tokenizer, pairs, beta=0.1, max_length=128, batch_size=2)
    whole = NegDPOObjective(model, tokenizer, pairs, beta=0.1, max_length=128, batch_size=5)
    j_small, g_small = small.value_and_grad(model, params)
    j_whole, g_whole = whole.value_and_grad(model, params)
    assert j_small == pytest.approx(-torch.log(torch.tensor(2.0)).item())  # at the reference
    assert j_whole == pytest.approx(j_small)
    # 64 wide, sequences <= 128 tokens: 2.4e-4 at gradients up to 0.25; measured 4.5e-8
    # (was rtol=1e-4, atol=1e-7)
    atol = reordered_grad_atol(g_whole, 64, 128)
    for a, b in zip(g_small, g_whole):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)
    assert sum(float(g.abs().sum()) for g in g_small) > 0


def test_leave_one_out_baseline_by_hand():
    rewards = torch.tensor([1.0, 2.0, 4.0, 0.0, 3.0, 3.0]).double()
    torch.testing.assert_close(
        _leave_one_out_baseline(rewards, 3), torch.tensor([3.0, 2.5, 1.5, 3.0, 1.5, 1.5]).double()
    )
    torch.testing.assert_close(
        _leave_one_out_baseline(rewards[:3], 1), torch.tensor([3.0, 2.5, 1.5]).double()
    )
    assert _leave_one_out_baseline(torch.tensor([5.0]).double(), 1).item() == 0.0


def _token_reward(prompt, response):
    return float(len(response) % 3) - 1.0


def test_reward_objective_score_function_gradient_is_unbiased(model, tokenizer):
    """One-token responses: J = sum_v pi(v|x) r(v) exactly; the REINFORCE estimate with many
    samples must point the same way and have the same size."""
    prompts = ["Who wrote the book?", "Where was she born?"]
    objective = RewardObjective(
        tokenizer,
        prompts,
        _token_reward,
        samples_per_prompt=1000,
        max_new_tokens=1,
        seed=1,
        batch_size=1000,
    )
    params = list(trainable(model).values())
    value, estimate = objective.value_and_grad(model, params)
    vocab_rewards = torch.tensor(
        [
            _token_reward(None, tokenizer.decode([v], skip_special_tokens=True))
            for v in range(len(tokenizer))
        ]
    ).double()
    exact_j, reward_variance = 0.0, 0.0
    for ids in objective.prompt_ids:
        probs = model(input_ids=torch.tensor([ids])).logits[0, -1].double().softmax(-1)
        mean_reward = (probs * vocab_rewards).sum()
        exact_j = exact_j + mean_reward / len(prompts)
        reward_variance += float((probs * vocab_rewards**2).sum() - mean_reward**2)
    exact = torch.autograd.grad(exact_j, params, allow_unused=True)
    exact = torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, exact)]
    ).double()
    estimate = torch.cat([g.reshape(-1) for g in estimate]).double()
    cosine = float(estimate @ exact / (estimate.norm() * exact.norm()))
    # 4 standard errors of the mean of 1000 rewards per prompt, averaged over the prompts: 0.049;
    # over seeds 0-11 the worst gap was 1.8 SE (was abs=0.05)
    standard_error = (reward_variance / 1000) ** 0.5 / len(prompts)
    assert value == pytest.approx(exact_j.item(), abs=4 * standard_error)
    assert cosine > 0.85  # seeds 0-11: 0.903 to 0.934
    # the estimate's projection on the exact gradient over seeds 0-11: mean 0.991, std 0.047,
    # max |. - 1| 0.087; 4 std (was abs=0.2)
    assert float(estimate @ exact / exact.norm() ** 2) == pytest.approx(1.0, abs=4 * 0.047)
    # common random numbers: the same draw on every call
    assert objective.value(model) == pytest.approx(value)


def test_run_u2a_on_lora_lm_with_dpo_objective_and_cg(model, tokenizer, forget01):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    frozen = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    task = LMForgetTask(
        lora, tokenizer, _negatives(forget01, 10), "NPO", max_length=128, batch_size=4
    )
    pairs = [
        {"prompt": r["question"], "chosen": r["answer"], "rejected": forget01[-1 - i]["answer"]}
        for i, r in enumerate(forget01[20:24])
    ]
    objective = NegDPOObjective(lora, tokenizer, pairs, max_length=128)
    cfg = U2AConfig(
        rounds=3,
        init_size=3,
        per_round=2,
        delta=-1.0,
        hessian="cg",
        cg_iters=3,
        inner_steps=3,
        inner_learning_rate=1e-2,
        batch_size=4,
        grad_chunk=4,
    )
    result = run_u2a(lora, task, objective, cfg)
    assert [r["set_size"] for r in result.log] == [0, 3, 5, 7]
    assert len(set(result.selected)) == 7 and sum(result.weights) == pytest.approx(1.0)
    assert len({round(w, 9) for w in result.weights}) > 1  # mirror descent moved the weights
    assert result.objective_initial == pytest.approx(-torch.log(torch.tensor(2.0)).item())
    assert result.objective_final != result.objective_initial
    for name, p in lora.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), name
    assert any(
        float(p.detach().abs().sum()) > 0 for n, p in lora.named_parameters() if "lora_B" in n
    )


def test_toy_pretraining_is_the_engine_sft_preset(monkeypatch):
    from negpref.studies.u2a_toy import make_task, pretrain

    seen = []
    engine_loss = UnlearnTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        loss = engine_loss(self, model, inputs, *args, **kwargs)
        if not seen:  # step 1, before any update: the NLL of the stream's first batch by hand
            first = [f for f, _ in self.data.stream(0, self.effective_batch)]
            batch = collate([self.data.forget[i] for i in first], self.pad_id)
            out = sequence_logps(model, {k: v.to(loss.device) for k, v in batch.items()})
            seen.append((loss.item(), losses.nll(out.logps, out.n_tokens).item()))
        seen.append(self.args.method)
        return loss

    monkeypatch.setattr(UnlearnTrainer, "compute_loss", spy)
    model, _ = pretrain(make_task(0), steps=3, batch_size=4)
    (engine, hand), *methods = seen
    assert methods == ["SFT"] * 3 and not model.training
    # the same forward on the same padded batch, recomputed: within eps * (48 tokens x 64 wide)
    # * |loss| = 4.1e-3 at a loss of 6.1 (a kernel may sum in another order); measured 0
    assert engine == pytest.approx(hand, rel=0, abs=rounding_bound(torch.float32, 48 * 64, hand))
