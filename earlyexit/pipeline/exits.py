"""Step 1 of a run: the backbone, the strategy, and its exits (from the adapter cache, or trained
on the exit-training split and saved there)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil

from earlyexit.data.splits import load_split, splits_for
from earlyexit.errors import ConfigError, CorruptAdapterError
from earlyexit.models import embedded
from earlyexit.models.adapters import backbone_fingerprint, load_exits, save_exits
from earlyexit.models.loading import load_backend
from earlyexit.pipeline.context import RunContext
from earlyexit.pipeline.settings import RunSettings
from earlyexit.training.exits import interrupted_training, train_exits
from earlyexit.util.ranks import barrier, main_first, process_group, shared_from_main


def exits_cache_folder(settings: RunSettings, strategy, backbone_fingerprint: str) -> str:
    """Where the trained exits of this strategy, backbone and training data are cached."""
    # version 2: exit states and the last layer's compared before the final norm (FREE's like-with-like fix);
    # version 3: frozen-backbone features cached across epochs (later epochs keep the first one's batches)
    recipe = {"version": 3, "strategy": strategy.name, "exit_layers": strategy.exit_layers, "data": settings.data,
              "train_limit": settings.train_limit, "seed": settings.seed,
              "config": {k: v for k, v in strategy.config.to_dict().items() if k != strategy.knob}}
    if settings.dtype not in (None, "float32"):  # exits trained in another precision are other exits
        recipe["dtype"] = settings.dtype
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(embedded.cache_root(), "exits", f"{settings.backend}-{backbone_fingerprint}-{strategy.name}-{key}")


def load_models(run: RunContext) -> None:
    """The backbone and an untrained strategy at its exit layers; every knob value the run will
    try is checked against the strategy's config before any training."""
    settings = run.settings
    refuse_building_under_torchrun(settings.model)
    # an embedded model: rank 0 loads first (it repairs a damaged build), the others then read it;
    # any other model loads on every rank at once
    with main_first() if settings.model in embedded.MODELS else contextlib.nullcontext():
        run.backend = load_backend(run.registry.backend(settings.backend), settings.model, device=settings.device,
                                   dtype=settings.dtype)
    strategy_cls = run.registry.strategy(settings.strategy)
    config = strategy_cls.Config(**settings.options)
    exit_layers = settings.exit_layers or strategy_cls.default_exit_layers(run.backend.num_layers)
    run.strategy = strategy = strategy_cls(run.backend, exit_layers, config)
    if strategy.knob and not (settings.gate != "none" and settings.gate_mode == "replace" and strategy.accepts_gate):
        for value in [v for v in (settings.threshold, *(settings.grid or ())) if v is not None]:
            strategy.config_with_knob(strategy.config, value)  # refuses bad values before any training
    run.train_split = splits_for(settings.data)[0]


def refuse_building_under_torchrun(model: str) -> None:
    """An embedded model built inside a multi-process run would keep every other rank waiting at
    a barrier for the whole build (and past the collectives' timeout): build it first."""
    if model in embedded.MODELS and process_group()[1] > 1 and not embedded.is_built(embedded.recipe_of(model)):
        raise ConfigError(f"the embedded model {model} is not built yet; build it once in one process "
                          f"(earlyexit build-{model}), then launch torchrun")


def prepare_exits(run: RunContext) -> None:
    """The strategy's trained exits: reused from the cache, else trained and saved (rank 0 saves)."""
    settings, strategy = run.settings, run.strategy
    if not strategy.needs_training:
        return
    folder = exits_cache_folder(settings, strategy, backbone_fingerprint(run.backend))
    work = folder + ".work"  # checkpoints: an interrupted training resumes from here
    world = process_group()[1]
    if shared_from_main(os.path.isdir(folder) and not settings.retrain, world):  # rank 0 decides for all
        try:
            run.strategy = load_exits(folder, run.backend, run.registry)
            run.log(f"exits: reusing {folder}")
            if os.path.isdir(work) and run.main:  # an interrupted --retrain's: this run trains nothing
                shutil.rmtree(work, ignore_errors=True)
                run.log(f"note: removed {work}, left by an interrupted --retrain; the cached exits are used (pass "
                        "--retrain to train them again)")
            return
        except CorruptAdapterError as error:  # a cache entry is ours to rebuild (every rank reads the same files)
            run.log(f"note: {error}; training them again")
    run.log(f"exits: training {strategy.name} at layers {strategy.exit_layers} on {settings.data}/{run.train_split}")
    with run.timed("train_exits_s"):
        with main_first():  # rank 0 writes what a first load caches; the others then read it
            train_data = load_split(settings.data, run.train_split, settings.train_limit)
        train_exits(strategy, run.backend, train_data, work, seed=settings.seed, progress=settings.progress,
                    deepspeed_config=settings.deepspeed,
                    on_log=lambda step, losses: run.on_batch({"phase": "train_exits", "step": step, **losses}),
                    before_training=lambda config, world_size: resume_or_remove(run, work, config, world_size))
        barrier()  # every rank is done with the checkpoints in `work`
        if run.main:  # every rank holds the trained exits (data parallel: the same); rank 0 saves them
            save_exits(strategy, folder, backbone_name=settings.model)
            shutil.rmtree(work, ignore_errors=True)
        barrier()  # the saved exits exist before any rank goes on


def resume_or_remove(run: RunContext, work: str, config, world_size: int) -> None:
    """What an interrupted training left in `work`: resumed when its checkpoint fits this
    training, else removed (rank 0 removes, before any rank resumes); a `note:` line says which."""
    verdict, detail = interrupted_training(work, config, world_size)
    what = "retrain" if run.settings.retrain else "exit training"
    if verdict == "resume":
        run.log(f"note: resuming the interrupted {what} {detail} ({work})")
    elif verdict == "stale":
        if run.main:
            shutil.rmtree(work, ignore_errors=True)
        run.log(f"note: removed {work}, left by an interrupted {what}: {detail}; training from the start")
    barrier()  # every rank judged `work` before any writes to it
