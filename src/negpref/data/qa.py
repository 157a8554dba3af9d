"""Prompt/answer pairs -> token ids with an answer mask; batches padded for one forward.

A question is formatted with the tokenizer's chat template when it has one, otherwise as
``Question: {q}\\nAnswer:``; the answer follows, ended by EOS. Prompt and answer are tokenized
separately so the answer mask is exact: losses and metrics count answer tokens only (EOS
included, as TOFU does). Sequences longer than ``max_length`` lose answer tokens from the
right and are flagged ``truncated``; a prompt that leaves no room for an answer is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from negpref.errors import NegprefError

PLAIN_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass
class Encoded:
    input_ids: list[int]
    answer_mask: list[int]  # 1 where the token belongs to the answer (is predicted and scored)
    truncated: bool


def format_prompt(tokenizer, question: str | list[dict]) -> str:
    """The text the model sees before the answer. ``question`` may be a chat message list."""
    if getattr(tokenizer, "chat_template", None):
        messages = (
            question if isinstance(question, list) else [{"role": "user", "content": question}]
        )
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if isinstance(question, list):
        question = "\n".join(m["content"] for m in question)
    return PLAIN_TEMPLATE.format(question=question)


def _answer_text(tokenizer, answer: str) -> str:
    # The plain template ends in "Answer:", so the answer starts after a space; chat templates
    # end with the assistant header and the answer starts right away.
    return answer if getattr(tokenizer, "chat_template", None) else " " + answer


def encode_qa(tokenizer, question, answer: str, max_length: int) -> Encoded:
    """Token ids of prompt + answer + EOS, with the answer mask."""
    prompt = format_prompt(tokenizer, question)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    prompt_ids = tokenizer(prompt, add_special_tokens=not has_template)["input_ids"]
    answer_ids = tokenizer(_answer_text(tokenizer, answer), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = [*answer_ids, tokenizer.eos_token_id]
    return _join(prompt_ids, answer_ids, max_length)


def encode_text(tokenizer, text: str, max_length: int) -> Encoded:
    """A plain text record (MUSE-style ``text``): every token after BOS is scored."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    prompt_len = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
    if prompt_len == 0:  # no BOS: the first token has no context to be predicted from
        prompt_len = 1
    return _join(ids[:prompt_len], ids[prompt_len:], max_length)


def _join(prompt_ids: list[int], answer_ids: list[int], max_length: int) -> Encoded:
    room = max_length - len(prompt_ids)
    if room < 1:
        raise NegprefError(
            f"a prompt of {len(prompt_ids)} tokens leaves no room for its answer within "
            f"max_length={max_length}; raise --max-length"
        )
    truncated = len(answer_ids) > room
    answer_ids = answer_ids[:room]
    return Encoded(
        input_ids=prompt_ids + answer_ids,
        answer_mask=[0] * len(prompt_ids) + [1] * len(answer_ids),
        truncated=truncated,
    )


def collate(encoded: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: ``input_ids``, ``attention_mask``, ``answer_mask``."""
    width = max(len(e.input_ids) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    answer_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        attention_mask[i, :n] = 1
        answer_mask[i, :n] = torch.tensor(e.answer_mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "answer_mask": answer_mask}
