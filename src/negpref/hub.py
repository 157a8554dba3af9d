"""When a name that is not a local path may go to the Hugging Face hub, and when it may not.

A local path typo must fail at once with "no such file or directory", not after a minute of
hub retries: a name reaches the hub only when it looks like a hub id (``name`` or
``owner/name``, no file suffix, no path syntax) and the hub is reachable right now.
"""

from __future__ import annotations

import os
import re
import socket
from urllib.parse import urlparse

# Hub ids: an optional owner, then a repository name, of letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
# Names ending like a local file are never hub ids, whatever else they look like.
_FILE_SUFFIXES = (
    ".json", ".jsonl", ".parquet", ".csv", ".txt", ".yaml", ".yml", ".gguf", ".safetensors",
    ".bin", ".pt", ".pth", ".arrow",
)  # fmt: skip
# Seconds to wait for a TCP connection to the hub: a reachable hub answers in well under one.
_PROBE_TIMEOUT_S = 3.0


def plausible_hub_id(name: str) -> bool:
    """True when ``name`` could be a hub repository id rather than a mistyped local path."""
    return (
        bool(_HUB_ID.match(name)) and ".." not in name and not name.lower().endswith(_FILE_SUFFIXES)
    )


def _hub_host() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def offline_reason() -> str | None:
    """Why the hub cannot be used now (a phrase), or None when it answers."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]} forbids the hub"
    host, port = _hub_host()
    try:
        socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"the hub ({host}) is unreachable: {e.strerror or type(e).__name__}"
    return None


def local_or_hub(name: str, flag: str, kind: str) -> None:
    """Raise unless ``name`` (not found locally) may be fetched from the hub now."""
    from negpref.errors import NegprefError

    label = f"{flag} {name}" if flag else name
    if not plausible_hub_id(name):
        raise NegprefError(f"{label}: not found (no such {kind}); check the path")
    reason = offline_reason()
    if reason is not None:
        raise NegprefError(
            f"{label}: not found (no such local {kind}), and {reason}; check the path, or go "
            "online to use a hub id"
        )
