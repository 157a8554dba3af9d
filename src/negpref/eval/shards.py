"""Evaluation split over processes: each process runs every N-th job, all get every result.

A job is one batch exactly as a single process forms it (a length-sorted scoring chunk, a
generation batch), so a job's figures are computed by the same arithmetic whatever the number
of processes, and the gathered logs equal the one-process logs. Jobs go round-robin: the
batches are sorted longest first, so neighbours cost alike and the processes finish together.

Results travel between processes as JSON (floats round-trip exactly; NaN is kept), never as
pickles.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

T = TypeVar("T")


@dataclass(frozen=True)
class Shards:
    """Process ``rank`` of ``size``; ``Shards()`` is one process doing everything."""

    rank: int = 0
    size: int = 1

    @classmethod
    def of_processes(cls) -> Shards:
        """The processes of the running ``torch.distributed`` group (one without a group)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return cls()
        return cls(torch.distributed.get_rank(), torch.distributed.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def map(self, fn: Callable[[Any], T], jobs: Sequence, desc: str | None = None) -> list[T]:
        """``[fn(job) for job in jobs]``, this process computing jobs ``rank, rank + size, ...``;
        ``fn`` must return JSON data (lists, dicts, numbers, strings)."""
        mine = range(self.rank, len(jobs), self.size)
        local = [
            fn(jobs[i])
            for i in tqdm(mine, desc=desc, disable=desc is None or not self.is_main, leave=False)
        ]
        if self.size == 1:
            return local
        parts = gather_json(local)
        return [parts[i % self.size][i // self.size] for i in range(len(jobs))]


def gather_json(value) -> list:
    """``value`` of every process, in rank order (JSON-encoded bytes over the process group)."""
    data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
    group_device = _collective_device()
    size = torch.tensor([data.numel()], device=group_device)
    sizes = [torch.zeros_like(size) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=group_device)
    padded[: data.numel()] = data.to(group_device)
    chunks = [torch.zeros_like(padded) for _ in sizes]
    torch.distributed.all_gather(chunks, padded)
    return [
        json.loads(c[: int(s.item())].cpu().numpy().tobytes().decode())
        for c, s in zip(chunks, sizes, strict=True)
    ]


def _collective_device() -> torch.device:
    """Where the default group's collectives run: the GPU for NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
