"""DeepSpeed settings from the command line, without importing torch (so `--help` stays instant).
The engine itself is in `distributed.py`."""

from __future__ import annotations

import json
import os

from earlyexit.errors import ConfigError

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


def config_from_arguments(args, batch_size: int, grad_clip: float = 1.0, dtype: str | None = None) -> dict | None:
    """The DeepSpeed config the command line asks for, or None for plain PyTorch. With the
    model's `dtype`, mixed precision is set through DeepSpeed's own `bf16` / `fp16` sections."""
    world = launched_world_size()
    if args.zero is not None:
        config = zero_config(args.zero, max(1, batch_size // world), grad_clip)
    elif args.deepspeed:
        config = read_config(args.deepspeed)
        config.setdefault("train_micro_batch_size_per_gpu", max(1, batch_size // world))
        config.setdefault("gradient_accumulation_steps", 1)
        config.setdefault("gradient_clipping", grad_clip)
        check_ranges(config, args.deepspeed)
    else:
        return None
    return with_precision(config, dtype) if dtype else config


PRECISION_SECTIONS = {"bfloat16": "bf16", "float16": "fp16"}


def with_precision(config: dict, dtype: str) -> dict:
    """`config` with DeepSpeed's mixed precision matching a model in `dtype` (float32, bfloat16,
    float16): `bf16: {enabled: true}` or `fp16: {enabled: true}` (fp32 master weights in the
    optimiser), neither for float32. A config that enables another precision than the model's is
    refused: DeepSpeed would cast the trained modules and leave the frozen backbone as it is."""
    wanted = PRECISION_SECTIONS.get(dtype)
    config = dict(config)
    for section in PRECISION_SECTIONS.values():
        enabled = isinstance(config.get(section), dict) and config[section].get("enabled", False)
        if enabled and section != wanted:
            raise ConfigError(f"the DeepSpeed config enables {section} but the model is {dtype}; pass "
                              f"--dtype {'bfloat16' if section == 'bf16' else 'float16'} or drop the {section} section")
    if wanted:
        config[wanted] = {**(config.get(wanted) or {}), "enabled": True}
    return config


def launched_world_size() -> int:
    """Processes started by torchrun / the deepspeed launcher (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def read_config(path: str) -> dict:
    """The JSON object in `path`, checked for what would otherwise fail deep inside DeepSpeed:
    a file that is a list or a folder, an optimizer section, out-of-range sizes or stages."""
    try:
        with open(path) as handle:
            config = json.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config {path} does not exist; pass a JSON file or use --zero N") from None
    except IsADirectoryError:
        raise ConfigError(f"DeepSpeed config {path} is a folder; pass the JSON file (e.g. {path}/ds_config.json) "
                          "or use --zero N") from None
    except OSError as error:
        raise ConfigError(f"DeepSpeed config {path} cannot be read ({error.strerror or error}); make it readable "
                          "or use --zero N") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON ({str(error)[:120]})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"DeepSpeed config {path} holds a JSON {type(config).__name__}; it must be one object "
                          '{"zero_optimization": {"stage": 2}, ...}')
    if "optimizer" in config:
        raise ConfigError(f"{path} declares an optimizer; earlyexit passes its own AdamW (remove the "
                          "'optimizer' section; set the learning rate with the command's options)")
    return config


def check_ranges(config: dict, path: str) -> None:
    """Sizes, the ZeRO stage and clipping within what DeepSpeed accepts, named when not."""
    def fail(what: str) -> None:
        raise ConfigError(f"DeepSpeed config {path}: {what}")

    def positive_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        if key in config and not positive_int(config[key]):
            fail(f"{key} must be a positive integer (got {config[key]!r})")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        fail(f"zero_optimization must be an object such as {{\"stage\": 2}} (got {zero!r})")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        fail(f"zero_optimization.stage must be 0, 1, 2 or 3 (got {stage!r})")
    clipping = config.get("gradient_clipping", 0.0)
    if isinstance(clipping, bool) or not isinstance(clipping, (int, float)) or not 0 <= clipping < float("inf"):
        fail(f"gradient_clipping must be a number >= 0 (got {clipping!r})")
    for section in ("bf16", "fp16"):
        if section in config and not (isinstance(config[section], dict)
                                      and isinstance(config[section].get("enabled", False), bool)):
            fail(f'{section} must be an object such as {{"enabled": true}} (got {config[section]!r})')
    if "train_batch_size" in config:  # DeepSpeed asserts this product deep inside initialize
        micro = config.get("train_micro_batch_size_per_gpu")
        steps = config.get("gradient_accumulation_steps", 1)
        world = launched_world_size()
        if micro is not None and config["train_batch_size"] != micro * steps * world:
            fail(f"train_batch_size {config['train_batch_size']} is not train_micro_batch_size_per_gpu {micro} x "
                 f"gradient_accumulation_steps {steps} x {world} processes; drop train_batch_size or fix the product")
