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

from earlyexit.core.strategy import StrategyConfig, config_field
from earlyexit.core.validation import check_config_fields
from earlyexit.errors import ConfigError

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
    first one included) and, for drafters that ask (`Drafter.wants_hidden`), the final layer's
    state at the last verified position."""

    tokens: list[int]
    hidden: torch.Tensor | None = None


class Drafter:
    """Base class of every drafter. Subclasses set `name`, `description` and `Config`, and
    implement `fit` (when `needs_fitting`), `propose`, `save` and `load`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type[DrafterConfig]] = DrafterConfig
    needs_fitting: ClassVar[bool] = True  # learns from the backbone's own outputs before it drafts
    uses_exits: ClassVar[bool] = False  # drafts with the strategy's exits inside the engine (`exit`)
    wants_hidden: ClassVar[bool] = False  # `DraftContext.hidden` is filled for it

    def __init__(self, backend: Backend, config: DrafterConfig | None = None):
        self.backend = backend
        self.config = config if config is not None else self.Config()

    # -- building ---------------------------------------------------------------------------
    def fit(self, outputs: list[list[int]], log=print) -> None:
        """Learn from `outputs`, the backbone's own greedy tokens on the exit-training split."""
        raise NotImplementedError

    def save(self, folder: str) -> None:
        """Write what `fit` learned into `folder` (an empty folder the caller made)."""
        raise NotImplementedError

    def load(self, folder: str) -> None:
        """Read back what `save` wrote."""
        raise NotImplementedError

    def recipe(self) -> dict[str, Any]:
        """What makes two fits of this drafter the same (its cache key): the config, by default."""
        return {"drafter": self.name, "config": self.config.to_dict()}

    # -- drafting ---------------------------------------------------------------------------
    def start(self) -> None:
        """A new sequence begins (drafters with per-sequence state reset it here)."""

    def propose(self, context: DraftContext, count: int) -> list[int]:
        """Up to `count` tokens to follow `context.tokens`; fewer (or none) where the drafter is
        not confident enough (`config.stop_below`)."""
        raise NotImplementedError
