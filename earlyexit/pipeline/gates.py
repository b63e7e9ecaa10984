"""Step 2 of a run: the gates that decide before the head, for the strategy's exits and for the
untrained `confidence` exits it is compared with."""

from __future__ import annotations

import hashlib
import json
import os

from earlyexit.core.gates import LearnedGate, make_gate
from earlyexit.data.splits import load_split
from earlyexit.models import embedded
from earlyexit.models.adapters import backbone_fingerprint
from earlyexit.pipeline.context import RunContext
from earlyexit.pipeline.exits import exits_cache_folder
from earlyexit.pipeline.settings import RunSettings
from earlyexit.training.gates import train_gate
from earlyexit.util.ranks import barrier, process_group, shared_from_main


def confidence_like(registry, strategy, threshold: float = 0.9):
    """The untrained `confidence` exits at the strategy's exit layers."""
    cls = registry.strategy("confidence")
    return cls(strategy.backend, strategy.exit_layers, cls.Config(threshold=threshold))


def make_run_gate(settings: RunSettings, strategy, backend, train_split: str, log):
    """The gate `run` uses: cosine (nothing to train), or a learned gate trained on the exit
    training split for this strategy's exits and cached beside its adapter."""
    if settings.gate == "cosine":
        return make_gate("cosine", backend.text_config.hidden_size, len(strategy.exit_layers),
                         threshold=settings.gate_threshold if settings.gate_mode == "filter" else None,
                         mode=settings.gate_mode)
    recipe = {"exits": exits_cache_folder(settings, strategy, backbone_fingerprint(backend)), "gate": settings.gate,
              "version": 2}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:12]
    folder = os.path.join(embedded.cache_root(), "gates", f"{strategy.name}-{key}")
    rank, world = process_group()
    train = shared_from_main(not os.path.isdir(folder) or settings.retrain, world)  # rank 0 decides for all
    gate = None
    if train and rank == 0:  # rank 0 trains and saves it; the other ranks read what it saved
        log(f"gate: training a learned gate for {strategy.name} at layers {strategy.exit_layers}")
        gate = make_gate("learned", backend.text_config.hidden_size, len(strategy.exit_layers))
        report = train_gate(gate, backend, strategy, load_split(settings.data, train_split, settings.train_limit),
                            seed=settings.seed)
        log(f"gate: loss {report['loss']:.3f}; share of exits that agree with the final layer "
            + ", ".join(f"{k}: {p:.2f}" for k, p in zip(strategy.exit_layers, report["positives"])))
        gate.save(folder, extra={"strategy": strategy.name, "exit_layers": strategy.exit_layers})
    if train:
        barrier()
    gate = gate or LearnedGate.load(folder)
    gate.mode = settings.gate_mode
    if settings.gate_mode == "filter":
        gate.threshold = settings.gate_threshold
    gate.folder = folder  # the report says which cached gate it used
    return gate


def prepare_gates(run: RunContext) -> dict | None:
    """{"strategy": gate, "confidence": gate} when the run uses a gate, else None."""
    settings, strategy = run.settings, run.strategy
    if settings.gate != "none" and not strategy.accepts_gate:
        run.log(f"gate: none ({strategy.name}'s rule takes none: it decides without a read-out or needs every exit)")
    if settings.gate == "none" or not strategy.knob or not strategy.accepts_gate:
        return None
    with run.timed("train_gate_s"):
        return {name: make_run_gate(settings, candidate, run.backend, run.train_split, run.log)
                for name, candidate in (("strategy", strategy), ("confidence", confidence_like(run.registry, strategy)))}
