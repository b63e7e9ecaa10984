"""Where a model runs and in which precision: `--device` and `--dtype`, checked before any work.

Devices: `cpu`, `cuda`, `cuda:N`, `mps`. Default: `cuda` when a GPU is visible, else `cpu` (under
a multi-process launcher, `cuda` means this process's GPU, `cuda:$LOCAL_RANK`). Dtypes:
`float32`, `bfloat16`, `float16`. Default: bfloat16 on CUDA (where the GPU supports it, else
float16), float32 elsewhere. Torch is imported only when a value is checked.
"""

from __future__ import annotations

import os
import re

from earlyexit.errors import ConfigError

DEVICES = ("cpu", "cuda", "cuda:N", "mps")
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(text: str | None) -> str:
    """A device name torch accepts and that exists here, or a one-line ConfigError."""
    import torch

    name = (text or default_device()).strip().lower()
    if name == "cpu":
        return name
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match:
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA GPU is visible here; pass --device cpu (or run on a GPU "
                              "machine)")
        index = match.group(1)
        if index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one GPU per launched process
            index = os.environ.get("LOCAL_RANK", "0")
        if index is not None and int(index) >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                              f"numbered 0..{torch.cuda.device_count() - 1}")
        return "cuda" if index is None else f"cuda:{int(index)}"
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("--device mps: Apple's Metal backend is not available here; pass --device cpu")
        return name
    raise ConfigError(f"unknown --device {text!r}; use one of {', '.join(DEVICES)}")


def resolve_dtype(text: str | None, device: str) -> str:
    """A dtype name (`float32`, `bfloat16`, `float16`) the device can run, or a one-line ConfigError."""
    import torch

    if text is None:
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    name = DTYPE_ALIASES.get(text.strip().lower(), text.strip().lower())
    if name not in DTYPES:
        raise ConfigError(f"unknown --dtype {text!r}; use one of {', '.join(DTYPES)}")
    if name != "float32" and not runs_in(device, name):
        raise ConfigError(f"--dtype {name} does not run on {device} with this torch; pass --dtype float32")
    return name


def runs_in(device: str, dtype: str) -> bool:
    """Whether the few ops a decoder needs (matmul, layer norm, softmax, attention) run in
    `dtype` on `device` (a probe on tiny tensors; float16 on older CPU builds does not)."""
    import torch

    try:
        x = torch.ones(2, 4, 8, dtype=getattr(torch, dtype), device=device)
        y = torch.nn.functional.layer_norm(x @ x.transpose(-1, -2) @ x, (8,)).softmax(-1)
        torch.nn.functional.scaled_dot_product_attention(y[None], y[None], y[None])
        return True
    except (RuntimeError, TypeError):
        return False


def resolve(device: str | None, dtype: str | None) -> tuple[str, str]:
    """(device, dtype) from what the user gave (None: the defaults), checked."""
    device = resolve_device(device)
    return device, resolve_dtype(dtype, device)


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def distributed_backend(device: str) -> str:
    """The collective backend for a model on `device`: nccl on CUDA GPUs, gloo elsewhere."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


def host_memory_bytes() -> int | None:
    """This machine's physical memory, or None where the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on this platform
        return None


def available_memory_bytes(device: str | None) -> int | None:
    """Memory a model on `device` can still take: the GPU's free memory (torch.cuda.mem_get_info,
    which sees other processes too) on CUDA, this machine's physical memory otherwise (the CPU,
    and MPS, whose memory is the host's); None where the platform does not say."""
    import torch

    name = str(device or "cpu")
    if name.startswith("cuda") and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(torch.device(name))
        return int(free)
    return host_memory_bytes()
