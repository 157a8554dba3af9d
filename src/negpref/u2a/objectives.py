"""U2A for causal language models: the candidate negatives, the unlearning losses and the
alignment objectives ``J``.

- ``LMForgetTask``: negatives (prompt + bad response) with the unlearning registry's GA, GA+RT,
  NPO or NPO+RT (``negpref.unlearn.objectives``: its forget losses and retain NLL, weighted per
  sample) on ``negpref.logprobs.sequence_logps``; its inner unlearning (``unlearn``) is the
  unlearning engine, ``UnlearnTrainer``, with the preset of that name.
- ``NegDPOObjective``: ``J = -DPO loss`` on a held-out preference set, reference log-probs
  precomputed at ``theta_0`` (the objective of the authors' code).
- ``RewardObjective``: ``J = E[r(x, y)]`` over the model's own samples ``y ~ pi(.|x)``, with
  the score-function (REINFORCE) gradient ``E[(r - b) grad log pi(y|x)]`` and a leave-one-out
  baseline ``b``. Rewards are ``negpref.rewards`` callables (a registered name,
  ``module:function`` or a sequence-classification reward model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from negpref import losses
from negpref.data import Encoded, collate, encode_qa, load_records
from negpref.data.records import PROMPT, check_kinds, place
from negpref.errors import NegprefError
from negpref.generation import Sampling, generate_ids, prompt_ids
from negpref.logprobs import sequence_logps
from negpref.u2a.config import U2AConfig, u2a_method
from negpref.u2a.implicit import grads_of
from negpref.u2a.types import Grads
from negpref.unlearn.dataset import UnlearnData
from negpref.unlearn.objectives import (
    PRESETS,
    GroupLogps,
    Objective,
    StepLogps,
    forget_loss_for,
)
from negpref.unlearn.trainer import last_logged, train_in_memory

# the field pairs accepted for a negative sample: (prompt field, bad-response field)
NEGATIVE_SCHEMAS = (("prompt", "response"), ("question", "answer"), ("prompt", "rejected"))


def _text(value, where: str) -> str:
    """A completion given as a string or a chat message list (its last message)."""
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        value = value[-1].get("content")
    if not isinstance(value, str) or not value:
        raise NegprefError(
            f"{where} must be a non-empty string or chat message list, got "
            f"{type(value).__name__}; fix the record"
        )
    return value


def _completion(value, where: str) -> str:
    """A string, a chat message list, or a list of candidates (MC-PO: the first is used)."""
    if isinstance(value, list) and value and not isinstance(value[0], dict):
        value = value[0]
    return _text(value, where)


def load_negatives(source, max_length: int | None = None) -> list[dict]:
    """Negative samples as ``{"id", "prompt", "response"}``.

    Accepts ``prompt``/``response``, TOFU's ``question``/``answer`` and preference-style
    ``prompt``/``rejected``; a list-valued ``rejected`` (MC-PO candidates) gives one negative
    per candidate, with ids ``ID/0``, ``ID/1``, ...
    """
    records = load_records(source, what="negative samples", max_length=max_length)
    out = []
    for i, record in enumerate(records):
        where = records.where(i)
        schema = next((s for s in NEGATIVE_SCHEMAS if all(record.get(k) for k in s)), None)
        if schema is None:
            names = " or ".join("/".join(s) for s in NEGATIVE_SCHEMAS)
            raise NegprefError(f"{where}: a negative sample needs fields {names}")
        prompt_field, response_field = schema
        check_kinds(records[i : i + 1], {prompt_field: PROMPT}, str(source))
        rid = str(record.get("id", i))
        responses = record[response_field]
        many = isinstance(responses, list) and not isinstance(responses[0], dict)
        for j, response in enumerate(responses if many else [responses]):
            out.append(
                {
                    "id": f"{rid}/{j}" if many else rid,
                    "prompt": record[prompt_field],
                    "response": _text(response, f"{where}: field `{response_field}`"),
                }
            )
    return out


def _encode_all(tokenizer, pairs, max_length: int) -> list[Encoded]:
    return [encode_qa(tokenizer, prompt, response, max_length) for prompt, response in pairs]


def _to(batch: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def _logps(model, encoded: list[Encoded], pad_id: int, batch_size: int) -> torch.Tensor:
    out = []
    for start in range(0, len(encoded), batch_size):
        batch = _to(collate(encoded[start : start + batch_size], pad_id), model)
        out.append(sequence_logps(model, batch).logps)
    return torch.cat(out) if out else torch.empty(0)


class LMForgetTask:
    """Candidate negatives of a causal LM and the unlearning loss on them (``ForgetTask``).

    ``loss`` is a registry method (``GA``, ``GA+RT``, ``NPO``, ``NPO+RT``, any case): its forget
    loss with ``npo_beta`` as beta, and for ``+RT`` its retain NLL scaled by ``retain_weight``.
    """

    def __init__(
        self,
        model,
        tokenizer,
        negatives: list[dict],
        loss: str = "GA",
        npo_beta: float = 0.1,
        max_length: int = 256,
        retain: list[dict] | None = None,
        retain_weight: float = 1.0,
        batch_size: int = 8,
    ):
        self.method = u2a_method(loss)
        preset = PRESETS[self.method]
        if preset.c_rt and not retain:
            raise NegprefError(f"loss {self.method} needs a retain set (field retain)")
        self.objective = Objective(
            forget_loss_for(preset.forget_loss),
            c_forget=1.0,
            c_rt=retain_weight if preset.c_rt else 0.0,
            c_rtkl=0.0,
            c_fgkl=0.0,
            beta=npo_beta,
            gamma=preset.gamma,
        )
        self.batch_size, self.tokenizer = batch_size, tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.device = next(model.parameters()).device
        pairs = [(n["prompt"], n["response"]) for n in negatives]
        self.encoded = _encode_all(tokenizer, pairs, max_length)
        self.ref_logps = (
            _logps(model, self.encoded, self.pad_id, batch_size)
            if self.objective.ref_logp_groups
            else None
        )
        self.retain = (
            _encode_all(tokenizer, [(r["prompt"], r["response"]) for r in retain], max_length)
            if preset.c_rt
            else []
        )

    def __len__(self) -> int:
        return len(self.encoded)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = collate([self.encoded[i] for i in indices], self.pad_id)
        if self.ref_logps is not None:
            batch["ref_logps"] = self.ref_logps[list(indices)]
        return {k: v.to(self.device) for k, v in batch.items()}

    def loss(self, model, batch, weights=None) -> torch.Tensor:
        out = sequence_logps(model, batch)
        forget = GroupLogps(out.logps, out.n_tokens, ref_logps=batch.get("ref_logps"))
        step = StepLogps({"forget": forget}, weights)
        return self.objective.forget_loss.fn(step, self.objective.beta, self.objective.gamma)

    def unlearn(
        self,
        model,
        support: Sequence[int],
        weights: torch.Tensor,
        theta0: Grads,
        cfg: U2AConfig,
        steps: int,
        seed: int,
    ) -> float:
        """The inner problem on the unlearning engine: ``steps`` optimizer steps of
        ``UnlearnTrainer`` with this task's preset on the support, the simplex ``weights`` as
        per-record forget weights, ``cfg.reg_lambda * ||theta - theta0||^2`` as the trainer's
        proximal term, no dropout, the optimizer ``cfg.inner_optimizer`` (AdamW without decay,
        or plain SGD) at a constant ``cfg.inner_learning_rate``, no clipping. Returns the last
        step's objective.

        How it relates to eq. 8 of the U2A paper, ``sum_S w_i l_i + lambda ||theta-theta0||^2``:
        a step on minibatch ``B`` of ``S`` (``|B| = min(batch_size, |S|)``, a seeded
        permutation stream of ``S``) minimises ``sum_B w_i l_i / sum_B w_i`` (the engine's
        weighted reduction) ``+ c_rt * L_RT`` on ``|B|`` retain partners (+RT presets) ``+
        lambda ||theta - theta0||^2``. Because ``sum_S w_i = 1`` on the simplex, the forget term
        equals eq. 8's ``sum_S w_i l_i`` exactly when ``|B| = |S|``; for ``|B| < |S|`` it is
        the self-normalised (ratio) estimate of it, where ``weighted_unlearn``'s loop for
        closed-form tasks takes the unbiased ``|S|/|B| sum_B w_i l_i``: the two differ by the
        factor ``|S|/|B| sum_B w_i`` per batch, whose mean over batches is 1. The marginal gains and the weight updates
        (eqs. 9-12) are unchanged; only theta*(w) is approximated by these steps.
        """
        if steps == 0:
            return float("nan")
        support = list(support)
        ref = (
            {"forget": self.ref_logps[support].float().cpu()} if self.ref_logps is not None else {}
        )
        data = UnlearnData(
            forget=[self.encoded[i] for i in support],
            refusal=[],
            retain=self.retain,
            weights=torch.as_tensor(weights, dtype=torch.float32).cpu(),
            seed=seed,
            truncated={},
            ref_logps=ref,
        )
        trainer = train_in_memory(
            model,
            self.tokenizer,
            data,
            method=self.method,
            beta=self.objective.beta,
            c_rt=self.objective.c_rt,
            learning_rate=cfg.inner_learning_rate,
            optim="sgd" if cfg.inner_optimizer == "sgd" else "adamw_torch",
            weight_decay=0.0,
            max_grad_norm=0.0,
            lr_scheduler_type="constant",
            warmup_epochs=0.0,
            max_steps=steps,
            per_device_train_batch_size=min(cfg.batch_size, len(support)),
            gradient_accumulation_steps=1,
            seed=seed,
            proximal_lambda=cfg.reg_lambda,
            proximal_anchor=theta0,
            dropout=False,  # the gains differentiate the eval-mode loss: train that one
        )
        return last_logged(trainer)

    def retain_loss(self, model, step: int) -> torch.Tensor | None:
        """``c_rt`` times the registry's retain NLL on the ``step``-th retain minibatch
        (cycling)."""
        if not self.retain:
            return None
        start = (step * self.batch_size) % len(self.retain)
        chunk = self.retain[start : start + self.batch_size]
        out = sequence_logps(model, _to(collate(chunk, self.pad_id), model))
        return self.objective.c_rt * self.objective.retain_nll(GroupLogps(out.logps, out.n_tokens))


class NegDPOObjective:
    """``J = -mean DPO loss`` on preference pairs; reference log-probs taken at construction."""

    def __init__(
        self,
        model,
        tokenizer,
        pairs: list[dict],
        beta: float = 0.1,
        max_length: int = 256,
        batch_size: int = 8,
    ):
        if not pairs:
            raise NegprefError("the preference set of the DPO objective is empty")
        self.beta, self.batch_size, self.pad_id = beta, batch_size, tokenizer.pad_token_id
        self.chosen, self.rejected = (
            _encode_all(
                tokenizer,
                [
                    (p["prompt"], _completion(p[key], f"{place(pairs, i, 'pairs')}: field `{key}`"))
                    for i, p in enumerate(pairs)
                ],
                max_length,
            )
            for key in ("chosen", "rejected")
        )
        self.ref_chosen = _logps(model, self.chosen, self.pad_id, batch_size)
        self.ref_rejected = _logps(model, self.rejected, self.pad_id, batch_size)

    def value_and_grad(self, model, params) -> tuple[float, Grads]:
        n = len(self.chosen)
        value, grads = 0.0, [torch.zeros_like(p) for p in params]
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            size = stop - start
            pairs = collate(self.chosen[start:stop] + self.rejected[start:stop], self.pad_id)
            out = sequence_logps(model, _to(pairs, model))
            loss = losses.dpo(
                out.logps[:size],
                out.logps[size:],
                self.ref_chosen[start:stop],
                self.ref_rejected[start:stop],
                self.beta,
            )
            j_part = -loss * (size / n)
            grads = [g + d for g, d in zip(grads, grads_of(j_part, params))]
            value += j_part.item()
        return value, grads


class RewardObjective:
    """``J = mean reward of the model's own samples``, score-function gradient.

    Every call samples with the same seed (common random numbers), so ``J`` of successive
    rounds differ by the model, not by the draw. Sampling is plain ancestral sampling at
    temperature 1 (no top-k/top-p), the distribution the estimator differentiates.
    """

    def __init__(
        self,
        tokenizer,
        prompts: list,
        reward_fn: Callable[[object, str], float],
        samples_per_prompt: int = 4,
        max_new_tokens: int = 32,
        seed: int = 0,
        batch_size: int = 8,
        max_length: int = 256,
    ):
        if not prompts:
            raise NegprefError("the prompt set of the reward objective is empty")
        if samples_per_prompt < 1:
            raise NegprefError(f"reward_samples: must be at least 1, got {samples_per_prompt}")
        self.tokenizer, self.prompts, self.reward_fn = tokenizer, prompts, reward_fn
        self.samples, self.max_new_tokens, self.seed = samples_per_prompt, max_new_tokens, seed
        self.batch_size, self.max_length = batch_size, max_length
        self.prompt_ids = [prompt_ids(tokenizer, p, max_length) for p in prompts]

    @torch.no_grad()
    def sample(self, model) -> tuple[list[Encoded], list[str], torch.Tensor]:
        """Responses (as prompt+response ``Encoded`` and as text) and their rewards, grouped by
        prompt (``samples_per_prompt`` consecutive rows per prompt)."""
        eos = self.tokenizer.eos_token_id
        sampling = Sampling(self.max_new_tokens, 1.0, 1.0, 0, self.samples)
        generated = generate_ids(
            model, self.tokenizer, self.prompt_ids, sampling, self.batch_size, self.seed
        )
        encoded, texts, rewards = [], [], []
        for prompt, ids, rows in zip(self.prompts, self.prompt_ids, generated, strict=True):
            for seq in rows:
                response = seq[: seq.index(eos) + 1] if eos in seq else seq
                encoded.append(
                    Encoded(ids + response, [0] * len(ids) + [1] * len(response), eos not in seq)
                )
                texts.append(self.tokenizer.decode(response, skip_special_tokens=True))
                rewards.append(float(self.reward_fn(prompt, texts[-1])))
        return encoded, texts, torch.tensor(rewards, dtype=torch.float64)

    def value(self, model) -> float:
        return float(self.sample(model)[2].mean())

    def value_and_grad(self, model, params) -> tuple[float, Grads]:
        encoded, _, rewards = self.sample(model)
        advantages = rewards - _leave_one_out_baseline(rewards, self.samples)
        grads = [torch.zeros_like(p) for p in params]
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start : start + self.batch_size]
            batch = _to(collate(chunk, self.tokenizer.pad_token_id), model)
            logps = sequence_logps(model, batch).logps
            adv = advantages[start : start + len(chunk)].to(logps.device, logps.dtype)
            surrogate = (adv * logps).sum() / len(encoded)
            grads = [g + d for g, d in zip(grads, grads_of(surrogate, params))]
        return float(rewards.mean()), grads


def _leave_one_out_baseline(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """Mean reward of the *other* samples of the same prompt (of all samples when ``group``
    is 1): independent of the sample itself, so the gradient estimate stays unbiased."""
    rows = rewards.view(-1, group) if group > 1 else rewards[None]
    size = rows.shape[-1]
    if size == 1:
        return torch.zeros_like(rewards)
    return ((rows.sum(-1, keepdim=True) - rows) / (size - 1)).reshape(-1)
