"""The Drafter contract: a drafter proposes the tokens that come next, and the full model
verifies them in one forward (`earlyexit.core.speculative`), so the output is the full model's
own, token for token under greedy decoding.

A drafter learns from the frozen backbone only (its own outputs on the exit-training split, never
labels or test data), is saved alone in a small folder (PEFT-style: its config and its own
tensors), and is cached like exits. Drafter classes are plain Python at import time, as
strategies are, so `earlyexit list` stays instant.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import json
import os

from earlyexit.core.strategy import StrategyConfig, config_field
from earlyexit.core.validation import check_config_fields
from earlyexit.errors import ConfigError, CorruptAdapterError

DRAFTER_CONFIG = "drafter_config.json"  # beside what `save` writes: which drafter, and its config
DRAFTING_KNOBS = ("draft_length", "stop_below")  # how a fitted drafter drafts, not what it learned

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from earlyexit.core.backend import Backend


@dataclasses.dataclass
class DrafterConfig(StrategyConfig):
    """What every drafter shares: how far it drafts, and where it stops early."""

    draft_length: int = config_field(4, "tokens drafted a round at most (k)")
    stop_below: float = config_field(0.0, "stop a round's drafting where the drafter's probability of its next "
                                          "token falls below this (τ; 0: always draft k)")

    def __post_init__(self):
        check_config_fields(self)
        if self.draft_length < 1:
            raise ConfigError(f"draft_length must be at least 1 (got {self.draft_length})")
        if self.stop_below > 1:
            raise ConfigError(f"stop_below is a probability in [0, 1] (got {self.stop_below})")


@dataclasses.dataclass
class DraftContext:
    """What a drafter may read when it proposes: the tokens generated so far (the prompt pass's
    first one included) and, for drafters that ask (`Drafter.wants_hidden`), what the full model
    verified since the drafter last proposed (every prompt position, the first time; then the
    positions each verification kept): their final-layer states before the final norm, the
    embedded input at the position after each (the newest token's last), and their positions."""

    tokens: list[int]
    hidden: torch.Tensor | None = None  # (positions, width)
    inputs: torch.Tensor | None = None  # (positions, width): what enters the first layer one position later
    positions: torch.Tensor | None = None  # (positions,)


@dataclasses.dataclass
class BatchDraftContext:
    """`DraftContext` for a whole batch (`Drafter.propose_batch`): each row's tokens, and for
    drafters that ask, the last forward's positions for every row at once, padded to the longest:
    `real[r, j]` says whether position j of row r is one the full model kept (left padding of the
    prompt and each row's refused drafts are not)."""

    tokens: list[list[int]]
    hidden: torch.Tensor | None = None  # (rows, positions, width)
    inputs: torch.Tensor | None = None  # (rows, positions, width)
    positions: torch.Tensor | None = None  # (rows, positions)
    real: torch.Tensor | None = None  # (rows, positions): 1 where kept


def last_kept(real: torch.Tensor) -> torch.Tensor:
    """Each row's last kept position (the last 1 of `real`, rows x positions; 0 where none is)."""
    return (real.shape[1] - 1 - real.flip(1).argmax(1)).clamp(min=0)


class Drafter:
    """Base class of every drafter. Subclasses set `name`, `description` and `Config`, and
    implement `fit` (when `needs_fitting`), `propose`, `save` and `load`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type[DrafterConfig]] = DrafterConfig
    needs_fitting: ClassVar[bool] = True  # learns from the backbone's own outputs before it drafts
    uses_exits: ClassVar[bool] = False  # drafts with the strategy's exits inside the engine (`exit`)
    wants_hidden: ClassVar[bool] = False  # `DraftContext.hidden` is filled for it
    # whether a batch drafts at once (`propose_batch`); None: unless it `wants_hidden` (its state is
    # per sequence, so the default `propose_batch`, row by row over one state, would mix rows up)
    drafts_batches: ClassVar[bool | None] = None
    wants_samples: ClassVar[bool] = False  # `fit` also takes the samples its outputs belong to
    decoder_only: ClassVar[bool] = False  # refused on encoder-decoder backbones (checked before a model loads)

    def __init__(self, backend: Backend, config: DrafterConfig | None = None):
        self.backend = backend
        self.config = config if config is not None else self.Config()

    # -- building ---------------------------------------------------------------------------
    def fit(self, outputs: list[list[int]], log=print) -> None:
        """Learn from `outputs`, the backbone's own greedy tokens on the exit-training split (with
        `wants_samples`, `fit(outputs, log, samples)`: also the split's samples, in that order, so
        it can run the backbone on them)."""
        raise NotImplementedError

    def save(self, folder: str) -> None:
        """Write what `fit` learned into `folder` (an empty folder the caller made)."""
        raise NotImplementedError

    def load(self, folder: str) -> None:
        """Read back what `save` wrote."""
        raise NotImplementedError

    def recipe(self) -> dict[str, Any]:
        """What makes two fits of this drafter the same (its cache key): the config but its drafting
        knobs (`DRAFTING_KNOBS`), by default: one fit drafts at any k and τ."""
        return {"drafter": self.name,
                "config": {k: v for k, v in self.config.to_dict().items() if k not in DRAFTING_KNOBS}}

    def with_drafting(self, **knobs) -> Drafter:
        """Draft with other `DRAFTING_KNOBS` (draft_length, stop_below), e.g. those `run` chose on
        dev; what was fitted stays. Returns the drafter."""
        unknown = set(knobs) - set(DRAFTING_KNOBS)
        if unknown:
            raise ConfigError(f"not a drafting knob: {', '.join(sorted(unknown))} (knobs: {', '.join(DRAFTING_KNOBS)})")
        self.config = dataclasses.replace(self.config, **knobs)
        return self

    # -- drafting ---------------------------------------------------------------------------
    def start(self) -> None:
        """A new sequence begins (drafters with per-sequence state reset it here)."""

    def propose(self, context: DraftContext, count: int) -> list[int]:
        """Up to `count` tokens to follow `context.tokens`; fewer (or none) where the drafter is
        not confident enough (`config.stop_below`)."""
        raise NotImplementedError

    # -- drafting a batch at once (batched speculative decoding) ------------------------------
    def can_draft_batches(self) -> bool:
        return self.drafts_batches if self.drafts_batches is not None else not self.wants_hidden

    def start_batch(self, rows: int) -> None:
        """A batch of `rows` new sequences begins."""
        self.start()

    def propose_batch(self, context: BatchDraftContext, counts: list[int]) -> list[list[int]]:
        """Each row's drafts (up to `counts[r]`; a row with 0 gets none). By default `propose` row
        by row, which is right for drafters without per-sequence state; a drafter with such state
        overrides this (and `start_batch`) to keep every row's state in one batched structure."""
        return [self.propose(DraftContext(list(tokens)), count) if count > 0 else []
                for tokens, count in zip(context.tokens, counts)]


