"""Prompt/answer pairs -> token ids with an answer mask; batches padded for one forward.

A question is formatted as ``PromptFormat`` says: with the tokenizer's chat template when it
has one (and ``chat_template`` is on), otherwise with the fallback template
``Question: {question}\\nAnswer:``; the answer follows, ended by EOS. A chat template may add
its own default system prompt (SmolLM2's does) unless ``system_prompt`` is given. Prompt and
answer are tokenized separately so the answer mask is exact: losses and metrics count answer tokens only (EOS
included, as TOFU does). Sequences longer than ``max_length`` lose answer tokens from the
right and are flagged ``truncated``; a prompt that leaves no room for an answer is an error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from negpref.errors import NegprefError

PLAIN_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes the prompt text: recorded with every run and evaluation.

    ``system_prompt``: None keeps the chat template's own behaviour (which may insert a
    default system prompt); a string (even empty) is sent as the system message, or with the
    fallback template written on the line before it. ``chat_template``: use the tokenizer's
    chat template when it has one; off, every model gets ``fallback_template``, which must
    contain ``{question}``.
    """

    system_prompt: str | None = None
    chat_template: bool = True
    fallback_template: str = PLAIN_TEMPLATE

    def __post_init__(self):
        if "{question}" not in self.fallback_template:
            raise NegprefError(
                f"--fallback-template: must contain {{question}}, got {self.fallback_template!r}"
            )
        try:
            self.fallback_template.format(question="")
        except (KeyError, IndexError, ValueError) as e:
            raise NegprefError(
                f"--fallback-template: only {{question}} may appear in braces ({e}); write "
                "literal braces as {{ and }}"
            ) from None

    def uses_chat_template(self, tokenizer) -> bool:
        return self.chat_template and bool(getattr(tokenizer, "chat_template", None))

    def describe(self, tokenizer=None) -> dict:
        """The settings, plus (given the tokenizer) which template was actually applied."""
        record = asdict(self)
        if tokenizer is not None:
            record["template_used"] = "chat" if self.uses_chat_template(tokenizer) else "fallback"
        return record


DEFAULT_PROMPT = PromptFormat()


_PROMPT_HELP = {
    "system_prompt": "system message for every prompt (default: the chat template's own, e.g. "
    "SmolLM2's built-in one)",
    "chat_template": "format prompts with the tokenizer's chat template if it has one",
    "fallback_template": "prompt template without a chat template; must contain {question}",
}


def prompt_field(name: str):
    """A config dataclass field for setting ``name`` of ``PromptFormat`` (same default, help)."""
    return field(default=getattr(DEFAULT_PROMPT, name), metadata={"help": _PROMPT_HELP[name]})


def prompt_from_config(config) -> PromptFormat:
    """The ``PromptFormat`` a verb's config (with the ``prompt_field`` fields) describes."""
    return PromptFormat(**{name: getattr(config, name) for name in _PROMPT_HELP})


@dataclass
class Encoded:
    input_ids: list[int]
    answer_mask: list[int]  # 1 where the token belongs to the answer (is predicted and scored)
    truncated: bool


def format_prompt(
    tokenizer, question: str | list[dict], prompt: PromptFormat = DEFAULT_PROMPT
) -> str:
    """The text the model sees before the answer. ``question`` may be a chat message list."""
    if prompt.uses_chat_template(tokenizer):
        messages = (
            question if isinstance(question, list) else [{"role": "user", "content": question}]
        )
        if prompt.system_prompt is not None and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": prompt.system_prompt}, *messages]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if isinstance(question, list):
        question = "\n".join(m["content"] for m in question)
    text = prompt.fallback_template.format(question=question)
    return text if prompt.system_prompt is None else f"{prompt.system_prompt}\n{text}"


def _answer_text(tokenizer, answer: str, prompt: PromptFormat) -> str:
    # The plain template ends in "Answer:", so the answer starts after a space; chat templates
    # end with the assistant header and the answer starts right away.
    return answer if prompt.uses_chat_template(tokenizer) else " " + answer


def encode_qa(
    tokenizer, question, answer: str, max_length: int, prompt: PromptFormat = DEFAULT_PROMPT
) -> Encoded:
    """Token ids of prompt + answer + EOS, with the answer mask."""
    text = format_prompt(tokenizer, question, prompt)
    has_template = prompt.uses_chat_template(tokenizer)
    prompt_ids = tokenizer(text, add_special_tokens=not has_template)["input_ids"]
    answer_ids = tokenizer(_answer_text(tokenizer, answer, prompt), add_special_tokens=False)[
        "input_ids"
    ]
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
