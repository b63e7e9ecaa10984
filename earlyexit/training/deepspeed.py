"""DeepSpeed ZeRO as the training engine (multi-GPU with nccl, multi-node; gloo on CPU).

`DeepSpeedEngine` has the interface of `training.PlainEngine` (`optimize(group, loss)`,
`save`, `load`), with one DeepSpeed engine per parameter group (FREE: one for the exit
transformers, one for the feature classifiers). The frozen backbone is never wrapped.

Two slow builds are avoided on every run: the optimiser is a client `torch.optim.AdamW` (a
config-declared optimiser would JIT-compile fused Adam), and the shared-memory all-reduce op
that DeepSpeed compiles for CPUs inside `initialize` (about 45 s) is marked unavailable, so
collectives go through gloo.

Launch with `torchrun --nproc_per_node N` or `deepspeed --num_gpus N`; without a launcher the
process is a world of one.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket

import torch

from earlyexit.errors import CheckpointError, ConfigError
from earlyexit.training.deepspeed_config import SHM_OP, with_precision
from earlyexit.training.loop import TrainConfig, warmup_cosine_schedule
from earlyexit.util.quiet import quiet_deepspeed
from earlyexit.util.ranks import join_process_group


def init_distributed(device: str | torch.device = "cpu") -> tuple[int, int]:
    """Join (or create, as a world of one) the process group: nccl for a model on CUDA GPUs
    (each process on its own GPU), gloo on the CPU; returns (rank, world)."""
    quiet_deepspeed()  # its accelerator warnings at import: --debug shows them
    try:
        import deepspeed
        import deepspeed.ops
    except ImportError as error:
        raise ConfigError("DeepSpeed is not installed: run scripts/setup.sh, or "
                          "DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed") from error
    deepspeed.ops.__compatible_ops__[SHM_OP] = False  # gloo all-reduce instead of a 45 s JIT build
    if "RANK" not in os.environ:  # no launcher: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    # the group (`run` joins it earlier; a script or a world of one here) must serve `device`: DeepSpeed
    # adopts whatever group exists, and gloo cannot carry ZeRO's CUDA collectives
    return join_process_group(device, alone=True)


@contextlib.contextmanager
def tensors_only(engine):
    """DeepSpeed reads its checkpoint files with `torch.load(weights_only=False)`, which runs
    whatever code a pickle planted in a checkpoint folder carries. Inside this block the engine's
    checkpoint reader uses `weights_only=True`: tensors, plain containers and the few plain
    DeepSpeed types its checkpoints hold; anything else is refused with a one-line error."""
    reader = engine.checkpoint_engine
    original = reader.load

    def load(path, map_location=None):
        try:
            with torch.serialization.safe_globals(_deepspeed_checkpoint_types()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"{path} holds more than tensors and plain data, so it was not loaded "
                                  f"({reason[:160]}); delete that checkpoint folder (or use a fresh --output) "
                                  "to start afresh") from None

    reader.load = load
    try:
        yield
    finally:
        reader.load = original


def _deepspeed_checkpoint_types() -> list:
    """The non-builtin types DeepSpeed writes into its own ZeRO checkpoints (plain data)."""
    import argparse
    import collections

    from deepspeed.runtime.zero.config import ZeroStageEnum

    types = [argparse.Namespace, collections.OrderedDict, ZeroStageEnum]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        types += [LossScaler, DynamicLossScaler]
    except ImportError:  # pragma: no cover - older layouts
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        types.append(fragment_address)
    except ImportError:  # pragma: no cover
        pass
    return types


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class DeepSpeedEngine:
    def __init__(self, modules: dict[str, torch.nn.Module], config: TrainConfig, ds_config: dict):
        import deepspeed


        parameters = [p for module in modules.values() for p in module.parameters()]
        self.device = parameters[0].device if parameters else torch.device("cpu")
        dtype = next((p.dtype for p in parameters if p.is_floating_point()), torch.float32)
        ds_config = with_precision(ds_config, str(dtype).removeprefix("torch."))
        self.rank, self.world_size = init_distributed(self.device)
        self.config, self.modules, self.engines = config, modules, {}
        self.stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        for name, module in modules.items():
            parameters = [p for p in module.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
            scheduler = warmup_cosine_schedule(optimizer, config)
            engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                              config=dict(ds_config))
            self.engines[name] = engine

    def optimize(self, group: str, loss: torch.Tensor) -> float:
        if not torch.isfinite(loss):
            raise ConfigError(f"the {group} loss became {loss.item()}; lower the learning rate")
        engine = self.engines[group]
        engine.backward(loss)
        engine.step()
        return loss.item()

    def shard(self, batch: dict) -> dict:
        """This rank's rows of a global batch."""
        return {k: v[self.rank::self.world_size] for k, v in batch.items()}

    def mean_over_ranks(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)  # nccl reduces GPU tensors only
        torch.distributed.all_reduce(tensor)
        return tensor.item() / self.world_size

    def barrier(self) -> None:
        torch.distributed.barrier()

    def save(self, folder: str) -> None:
        for name, engine in self.engines.items():
            engine.save_checkpoint(folder, tag=name)

    def load(self, folder: str) -> None:
        for name, engine in self.engines.items():
            with tensors_only(engine):
                path, _ = engine.load_checkpoint(folder, tag=name)
            if path is None:
                raise CheckpointError(f"{folder} has no DeepSpeed checkpoint for {name}; use a fresh --output")

    @contextlib.contextmanager
    def full_parameters(self, group: str):
        """Inside, the group's parameters are whole on every rank (ZeRO-3 gathers them)."""
        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.modules[group].parameters())):
                yield
        else:
            yield

    def consolidated_state(self, group: str) -> dict:
        """The group's full state dict (ZeRO-3 shards gathered), on every rank."""
        with self.full_parameters(group):
            return {k: v.detach().clone() for k, v in self.modules[group].state_dict().items()}
