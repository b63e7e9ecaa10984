"""Several processes: which one this is, and rank 0's result handed to every rank."""

from __future__ import annotations

import torch


def process_group() -> tuple[int, int]:
    """(rank, world size) when launched with several processes, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shared_from_main(result, world: int):
    """Rank 0's result on every rank (rank 0 gathers and scores; the others pass None), so that
    a multi-process `run` goes on in step: every rank then calibrates and evaluates alike."""
    if world > 1:
        box = [result]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return result
