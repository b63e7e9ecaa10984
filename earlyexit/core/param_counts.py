"""Parameters each strategy trains and adds at inference, for a loaded backbone.

The paper's claim to check: FREE's exit transformers need about half the trainable parameters
of vocabulary-classifier exits (DeeBERT, PABEE, LeeBERT) on its models, where a decoder layer
(~12·d² weights) is smaller than an LM head (d·V). Counting needs no weights: a backbone built
on the `meta` device gives the same numbers as the real checkpoint.
"""

from __future__ import annotations

from earlyexit.errors import ConfigError


def strategy_parameter_counts(registry, backend, exit_layers: list[int] | None = None) -> list[dict]:
    """One row per registered strategy: its exits, trainable and inference-time parameters, and
    the backbone's own size for scale (rows for strategies that refuse these exits say why)."""
    backbone = sum(p.numel() for p in backend.model.parameters())
    rows = []
    for name in registry.names("strategy"):
        cls = registry.strategy(name)
        layers = exit_layers or cls.default_exit_layers(backend.num_layers)
        try:
            strategy = cls(backend, layers)
        except ConfigError as error:
            rows.append({"strategy": name, "exit_layers": layers, "error": str(error)})
            continue
        counts = strategy.parameter_counts()
        rows.append({"strategy": name, "exit_layers": strategy.exit_layers, "knob": cls.knob, **counts,
                     "trainable_share_of_backbone": counts["trainable"] / backbone, "backbone": backbone})
    return rows
