"""Model forward -> per-sequence summed log-probs of the answer tokens.

The one place that turns logits into the 1-D tensors every loss in ``negpref.losses`` takes:
``sequence_logps`` (one training forward, everything a loss may read), ``answer_logps``
(summed log-probs only, logits from the first answer position on), ``shared_prompt_scores``
(completions of a shared prompt continuing its key/value cache) and ``batched_logps`` (the
no-grad scoring pass over many sequences).
Token log-probs are ``logit[target] - logsumexp(logits)`` in float32, which avoids
materialising a full log-softmax copy of the vocabulary.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from negpref.data import Encoded, collate


@dataclass
class SequenceLogps:
    logps: torch.Tensor  # [batch] sum of answer-token log-probs
    n_tokens: torch.Tensor  # [batch] number of answer tokens
    token_logps: torch.Tensor  # [batch, tokens-1] per-token log-probs (0 off the answer)
    mask: torch.Tensor  # [batch, tokens-1] answer mask aligned with token_logps / logits
    targets: torch.Tensor  # [batch, tokens-1] the token each position predicts (input_ids[:, 1:])
    logits: torch.Tensor | None = None  # [batch, tokens-1, vocab] with keep_logits
    # [batch, tokens, vocab], unshifted (``logits`` is a view of it); with keep_logits
    all_logits: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None  # [batch, tokens] of the batch
    # [batch, tokens, hidden] activations after decoder block ``hidden_layer`` (unshifted)
    hidden: torch.Tensor | None = None


def token_logps_from_logits(
    logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted next-token log-probs and mask: position t scores token t+1."""
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    targets = input_ids[:, 1:]
    mask = answer_mask[:, 1:].to(logits.dtype)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    token_logps = (picked - logits.logsumexp(-1)) * mask
    return token_logps, mask


def sequence_logps(
    model,
    batch: dict[str, torch.Tensor],
    keep_logits: bool = False,
    hidden_layer: int | None = None,
) -> SequenceLogps:
    """One forward of ``batch`` (from ``data.collate``) through ``model``; with ``hidden_layer``
    N also the output of decoder block N (0-based, ``model.layers.N``)."""
    hidden_kwargs = {"output_hidden_states": True} if hidden_layer is not None else {}
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **hidden_kwargs
    )
    token_logps, mask = token_logps_from_logits(
        out.logits, batch["input_ids"], batch["answer_mask"]
    )
    return SequenceLogps(
        logps=token_logps.sum(-1),
        n_tokens=mask.sum(-1),
        token_logps=token_logps,
        mask=mask,
        targets=batch["input_ids"][:, 1:],
        logits=out.logits[:, :-1] if keep_logits else None,
        all_logits=out.logits if keep_logits else None,
        attention_mask=batch["attention_mask"],
        # hidden_states[0] is the embedding output, [N + 1] the output of block N
        hidden=out.hidden_states[hidden_layer + 1] if hidden_layer is not None else None,
    )


def forward_accepts(model, *names: str) -> bool:
    """Whether the (unwrapped, base) model's forward takes every keyword in ``names``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return all(name in params for name in names)


def split_answer(encoded: Encoded) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of an encoded completion."""
    start = encoded.answer_mask.index(1)
    return encoded.input_ids[:start], encoded.input_ids[start:]


