"""The CPU: its model name and feature flags (Linux ``/proc/cpuinfo``), and intra-op thread
settings for small workloads."""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch on one thread inside the block (or decorated function), then restore.

    The small models of the synthetic studies and the demo (at most a few million
    parameters) spend more on synchronising intra-op threads than the threads save: on this
    2-core machine the divergence study ran 30x slower with two threads than with one, and
    the demo's training took twice the CPU time.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.cache
def _cpuinfo(field: str) -> str:
    """The first ``field`` line's value in ``/proc/cpuinfo`` ("" where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    line = next((ln for ln in text.splitlines() if ln.split(":")[0].strip() == field), "")
    return line.partition(":")[2].strip()


def cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    return _cpuinfo("model name") or platform.processor() or "unknown"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux; empty elsewhere)."""
    return frozenset(_cpuinfo("flags").split())
