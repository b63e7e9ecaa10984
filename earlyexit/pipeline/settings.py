"""What `earlyexit run` is asked to do, and the checks made before any work starts."""

from __future__ import annotations

import dataclasses

from earlyexit.core.validation import gate_threshold_problem, setting_problem, shown
from earlyexit.data.registry import task_name
from earlyexit.data.splits import refuse_unanswered, test_split_of
from earlyexit.data.tasks import task_of
from earlyexit.errors import ConfigError
from earlyexit.models.embedded import NAME as EMBEDDED_DEFAULT


@dataclasses.dataclass
class RunSettings:
    backend: str
    strategy: str
    model: str = EMBEDDED_DEFAULT
    device: str | None = None  # cpu, cuda, cuda:N, mps (None: the CPU)
    dtype: str | None = None  # float32, bfloat16, float16 (None: float32)
    data: str = "scenes"
    exit_layers: list[int] | None = None
    options: dict = dataclasses.field(default_factory=dict)  # strategy config overrides
    threshold: float | None = None  # the strategy's knob value (threshold, entropy, patience, γ): skip calibration
    rule: str = "budget"
    budget: float = 0.01  # budget rule: allowed relative quality loss; risk rule: allowed risk δ
    epsilon: float = 0.1  # budget and risk rules: the guarantee holds with probability 1 - epsilon
    grid: tuple | None = None  # knob values to calibrate over (default: the strategy's grid)
    kv_policy: str = "catchup"
    gate: str = "learned"  # decide before the head: none, learned (trained here, seconds) or cosine
    gate_mode: str = "filter"  # filter: the gate pre-selects, the strategy's rule decides; replace: the gate decides
    gate_threshold: float = 0.3  # filter mode: low, so the gate passes most rows the rule would take
    speed_target: str = "layer"  # what the budget rule maximises: layer (deterministic) or wall (timed on dev)
    speculative: bool = True  # also report self-speculative decoding over the strategy's exits
    draft_exit: int | None = None  # exit layer that drafts (default: chosen on dev)
    draft_length: int | None = None  # tokens drafted per round (default: chosen on dev among 1-4)
    draft_vocabulary: int | None = None  # drafts read out only the N tokens the backbone writes most on the train split
    drafter: str | None = None  # also a speculative row with this drafter (`earlyexit list`: kind drafter)
    drafter_options: dict = dataclasses.field(default_factory=dict)  # its config overrides (draft_length, stop_below)
    draft_anyway: bool = False  # decode the drafter's row on test even where dev says plain decoding is faster
    # exits decide and emit over the N tokens the backbone writes most on the train split (the
    # final layer reads the whole vocabulary); drafts too, unless draft_vocabulary is given
    exit_vocabulary: int | None = None
    test_limit: int | None = None
    dev_limit: int | None = None
    train_limit: int | None = None
    batch_size: int = 32
    num_beams: int = 1
    max_new_tokens: int = 20
    retrain: bool = False
    output: str = "runs"
    deepspeed: dict | None = None  # exit training under DeepSpeed (e.g. launched with torchrun)
    seed: int = 0
    progress: bool = True
    noise: float = 0.0  # Gaussian pixel noise on the test images only (calibration stays on clean dev)
    compare_untrained: bool = True  # also score the untrained `confidence` exits, calibrated by the same rule
    test_data: str | None = None  # score on another data set (the paper: NoCaps val with exits from COCO)
    test_split: str | None = None  # and/or another split (default: the data set's test split)


def check_typed(settings: RunSettings) -> None:
    """Each setting's type, range, finiteness and allowed names, by the rules a bench spec is
    checked with (earlyexit/core/validation.py), named as the flag that sets it."""
    problem = gate_threshold_problem(settings.gate, settings.gate_threshold)  # the gate's own range first
    if problem:
        raise ConfigError(f"--gate-threshold {settings.gate_threshold}: a {settings.gate} gate's threshold {problem}")
    for name, value in dataclasses.asdict(settings).items():
        if name == "grid" and value is not None:
            value = list(value)
        problem = setting_problem(name, value)
        if problem:
            raise ConfigError(f"--{name.replace('_', '-')} {shown(value)}: {problem}")


def check_settings(settings: RunSettings) -> None:
    """One-line errors for values no run can use, before anything loads."""
    if settings.threshold is not None and not 0 <= settings.threshold:  # NaN fails too
        raise ConfigError(f"--threshold {settings.threshold}: the threshold must be >= 0, e.g. --threshold 0.8")
    if not 0 < settings.epsilon < 1:
        raise ConfigError(f"--epsilon is a probability in (0, 1), e.g. 0.1 (got {settings.epsilon})")
    if not 0 <= settings.budget < 1:
        raise ConfigError(f"--budget is a fraction of the full model's quality, e.g. 0.02 (got {settings.budget})")
    if settings.grid is not None and not settings.grid:
        raise ConfigError("the calibration grid is empty; pass values such as --grid 0.5,0.7,0.9")
    refuse_unanswered(*test_split_of(settings))  # before any training, not after hours of it
    if settings.exit_vocabulary:  # before any exit is trained
        for data in filter(None, (settings.data, settings.test_data)):
            task_of(task_name(data)).refuse_exit_vocabulary()
    for flag, size in (("draft", settings.draft_vocabulary), ("exit", settings.exit_vocabulary)):
        if size is not None and size < 1:
            raise ConfigError(f"--{flag}-vocabulary is a number of tokens, e.g. 1024 (got {size})")
    check_typed(settings)
