"""Records -> encoded sequence groups, the seeded data stream, micro-batches.

The forget set is read as a *stream* of seeded permutations (epoch ``e`` is permutation
``e`` of the forget items), like TOFU's trainer, which iterates its data loader across epoch
boundaries: every optimizer step takes the next ``effective_batch`` items, so every step is
full and the whole data order is a pure function of ``(seed, position)``. A checkpoint then
only needs the step number to restore the order, and any number of processes sees the same
global batches.

Each forget item ``i`` carries its refusal sequence (forget question + refusal answer ``k_i``,
drawn once per seed) and, per epoch, a retain partner (a seeded permutation of the retain set,
cycled when it is smaller than the forget set).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from negpref.data import (
    DEFAULT_PROMPT,
    Encoded,
    PromptFormat,
    collate,
    encode_qa,
    encode_text,
    load_lines,
    load_records,
)
from negpref.data.records import PROMPT, TEXT, Records, check_kinds, place
from negpref.errors import NegprefError

QA_FIELDS = ("question", "answer")
# A question may be a chat message list (``format_prompt``); answers and texts are strings.
FIELD_KINDS = {"question": PROMPT, "answer": TEXT, "text": TEXT}


def _missing(record: dict, fields: tuple[str, ...]) -> list[str]:
    return [f for f in fields if record.get(f) in (None, "", [])]


def record_fields(record: dict) -> tuple[str, ...]:
    """A record is QA (question + answer) unless it holds only ``text`` (MUSE-style)."""
    return ("text",) if "text" in record and "question" not in record else QA_FIELDS


def load_qa(source, what: str, max_length: int | None = None) -> Records:
    """QA or text records from a file, folder, hub name or Python object (``load_records``),
    checked: every record holds the fields of the first one's kind, as strings."""
    records = load_records(source, what=what, max_length=max_length)
    fields = record_fields(records[0])
    for i, r in enumerate(records):
        if missing := _missing(r, fields):
            raise NegprefError(
                f"{records.where(i)}: missing field(s) {', '.join(missing)}; each record needs "
                f"{', '.join(fields)}"
            )
    check_kinds(records, {f: FIELD_KINDS[f] for f in fields}, what)
    return records


def record_key(record: dict) -> str:
    fields = ("question", "answer") if "question" in record else ("text",)
    return json.dumps([record[f] for f in fields], sort_keys=True)


def count_overlap(forget: list[dict], retain: list[dict]) -> int:
    """Forget records that also appear, verbatim, in the retain set."""
    retain_keys = {record_key(r) for r in retain}
    return sum(record_key(r) in retain_keys for r in forget)


def forget_weights(records: Sequence[dict]) -> torch.Tensor | None:
    """Per-record ``weight`` fields (U2A's weighted unlearning); None when no record has one."""
    if not any("weight" in r for r in records):
        return None
    values = []
    for i, r in enumerate(records):
        w = r.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0:
            raise NegprefError(
                f"{place(records, i, 'forget records')}: field `weight` must be a finite number "
                f">= 0, got {w!r}"
            )
        values.append(float(w))
    return torch.tensor(values, dtype=torch.float32)


def _encode_all(
    tokenizer,
    records: list[dict],
    max_length: int,
    what: str,
    prompt: PromptFormat,
    answers: list[str] | None = None,
) -> list[Encoded]:
    encoded = []
    for i, record in enumerate(records):
        try:
            if answers is None and "question" not in record:
                encoded.append(encode_text(tokenizer, record["text"], max_length))
            else:
                answer = record["answer"] if answers is None else answers[i]
                encoded.append(encode_qa(tokenizer, record["question"], answer, max_length, prompt))
        except NegprefError as e:
            raise NegprefError(f"{place(records, i, what)}: {e}") from None
    return encoded


