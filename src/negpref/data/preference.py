"""Preference records: ``prompt``, ``chosen``, ``rejected`` in TRL's formats, with K candidates.

Accepted record shapes (one file holds one shape):

- explicit prompt: ``prompt`` (string or chat message list), ``chosen`` (string or a list of
  one assistant message), ``rejected`` (the same, or a *list of candidates*, each a string or
  a message list: MC-PO draws its negatives from them);
- implicit prompt (TRL): ``chosen`` and ``rejected`` hold the whole conversation (message
  lists) or whole text; the prompt is their longest common prefix;
- unpaired (TRL/KTO): ``prompt``, ``completion``, ``label`` (true = desirable). Each desirable
  completion becomes a record whose candidates are the undesirable completions of its prompt.

Other field names (e.g. TOFU's ``question``/``answer``/``perturbed_answer``) are mapped with
``fields``. Every source ``negpref.data.load_records`` reads (JSON, JSON Lines, Parquet, CSV,
``save_to_disk`` folders, hub names, ``datasets.Dataset`` objects) is accepted, and errors name
the record as it does.

A candidate identical to ``chosen`` carries no preference: it is dropped, counted and reported
in a warning; a record left without candidates is dropped the same way. A record that gives
no candidate at all (K = 0) is an error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from negpref.data.records import load_records, place
from negpref.errors import NegprefError

log = logging.getLogger(__name__)

Prompt = str | list[dict]


@dataclass
class PreferenceRecord:
    prompt: Prompt
    chosen: str
    rejected: list[str]  # K >= 1 candidate completions, none equal to ``chosen``
    where: str = ""  # the record it came from ("prefs.jsonl:3"), for later errors


@dataclass
class PreferenceData:
    records: list[PreferenceRecord]
    source: str
    dropped_candidates: int = 0  # candidates identical to their chosen completion
    dropped_records: int = 0  # records left with no candidate (or unpaired prompts one-sided)
    stats: dict = field(default_factory=dict)


@dataclass
class FieldNames:
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _check_messages(messages: list[dict], where: str, name: str) -> None:
    for m in messages:
        if not isinstance(m.get("content"), str) or "role" not in m:
            raise NegprefError(
                f"{where}: `{name}` messages need `role` and string `content`, got {m!r}"
            )


def completion_text(value, where: str, name: str) -> str:
    """A completion as text: a string, or a list holding one assistant message."""
    if isinstance(value, str):
        if not value.strip():
            raise NegprefError(f"{where}: `{name}` is empty")
        return value
    if _is_messages(value):
        _check_messages(value, where, name)
        if len(value) != 1 or value[0]["role"] != "assistant":
            roles = [m["role"] for m in value]
            raise NegprefError(
                f"{where}: `{name}` must be one assistant message, got roles {roles}; "
                "multi-turn completions are not supported"
            )
        return completion_text(value[0]["content"], where, name)
    raise NegprefError(
        f"{where}: `{name}` must be a string or a list of one assistant message, "
        f"got {type(value).__name__}"
    )


def _candidates(value, where: str, name: str) -> list[str]:
    """``rejected``: one completion, or a list of candidate completions."""
    if isinstance(value, str) or _is_messages(value):
        return [completion_text(value, where, name)]
    if isinstance(value, list):
        if not value:
            raise NegprefError(
                f"{where}: `{name}` has no candidates (K=0); give at least one rejected completion"
            )
        return [completion_text(v, f"{where} candidate {i}", name) for i, v in enumerate(value)]
    raise NegprefError(
        f"{where}: `{name}` must be a string, a message list or a list of candidates, "
        f"got {type(value).__name__}"
    )


def _prompt(value, where: str, name: str) -> Prompt:
    if isinstance(value, str) and value.strip():
        return value
    if _is_messages(value):
        _check_messages(value, where, name)
        return value
    raise NegprefError(f"{where}: `{name}` must be a non-empty string or a chat message list")


def _split_implicit(chosen, rejected, where: str) -> tuple[Prompt, object, object]:
    """TRL's implicit prompt: the longest common prefix of the chosen and rejected sequences."""
    if _is_messages(chosen) and _is_messages(rejected):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise NegprefError(f"{where}: no `prompt` and the conversations share no prefix")
        return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = next(
            (i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b),
            min(len(chosen), len(rejected)),
        )
        cut = chosen[:n].rfind(" ")  # split on a word boundary, as a tokenizer would
        if cut <= 0:
            raise NegprefError(f"{where}: no `prompt` and chosen/rejected share no prefix")
        return chosen[:cut], chosen[cut:].lstrip(), rejected[cut:].lstrip()
    raise NegprefError(
        f"{where}: without a `prompt` field, `chosen` and `rejected` must both be full "
        "conversations (message lists) or both strings"
    )


