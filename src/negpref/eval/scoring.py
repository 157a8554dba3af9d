"""Batched answer scoring: one forward per batch of (question, answer) pairs.

Pairs are sorted by length before batching so that a batch holds sequences of similar length
(less padding), then results are put back in input order. Right padding never changes a
sequence's values: the tests check batched against one-at-a-time scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from negpref import losses
from negpref.conventions import NPO, Conventions, get_conventions
from negpref.data import DEFAULT_PROMPT, PromptFormat, collate, encode_qa
from negpref.eval import mia
from negpref.logprobs import sequence_logps


@dataclass
class AnswerScores:
    """Per pair, in input order. NaN marks a pair whose log-prob came out NaN or infinite."""

    logps: list[float]  # summed answer-token log-prob
    n_tokens: list[int]  # answer tokens scored (EOS included)
    truncated: list[bool]  # answer cut at max_length
    mia: dict[str, list[float]] | None = None  # attack name -> score (higher: member)
    kl_ref: list[float] | None = None  # per pair KL(ref || model), token mean

    @property
    def avg_losses(self) -> list[float]:
        """Token-mean NLL per pair: TOFU's ``avg_*_loss``."""
        return [-lp / n if n else math.nan for lp, n in zip(self.logps, self.n_tokens)]

    @property
    def n_nan(self) -> int:
        return sum(not math.isfinite(lp) for lp in self.logps)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score_answers(
    model,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 8,
    max_length: int = 512,
    ref_model=None,
    mia_k: float | None = None,
    desc: str | None = None,
    prompt: PromptFormat = DEFAULT_PROMPT,
    conventions: Conventions | str = NPO,
) -> AnswerScores:
    """Score ``(question, answer)`` pairs under ``model``, questions formatted by ``prompt``.

    With ``ref_model``, also the per-pair forget/retain KL ``KL(pi_ref || pi_model)`` over the
    answer tokens; with ``mia_k``, the membership-inference scores of ``mia.ATTACKS`` (Min-K%
    and Min-K%++ over the lowest ``mia_k`` fraction of tokens; without the EOS token under
    open-unlearning's ``conventions``).
    """
    drop_eos = get_conventions(conventions).mia_drop_eos
    encoded = [encode_qa(tokenizer, q, a, max_length, prompt) for q, a in pairs]
    n = len(encoded)
    logps, n_tokens = [math.nan] * n, [0] * n
    scores = {name: [math.nan] * n for name in mia.ATTACKS} if mia_k is not None else None
    kl_ref = [math.nan] * n if ref_model is not None else None
    order = sorted(range(n), key=lambda i: -len(encoded[i].input_ids))
    device = model_device(model)
    pad_id = tokenizer.pad_token_id
    need_logits = ref_model is not None or mia_k is not None
    chunks = [order[s : s + batch_size] for s in range(0, n, batch_size)]
    for chunk in tqdm(chunks, desc=desc, disable=desc is None, leave=False):
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in chunk], pad_id).items()}
        out = sequence_logps(model, batch, keep_logits=need_logits)
        ref_out = None
        if ref_model is not None:
            ref_device = model_device(ref_model)
            ref_batch = {k: v.to(ref_device) for k, v in batch.items()}
            ref_out = sequence_logps(ref_model, ref_batch, keep_logits=True)
        if scores is not None:
            min_k_mask = mia.drop_last_answer_token(out.mask) if drop_eos else out.mask
            min_k = mia.min_k_scores(out.token_logps, min_k_mask, mia_k)
            min_k_pp = mia.min_k_plus_plus_scores(out.token_logps, out.logits, min_k_mask, mia_k)
        for row, i in enumerate(chunk):
            lp, count = out.logps[row].item(), int(out.n_tokens[row].item())
            n_tokens[i] = count
            if not math.isfinite(lp):
                continue  # stays NaN everywhere: counted by the caller
            logps[i] = lp
            if scores is not None:
                mean_logp = lp / count
                scores["loss"][i] = mean_logp
                scores["zlib"][i] = mia.zlib_score(mean_logp, pairs[i][1])
                scores["min_k"][i] = min_k[row].item()
                scores["min_k_plus_plus"][i] = min_k_pp[row].item()
            if ref_out is not None:
                kl_ref[i] = losses.kl(
                    out.logits[row : row + 1],
                    ref_out.logits[row : row + 1].to(device),
                    out.mask[row : row + 1],
                    direction="ref||policy",
                ).item()
    return AnswerScores(
        logps=logps,
        n_tokens=n_tokens,
        truncated=[e.truncated for e in encoded],
        mia=scores,
        kl_ref=kl_ref,
    )