@dataclass
class UnlearnData:
    """Encoded groups, aligned by forget index (``refusal[i]`` belongs to ``forget[i]``)."""

    forget: list[Encoded]
    refusal: list[Encoded]
    retain: list[Encoded]
    weights: torch.Tensor | None
    seed: int
    truncated: dict[str, int]
    ref_logps: dict[str, torch.Tensor] = field(default_factory=dict)  # group -> [n_forget]
    _orders: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def n_forget(self) -> int:
        return len(self.forget)

    def group(self, name: str) -> list[Encoded]:
        return {"forget": self.forget, "refusal": self.refusal, "retain": self.retain}[name]

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._orders:
            self._orders[epoch] = self._draw_epoch_order(epoch)
        return self._orders[epoch]

    def _draw_epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        n = self.n_forget
        forget_order = np.random.default_rng([self.seed, epoch, 0]).permutation(n)
        if not self.retain:
            return forget_order, np.zeros(n, dtype=np.int64)
        rounds = -(-n // len(self.retain))
        retain_order = np.concatenate(
            [
                np.random.default_rng([self.seed, epoch, 1, r]).permutation(len(self.retain))
                for r in range(rounds)
            ]
        )[:n]
        return forget_order, retain_order

    def stream(self, start: int, count: int) -> list[tuple[int, int]]:
        """``(forget index, retain index)`` pairs at stream positions ``start .. start+count``."""
        pairs = []
        for position in range(start, start + count):
            epoch, k = divmod(position, self.n_forget)
            forget_order, retain_order = self._epoch_order(epoch)
            pairs.append((int(forget_order[k]), int(retain_order[k])))
        return pairs

    def fingerprint(self) -> str:
        """Hash of every token id and the seed: a resumed run must see the same data."""
        h = hashlib.sha256(str(self.seed).encode())
        for name in ("forget", "refusal", "retain"):
            for e in self.group(name):
                h.update(json.dumps([name, e.input_ids, e.answer_mask]).encode())
        if self.weights is not None:
            h.update(self.weights.numpy().tobytes())
        return h.hexdigest()[:16]

    def micro_batch(self, pairs: list[tuple[int, int]], groups: tuple[str, ...]) -> MicroBatch:
        forget_idx = [f for f, _ in pairs]
        encoded = {g: [self.group(g)[r if g == "retain" else f] for f, r in pairs] for g in groups}
        ref_logps = {g: v[forget_idx] for g, v in self.ref_logps.items() if g in groups}
        weights = self.weights[forget_idx] if self.weights is not None else None
        return MicroBatch(encoded=encoded, ref_logps=ref_logps, weights=weights)


@dataclass
class MicroBatch:
    """The sequences of one micro-batch, group by group, and what is known about them."""

    encoded: dict[str, list[Encoded]]
    ref_logps: dict[str, torch.Tensor]  # precomputed reference log-probs per group
    weights: torch.Tensor | None

    def collate(self, groups: tuple[str, ...], pad_id: int) -> dict[str, torch.Tensor]:
        """One padded batch holding ``groups`` back to back, for a single forward."""
        return collate([e for g in groups for e in self.encoded[g]], pad_id)

    def sizes(self, groups: tuple[str, ...]) -> list[int]:
        return [len(self.encoded[g]) for g in groups]


def build_data(
    tokenizer,
    forget: list[dict],
    retain: list[dict] | None,
    idk_answers: list[str] | None,
    max_length: int,
    seed: int,
    prompt: PromptFormat = DEFAULT_PROMPT,
) -> UnlearnData:
    """Encode every sequence a run may need, once, with the questions formatted by ``prompt``."""
    encoded_forget = _encode_all(tokenizer, forget, max_length, "forget records", prompt)
    refusal: list[Encoded] = []
    if idk_answers:
        choice = np.random.default_rng([seed, 2]).integers(len(idk_answers), size=len(forget))
        answers = [idk_answers[k] for k in choice]
        refusal = _encode_all(tokenizer, forget, max_length, "forget records", prompt, answers)
    encoded_retain = _encode_all(tokenizer, retain or [], max_length, "retain records", prompt)
    return UnlearnData(
        forget=encoded_forget,
        refusal=refusal,
        retain=encoded_retain,
        weights=forget_weights(forget),
        seed=seed,
        truncated={
            name: sum(e.truncated for e in enc)
            for name, enc in (
                ("forget", encoded_forget),
                ("refusal", refusal),
                ("retain", encoded_retain),
            )
        },
    )


def load_idk(path: str | Path, max_length: int | None = None) -> list[str]:
    return load_lines(path, what="refusal answers", max_length=max_length)
