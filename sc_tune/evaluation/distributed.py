"""Sharding an evaluation across ranks so that every sample is scored exactly once.

Rank ``r`` of ``W`` takes the samples whose index ``i`` has ``i % W == r`` (no padding, no dropping: with
an odd count some ranks get one sample more), keeps each result tagged with ``i``, and every rank then
gathers all results and orders them by ``i``. The gather checks that the indices are exactly
``0..N-1``; Qwen-VL's own evaluator instead drops up to batch-1 samples per rank (``drop_last``).

Works with no process group at all (a single process), and initialises one from torchrun's environment
variables when ``WORLD_SIZE > 1``: NCCL when CUDA is available, gloo on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: its rank and the number of ranks (1 and 0 when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_from_env() -> Ranks:
    """Start the process group torchrun asked for (if any) and return this process's ranks."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return Ranks(dist.get_rank(), dist.get_world_size())


def current_ranks(distributed: bool | None = None) -> Ranks:
    """The ranks to shard over: ``distributed=None`` follows an initialised process group, ``False`` forces
    a single process (e.g. an in-process call made on rank 0 only), ``True`` requires a process group."""
    initialised = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = initialised and dist.get_world_size() > 1
    if not distributed:
        return Ranks()
    if not initialised:
        raise RuntimeError("distributed=True but torch.distributed is not initialised")
    return Ranks(dist.get_rank(), dist.get_world_size())


def gather_by_index(local: Sequence[tuple[int, object]], num_samples: int, ranks: Ranks,
                    known: dict[int, object] | None = None) -> list:
    """All ranks' ``(index, result)`` pairs, plus ``known`` results every rank already has (a resumed run's),
    -> the results in index order, on every rank.

    Raises if any index is missing or scored twice, so a sharding bug can never shrink the denominator.
    """
    pairs = list(local)
    if ranks.active:
        gathered: list = [None] * ranks.world_size
        dist.all_gather_object(gathered, pairs)
        pairs = [p for part in gathered for p in part]
    pairs += list((known or {}).items())
    pairs.sort(key=lambda p: p[0])
    indices = [i for i, _ in pairs]
    if indices != list(range(num_samples)):
        seen = set(indices)
        missing = [i for i in range(num_samples) if i not in seen][:10]
        raise RuntimeError(
            f"gathered {len(indices)} results for {num_samples} samples (missing e.g. {missing}, "
            f"duplicates: {len(indices) - len(seen)}); every sample must be scored exactly once"
        )
    return [r for _, r in pairs]


def broadcast_from_main(value, ranks: Ranks):
    """``value`` as computed on rank 0, on every rank (for work done once, such as METEOR)."""
    if not ranks.active:
        return value
    box = [value if ranks.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ranks: Ranks) -> None:
    if ranks.active:
        dist.barrier()


def shutdown(ranks: Ranks) -> None:
    if ranks.active and dist.is_initialized():
        dist.destroy_process_group()
