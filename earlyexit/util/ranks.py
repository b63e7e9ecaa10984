"""Several processes (torchrun, the deepspeed launcher): joining their group, which one this is,
files written once by rank 0, and results moved between ranks as plain Python values."""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

from earlyexit.errors import EarlyExitError
from earlyexit.util.devices import distributed_backend


def launched_world_size() -> int:
    """Processes started by torchrun / the deepspeed launcher (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_process_group(device, alone: bool = False) -> tuple[int, int]:
    """(rank, world): join the launcher's process group with the collective backend `device`
    needs (nccl for CUDA, each process on its own GPU; gloo for the CPU); `alone`: a world of
    one gets a group too (DeepSpeed needs one). A group created earlier is kept, but it must
    serve `device`: DeepSpeed and every collective reuse it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        check_group_serves(device)
    elif launched_world_size() > 1 or alone:
        backend = distributed_backend(str(device))
        if backend == "nccl":
            index = torch.device(device).index
            torch.cuda.set_device(index if index is not None else int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend=backend)
    return process_group()


def check_group_serves(device) -> None:
    """A group created with gloo cannot run a CUDA model's collectives (nor nccl a CPU one's)."""
    wanted = distributed_backend(str(device))
    have = str(torch.distributed.get_backend())
    if wanted not in have:
        raise EarlyExitError(f"the process group was created with {have} but the model is on {device}, which needs "
                             f"{wanted}; create the group with earlyexit.util.ranks.join_process_group(device)")


def process_group() -> tuple[int, int]:
    """(rank, world size) when launched with several processes, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if process_group()[1] > 1:
        torch.distributed.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (it may write what the block needs: a built model, a cache
    entry); the other ranks run it once rank 0 is done, so they read complete files."""
    rank, world = process_group()
    if world > 1 and rank != 0:
        torch.distributed.barrier()
    try:
        yield
    finally:  # on an error too: the others then meet it themselves instead of waiting forever
        if world > 1 and rank == 0:
            torch.distributed.barrier()


# -- moving results between ranks -----------------------------------------------------------------
@dataclasses.dataclass
class TensorValues:
    """A tensor as plain Python: its values (nested lists), shape and dtype name."""

    values: object
    shape: tuple
    dtype: str

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.values, dtype=getattr(torch, self.dtype)).reshape(self.shape)


def _convert(value, leaf):
    """`value` with every tensor (in dataclasses, lists, tuples and dicts, at any depth) replaced by `leaf(it)`."""
    if isinstance(value, (torch.Tensor, TensorValues)):
        return leaf(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        state = vars(value) if hasattr(value, "__dict__") else {
            f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        copy = object.__new__(type(value))  # no __init__/__post_init__: the fields are copied as they are
        for key, item in state.items():
            object.__setattr__(copy, key, _convert(item, leaf))  # frozen dataclasses too
        return copy
    if isinstance(value, (list, tuple)):
        return type(value)(_convert(v, leaf) for v in value)
    if isinstance(value, dict):
        return {k: _convert(v, leaf) for k, v in value.items()}
    return value


def plain(value):
    """`value` with its tensors as `TensorValues`: what is sent between ranks holds no tensor
    (a CUDA tensor pickled on one rank would be unpickled onto that rank's GPU on another)."""
    return _convert(value, lambda t: TensorValues(t.tolist(), tuple(t.shape), str(t.dtype).removeprefix("torch."))
                    if isinstance(t, torch.Tensor) else t)


def with_tensors(value):
    """`plain`'s inverse: every `TensorValues` back as a CPU tensor."""
    return _convert(value, lambda t: t.tensor() if isinstance(t, TensorValues) else t)


def gather_on_main(value, world: int) -> list | None:
    """Every rank's `value` on rank 0, in rank order (sent as plain Python); None on the others."""
    if world == 1:
        return [value]
    rank = torch.distributed.get_rank()
    values = [None] * world
    torch.distributed.all_gather_object(values, plain(value))
    return [with_tensors(v) for v in values] if rank == 0 else None


def shared_from_main(result, world: int):
    """Rank 0's result on every rank (rank 0 gathers and scores; the others pass None), so that
    a multi-process `run` goes on in step: every rank then calibrates and evaluates alike."""
    if world > 1:
        box = [plain(result)]
        torch.distributed.broadcast_object_list(box, src=0)
        return with_tensors(box[0])
    return result
