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

from negpref import losses
from negpref.conventions import NPO, Conventions, get_conventions
from negpref.data import DEFAULT_PROMPT, Encoded, PromptFormat, collate, encode_qa
from negpref.errors import NegprefError
from negpref.eval import mia
from negpref.eval.memorization import exact_memorization, extraction_strength, greedy_matches
from negpref.eval.shards import Shards
from negpref.logprobs import can_share_prompts, sequence_logps, shared_prompt_scores, split_answer


@dataclass
class AnswerScores:
    """Per pair, in input order. NaN marks a pair whose log-prob came out NaN or infinite."""

    logps: list[float]  # summed answer-token log-prob
    n_tokens: list[int]  # answer tokens scored (EOS included)
    truncated: list[bool]  # answer cut at max_length
    mia: dict[str, list[float]] | None = None  # attack name -> score (higher: member)
    kl_ref: list[float] | None = None  # per pair KL(ref || model), token mean
    exact_memorization: list[float] | None = None  # per pair, with memorization=True
    extraction_strength: list[float] | None = None

    @property
    def avg_losses(self) -> list[float]:
        """Token-mean NLL per pair: TOFU's ``avg_*_loss``."""
        return [-lp / n if n else math.nan for lp, n in zip(self.logps, self.n_tokens)]

    @property
    def n_nan(self) -> int:
        return sum(not math.isfinite(lp) for lp in self.logps)

    @staticmethod
    def concat(parts: Sequence[AnswerScores]) -> AnswerScores:
        """The items of ``parts`` one after the other; a figure only the first part has (KL,
        MIA, memorization) is NaN for the others' items."""

        def joined(get):
            if get(parts[0]) is None:
                return None
            return [v for p in parts for v in (get(p) or [math.nan] * len(p.logps))]

        mia_names = list(parts[0].mia) if parts[0].mia is not None else []
        return AnswerScores(
            logps=[v for p in parts for v in p.logps],
            n_tokens=[v for p in parts for v in p.n_tokens],
            truncated=[v for p in parts for v in p.truncated],
            mia={k: joined(lambda p, k=k: p.mia and p.mia[k]) for k in mia_names} or None,
            kl_ref=joined(lambda p: p.kl_ref),
            exact_memorization=joined(lambda p: p.exact_memorization),
            extraction_strength=joined(lambda p: p.extraction_strength),
        )

    def subset(self, start: int, stop: int) -> AnswerScores:
        """The scores of items ``start:stop``."""

        def cut(values):
            return None if values is None else values[start:stop]

        return AnswerScores(
            logps=self.logps[start:stop],
            n_tokens=self.n_tokens[start:stop],
            truncated=self.truncated[start:stop],
            mia=None if self.mia is None else {k: v[start:stop] for k, v in self.mia.items()},
            kl_ref=cut(self.kl_ref),
            exact_memorization=cut(self.exact_memorization),
            extraction_strength=cut(self.extraction_strength),
        )


def model_device(model) -> torch.device:
    return next(model.parameters()).device


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
    memorization: bool = False,
) -> AnswerScores:
    """Score ``(question, answer)`` pairs under ``model``, questions formatted by ``prompt``.

    With ``ref_model``, also the per-pair forget/retain KL ``KL(pi_ref || pi_model)`` over the
    answer tokens; with ``mia_k``, the membership-inference scores of ``mia.ATTACKS`` (Min-K%
    and Min-K%++ over the lowest ``mia_k`` fraction of tokens; without the EOS token under
    open-unlearning's ``conventions``); with ``memorization``, exact memorization and
    extraction strength of the answer (``negpref.eval.memorization``).
    """
    encoded = [encode_qa(tokenizer, q, a, max_length, prompt) for q, a in pairs]
    return score_encoded(
        model,
        tokenizer.pad_token_id,
        encoded,
        [a for _, a in pairs],
        batch_size,
        ref_model=ref_model,
        mia_k=mia_k,
        desc=desc,
        conventions=conventions,
        memorization=memorization,
    )


