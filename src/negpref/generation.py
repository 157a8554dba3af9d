"""Prompt ids, left padding and batched generation, greedy or sampled, for every caller.

Prompts are tokenized exactly as ``negpref.data.encode_qa`` puts them before an answer (chat
template or ``Question: ...\\nAnswer:``), so what is generated is scored later against the same
prompt tokens. Rows are left-padded, so every row continues its own prompt, and go to
``model.generate`` (KV cache; a row that emits EOS is padded from there on).

- :func:`generate_ids`: the token ids after each prompt, batches in input order, under a seed;
- :func:`generate`: sampled (or, at temperature 0, greedy) completions as ``encode_qa`` answer
  text (OnMC-PO rounds, reward evaluation, ``negpref eval --alignment``);
- :func:`greedy_generate` / :func:`greedy_continue`: greedy answers, whitespace-stripped, of QA
  prompts / token-id prompts (TOFU and MUSE evaluation), decoded by :func:`greedy_until_eos`
  (rows leave the batch at their EOS) where the model's forward allows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from negpref.data import DEFAULT_PROMPT, PromptFormat, encode_qa
from negpref.logprobs import can_share_prompts


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    num_samples: int = 1


def prompt_ids(tokenizer, prompt, max_length: int, fmt: PromptFormat = DEFAULT_PROMPT) -> list[int]:
    """The token ids ``encode_qa`` puts before the answer (raises if the prompt leaves no room
    for an answer within ``max_length``)."""
    encoded = encode_qa(tokenizer, prompt, "", max_length, fmt)
    return [t for t, a in zip(encoded.input_ids, encoded.answer_mask, strict=True) if not a]


def left_pad(rows: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, width - len(r) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def completion_text(tokenizer, ids: list[int]) -> str:
    """Generated ids as the answer text ``encode_qa`` turns back into the same tokens."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    # the plain template puts a space before the answer; encode_qa adds it back
    if not getattr(tokenizer, "chat_template", None) and text.startswith(" "):
        text = text[1:]
    return text


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    sampling: Sampling,
    batch_size: int = 8,
    seed: int | None = None,
    desc: str | None = None,
) -> list[list[list[int]]]:
    """``sampling.num_samples`` generations per token-id prompt, one list per prompt: the ids
    after the prompt, up to ``max_new_tokens`` (a batch ends when all its rows have emitted EOS;
    a row that stopped earlier holds pad ids after its EOS).

    Batches go in input order under ``seed``, so the same prompts, batch size and seed draw the
    same samples; the caller's random state is left as it was.
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    greedy = sampling.temperature == 0
    kwargs = dict(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=not greedy,
        num_return_sequences=sampling.num_samples,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if not greedy:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    n = sampling.num_samples
    starts = range(0, len(prompts), batch_size)
    outputs: list[list[list[int]]] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        for start in tqdm(starts, desc=desc, disable=desc is None, leave=False):
            batch = left_pad(prompts[start : start + batch_size], pad_id)
            width = batch["input_ids"].shape[1]
            rows = model.generate(**{k: v.to(device) for k, v in batch.items()}, **kwargs)
            rows = rows[:, width:].tolist()
            outputs.extend(rows[i : i + n] for i in range(0, len(rows), n))
    return outputs


def generate(
    model,
    tokenizer,
    prompts: Sequence,
    sampling: Sampling,
    max_length: int,
    batch_size: int = 16,
    seed: int | None = None,
) -> list[list[str]]:
    """``sampling.num_samples`` completions per prompt (:func:`completion_text`), one list per
    prompt, drawn with the model in eval mode (no dropout) and its mode restored after."""
    ids = [prompt_ids(tokenizer, p, max_length) for p in prompts]
    was_training = model.training
    model.eval()
    try:
        generated = generate_ids(model, tokenizer, ids, sampling, batch_size, seed)
    finally:
        model.train(was_training)
    return [[completion_text(tokenizer, g) for g in rows] for rows in generated]


def greedy_generate(
    model,
    tokenizer,
    questions: Sequence,
    batch_size: int = 8,
    max_new_tokens: int = 200,
    max_length: int = 512,
    desc: str | None = None,
    prompt: PromptFormat = DEFAULT_PROMPT,
    drop_finished_rows: bool = True,
    map_batches: Callable | None = None,
) -> list[str]:
    """Greedy answers (special tokens dropped, whitespace stripped), in input order.

    An answer may be empty (the model emitted EOS at once); callers count those.
    """
    prompts = [prompt_ids(tokenizer, q, max_length, prompt) for q in questions]
    return greedy_continue(
        model, tokenizer, prompts, batch_size, max_new_tokens, desc, drop_finished_rows,
        map_batches,
    )  # fmt: skip


@torch.no_grad()
def greedy_until_eos(
    model, prompts: Sequence[list[int]], pad_id: int, eos_id: int, max_new_tokens: int
) -> list[list[int]]:
    """Greedy continuations of one batch of token-id prompts, each up to and including its
    EOS (or ``max_new_tokens`` tokens); a row that has emitted EOS leaves the batch and its
    key/value cache, so every later step computes only the rows still generating.

    The same tokens as ``model.generate`` greedy on this batch (left padding, positions from
    the attention mask), up to the float rounding of another batch size: on CPU a decoding
    step's cost grows with its rows, and most answers end long before the longest.
    """
    device = next(model.parameters()).device
    batch = left_pad(prompts, pad_id)
    mask = batch["attention_mask"].to(device)
    out = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
        logits_to_keep=1,
    )
    cache, positions = out.past_key_values, mask.sum(-1)
    rows = list(range(len(prompts)))
    generated: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        tokens = out.logits[:, -1].argmax(-1)
        for row, token in zip(rows, tokens.tolist(), strict=True):
            generated[row].append(token)
        keep = [k for k, token in enumerate(tokens.tolist()) if token != eos_id]
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            rows = [rows[k] for k in keep]
            tokens, mask, positions = tokens[index], mask[index], positions[index]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
        out = model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=positions[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        positions = positions + 1
    return generated


def greedy_continue(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    batch_size: int = 8,
    max_new_tokens: int = 200,
    desc: str | None = None,
    drop_finished_rows: bool = True,
    map_batches: Callable | None = None,
) -> list[str]:
    """Greedy continuations of token-id prompts, decoded as :func:`greedy_generate`'s.

    Prompts go longest first, so batches need little padding; answers come back in input order.
    With ``drop_finished_rows`` (and a model whose forward allows it) rows leave their batch at
    EOS (:func:`greedy_until_eos`); else ``model.generate`` runs every row to the batch's end.
    ``map_batches(fn, batches, desc)`` runs the batches (default: one after the other here;
    ``negpref.eval.shards.Shards.map`` splits them over processes).
    """
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    ordered = [prompts[i] for i in order]
    batches = [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if drop_finished_rows and can_share_prompts(model):  # the cache interface the loop drives

        def run(batch: list[list[int]]) -> list[list[int]]:
            return greedy_until_eos(model, batch, pad_id, eos_id, max_new_tokens)

    else:
        greedy = Sampling(max_new_tokens, 0.0)

        def run(batch: list[list[int]]) -> list[list[int]]:
            return [ids for [ids] in generate_ids(model, tokenizer, batch, greedy, len(batch))]

    per_batch = (map_batches or _in_turn)(run, batches, desc)
    answers = [""] * len(prompts)
    for i, ids in zip(order, (ids for batch in per_batch for ids in batch), strict=True):
        answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return answers


def _in_turn(fn: Callable, jobs: Sequence, desc: str | None) -> list:
    return [fn(job) for job in tqdm(jobs, desc=desc, disable=desc is None, leave=False)]
