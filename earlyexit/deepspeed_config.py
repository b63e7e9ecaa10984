"""DeepSpeed settings from the command line, without importing torch (so `--help` stays instant).
The engine itself is in `distributed.py`."""

from __future__ import annotations

import json
import os

from .errors import ConfigError

SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU shared-memory all-reduce, a 45 s JIT build


def zero_config(stage: int, batch_size: int, grad_clip: float) -> dict:
    """A ZeRO config for `--zero N` (the micro batch is the per-rank share of `batch_size`)."""
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"--zero takes a ZeRO stage 0, 1, 2 or 3 (got {stage})")
    return {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
            "gradient_clipping": grad_clip, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}


def add_arguments(parser) -> None:
    """`--deepspeed CONFIG.json` / `--zero N` for every training command."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--deepspeed", metavar="CONFIG.json",
                       help="train with DeepSpeed using this config (no 'optimizer' section: earlyexit passes AdamW)")
    group.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help="train with DeepSpeed ZeRO at this stage")


def config_from_arguments(args, batch_size: int, grad_clip: float = 1.0) -> dict | None:
    """The DeepSpeed config the command line asks for, or None for plain PyTorch."""
    world = launched_world_size()
    if args.zero is not None:
        return zero_config(args.zero, max(1, batch_size // world), grad_clip)
    if args.deepspeed:
        config = read_config(args.deepspeed)
        config.setdefault("train_micro_batch_size_per_gpu", max(1, batch_size // world))
        config.setdefault("gradient_accumulation_steps", 1)
        config.setdefault("gradient_clipping", grad_clip)
        return config
    return None


def launched_world_size() -> int:
    """Processes started by torchrun / the deepspeed launcher (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def read_config(path: str) -> dict:
    try:
        with open(path) as handle:
            config = json.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config {path} does not exist; pass a JSON file or use --zero N")
    except json.JSONDecodeError as error:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON ({error})")
    if "optimizer" in config:
        raise ConfigError(f"{path} declares an optimizer; earlyexit passes its own AdamW (remove the "
                          "'optimizer' section; set the learning rate with the command's options)")
    return config