def _forward(model, pad_id: int, items: list[Encoded], keep_logits: bool, share: bool):
    """Scores of ``items`` in one forward, left-aligned and right-padded: with ``share``, each
    distinct prompt runs once and its answers continue its cache (columns = answer tokens);
    else the concatenated sequences (columns = sequence positions). Either way a forward over a
    subset of the rows is a prefix of the same columns."""
    device = model_device(model)
    if not share:
        batch = {k: v.to(device) for k, v in collate(items, pad_id).items()}
        return sequence_logps(model, batch, keep_logits=keep_logits)
    prompts: dict[tuple[int, ...], int] = {}
    owner, answers = [], []
    for item in items:
        prompt, answer = split_answer(item)
        owner.append(prompts.setdefault(tuple(prompt), len(prompts)))
        answers.append(answer)
    return shared_prompt_scores(
        model, [list(p) for p in prompts], answers, owner, pad_id, device, keep_logits
    )


def _chunks(encoded: Sequence[Encoded], batch_size: int, share: bool) -> list[list[int]]:
    """Item indices per forward, longest first so a forward pads little: with ``share``, items
    sharing a prompt stay together, up to ``batch_size`` rows unless one group is larger;
    else ``batch_size`` items at a time."""
    if not share:
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
        return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, item in enumerate(encoded):
        groups.setdefault(tuple(split_answer(item)[0]), []).append(i)
    ordered = sorted(groups.values(), key=lambda g: -max(len(encoded[i].input_ids) for i in g))
    chunks: list[list[int]] = []
    for group in ordered:
        if chunks and len(chunks[-1]) + len(group) <= batch_size:
            chunks[-1].extend(group)
        else:
            chunks.append(list(group))
    return chunks


@torch.no_grad()
def score_encoded(
    model,
    pad_id: int,
    encoded: Sequence[Encoded],
    scored_texts: Sequence[str],
    batch_size: int = 8,
    ref_model=None,
    mia_k: float | None = None,
    desc: str | None = None,
    conventions: Conventions | str = NPO,
    memorization: bool = False,
    detail: Sequence[bool] | None = None,
    share_prompts: bool = True,
    shards: Shards | None = None,
) -> AnswerScores:
    """:func:`score_answers` on encoded items; ``scored_texts`` (the text of each item's scored
    tokens) feed the zlib attack. ``detail`` (default: every item) marks the items that get the
    KL, MIA and memorization figures; the others get their log-probs only.

    Items with the same prompt tokens (a TOFU question's answer, paraphrase and perturbed
    answers) are scored in one forward that encodes the prompt once
    (``logprobs.shared_prompt_scores``) when ``share_prompts`` and the model's forward allows;
    the values equal the one-sequence-per-item forward up to float rounding. ``shards``
    splits the forwards over processes (``negpref.eval.shards``); every process gets all scores.
    """
    drop_eos = get_conventions(conventions).mia_drop_eos
    n = len(encoded)
    detail = [True] * n if detail is None else list(detail)
    need_logits = ref_model is not None or mia_k is not None or memorization
    share = share_prompts and can_share_prompts(model)

    def score_chunk(chunk: list[int]) -> list[dict]:
        """The figures of one forward's items, as plain numbers (what processes exchange)."""
        keep = need_logits and any(detail[i] for i in chunk)
        out = _forward(model, pad_id, [encoded[i] for i in chunk], keep, share)
        detailed = [row for row, i in enumerate(chunk) if detail[i]] if keep else []
        ref_out = None
        if ref_model is not None and detailed:
            ref_share = share_prompts and can_share_prompts(ref_model)
            ref_items = [encoded[chunk[row]] for row in detailed]
            ref_out = _forward(ref_model, pad_id, ref_items, True, ref_share)
        if mia_k is not None and detailed:
            min_k_mask = mia.drop_last_answer_token(out.mask) if drop_eos else out.mask
            min_k = mia.min_k_scores(out.token_logps, min_k_mask, mia_k)
            min_k_pp = mia.min_k_plus_plus_scores(out.token_logps, out.logits, min_k_mask, mia_k)
        if memorization and detailed:
            matches = greedy_matches(out.logits, out.targets, out.mask)
            item_em = exact_memorization(matches, out.mask)
            item_es = extraction_strength(matches, out.mask)
        rows = []
        for row, i in enumerate(chunk):
            lp, count = out.logps[row].item(), int(out.n_tokens[row].item())
            figures = {"n_tokens": count}
            rows.append(figures)
            if not math.isfinite(lp):
                continue  # stays NaN everywhere: counted by the caller
            figures["logp"] = lp
            if not detail[i] or not keep:
                continue
            if mia_k is not None:
                mean_logp = lp / count
                figures["mia"] = {
                    "loss": mean_logp,
                    "zlib": mia.zlib_score(mean_logp, scored_texts[i]),
                    "min_k": min_k[row].item(),
                    "min_k_plus_plus": min_k_pp[row].item(),
                }
            if memorization:
                figures["em"], figures["es"] = item_em[row].item(), item_es[row].item()
            if ref_out is not None:
                j = detailed.index(row)
                width = ref_out.logits.shape[1]  # the subset's columns: a prefix of the chunk's
                figures["kl"] = losses.kl(
                    out.logits[row : row + 1, :width],
                    ref_out.logits[j : j + 1].to(out.logits.device),
                    out.mask[row : row + 1, :width],
                    direction="ref||policy",
                ).item()
        return rows

    logps, n_tokens = [math.nan] * n, [0] * n
    scores = {name: [math.nan] * n for name in mia.ATTACKS} if mia_k is not None else None
    kl_ref = [math.nan] * n if ref_model is not None else None
    em = [math.nan] * n if memorization else None
    es = [math.nan] * n if memorization else None
    chunks = _chunks(encoded, batch_size, share)
    for chunk, rows in zip(chunks, (shards or Shards()).map(score_chunk, chunks, desc)):
        for i, figures in zip(chunk, rows, strict=True):
            n_tokens[i] = figures["n_tokens"]
            logps[i] = figures.get("logp", math.nan)
            for name, value in figures.get("mia", {}).items():
                scores[name][i] = value
            if "em" in figures:
                em[i], es[i] = figures["em"], figures["es"]
            if "kl" in figures:
                kl_ref[i] = figures["kl"]
    return AnswerScores(
        logps=logps,
        n_tokens=n_tokens,
        truncated=[e.truncated for e in encoded],
        mia=scores,
        kl_ref=kl_ref,
        exact_memorization=em,
        extraction_strength=es,
    )


