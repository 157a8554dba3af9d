"""Preference records -> token ids, and batched log-probs of many completions.

Every completion (chosen or candidate) is encoded once with ``negpref.data.encode_qa``; a
training step collates the chosen completions and the drawn negatives of its prompts into ONE
right-padded batch, ``[chosen_1..B, negatives...]``, for one forward (TRL's concatenated
forward). No-grad passes over many completions (reference log-probs, kernel scores) sort them
by length first so that batches carry little padding.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from negpref.data import Encoded, collate, encode_qa
from negpref.data.preference import PreferenceRecord
from negpref.errors import NegprefError
from negpref.logprobs import token_logps_from_logits

log = logging.getLogger(__name__)


@dataclass
class EncodedItem:
    record: PreferenceRecord
    chosen: Encoded
    candidates: list[Encoded]
    ref_chosen: float = float("nan")
    ref_candidates: list[float] = field(default_factory=list)


def encode_items(
    tokenizer, records: list[PreferenceRecord], max_length: int, source: str = "data"
) -> list[EncodedItem]:
    """Encode every record; a prompt that leaves no room for its answer is an error."""
    items, truncated = [], 0
    for i, r in enumerate(records):
        try:
            chosen = encode_qa(tokenizer, r.prompt, r.chosen, max_length)
            candidates = [encode_qa(tokenizer, r.prompt, c, max_length) for c in r.rejected]
        except NegprefError as e:
            raise NegprefError(f"{r.where or f'{source} record {i + 1}'}: {e}") from None
        truncated += chosen.truncated + sum(c.truncated for c in candidates)
        items.append(EncodedItem(r, chosen, candidates))
    if truncated:
        log.warning(
            "%s: %d completion(s) cut to --max-length %d tokens", source, truncated, max_length
        )
    return items


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


def shared_prompt_logps(
    model, prompts: list[list[int]], answers: list[list[int]], owner: list[int], pad_id, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and lengths of ``answers``, answer i continuing ``prompts[owner[i]]``.

    Each prompt runs through the model once (left-padded, explicit positions); its key/value
    cache is gathered per answer and the answers attend to it. Causal attention makes this the
    concatenated forward up to float rounding, with one prompt pass per prompt instead of one
    per completion (DPO has 2 completions per prompt, MC-PO scores K+1). The prompt's last
    logit scores each answer's first token.
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
    picked = logits.gather(-1, answer_ids.unsqueeze(-1)).squeeze(-1)
    token_logps = (picked - logits.logsumexp(-1)) * answer_mask
    return token_logps.sum(-1), answer_mask.sum(-1)


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
def logps_of(
    model,
    encoded: list[Encoded],
    pad_id: int,
    batch_size: int,
    device,
    autocast=None,
    trim: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs and answer lengths of ``encoded`` (no grad), in input order."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    logps = torch.empty(len(encoded), dtype=torch.float32)
    lengths = torch.empty(len(encoded), dtype=torch.float32)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = batch_to(collate([encoded[i] for i in chunk], pad_id), device)
        with autocast() if autocast is not None else nullcontext():
            chunk_logps, chunk_lengths = answer_logps(model, batch, trim)
        logps[chunk] = chunk_logps.float().cpu()
        lengths[chunk] = chunk_lengths.float().cpu()
    return logps, lengths
