"""The plain-PyTorch engine for small trained modules (exits, adapters) beside a frozen backbone
of any dtype, in one process or data parallel without DeepSpeed.

`TrainingEngine` is `loop.PlainEngine` with three additions, each inert where it does not apply:

- fp32 master weights for bf16/fp16 parameters: AdamW steps the masters and the module's
  low-precision weights are refreshed from them after every step (an update of 1e-4 vanishes
  against a bf16 weight of 0.03 or a norm gain of 1). Checkpoints hold the masters, so a resumed
  run continues exactly.
- loss scaling for fp16 (`torch.amp.GradScaler`): a step whose gradients overflow is skipped
  and the scale falls. A non-finite *loss* is still a ConfigError.
- data parallel when several processes run (torchrun without --zero/--deepspeed): each rank
  takes its rows of every global batch, gradients are averaged over ranks before the step, and
  rank 0 alone writes checkpoint files.

fp32 parameters in one process are optimised exactly as `PlainEngine` does (bit for bit).
"""

from __future__ import annotations

import os
import warnings

import torch

from earlyexit.errors import ConfigError
from earlyexit.training.features import FEATURES
from earlyexit.training.loop import PlainEngine, TrainConfig
from earlyexit.util.ranks import join_process_group

LOW_PRECISION = (torch.bfloat16, torch.float16)
SCALER_FILE = "loss_scale.pt"


class TrainingEngine(PlainEngine):
    """`PlainEngine` with fp32 masters, fp16 loss scaling and data parallel (see the module's
    docstring); `groups` and `lr_multipliers` as for `PlainEngine`. `self.groups` holds the
    masters (what AdamW steps and checkpoints hold), `self.model_groups` the module's weights."""

    def __init__(self, groups: dict[str, dict[str, torch.nn.Parameter]], config: TrainConfig,
                 lr_multipliers: dict[str, float] | None = None):
        parameters = [p for params in groups.values() for p in params.values()]
        self.device = parameters[0].device if parameters else torch.device("cpu")
        self.rank, self.world_size = join_process_group(self.device)
        self.model_groups = groups  # what the loss is differentiated against
        if self.world_size > 1:
            self._broadcast_from_main(parameters)
        # the optimiser (and checkpoints) see fp32 masters; an fp32 parameter is its own master
        masters = {g: {n: self._master(p) for n, p in params.items()} for g, params in groups.items()}
        super().__init__(masters, config, lr_multipliers)
        self.scalers = {g: torch.amp.GradScaler(self.device.type) for g, params in groups.items()
                        if any(p.dtype == torch.float16 for p in params.values())}
        self.versions = {}  # in-place version of each low-precision weight when its master last matched it
        for group in groups:
            self._refresh(group)

    @staticmethod
    def _master(parameter: torch.nn.Parameter) -> torch.nn.Parameter:
        if parameter.dtype not in LOW_PRECISION:
            return parameter
        return torch.nn.Parameter(parameter.detach().float().clone())

    def _broadcast_from_main(self, parameters) -> None:
        """Every rank starts from rank 0's weights (as DDP does); sent in fp32, which round-trips
        bf16/fp16 exactly and which every backend reduces."""
        with torch.no_grad():
            for p in parameters:
                value = p.detach().float().contiguous()
                torch.distributed.broadcast(value, src=0)
                p.copy_(value)

    def optimize(self, group: str, loss: torch.Tensor) -> float:
        """Backward `loss` into `group`'s parameters (scaled under fp16), average the gradients
        over ranks, clip, step the fp32 masters and refresh the module's weights from them."""
        if not torch.isfinite(loss):
            raise ConfigError(f"the {group} loss became {loss.item()}; lower the learning rate")
        parameters = list(self.model_groups[group].values())
        masters = list(self.groups[group].values())
        scaler = self.scalers.get(group)
        scaled = scaler.scale(loss) if scaler is not None else loss
        grads = torch.autograd.grad(scaled, parameters, allow_unused=True)
        self._adopt_outside_changes(group)
        for master, grad in zip(masters, grads):
            master.grad = None if grad is None else grad.to(master.dtype)  # no copy for fp32
        value = loss.item()
        if self.world_size > 1:
            value = self._average_over_ranks(masters, loss)
        optimizer = self.optimizers[group]
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(masters, self.config.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)  # skipped when a gradient is inf/nan
            scaler.update()
        else:
            optimizer.step()
        with warnings.catch_warnings():  # a skipped first step is expected under loss scaling
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            self.schedulers[group].step()
        optimizer.zero_grad(set_to_none=True)
        self._refresh(group)
        return value

    def _average_over_ranks(self, masters, loss: torch.Tensor) -> float:
        """One all-reduce of every gradient, flattened, and of the loss (the mean over ranks is
        what is logged); a parameter no rank used keeps no gradient, as in one process (AdamW then
        leaves it alone). Returns the mean loss."""
        used = torch.tensor([float(m.grad is not None) for m in masters], device=self.device)
        flat = torch.cat([(m.grad if m.grad is not None else torch.zeros_like(m)).reshape(-1).float()
                          for m in masters] + [loss.detach().float().reshape(1), used])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        parts = flat.split([m.numel() for m in masters] + [1, len(masters)])
        for master, part, anyone in zip(masters, parts, parts[-1].tolist()):
            master.grad = part.view_as(master).to(master.dtype) if anyone else None
        return parts[-2].item()

    @torch.no_grad()
    def _refresh(self, group: str) -> None:
        for name, parameter in self.model_groups[group].items():
            master = self.groups[group][name]
            if master is not parameter:
                parameter.copy_(master)
                self.versions[name, group] = parameter._version

    @torch.no_grad()
    def _adopt_outside_changes(self, group: str) -> None:
        """A low-precision weight set outside the engine since the last step (a strategy's
        `match_statistics` on its first batch, a loaded state dict) becomes its master's value,
        rather than being overwritten by the stale master after the step."""
        for name, parameter in self.model_groups[group].items():
            master = self.groups[group][name]
            if master is not parameter and parameter._version != self.versions[name, group]:
                master.copy_(parameter)

    # -- several processes ----------------------------------------------------------------------
    def shard(self, batch: dict) -> dict:
        """This rank's rows of a global batch (rank, rank + world, ...). A batch that carries
        its features was already sharded by the feature cache."""
        if self.world_size == 1 or FEATURES in batch:
            return batch
        rows = next(len(v) for v in batch.values() if hasattr(v, "__len__"))
        if rows < self.world_size:
            raise ConfigError(f"a batch of {rows} rows cannot be shared by {self.world_size} processes; "
                              f"raise the batch size to at least {self.world_size}")
        return {k: v[self.rank::self.world_size] if hasattr(v, "__getitem__") else v for k, v in batch.items()}

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    # -- checkpoints: the fp32 masters, the optimiser, the loss scale -----------------------------
    def save(self, folder: str) -> None:
        if self.rank != 0:  # every rank holds the same state: one copy, written once
            return
        super().save(folder)
        if self.scalers:
            torch.save({g: s.state_dict() for g, s in self.scalers.items()}, os.path.join(folder, SCALER_FILE))

    def load(self, folder: str) -> None:
        super().load(folder)  # into the masters: exact, whatever the module's dtype
        path = os.path.join(folder, SCALER_FILE)
        if self.scalers and os.path.exists(path):
            states = torch.load(path, weights_only=True)
            for group, scaler in self.scalers.items():
                scaler.load_state_dict(states[group])
        for group in self.groups:
            self._refresh(group)
