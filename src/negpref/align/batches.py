"""Preference records -> token ids, and batched log-probs of many completions.

Every completion (chosen or candidate) is encoded once with ``negpref.data.encode_qa``; a
training step collates the chosen completions and the drawn negatives of its prompts into ONE
right-padded batch, ``[chosen_1..B, negatives...]``, for one forward (TRL's concatenated
forward). No-grad passes over many completions (reference log-probs, kernel scores) sort them
by length first so that batches carry little padding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from negpref.data import Encoded, encode_qa
from negpref.data.preference import PreferenceRecord
from negpref.errors import NegprefError

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
