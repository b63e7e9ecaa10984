"""`earlyexit run`: train (if needed), calibrate, evaluate and report, in one command.

1. the backbone (default: the embedded `tiny`, built on first use);
2. exits: loaded from the adapter cache, or trained on the exit-training split and saved;
3. the threshold: given, or calibrated on the development split by the stated rule;
4. the test split: the full model, the strategy at the chosen threshold, and the untrained
   `confidence` exits at the same threshold, each with quality and the three speed-ups;
5. the per-exit accuracy of untrained versus trained exits (the paper's mid-crisis plot).
Splits follow the paper: exits train on 80 % of val and are tuned on the other 20 %.

VisDial (answer ranking, scored by MRR; `earlyexit.dialog`): its test split has no ground truth,
so everything comes from val, in three disjoint parts cut at dialog boundaries (no image is in
two of them): exits train on val's first 80 % (the round's dialog prompt and ground-truth
answer; FREE's distill mode uses no label loss), the knob is calibrated on the next 10 % by
MRR, and the last 10 % is scored. Nothing is generated, so ranking uses one beam and the
speculative row is skipped (both logged). With caption training data and `test_data` VisDial,
the exits train and calibrate on the captions and the same last 10 % of VisDial val is ranked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time

from earlyexit.core.gates import LearnedGate, make_gate
from earlyexit.core.generation import count_tokens, timed
from earlyexit.core.speculative import DEFAULT_DRAFT_LENGTH, DRAFT_LENGTHS, draft_vocabulary_of
from earlyexit.data.prompts import prompt_for
from earlyexit.data.splits import load_split, splits_for, test_split_of
from earlyexit.errors import ConfigError, CorruptAdapterError
from earlyexit.evaluation.calibrate import Knob, choose, cost_warning, main_metric, sweep, write_curve
from earlyexit.evaluation.common import RANKING_TAKES_NO_EXIT_VOCABULARY, EvalSettings
from earlyexit.evaluation.evaluate import evaluate
from earlyexit.evaluation.layer_accuracy import exit_accuracy, per_layer_accuracy
from earlyexit.models import embedded
from earlyexit.models.adapters import backbone_fingerprint, load_exits, save_exits
from earlyexit.models.loading import load_backend
from earlyexit.plugins.registry import notify
from earlyexit.training.deepspeed import init_distributed
from earlyexit.training.deepspeed_config import is_main_process, launched_world_size
from earlyexit.training.exits import backbone_captions, train_exits
from earlyexit.training.gates import train_gate
from earlyexit.util.files import atomic_write, save_figure
from earlyexit.util.provenance import provenance


@dataclasses.dataclass
class RunSettings:
    backend: str
    strategy: str
    model: str = embedded.NAME
    device: str | None = None  # cpu, cuda, cuda:N, mps (None: the CPU)
    dtype: str | None = None  # float32, bfloat16, float16 (None: float32)
    data: str = "scenes"
    exit_layers: list[int] | None = None
    options: dict = dataclasses.field(default_factory=dict)  # strategy config overrides
    threshold: float | None = None  # the strategy's knob value (threshold, entropy, patience, γ): skip calibration
    rule: str = "budget"
    budget: float = 0.01  # budget rule: allowed relative quality loss; risk rule: allowed risk δ
    epsilon: float = 0.1  # risk rule: the guarantee holds with probability 1 - epsilon
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
    compare_untrained: bool = True  # also score the untrained `confidence` exits at the same threshold
    test_data: str | None = None  # score on another data set (the paper: NoCaps val with exits from COCO)
    test_split: str | None = None  # and/or another split (default: the data set's test split)


def exits_cache_folder(settings: RunSettings, strategy, backbone_fingerprint: str) -> str:
    # version 2: exit states and the last layer's compared before the final norm (FREE's like-with-like fix);
    # version 3: frozen-backbone features cached across epochs (later epochs keep the first one's batches)
    recipe = {"version": 3, "strategy": strategy.name, "exit_layers": strategy.exit_layers, "data": settings.data,
              "train_limit": settings.train_limit, "seed": settings.seed,
              "config": {k: v for k, v in strategy.config.to_dict().items() if k != strategy.knob}}
    if settings.dtype not in (None, "float32"):  # exits trained in another precision are other exits
        recipe["dtype"] = settings.dtype
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(embedded.cache_root(), "exits", f"{settings.backend}-{backbone_fingerprint}-{strategy.name}-{key}")


def run(settings: RunSettings, registry, log=print) -> dict | None:

    check_settings(settings)  # the CLI checked already; callers of the API get the same one-line errors
    started = time.perf_counter()
    if launched_world_size() > 1:  # torchrun / deepspeed launcher: every rank trains, calibrates and

        init_distributed()
    main = is_main_process()
    if not main:
        log = lambda *args, **kwargs: None  # noqa: E731 - one voice for the whole run
    if main:
        notify(registry, "run_start", config=dataclasses.asdict(settings))

    def on_batch(stats):
        if main:
            notify(registry, "batch_stats", stats=stats)

    backend = load_backend(registry.backend(settings.backend), settings.model, device=settings.device,
                           dtype=settings.dtype)
    strategy_cls = registry.strategy(settings.strategy)
    config = strategy_cls.Config(**settings.options)
    exit_layers = settings.exit_layers or strategy_cls.default_exit_layers(backend.num_layers)
    strategy = strategy_cls(backend, exit_layers, config)
    if strategy.knob and not (settings.gate != "none" and settings.gate_mode == "replace" and strategy.accepts_gate):
        for value in [v for v in (settings.threshold, *(settings.grid or ())) if v is not None]:
            strategy.config_with_knob(strategy.config, value)  # refuses bad values before any training
    train_split, dev_split, _ = splits_for(settings.data)
    timings = {}

    if strategy.needs_training:
        folder = exits_cache_folder(settings, strategy, backbone_fingerprint(backend))
        cached = None
        if os.path.isdir(folder) and not settings.retrain:
            try:
                cached = load_exits(folder, backend, registry)
                log(f"exits: reusing {folder}")
            except CorruptAdapterError as error:  # a cache entry is ours to rebuild
                log(f"note: {error}; training them again")
        if cached is not None:
            strategy = cached
        else:
            log(f"exits: training {strategy.name} at layers {strategy.exit_layers} on {settings.data}/{train_split}")
            began = time.perf_counter()
            train_data = load_split(settings.data, train_split, settings.train_limit)
            work = folder + ".work"  # checkpoints: an interrupted training resumes from here
            train_exits(strategy, backend, train_data, work, seed=settings.seed, progress=settings.progress,
                        deepspeed_config=settings.deepspeed,
                        on_log=lambda step, losses: on_batch({"phase": "train_exits", "step": step, **losses}))
            if main:  # every rank holds the trained exits; rank 0 saves them
                save_exits(strategy, folder, backbone_name=settings.model)
                shutil.rmtree(work, ignore_errors=True)
            timings["train_exits_s"] = time.perf_counter() - began

    evaluation = EvalSettings(batch_size=settings.batch_size, num_beams=settings.num_beams,
                              max_new_tokens=settings.max_new_tokens, seed=settings.seed, progress=settings.progress)
    output = os.path.join(settings.output, f"{settings.backend}-{settings.strategy}")
    dev = load_split(settings.data, dev_split, settings.dev_limit)
    test = load_split(*test_split_of(settings), settings.test_limit)  # before the work: a missing split fails now
    ranking = "dialog" in (dev.task, test.task)
    if ranking and settings.num_beams > 1:
        log(f"note: VisDial is scored by ranking answer options, not by beam search: it ranks with one beam "
            f"(--num-beams {settings.num_beams} applies to the {dev.task} calibration only)"
            if dev.task != "dialog" else "note: VisDial is ranked with one beam (ranking decodes nothing)")
    if dev.task == "dialog":
        evaluation = dataclasses.replace(evaluation, num_beams=1)
    metric = main_metric(dev.task)
    gate = gates_for = None
    if settings.gate != "none" and not strategy.accepts_gate:
        log(f"gate: none ({strategy.name}'s rule takes none: it decides without a read-out or needs every exit)")
    if settings.gate != "none" and strategy.knob and strategy.accepts_gate:
        began = time.perf_counter()
        gates_for = {}
        for name, candidate in (("strategy", strategy), ("confidence", _confidence_like(registry, strategy))):
            gates_for[name] = make_run_gate(settings, candidate, backend, train_split, log)
        gate = gates_for["strategy"]
        timings["train_gate_s"] = time.perf_counter() - began
    knob = Knob(strategy, gate) if strategy.knob or gate is not None else None
    exit_vocabulary = vocabulary = None
    if settings.exit_vocabulary or (settings.draft_vocabulary and settings.speculative and not ranking):
        began = time.perf_counter()
        exit_vocabulary, vocabulary = run_vocabularies(backend, settings, train_split)
        timings["vocabulary_s"] = time.perf_counter() - began
        if exit_vocabulary is not None:
            log(f"exits read out {len(exit_vocabulary)} tokens (the backbone's most frequent on "
                f"{settings.data}/{train_split}; the final layer reads all {backend.language_model.lm_head.out_features})")
    calibration = None
    if settings.threshold is not None and knob is not None:
        knob.value = settings.threshold
    elif knob is not None:
        began = time.perf_counter()
        full_dev, points = sweep(backend, strategy, dev, evaluation, grid=settings.grid, kv_policy=settings.kv_policy,
                                 progress=settings.progress, gate=gate, measure_wall=settings.speed_target == "wall",
                                 exit_vocabulary=exit_vocabulary)
        chosen, why = choose(points, full_dev, settings.rule, settings.budget, speed=settings.speed_target,
                             epsilon=settings.epsilon, safest_first=knob.safest_first)
        knob.value = chosen.threshold
        csv_path, png_path = write_curve(points, full_dev, metric, output) if main else (None, None)
        warning = cost_warning(chosen, settings.speed_target)
        calibration = {"rule": settings.rule, "budget": settings.budget, "epsilon": settings.epsilon,
                       "speed_target": settings.speed_target, "warning": warning,
                       "why": why, "knob": knob.name, "threshold": chosen.threshold, "gate": settings.gate,
                       "full_quality": full_dev, "points": [dataclasses.asdict(p) for p in points],
                       "csv": csv_path, "png": png_path}
        timings["calibrate_s"] = time.perf_counter() - began
        log(f"calibration: {why}; curve in {csv_path} and {png_path}")
        if warning:
            log(warning)
    draft_exit = draft_choice = None
    if settings.speculative and ranking:
        log("note: no self-speculative row: VisDial is scored by ranking answer options, nothing is decoded")
    elif settings.speculative:
        vocabulary = vocabulary if vocabulary is not None else exit_vocabulary
        if vocabulary is not None:
            log(f"speculative: drafts read out {len(vocabulary)} tokens (the backbone's most frequent on "
                f"{settings.data}/{train_split})")
        draft_exit, draft_length, draft_choice = choose_draft_exit(backend, strategy, dev, evaluation, settings, log,
                                                                   vocabulary)

    began = time.perf_counter()
    if test.task == "dialog":
        evaluation = dataclasses.replace(evaluation, num_beams=1)
    threshold = knob.value if knob is not None else None
    label = settings.strategy + (f" + {settings.gate} gate" if gate is not None else "")
    if settings.noise:
        evaluation = dataclasses.replace(evaluation, noise=settings.noise)
    results = {"full": evaluate(backend, None, test, evaluation, kv_policy=settings.kv_policy, on_batch=on_batch)}
    results[label] = evaluate(backend, strategy, test, evaluation, kv_policy=settings.kv_policy, gate=gate,
                              exit_vocabulary=exit_vocabulary, on_batch=on_batch)
    if settings.compare_untrained and threshold is not None and (strategy.knob_is_confidence or knob.on_gate):
        # the same threshold on untrained exits
        confidence = _confidence_like(registry, strategy, threshold if strategy.knob_is_confidence else 0.9)
        if settings.strategy != "confidence":
            results["confidence"] = evaluate(backend, confidence, test, evaluation, kv_policy=settings.kv_policy,
                                             exit_vocabulary=exit_vocabulary)
        if gates_for is not None:
            if gate.mode == "replace":
                gates_for["confidence"].threshold = threshold
            name = f"confidence + {settings.gate} gate"
            if name != label:
                results[name] = evaluate(backend, confidence, test, evaluation, kv_policy=settings.kv_policy,
                                         gate=gates_for["confidence"], exit_vocabulary=exit_vocabulary)
    if draft_exit is not None:
        results[f"{settings.strategy} speculative"] = evaluate(
            backend, strategy, test, dataclasses.replace(evaluation, num_beams=1), kv_policy="catchup",
            decode="speculative", draft_exit=draft_exit, draft_length=draft_length,
            draft_vocabulary=vocabulary)
    timings["evaluate_s"] = time.perf_counter() - began

    mid_crisis = None
    if strategy.needs_training and dev.task == "caption":
        mid_crisis = mid_crisis_report(backend, strategy, dev, output) if main else None

    timings["total_s"] = time.perf_counter() - started
    if not main:
        return None
    notify(registry, "run_end", config=dataclasses.asdict(settings),
           results={name: {"quality": r["quality"], "speed": {k: v for k, v in r["speed"].items() if k != "wall"}}
                    for name, r in results.items()})
    return {"settings": dataclasses.asdict(settings), "threshold": threshold,
            "knob": knob.name if knob is not None else None, "parameters": strategy.parameter_counts(),
            "strategy_label": label, "draft_exit_layer": strategy.exit_layers[draft_exit] if draft_exit is not None
            else None, "draft_choice": draft_choice,
            "exit_layers": strategy.exit_layers, "strategy_config": strategy.config.to_dict(),
            "calibration": calibration, "results": results, "mid_crisis": mid_crisis, "timings": timings,
            "gate_folder": getattr(gate, "folder", None),
            "exit_vocabulary": exit_vocabulary.tolist() if exit_vocabulary is not None else None,
            "num_layers": backend.num_layers, "output": output, "provenance": provenance(),
            "tokenizer": backend.processor.tokenizer}


def _confidence_like(registry, strategy, threshold: float = 0.9):
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
    if os.path.isdir(folder) and not settings.retrain:
        gate = LearnedGate.load(folder)
    else:
        log(f"gate: training a learned gate for {strategy.name} at layers {strategy.exit_layers}")
        gate = make_gate("learned", backend.text_config.hidden_size, len(strategy.exit_layers))
        report = train_gate(gate, backend, strategy, load_split(settings.data, train_split, settings.train_limit),
                            seed=settings.seed)
        log(f"gate: loss {report['loss']:.3f}; share of exits that agree with the final layer "
            + ", ".join(f"{k}: {p:.2f}" for k, p in zip(strategy.exit_layers, report["positives"])))
        if is_main_process():  # every rank trained the same gate (same data and seed); one saves it
            gate.save(folder, extra={"strategy": strategy.name, "exit_layers": strategy.exit_layers})
    gate.mode = settings.gate_mode
    if settings.gate_mode == "filter":
        gate.threshold = settings.gate_threshold
    gate.folder = folder  # the report says which cached gate it used
    return gate


def backbone_vocabularies(backend, data: str, split: str, sizes, limit: int = 200, batch_size: int = 32,
                          progress: bool = True, max_new_tokens: int = 20) -> tuple:
    """For each of `sizes` (None or 0: None), that many tokens the backbone itself writes most
    often on (up to `limit` samples of) `data`/`split`: what exits or drafts read out over."""
    outputs = backbone_captions(backend, load_split(data, split, limit), batch_size=batch_size, progress=progress,
                                max_new_tokens=max_new_tokens)
    texts = [t for written in outputs.values() for t in written]
    return tuple(draft_vocabulary_of(backend, texts, size) if size else None for size in sizes)


def run_vocabularies(backend, settings: RunSettings, train_split: str):
    """(exit vocabulary, draft vocabulary), each None unless its size is set, from up to 200
    samples of the exit-training split: never the test split."""
    return backbone_vocabularies(backend, settings.data, train_split,
                                 (settings.exit_vocabulary, settings.draft_vocabulary),
                                 limit=min(settings.train_limit or 200, 200), batch_size=settings.batch_size,
                                 progress=settings.progress, max_new_tokens=settings.max_new_tokens)


def choose_draft_exit(backend, strategy, dev, evaluation, settings: RunSettings, log, vocabulary=None):
    """(exit index that drafts in speculative mode, draft length, what the choice saw). What is not
    given is chosen by tokens/s on (part of) the dev split, timed beside plain decoding of the same
    rows one at a time (what speculative decoding is compared with): first the exit at the given
    (or default) length, then the length at that exit. When no choice drafts faster than plain
    decoding, the log says so: the row is still reported, but it is slower here."""
    given_exit = None
    if settings.draft_exit is not None:
        if settings.draft_exit not in strategy.exit_layers:
            raise ConfigError(f"--draft-exit {settings.draft_exit} is not one of the exit layers {strategy.exit_layers}")
        given_exit = strategy.exit_layers.index(settings.draft_exit)
        if settings.draft_length is not None:
            return given_exit, settings.draft_length, None
    probe = dataclasses.replace(evaluation, num_beams=1, progress=False, quick_metrics=True, measure_wall=False)
    sample = dev.subset(min(len(dev), 40))
    plain = plain_tokens_per_s(backend, sample, evaluation.max_new_tokens)

    def tokens_per_s(e: int, length: int) -> float:
        result = evaluate(backend, strategy, sample, probe, kv_policy="catchup", decode="speculative", draft_exit=e,
                          draft_length=length, draft_vocabulary=vocabulary)
        return result["speed"]["wall"]["early_exit"]["tokens_per_s"]

    length = settings.draft_length or DEFAULT_DRAFT_LENGTH
    by_exit = {}
    if given_exit is None:
        by_exit = {e: tokens_per_s(e, length) for e in range(len(strategy.exit_layers))}
        best = max(by_exit, key=lambda e: (by_exit[e], -e))  # ties: the shallower exit
        log("speculative: tokens/s on dev by draft exit " + ", ".join(
            f"{strategy.exit_layers[e]}: {v:.1f}" for e, v in by_exit.items()) + f" ({length} drafts a round)")
    else:
        best = given_exit
    by_length = {}
    if settings.draft_length is None:
        by_length = {k: (by_exit[best] if k == length and best in by_exit else tokens_per_s(best, k))
                     for k in DRAFT_LENGTHS}
        length = max(by_length, key=lambda k: (by_length[k], -k))
        log(f"speculative: tokens/s on dev at exit {strategy.exit_layers[best]} by draft length " +
            ", ".join(f"{k}: {v:.1f}" for k, v in by_length.items()))
    speed = by_length.get(length, by_exit.get(best))
    log(f"speculative: drafting {length} a round at {strategy.exit_layers[best]} (plain decoding, one row at a "
        f"time: {plain:.1f} tokens/s)")
    if speed <= plain:
        hint = "better exits" + ("" if vocabulary is not None else " or a draft vocabulary (--draft-vocabulary)")
        log(f"note: speculative decoding is slower than plain decoding on dev at every exit and length tried (best "
            f"{speed / plain:.2f}x); its row is reported, but it does not pay here: {hint} may help")
    return best, length, {"dev_tokens_per_s": {strategy.exit_layers[e]: v for e, v in by_exit.items()},
                          "dev_tokens_per_s_by_length": by_length, "draft_length": length,
                          "dev_plain_tokens_per_s": plain, "dev_speedup": speed / plain if plain else None}


def plain_tokens_per_s(backend, dataset, max_new_tokens: int) -> float:
    """Greedy plain decoding of each sample alone (batch 1), as speculative decoding runs."""
    import torch


    eos = backend.language_model.generation_config.eos_token_id
    seconds = tokens = 0
    for sample in dataset:
        inputs = backend.prepare_inputs([sample.load_image()], [prompt_for(sample, dataset.task)])
        with torch.no_grad():
            sequences, spent, _ = timed(backend.plain_generate, inputs,
                                         {"max_new_tokens": max_new_tokens, "do_sample": False})
        seconds += spent
        tokens += count_tokens(sequences, inputs["input_ids"].shape[1], eos)
    return tokens / seconds if seconds else float("nan")


def mid_crisis_report(backend, strategy, dataset, folder: str, limit: int = 100) -> dict:
    """Per-exit teacher-forced accuracy: untrained (shared head) versus the strategy's exits."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    untrained = per_layer_accuracy(backend, dataset, limit=limit)
    trained = exit_accuracy(backend, strategy, dataset, limit=limit)
    os.makedirs(folder, exist_ok=True)
    csv_path, png_path = os.path.join(folder, "mid_crisis.csv"), os.path.join(folder, "mid_crisis.png")
    with atomic_write(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["layer", "untrained_accuracy", f"{strategy.name}_accuracy"])
        for row in untrained:
            writer.writerow([row["layer"], row["accuracy"], trained.get(row["layer"], "")])
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot([r["layer"] for r in untrained], [r["accuracy"] for r in untrained], "o-",
              label="untrained exits (shared head)")
    axis.plot(list(trained), list(trained.values()), "s-", label=f"{strategy.name} exits")
    axis.set_xlabel("exit layer")
    axis.set_ylabel("next-token accuracy (teacher forced)")
    axis.set_title("per-exit accuracy on the dev split")
    axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, png_path)
    plt.close(figure)
    return {"untrained": {r["layer"]: r["accuracy"] for r in untrained}, "trained": trained,
            "csv": csv_path, "png": png_path}


def check_settings(settings: RunSettings) -> None:
    if settings.threshold is not None and not 0 <= settings.threshold:  # NaN fails too
        raise ConfigError(f"--threshold {settings.threshold}: the threshold must be >= 0, e.g. --threshold 0.8")
    if not 0 < settings.epsilon < 1:
        raise ConfigError(f"--epsilon is a probability in (0, 1), e.g. 0.1 (got {settings.epsilon})")
    if not 0 <= settings.budget < 1:
        raise ConfigError(f"--budget is a fraction of the full model's quality, e.g. 0.02 (got {settings.budget})")
    if settings.grid is not None and not settings.grid:
        raise ConfigError("the calibration grid is empty; pass values such as --grid 0.5,0.7,0.9")
    if settings.exit_vocabulary and "visdial" in (settings.data.partition(":")[0],
                                                  (settings.test_data or "").partition(":")[0]):
        raise ConfigError(RANKING_TAKES_NO_EXIT_VOCABULARY)  # before any exit is trained
    for flag, size in (("draft", settings.draft_vocabulary), ("exit", settings.exit_vocabulary)):
        if size is not None and size < 1:
            raise ConfigError(f"--{flag}-vocabulary is a number of tokens, e.g. 1024 (got {size})")
