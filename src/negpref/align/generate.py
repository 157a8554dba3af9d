"""Sampled completions of prompts (OnMC-PO candidates, alignment evaluation).

Prompts are tokenized exactly as ``negpref.data.encode_qa`` does for training (chat template
or ``Question: ...\\nAnswer:``), left-padded, and passed to ``model.generate``. The completion
text is what ``encode_qa`` would turn back into the same answer tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from negpref.data import encode_qa


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    num_samples: int = 1


def prompt_ids(tokenizer, prompt, max_length: int) -> list[int]:
    """The token ids ``encode_qa`` puts before the answer (raises if the prompt is too long)."""
    encoded = encode_qa(tokenizer, prompt, "", max_length)
    return [t for t, a in zip(encoded.input_ids, encoded.answer_mask, strict=True) if not a]


def completion_from_ids(tokenizer, ids: list[int]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    # the plain template puts a space before the answer; encode_qa adds it back
    if not getattr(tokenizer, "chat_template", None) and text.startswith(" "):
        text = text[1:]
    return text


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list,
    sampling: Sampling,
    max_length: int,
    batch_size: int = 16,
    seed: int | None = None,
) -> list[list[str]]:
    """``sampling.num_samples`` completions per prompt, one list per prompt."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    greedy = sampling.temperature == 0
    kwargs = dict(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=not greedy,
        num_return_sequences=sampling.num_samples,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if not greedy:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    outputs: list[list[str]] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            ids = [
                prompt_ids(tokenizer, p, max_length) for p in prompts[start : start + batch_size]
            ]
            width = max(map(len, ids))
            input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(ids), width), dtype=torch.long)
            for i, row in enumerate(ids):
                input_ids[i, width - len(row) :] = torch.tensor(row)
                attention[i, width - len(row) :] = 1
            generated = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs
            )[:, width:].tolist()
            texts = [completion_from_ids(tokenizer, g) for g in generated]
            n = sampling.num_samples
            outputs.extend(texts[i : i + n] for i in range(0, len(texts), n))
    model.train(was_training)
    return outputs
