"""Per-rank optimiser-state memory and step time of FREE exit training: ZeRO-0 versus ZeRO-2.

    torchrun --nproc_per_node 2 benchmarks/zero_memory.py          # the embedded tiny model

Both runs use the same data, batch and exits; memory is the bytes of optimiser state each rank
holds after a few steps (Adam moments, and ZeRO's fp32 partitions), summed over both players.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from earlyexit.data.prompts import one_caption_per_sample
from earlyexit.data.splits import load_split
from earlyexit.models.loading import load_backend
from earlyexit.plugins.registry import get_registry
from earlyexit.training.batching import TrainingBatches
from earlyexit.training.deepspeed import DeepSpeedEngine, init_distributed
from earlyexit.training.deepspeed_config import zero_config
from earlyexit.training.loop import TrainConfig


def state_bytes(optimizer) -> int:
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the client optimiser
    return sum(t.numel() * t.element_size() for state in inner.state.values() for t in state.values()
               if torch.is_tensor(t))


def measure(stage: int, steps: int = 6) -> tuple[float, float]:
    registry = get_registry()
    backend = load_backend(registry.backend("blip2-opt"), "tiny")
    backend.model.requires_grad_(False)
    strategy = registry.strategy("free")(backend, [3, 6, 9])
    data = one_caption_per_sample(load_split("scenes", "exit_train", 64))
    batches = TrainingBatches(backend, [data], batch_size=16, seed=0)
    config = TrainConfig(output_dir="/tmp/unused", steps=steps, learning_rate=1e-4, warmup_steps=1, progress=False)
    engine = DeepSpeedEngine(strategy.training_modules(), config, zero_config(stage, 16 // engine_world(), 1.0))
    times = []
    for step in range(steps):
        began = time.perf_counter()
        strategy.training_step(engine.shard(batches(step)), engine)
        times.append(time.perf_counter() - began)
    memory = sum(state_bytes(e.optimizer) for e in engine.engines.values())
    return memory / 2**20, statistics.median(times[1:])


def engine_world() -> int:
    return torch.distributed.get_world_size()


def main() -> int:
    rank, world = init_distributed()
    results = {stage: measure(stage) for stage in (0, 2)}
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, results)
    if rank == 0:
        print(f"FREE exit training of the tiny model, {world} ranks, global batch 16")
        for stage in (0, 2):
            per_rank = ", ".join(f"rank {r}: {g[stage][0]:.2f} MiB" for r, g in enumerate(gathered))
            print(f"ZeRO-{stage}: optimiser state {per_rank}; median step {gathered[0][stage][1] * 1000:.0f} ms")
        ratio = gathered[0][2][0] / gathered[0][0][0]
        print(f"ZeRO-2 / ZeRO-0 optimiser state per rank: {ratio:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