def save_drafter(drafter: Drafter, folder: str) -> None:
    """`drafter` alone into `folder` (an empty folder the caller made): its own files and
    `drafter_config.json`, so `load_drafter` can rebuild it without the run that fitted it."""
    drafter.save(folder)
    with open(os.path.join(folder, DRAFTER_CONFIG), "w") as handle:
        json.dump({"drafter": drafter.name, "config": drafter.config.to_dict()}, handle, indent=2)


def check_drafter_spec(registry, spec: str) -> None:
    """`--drafter NAME[:FOLDER]` checked before any model loads: a registered name, and the folder
    (where the drafter needs one) holding a drafter's config."""
    name, _, folder = spec.partition(":")
    cls = registry.drafter(name)
    if cls.uses_exits:
        raise ConfigError(f"--drafter {name} drafts with the strategy's exits: drop --drafter and pass --strategy")
    if folder and not os.path.isfile(os.path.join(folder, DRAFTER_CONFIG)):
        raise ConfigError(f"--drafter {spec}: {folder} holds no {DRAFTER_CONFIG}; pass a folder a fitted drafter was "
                          "saved to (earlyexit run --drafter NAME names it)")
    if not folder and cls.needs_fitting:
        raise ConfigError(f"--drafter {name} drafts from what it learned: pass --drafter {name}:FOLDER (earlyexit "
                          f"run --drafter {name} fits one and names its folder)")


def load_drafter(registry, spec: str, backend) -> Drafter:
    """`--drafter NAME[:FOLDER]`: the registered drafter, read from FOLDER (one `run --drafter`
    cached, or `save_drafter` wrote); a drafter that needs fitting needs its folder."""
    check_drafter_spec(registry, spec)
    name, _, folder = spec.partition(":")
    cls = registry.drafter(name)
    if not folder:
        return cls(backend)
    path = os.path.join(folder, DRAFTER_CONFIG)
    try:
        with open(path) as handle:
            saved = json.load(handle)
        config = cls.Config(**saved["config"])
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as error:
        raise CorruptAdapterError(f"{path} is not a drafter's config ({error}); fit the drafter again") from None
    if saved.get("drafter") != name:
        raise ConfigError(f"--drafter {spec}: {folder} holds a {saved.get('drafter')!r} drafter, not {name!r}")
    drafter = cls(backend, config)
    drafter.load(folder)
    return drafter
