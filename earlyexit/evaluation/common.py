"""What generating and ranking evaluations share: settings, image noise, the wall-clock
comparison with the full model, and the record of what an evaluation ran with (their common
loop: `evaluation.loop`)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from earlyexit.errors import ConfigError


@dataclasses.dataclass
class EvalSettings:
    batch_size: int = 16
    num_beams: int = 1
    max_new_tokens: int = 20
    noise: float = 0.0  # standard deviation of Gaussian pixel noise, images scaled to [0, 1]
    limit: int | None = None  # evaluate the first N samples only
    measure_wall: bool = True  # time the plain backbone too (doubles the work)
    seed: int = 0
    progress: bool = True
    quick_metrics: bool = False  # captions: CIDEr only (no METEOR start-up), for calibration sweeps

    def __post_init__(self):
        if self.batch_size < 1 or self.num_beams < 1 or self.max_new_tokens < 1:
            raise ConfigError("batch size, beams and max new tokens must be positive integers")
        if not math.isfinite(self.noise) or self.noise < 0:
            raise ConfigError(f"--noise is a standard deviation and must be >= 0 (got {self.noise})")


def add_noise(image, sigma: float, seed: int):
    """The image with N(0, sigma^2) noise on its [0, 1]-scaled pixels, clipped (deterministic per seed)."""
    if sigma == 0:
        return image
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    pixels = pixels + np.random.default_rng(seed).normal(0.0, sigma, pixels.shape)
    return Image.fromarray((np.clip(pixels, 0.0, 1.0) * 255.0).round().astype(np.uint8))


def wall_clock(early: dict, full: dict | None) -> dict:
    """Per generated token of each side (the two may generate different lengths): end to end,
    and for the decode phase (everything after the prompt pass)."""
    def per_token(side):
        return {"seconds": side["seconds"], "prompt_seconds": side["prompt_seconds"], "tokens": side["tokens"],
                "tokens_per_s": side["tokens"] / side["seconds"] if side["seconds"] else float("nan"),
                "per_token_s": side["seconds"] / side["tokens"] if side["tokens"] else float("nan"),
                "decode_per_token_s": (side["seconds"] - side["prompt_seconds"]) / (side["tokens"] - side["rows"])
                if side["tokens"] > side["rows"] else float("nan")}

    result = {"early_exit": per_token(early)}
    if full is not None:
        result["full"] = per_token(full)
        result["wall_speedup"] = result["full"]["per_token_s"] / result["early_exit"]["per_token_s"]
        result["decode_wall_speedup"] = result["full"]["decode_per_token_s"] / result["early_exit"]["decode_per_token_s"]
        result["prompt_pass_ratio"] = full["prompt_seconds"] / early["prompt_seconds"] if early["prompt_seconds"] else None
    return result


def run_config(backend, strategy, dataset, settings, kv_policy: str, gate, decode: str) -> dict:
    """What an evaluation ran with, as its report records it."""
    return {"backend": backend.name, "strategy": strategy.name if strategy else None,
            "strategy_config": strategy.config.to_dict() if strategy else None,
            "exit_layers": strategy.exit_layers if strategy else [], "kv_policy": kv_policy,
            "gate": gate.kind if gate is not None else None,
            "gate_threshold": gate.threshold if gate is not None else None, "decode": decode,
            "data": dataset.name, "split": dataset.split, "samples": len(dataset),
            "settings": dataclasses.asdict(settings)}