def _same(a: str, b: str) -> bool:
    return a.strip() == b.strip()


def normalize_records(
    raw: list[dict], source: str, fields: FieldNames | None = None, max_candidates: int = 0
) -> PreferenceData:
    """Validate raw dict records into ``PreferenceRecord``s (see the module docstring)."""
    fields = fields or FieldNames()
    if raw and "completion" in raw[0] and "label" in raw[0] and fields.chosen not in raw[0]:
        return _pair_unpaired(raw, source, fields, max_candidates)
    records, dropped_candidates, dropped_records = [], 0, 0
    for i, r in enumerate(raw):
        where = place(raw, i, source)
        for name in (fields.chosen, fields.rejected):
            if name not in r:
                raise NegprefError(
                    f"{where}: missing field `{name}`; preference records need "
                    f"`{fields.prompt}`, `{fields.chosen}`, `{fields.rejected}`"
                )
        chosen, rejected = r[fields.chosen], r[fields.rejected]
        if fields.prompt in r:
            prompt = _prompt(r[fields.prompt], where, fields.prompt)
        else:
            prompt, chosen, rejected = _split_implicit(chosen, rejected, where)
        chosen = completion_text(chosen, where, fields.chosen)
        candidates = _candidates(rejected, where, fields.rejected)
        kept = [c for c in candidates if not _same(c, chosen)]
        dropped_candidates += len(candidates) - len(kept)
        if max_candidates:
            kept = kept[:max_candidates]
        if not kept:
            dropped_records += 1
            continue
        records.append(PreferenceRecord(prompt, chosen, kept, where))
    return _finish(records, source, dropped_candidates, dropped_records)


def _pair_unpaired(
    raw: list[dict], source: str, fields: FieldNames, max_candidates: int
) -> PreferenceData:
    groups: dict[str, tuple[Prompt, list[str], list[str]]] = {}
    for i, r in enumerate(raw):
        where = place(raw, i, source)
        for name in (fields.prompt, "completion", "label"):
            if name not in r:
                raise NegprefError(
                    f"{where}: missing field `{name}`; unpaired records need "
                    f"`{fields.prompt}`, `completion`, `label`"
                )
        if not isinstance(r["label"], bool):
            raise NegprefError(f"{where}: `label` must be true or false, got {r['label']!r}")
        prompt = _prompt(r[fields.prompt], where, fields.prompt)
        key = json.dumps(prompt, sort_keys=True)
        entry = groups.setdefault(key, (prompt, [], []))
        entry[1 if r["label"] else 2].append(completion_text(r["completion"], where, "completion"))
    records, dropped_candidates, dropped_records = [], 0, 0
    for prompt, good, bad in groups.values():
        if not good or not bad:
            dropped_records += 1  # a prompt with one side only makes no pair
            continue
        for chosen in good:
            kept = [c for c in bad if not _same(c, chosen)]
            dropped_candidates += len(bad) - len(kept)
            kept = kept[:max_candidates] if max_candidates else kept
            if kept:
                records.append(PreferenceRecord(prompt, chosen, kept))
            else:
                dropped_records += 1
    return _finish(records, source, dropped_candidates, dropped_records)


def _finish(records, source, dropped_candidates, dropped_records) -> PreferenceData:
    if dropped_candidates or dropped_records:
        log.warning(
            "%s: dropped %d rejected candidate(s) identical to their chosen completion and "
            "%d record(s) left without a usable pair",
            source,
            dropped_candidates,
            dropped_records,
        )
    if not records:
        raise NegprefError(f"{source}: no usable preference pairs (every record was dropped)")
    sizes = [len(r.rejected) for r in records]
    stats = {
        "records": len(records),
        "candidates_min": min(sizes),
        "candidates_max": max(sizes),
        "candidates_mean": sum(sizes) / len(sizes),
    }
    return PreferenceData(records, source, dropped_candidates, dropped_records, stats)


def load_preferences(
    source,
    fields: FieldNames | None = None,
    max_candidates: int = 0,
    max_length: int | None = None,
) -> PreferenceData:
    """Preference records from any source ``load_records`` reads, or a list of dicts."""
    if isinstance(source, PreferenceData):
        return source
    raw = load_records(source, what="preference records", max_length=max_length)
    return normalize_records(raw, str(raw.source), fields, max_candidates)
