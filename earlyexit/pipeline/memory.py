"""Will this run fit? The pre-flight memory estimate (`earlyexit.models.estimate`), made from
the model's config and the run's settings before a weight loads: a 7B backbone with MuE's layer
copies, or 32 rows x 5 beams of K/V, is refused in one line that names the knob, not after an hour
of loading and training ends in an out-of-memory error."""

from __future__ import annotations

import os

from earlyexit.core.strategy import Strategy
from earlyexit.data.registry import task_name
from earlyexit.data.tasks import task_of
from earlyexit.errors import ConfigError
from earlyexit.evaluation.dialog import OPTION_ROWS
from earlyexit.models import estimate as est
from earlyexit.training.features import feature_cache_budget
from earlyexit.util.devices import available_memory_bytes, resolve
from earlyexit.util.ranks import launched_world_size

SKIP_VARIABLE = "EARLYEXIT_NO_PREFLIGHT"  # set to 1 to try a run the estimate says will not fit


def run_estimate(settings, registry) -> tuple[dict, str] | None:
    """(bytes per part with their "total", the device) for `settings`, or None where the model's
    shape is not known without loading it (the embedded models, hub ids other than the paper's):
    those are small, or the estimate would cost a download."""
    config = est.model_config(settings.model)
    if config is None:
        return None
    device, dtype = resolve(settings.device, settings.dtype)
    shape = est.model_shape(config)
    strategy = registry.strategy(settings.strategy)
    exits = len(settings.exit_layers or strategy.default_exit_layers(shape.num_layers))
    task = task_of(task_name(settings.test_data or settings.data))
    stage = ((settings.deepspeed or {}).get("zero_optimization") or {}).get("stage", 0)
    common = dict(strategy=settings.strategy, options=dict(settings.options), exits=exits, dtype=dtype,
                  batch_size=settings.batch_size, num_beams=settings.num_beams, max_new_tokens=settings.max_new_tokens,
                  zero_stage=stage if settings.deepspeed else 0, world_size=launched_world_size(),
                  baseline=est.process_baseline_bytes(device))
    decoding = est.Settings(**common, prompt_tokens=est.PROMPT_TOKENS[task.name],
                            option_rows=OPTION_ROWS if task.ranks else 0)
    parts = est.estimate(shape, decoding)
    if strategy.training_modules is not Strategy.training_modules:  # the class has modules to train
        train_task = task_of(task_name(settings.data))
        training = est.Settings(**common, prompt_tokens=est.PROMPT_TOKENS[train_task.name], train=True,
                                train_items=settings.train_limit or 10**9, train_tokens=est.TARGET_TOKENS[train_task.name],
                                feature_cache_budget=feature_cache_budget(device))
        parts = max(parts, est.estimate(shape, training), key=lambda p: p["total"])
    return parts, device


def check_memory(settings, registry, log) -> None:
    """Refuse, in one line naming the knob, a run whose estimate exceeds the device's free memory;
    when it fits but takes more than half of it, say so (a tight run is worth knowing about)."""
    if os.environ.get(SKIP_VARIABLE):
        return
    estimate = run_estimate(settings, registry)
    if estimate is None:
        return
    parts, device = estimate
    available = available_memory_bytes(device)
    try:
        est.check_fits(parts, available, where=device)
    except ConfigError as error:
        raise ConfigError(f"{error} (or set {SKIP_VARIABLE}=1 to try anyway)") from None
    if available and parts["total"] > available // 2:
        log(f"memory: about {parts['total'] / est.GiB:.1f} GiB at the peak of {available / est.GiB:.1f} GiB free on "
            f"{device}")
