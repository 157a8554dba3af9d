"""Record schemas and loaders (QA in TOFU format, text, preference) and data generators."""

from negpref.data.qa import (
    DEFAULT_PROMPT,
    Encoded,
    PromptFormat,
    collate,
    encode_qa,
    encode_text,
    format_prompt,
)
from negpref.data.records import load_lines, load_records

__all__ = [
    "DEFAULT_PROMPT",
    "Encoded",
    "PromptFormat",
    "collate",
    "encode_qa",
    "encode_text",
    "format_prompt",
    "load_lines",
    "load_records",
]
