"""Intra-op thread settings for small CPU workloads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
