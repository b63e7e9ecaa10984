"""One training loop for every training command (backbone fine-tuning, exit training).

The loop owns the step schedule, seeding, progress, logging and checkpoints; an *engine* owns
the optimisation (backward, optimiser step, saving its state). `PlainEngine` is plain PyTorch
(AdamW, linear warm-up then cosine decay: transformers' schedule); a DeepSpeed engine can stand in without touching
the loop. Batches come from a function of the step number, so a resumed run sees exactly the
batches, and the dropout noise (re-seeded per step), the uninterrupted run would have seen.

Checkpoints are folders `checkpoint-<step>` written under a temporary name and renamed into
place, so a crash never leaves a half-written checkpoint that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
from typing import Callable

import torch

from earlyexit.errors import CheckpointError, ConfigError
from earlyexit.util.files import atomic_folder
from earlyexit.util.progress import progress_bar

STATE_FILE = "trainer_state.json"


@dataclasses.dataclass
class TrainConfig:
    output_dir: str
    steps: int = 1000
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 200
    keep_checkpoints: int = 1
    log_every: int = 25
    progress: bool = True

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError(f"steps must be at least 1 (got {self.steps})")
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ConfigError(f"learning rate must be positive (got {self.learning_rate})")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup steps must be >= 0 (got {self.warmup_steps})")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be at least 1 (got {self.checkpoint_every})")

    def schedule_key(self) -> dict:
        """Settings a resumed run must share with the run that wrote the checkpoint."""
        return {k: getattr(self, k) for k in ("steps", "learning_rate", "weight_decay", "warmup_steps", "seed")}


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig):
    """Linear warm-up over `warmup_steps`, then cosine decay to zero at `steps`
    (`transformers.get_cosine_schedule_with_warmup`); its state resumes exactly from a checkpoint."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=config.warmup_steps,
                                           num_training_steps=config.steps)


class PlainEngine:
    """Plain PyTorch optimisation: one AdamW (+ schedule) per named group of parameters.

    Most training has one group; adversarial training (FREE) has two, a generator and a
    discriminator, each stepped on its own loss. `optimize(group, loss)` is all a training
    step needs, so a DeepSpeed engine (one engine per group) can stand in.
    """

    def __init__(self, groups: dict[str, dict[str, torch.nn.Parameter]], config: TrainConfig,
                 lr_multipliers: dict[str, float] | None = None):
        """`lr_multipliers` scales the learning rate of parameters whose name starts with a
        prefix (e.g. a from-scratch vision tower learns faster than a language model)."""
        self.config = config
        self.groups = groups
        self.optimizers, self.schedulers = {}, {}
        multipliers = lr_multipliers or {}
        for name, parameters in groups.items():
            buckets: dict[tuple, list] = {}
            for pname, p in parameters.items():
                scale = next((m for prefix, m in multipliers.items() if pname.startswith(prefix)), 1.0)
                decay = config.weight_decay if p.ndim >= 2 else 0.0
                buckets.setdefault((scale, decay), []).append(p)
            optimizer = torch.optim.AdamW(
                [{"params": ps, "weight_decay": decay, "lr": config.learning_rate * scale}
                 for (scale, decay), ps in buckets.items()], lr=config.learning_rate)
            self.optimizers[name] = optimizer
            self.schedulers[name] = warmup_cosine_schedule(optimizer, config)

    def optimize(self, group: str, loss: torch.Tensor) -> float:
        """Backward `loss` into `group`'s parameters only, and step its optimiser."""
        parameters = list(self.groups[group].values())
        if not torch.isfinite(loss):
            raise ConfigError(f"the {group} loss became {loss.item()}; lower the learning rate")
        grads = torch.autograd.grad(loss, parameters, allow_unused=True)
        for parameter, grad in zip(parameters, grads):
            parameter.grad = grad
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(parameters, self.config.grad_clip)
        self.optimizers[group].step()
        self.schedulers[group].step()
        self.optimizers[group].zero_grad(set_to_none=True)
        return loss.item()

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {f"{group}/{name}": p for group, params in self.groups.items() for name, p in params.items()}

    def save(self, folder: str) -> None:
        from safetensors.torch import save_file

        save_file({n: p.detach().contiguous() for n, p in self.named_parameters().items()},
                  os.path.join(folder, "trainable.safetensors"))
        state = {name: {"optimizer": self.optimizers[name].state_dict(), "scheduler": self.schedulers[name].state_dict()}
                 for name in self.groups}
        torch.save(state, os.path.join(folder, "optimizer.pt"))

    def load(self, folder: str) -> None:
        from safetensors.torch import load_file

        weights = load_file(os.path.join(folder, "trainable.safetensors"))
        parameters = self.named_parameters()
        if set(weights) != set(parameters):
            raise CheckpointError(f"{folder} holds other parameters than this run trains; "
                                  "start over with a fresh --output folder")
        with torch.no_grad():
            for name, value in weights.items():
                parameters[name].copy_(value)
        state = torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True)
        for name in self.groups:
            self.optimizers[name].load_state_dict(state[name]["optimizer"])
            self.schedulers[name].load_state_dict(state[name]["scheduler"])