def _padded(rows: list[list[int]], pad_id: int, left: bool, device):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def shared_prompt_scores(
    model,
    prompts: list[list[int]],
    answers: list[list[int]],
    owner: list[int],
    pad_id,
    device,
    keep_logits: bool = False,
) -> SequenceLogps:
    """Log-probs of ``answers``, answer i continuing ``prompts[owner[i]]``, aligned on the
    answer tokens: column t of row i scores ``answers[i][t]`` (right-padded; ``targets`` are
    the answer ids, ``logits`` with ``keep_logits``).

    Each prompt runs through the model once (left-padded, explicit positions); its key/value
    cache is gathered per answer and the answers attend to it. Causal attention makes this the
    concatenated forward up to float rounding, with one prompt pass per prompt instead of one
    per completion (DPO has 2 completions per prompt, MC-PO scores K+1, a TOFU question 7).
    The prompt's last logit scores each answer's first token.
    """
    prompt_ids, prompt_mask = _padded(prompts, pad_id, left=True, device=device)
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
        logits_to_keep=1,
    )
    rows = torch.tensor(owner, device=device)
    cache = out.past_key_values
    cache.batch_select_indices(rows)
    answer_ids, answer_mask = _padded(answers, pad_id, left=False, device=device)
    positions = prompt_mask.sum(-1)[rows, None] + torch.arange(answer_ids.shape[1], device=device)
    continued = model(
        input_ids=answer_ids,
        attention_mask=torch.cat([prompt_mask[rows], answer_mask], 1),
        position_ids=positions,
        past_key_values=cache,
    )
    logits = torch.cat([out.logits[rows, -1:], continued.logits[:, :-1]], 1).float()
    mask = answer_mask.to(logits.dtype)
    picked = logits.gather(-1, answer_ids.unsqueeze(-1)).squeeze(-1)
    token_logps = (picked - logits.logsumexp(-1)) * mask
    return SequenceLogps(
        logps=token_logps.sum(-1),
        n_tokens=mask.sum(-1),
        token_logps=token_logps,
        mask=mask,
        targets=answer_ids,
        logits=logits if keep_logits else None,
    )


def can_share_prompts(model) -> bool:
    """Whether ``model``'s forward takes what :func:`shared_prompt_scores` passes."""
    return forward_accepts(model, "logits_to_keep", "past_key_values", "position_ids")


def answer_logps(model, batch: dict[str, torch.Tensor], trim: bool = True):
    """Summed answer log-probs and answer lengths of a collated batch, one forward.

    With ``trim`` the model computes logits only from the position before the batch's first
    answer token on (``logits_to_keep``): prompt positions are never scored, so their
    vocabulary projection and log-softmax are skipped. Without it, every position is
    projected (``negpref.logprobs.sequence_logps``' way); the values are the same.
    """
    input_ids, answer_mask = batch["input_ids"], batch["answer_mask"]
    kwargs = {}
    if trim:
        first = int(answer_mask.float().argmax(-1).min())  # earliest answer token in the batch
        keep = input_ids.shape[1] - max(first - 1, 0)
        kwargs["logits_to_keep"] = keep
        input_ids, answer_mask = input_ids[:, -keep:], answer_mask[:, -keep:]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    token_logps, mask = token_logps_from_logits(out.logits, input_ids, answer_mask)
    return token_logps.sum(-1), mask.sum(-1)


def batch_to(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def batched_logps(
    model,
    encoded: list[Encoded],
    pad_id: int,
    batch_size: int,
    device,
    autocast=None,
    trim: bool = False,
    progress: bool = False,
    desc: str = "log-probs",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs and answer lengths of ``encoded`` (no grad), in input order.

    The one batched no-grad scoring pass: sequences sorted by length so batches pad little;
    ``autocast`` (e.g. ``accelerator.autocast``) wraps each forward, ``trim`` as
    ``answer_logps``; ``progress`` shows a bar named ``desc``.
    """
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    logps = torch.empty(len(encoded), dtype=torch.float32)
    lengths = torch.empty(len(encoded), dtype=torch.float32)
    from tqdm.auto import tqdm

    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        chunk = order[start : start + batch_size]
        batch = batch_to(collate([encoded[i] for i in chunk], pad_id), device)
        with autocast() if autocast is not None else nullcontext():
            chunk_logps, chunk_lengths = answer_logps(model, batch, trim)
        logps[chunk] = chunk_logps.float().cpu()
        lengths[chunk] = chunk_lengths.float().cpu()
    return logps, lengths
