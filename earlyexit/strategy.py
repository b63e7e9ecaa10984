"""The Strategy contract: one exit method (when a token may leave, and what it emits).

Strategy classes are plain Python (no torch at import time) so `earlyexit list` stays instant;
their methods import torch where they need it. The engine (`earlyexit.engine`) calls a strategy
directly at every exit point; nothing goes through pluggy in that hot path.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .backend import Backend
    from .engine import StepContext


@dataclasses.dataclass
class StrategyConfig:
    """Base of every strategy's config. Subclasses add fields with `help` metadata and
    validate them in `__post_init__` (raise `ConfigError` with a fix-it message)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_field(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field that carries its help text (shown by the CLI)."""
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


class Strategy:
    """One exit method.

    Subclasses set `name`, `description`, `Config`, and implement `exit_logits` and `should_exit`.
    A strategy instance is bound to one backend and one list of exit layers.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    needs_training: ClassVar[bool] = False

    def __init__(self, backend: Backend, exit_layers: list[int], config: StrategyConfig | None = None):
        self.backend = backend
        self.config = config if config is not None else self.Config()
        self.exit_layers = self.validate_exit_layers(exit_layers, backend.num_layers)

    @classmethod
    def default_exit_layers(cls, num_layers: int) -> list[int]:
        """Exits used when none are given: after each quarter of the depth."""
        return sorted({max(1, round(num_layers * q / 4)) for q in (1, 2, 3)} - {num_layers})

    @staticmethod
    def validate_exit_layers(exit_layers: list[int], num_layers: int) -> list[int]:
        """Exit layer `k` means "after the k-th decoder layer" (1-based); the last layer is not an exit."""
        layers = sorted(set(int(k) for k in exit_layers))
        bad = [k for k in layers if not 1 <= k < num_layers]
        if bad:
            raise ConfigError(
                f"exit layers {bad} are out of range: this model has {num_layers} decoder layers, "
                f"so exits must lie in 1..{num_layers - 1}"
            )
        if not layers:
            raise ConfigError("no exit layers given; pass e.g. --exit-layers 3,6,9")
        return layers

    # -- modules -----------------------------------------------------------------------------
    def exit_modules(self) -> torch.nn.Module | None:
        """The trainable modules this strategy adds (saved as an adapter), or None."""
        return None

    def exit_module_layer_cost(self, exit_index: int) -> float:
        """Cost of evaluating exit `exit_index`'s own module (not its head), in decoder-layer
        equivalents (FREE's exit transformer costs 1)."""
        return 0.0

    def uses_head(self, exit_index: int) -> bool:
        """Whether deciding at this exit evaluates the LM head (for cost accounting)."""
        return True

    # -- inference ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Called at the start of every generation. Per-row state belongs in `StepContext.state`
        (it follows beam reordering), not on the strategy object."""

    def exit_attention_layer(self, exit_index: int) -> torch.nn.Module | None:
        """A decoder layer of the backbone's kind run on the hidden states at this exit before
        its classifier (FREE's exit transformer), or None. The engine gives it its own cache
        slot, kept under the same kv policy as the backbone layers."""
        return None

    def exit_logits(self, exit_index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (rows, vocab) for the newest position from its hidden state (rows, width)
        after decoder layer `self.exit_layers[exit_index]`."""
        raise NotImplementedError

    def should_exit(self, exit_index: int, logits: torch.Tensor, hidden: torch.Tensor,
                    context: StepContext) -> torch.Tensor:
        """Boolean (rows,): which rows are confident enough to leave at this exit. `context.step`
        is the index of the token being generated (0 for the first); `context.state` holds
        per-row tensors that follow beam reordering."""
        raise NotImplementedError