def checkpoint_steps(output_dir: str) -> tuple[list[int], list[str]]:
    """(steps of the complete checkpoints, ascending; names of `checkpoint-N` folders that are not
    complete: no readable state file, or one for another step). Incomplete ones are never loaded
    and never pruned: they are reported, and a valid checkpoint is never deleted because of them."""
    if not os.path.isdir(output_dir):
        return [], []
    complete, stale = [], []
    for name in os.listdir(output_dir):
        step = name.split("-", 1)[1] if name.startswith("checkpoint-") else ""
        if not step.isdigit():
            continue
        try:
            with open(os.path.join(output_dir, name, STATE_FILE)) as handle:
                state = json.load(handle)
            ok = isinstance(state, dict) and state.get("step") == int(step) and isinstance(state.get("losses"), list)
        except (OSError, ValueError):
            ok = False
        (complete.append(int(step)) if ok else stale.append(name))
    return sorted(complete), sorted(stale)


def latest_checkpoint(output_dir: str) -> str | None:
    steps, _ = checkpoint_steps(output_dir)
    return os.path.join(output_dir, f"checkpoint-{steps[-1]}") if steps else None


def clean_leftovers(output_dir: str) -> list[str]:
    """Remove the temporary folders an interrupted checkpoint save left behind; returns their names."""
    if not os.path.isdir(output_dir):
        return []
    leftovers = [n for n in os.listdir(output_dir) if n.startswith(".checkpoint-")]
    for name in leftovers:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    return leftovers


def save_checkpoint(engine, config: TrainConfig, step: int, losses: list) -> str:
    final = os.path.join(config.output_dir, f"checkpoint-{step}")
    rank, world = getattr(engine, "rank", 0), getattr(engine, "world_size", 1)
    state = {"step": step, "losses": losses, "schedule": config.schedule_key(), "world_size": world}
    if world == 1:
        with atomic_folder(final) as temporary:
            engine.save(temporary)
            with open(os.path.join(temporary, STATE_FILE), "w") as handle:
                json.dump(state, handle)
    else:  # every rank writes its shard into one temporary folder; rank 0 renames it
        temporary = os.path.join(config.output_dir, f".checkpoint-{step}-partial")
        if rank == 0:
            shutil.rmtree(temporary, ignore_errors=True)
            os.makedirs(temporary)
        engine.barrier()
        engine.save(temporary)
        engine.barrier()
        if rank == 0:
            with open(os.path.join(temporary, STATE_FILE), "w") as handle:
                json.dump(state, handle)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(temporary, final)
        engine.barrier()
    if rank == 0:  # prune older complete checkpoints only; incomplete folders are the user's to judge
        complete, _ = checkpoint_steps(config.output_dir)
        for old in [s for s in complete if s < step][:max(0, len(complete) - config.keep_checkpoints)]:
            shutil.rmtree(os.path.join(config.output_dir, f"checkpoint-{old}"), ignore_errors=True)
    return final


def resume(engine, config: TrainConfig) -> tuple[int, list[float]]:
    """Load the newest complete checkpoint in the output folder, if any: (next step, losses so far).
    Leftover temporary folders are removed; incomplete `checkpoint-N` folders are named and skipped."""
    if getattr(engine, "rank", 0) == 0:
        clean_leftovers(config.output_dir)
        for name in checkpoint_steps(config.output_dir)[1]:
            print(f"note: skipping {os.path.join(config.output_dir, name)}: not a complete checkpoint "
                  f"(no readable {STATE_FILE})", file=sys.stderr)
    if hasattr(engine, "barrier") and getattr(engine, "world_size", 1) > 1:
        engine.barrier()
    folder = latest_checkpoint(config.output_dir)
    if folder is None:
        return 0, []
    with open(os.path.join(folder, STATE_FILE)) as handle:
        state = json.load(handle)
    if state.get("world_size", 1) != getattr(engine, "world_size", 1):
        raise CheckpointError(f"{folder} was written by {state.get('world_size', 1)} processes; resume with as many")
    if state["schedule"] != config.schedule_key():
        raise CheckpointError(f"{folder} was written with other settings ({state['schedule']}); "
                              "resume with the same settings or use a fresh --output folder")
    engine.load(folder)
    return state["step"], state["losses"]


def train(model: torch.nn.Module, step_fn: Callable, batch_for_step: Callable[[int], dict], config: TrainConfig,
          engine=None, on_log: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Run (or resume) training to `config.steps`; returns every step's losses.

    `step_fn(batch, engine) -> dict[str, float]` does one step: it computes its losses and calls
    `engine.optimize(group, loss)` for each parameter group. Without an engine, one plain group
    "model" holds every parameter of `model` that requires grad.
    """
    if engine is None:
        engine = PlainEngine({"model": {n: p for n, p in model.named_parameters() if p.requires_grad}}, config)
    start, losses = resume(engine, config)
    model.train()
    main_process = getattr(engine, "rank", 0) == 0  # progress and logs on rank 0 only
    with progress_bar(total=config.steps, initial=start, desc="training", unit="step",
                      disable=not (config.progress and main_process)) as bar:
        for step in range(start, config.steps):
            torch.manual_seed(config.seed * 1_000_003 + step)  # dropout noise depends on the step only
            batch = batch_for_step(step)
            if hasattr(engine, "shard"):  # data parallel: each rank takes its rows of the global batch
                batch = engine.shard(batch)
            losses.append(step_fn(batch, engine))
            bar.update(1)
            if (step + 1) % config.log_every == 0:
                recent = {k: sum(entry[k] for entry in losses[-config.log_every:]) / config.log_every
                          for k in losses[-1]}
                bar.set_postfix({k: f"{v:.3f}" for k, v in recent.items()})
                if on_log and main_process:
                    on_log(step + 1, recent)
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                save_checkpoint(engine, config, step + 1, losses)
    model.eval()
    return losses
