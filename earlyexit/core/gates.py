"""Exit gates: decide on the hidden state, before any exit module or LM head runs.

A gate replaces a strategy's own rule at its exits; the strategy still supplies the exit's
module and read-out, which then run only for the rows that leave. Two gates:

- `learned` (CALM's learned classifier, Schuster et al. 2022): per exit, a layer norm and a
  linear scorer (or a small MLP) on the exit's hidden state, trained with the backbone and
  the exits frozen to predict that the exit's token equals the final layer's. It reads the
  state *before* the exit module, so for FREE the exit transformer runs only for leavers.
  Trained in seconds inside `earlyexit run`; saved as safetensors + JSON like an adapter.
- `cosine` (zero parameters): leave when the cosine similarity of the hidden states after the
  exit layer and one layer earlier reaches the threshold (the residual stream has settled).

A row passes when its score reaches `threshold` (a probability for `learned`, a cosine for
`cosine`); a threshold above the score's range never fires. `mode` says what passing means:
`replace` (the row leaves) or `filter` (the row is a candidate: the strategy's own rule then
runs for the candidates alone and decides; quality is never below the rule's at the same
threshold, and rows the gate turns away skip the exit module and read-out).
"""

from __future__ import annotations

import json
import math
import os

import torch

from earlyexit.core.choices import GATE_MODES, GATES
from earlyexit.core.validation import gate_threshold_problem
from earlyexit.errors import CheckpointError, ConfigError
from earlyexit.util.files import atomic_folder

COSINE_GRID = (0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


class LearnedGate(torch.nn.Module):
    kind = "learned"

    def __init__(self, width: int, num_exits: int, hidden: int = 0, threshold: float = 0.9, mode: str = "replace"):
        super().__init__()
        self.mode = check_mode(mode)
        self.width, self.hidden_units = width, hidden
        self.scorers = torch.nn.ModuleList(self._scorer(width, hidden) for _ in range(num_exits))
        self.threshold = threshold

    @staticmethod
    def _scorer(width: int, hidden: int) -> torch.nn.Module:
        if hidden:
            return torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, hidden), torch.nn.GELU(),
                                       torch.nn.Linear(hidden, 1))
        return torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, 1))

    def score(self, exit_index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid score that the exit's token equals the final layer's (in the gate's own
        dtype: trained in float32, moved to the model's by the early-exit model)."""
        scorer = self.scorers[exit_index]
        return scorer(hidden.to(scorer[-1].weight.dtype)).squeeze(-1)

    def decide(self, exit_index: int, view) -> torch.Tensor | bool:
        """Which rows pass (bool per row), or a bool for every row where the threshold alone
        says (the engine then reads nothing back from the device)."""
        if self.threshold >= 1.0:
            return False
        if self.threshold <= 0.0:
            return True
        # sigmoid(s) >= p  <=>  s >= logit(p): no sigmoid in the hot path
        return self.score(exit_index, view.hidden) >= math.log(self.threshold / (1 - self.threshold))

    def param_count(self, exit_index: int) -> int:
        return sum(p.numel() for p in self.scorers[exit_index].parameters())

    # -- saving, adapter style -------------------------------------------------------------
    def save(self, folder: str, extra: dict | None = None) -> None:
        from safetensors.torch import save_file


        with atomic_folder(folder) as temporary:
            save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()},
                      os.path.join(temporary, "gate.safetensors"))
            with open(os.path.join(temporary, "gate_config.json"), "w") as handle:
                json.dump({"kind": self.kind, "width": self.width, "hidden": self.hidden_units, "mode": self.mode,
                           "exits": len(self.scorers), "threshold": self.threshold, **(extra or {})}, handle, indent=2)

    @classmethod
    def load(cls, folder: str) -> LearnedGate:
        from safetensors.torch import load_file

        try:
            with open(os.path.join(folder, "gate_config.json")) as handle:
                config = json.load(handle)
            gate = cls(config["width"], config["exits"], config["hidden"], config["threshold"],
                       config.get("mode", "replace"))
            gate.load_state_dict(load_file(os.path.join(folder, "gate.safetensors")))
        except (OSError, KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{folder} does not hold a readable learned gate ({error}); train it again") from error
        problem = gate_threshold_problem("learned", config["threshold"])
        if problem:
            raise CheckpointError(f"{folder}/gate_config.json: threshold = {config['threshold']!r}: {problem}; "
                                  "fix it or train the gate again")
        return gate.eval()


class CosineGate:
    kind = "cosine"

    def __init__(self, threshold: float = 0.99, mode: str = "replace"):
        self.threshold = threshold
        self.mode = check_mode(mode)

    def decide(self, exit_index: int, view) -> torch.Tensor | bool:
        if view.previous is None:  # no layer before: nothing to compare, nobody passes
            return False
        similarity = torch.nn.functional.cosine_similarity(view.hidden.float(), view.previous.float(), dim=-1)
        return similarity >= self.threshold

    def param_count(self, exit_index: int) -> int:
        return 0

    def to(self, *args, **kwargs):  # nothing to move
        return self


def check_mode(mode: str) -> str:
    if mode not in GATE_MODES:
        raise ConfigError(f"gate mode must be one of {', '.join(GATE_MODES)} (got {mode!r})")
    return mode


def check_threshold(kind: str, threshold: float | None) -> None:
    """A learned gate's threshold is a probability, a cosine gate's a cosine; NaN never is (it
    would silently turn the gate off, since every comparison with it is false)."""
    problem = gate_threshold_problem(kind, threshold)
    if problem:
        raise ConfigError(f"gate threshold {threshold}: a {kind} gate's threshold {problem}")


def make_gate(kind: str, width: int, num_exits: int, threshold: float | None = None, hidden: int = 0,
              mode: str = "replace"):
    check_threshold(kind, threshold)
    if kind == "learned":
        return LearnedGate(width, num_exits, hidden, 0.9 if threshold is None else threshold, mode)
    if kind == "cosine":
        return CosineGate(0.99 if threshold is None else threshold, mode)
    raise ConfigError(f"unknown gate {kind!r}; choose one of {', '.join(GATES)} (or none)")