def gradnorm_scores(
    model,
    pad_id: int,
    encoded: Sequence[Encoded],
    p: float = mia.GRADNORM_P,
    shards: Shards | None = None,
) -> list[float]:
    """The GradNorm attack per item (``mia.gradnorm_score``), one backward each.

    Gradients are taken with ``torch.autograd.grad`` over the parameters that require them
    (an adapter's, for a PEFT model), so accumulated ``.grad`` of a training run is untouched;
    the model stays in eval mode (no dropout), unlike open-unlearning's, which switches to train.
    """
    params = [q for q in model.parameters() if q.requires_grad]
    if not params:
        raise NegprefError(
            "GradNorm MIA: the model has no parameters that require gradients; leave "
            "requires_grad on (or drop the gradnorm attack)"
        )
    device = model_device(model)

    @torch.enable_grad()
    def score(item: Encoded) -> float:
        batch = {k: v.to(device) for k, v in collate([item], pad_id).items()}
        out = sequence_logps(model, batch)
        if not out.n_tokens.item() or not torch.isfinite(out.logps).all():
            return math.nan
        loss = -(out.logps / out.n_tokens).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return mia.gradnorm_score([g for g in grads if g is not None], p)

    return (shards or Shards()).map(score, list(encoded))


def model_attack_scores(
    model,
    pad_id: int,
    encoded: Sequence[Encoded],
    scored_texts: Sequence[str],
    scores: AnswerScores,
    batch_size: int = 8,
    mia_ref_model=None,
    gradnorm: bool = False,
    shards: Shards | None = None,
) -> dict[str, list[float]]:
    """``mia.MODEL_ATTACKS`` per item: the reference attacks (with ``mia_ref_model``, scoring
    the same items under it) and GradNorm (with ``gradnorm``); ``scores`` are the model's own."""
    attacks: dict[str, list[float]] = {}
    if mia_ref_model is not None:
        ref = score_encoded(mia_ref_model, pad_id, encoded, scored_texts, batch_size, shards=shards)
        per_item = [
            mia.reference_scores(lp / n, ref_lp / ref_n)
            if n and ref_n and math.isfinite(lp) and math.isfinite(ref_lp)
            else dict.fromkeys(("reference", "reference_ratio"), math.nan)
            for lp, n, ref_lp, ref_n in zip(scores.logps, scores.n_tokens, ref.logps, ref.n_tokens)
        ]
        for name in ("reference", "reference_ratio"):
            attacks[name] = [item[name] for item in per_item]
    if gradnorm:
        attacks["gradnorm"] = gradnorm_scores(model, pad_id, encoded, shards=shards)
    return attacks
