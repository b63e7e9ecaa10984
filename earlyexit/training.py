"""One training loop for every training command (backbone fine-tuning, exit training).

The loop owns the step schedule, seeding, progress, logging and checkpoints; an *engine* owns
the optimisation (backward, optimiser step, saving its state). `PlainEngine` is plain PyTorch
(AdamW, linear warm-up then cosine decay); a DeepSpeed engine can stand in without touching
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
import tempfile
from typing import Callable

import torch

from .errors import CheckpointError, ConfigError

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
        if self.learning_rate <= 0:
            raise ConfigError(f"learning rate must be positive (got {self.learning_rate})")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be at least 1 (got {self.checkpoint_every})")

    def schedule_key(self) -> dict:
        """Settings a resumed run must share with the run that wrote the checkpoint."""
        return {k: getattr(self, k) for k in ("steps", "learning_rate", "weight_decay", "warmup_steps", "seed")}


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class PlainEngine:
    """Plain PyTorch optimisation of `parameters` (named) of `model`."""

    def __init__(self, model: torch.nn.Module, named_parameters: dict[str, torch.nn.Parameter], config: TrainConfig):
        self.model, self.config = model, config
        self.parameters = named_parameters
        decay = [p for n, p in named_parameters.items() if p.ndim >= 2]
        no_decay = [p for n, p in named_parameters.items() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.learning_rate,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, config.warmup_steps, config.steps))

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(list(self.parameters.values()), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, folder: str) -> None:
        from safetensors.torch import save_file

        save_file({n: p.detach().contiguous() for n, p in self.parameters.items()},
                  os.path.join(folder, "trainable.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   os.path.join(folder, "optimizer.pt"))

    def load(self, folder: str) -> None:
        from safetensors.torch import load_file

        weights = load_file(os.path.join(folder, "trainable.safetensors"))
        if set(weights) != set(self.parameters):
            raise CheckpointError(f"{folder} holds other parameters than this model trains; "
                                  "start over with a fresh --output folder")
        with torch.no_grad():
            for name, value in weights.items():
                self.parameters[name].copy_(value)
        state = torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def latest_checkpoint(output_dir: str) -> str | None:
    if not os.path.isdir(output_dir):
        return None
    steps = [int(name.split("-")[1]) for name in os.listdir(output_dir)
             if name.startswith("checkpoint-") and name.split("-")[1].isdigit()
             and os.path.isfile(os.path.join(output_dir, name, STATE_FILE))]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def save_checkpoint(engine, config: TrainConfig, step: int, losses: list[float]) -> str:
    os.makedirs(config.output_dir, exist_ok=True)
    final = os.path.join(config.output_dir, f"checkpoint-{step}")
    temporary = tempfile.mkdtemp(prefix=".checkpoint-", dir=config.output_dir)
    try:
        engine.save(temporary)
        state = {"step": step, "losses": losses, "schedule": config.schedule_key()}
        with open(os.path.join(temporary, STATE_FILE), "w") as handle:
            json.dump(state, handle)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    kept = sorted((int(n.split("-")[1]) for n in os.listdir(config.output_dir)
                   if n.startswith("checkpoint-") and n.split("-")[1].isdigit()), reverse=True)
    for old in kept[config.keep_checkpoints:]:
        shutil.rmtree(os.path.join(config.output_dir, f"checkpoint-{old}"), ignore_errors=True)
    return final


def resume(engine, config: TrainConfig) -> tuple[int, list[float]]:
    """Load the newest checkpoint in the output folder, if any: (next step, losses so far)."""
    folder = latest_checkpoint(config.output_dir)
    if folder is None:
        return 0, []
    with open(os.path.join(folder, STATE_FILE)) as handle:
        state = json.load(handle)
    if state["schedule"] != config.schedule_key():
        raise CheckpointError(f"{folder} was written with other settings ({state['schedule']}); "
                              "resume with the same settings or use a fresh --output folder")
    engine.load(folder)
    return state["step"], state["losses"]


def train(model: torch.nn.Module, loss_fn: Callable, batch_for_step: Callable[[int], dict], config: TrainConfig,
          engine=None, trainable: dict | None = None, on_log: Callable[[int, float], None] | None = None) -> list[float]:
    """Run (or resume) training to `config.steps`; returns the loss of every step."""
    from tqdm.auto import tqdm

    if trainable is None:
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    engine = engine or PlainEngine(model, trainable, config)
    start, losses = resume(engine, config)
    model.train()
    bar = tqdm(total=config.steps, initial=start, desc="training", disable=not config.progress, unit="step")
    for step in range(start, config.steps):
        torch.manual_seed(config.seed * 1_000_003 + step)  # dropout noise depends on the step only
        loss = loss_fn(model, batch_for_step(step))
        if not torch.isfinite(loss):
            raise ConfigError(f"the loss became {loss.item()} at step {step}; lower the learning rate")
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        bar.update(1)
        if (step + 1) % config.log_every == 0:
            recent = sum(losses[-config.log_every:]) / config.log_every
            bar.set_postfix(loss=f"{recent:.3f}")
            if on_log:
                on_log(step + 1, recent)
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            save_checkpoint(engine, config, step + 1, losses)
    bar.close()
    model.eval()
    return losses
