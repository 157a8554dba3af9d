"""Batched greedy generation from QA prompts, left-padded so every row continues its prompt."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from negpref.data import DEFAULT_PROMPT, PromptFormat, encode_qa
from negpref.eval.scoring import model_device


def prompt_ids(
    tokenizer, question, max_length: int, prompt: PromptFormat = DEFAULT_PROMPT
) -> list[int]:
    """Token ids of the prompt exactly as ``data.encode_qa`` builds them for scoring."""
    encoded = encode_qa(tokenizer, question, "", max_length, prompt)
    return [t for t, in_answer in zip(encoded.input_ids, encoded.answer_mask) if not in_answer]


def left_pad(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r)
        attention_mask[i, width - len(r) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def greedy_generate(
    model,
    tokenizer,
    questions: Sequence,
    batch_size: int = 8,
    max_new_tokens: int = 200,
    max_length: int = 512,
    desc: str | None = None,
    prompt: PromptFormat = DEFAULT_PROMPT,
) -> list[str]:
    """Greedy answers (special tokens dropped, whitespace stripped), in input order.

    Prompts are sorted by length so batches need little padding. An answer may be empty (the
    model emitted EOS at once); callers count those.
    """
    prompts = [prompt_ids(tokenizer, q, max_length, prompt) for q in questions]
    return greedy_continue(model, tokenizer, prompts, batch_size, max_new_tokens, desc)


@torch.no_grad()
def greedy_continue(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    batch_size: int = 8,
    max_new_tokens: int = 200,
    desc: str | None = None,
) -> list[str]:
    """Greedy continuations of token-id prompts, decoded as :func:`greedy_generate`'s."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    device = model_device(model)
    pad_id = tokenizer.pad_token_id
    answers = [""] * len(prompts)
    chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    for chunk in tqdm(chunks, desc=desc, disable=desc is None, leave=False):
        batch = {k: v.to(device) for k, v in left_pad([prompts[i] for i in chunk], pad_id).items()}
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(
            out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )
        for i, text in zip(chunk, texts, strict=True):
            answers[i] = text.strip()
    return answers
