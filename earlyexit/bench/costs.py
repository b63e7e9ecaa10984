"""What a bench will cost before it starts: device-hours and peak memory per cell, totals per table.

Time comes from a short probe on the device at hand: a language model with one decoder layer,
random weights, the cell's width and dtype, is run at the cell's shapes, and hooks time the
layer and the head; a one-layer vision tower likewise. Each phase of a cell is then

    decode a batch   vision(B) + L x layer_prefill(R rows, prompt) + N x (L x layer_step(R) + head(R))
    decode a split   ceil(items / B) x decode a batch; R = B x beams, N = max new tokens
    test             2 x decode(test): the early-exit model and the full model (wall speed-up)
    calibration      a max-softmax rule that replays (greedy, catchup, no gate or a filter gate): the full
                     model's decode(dev), one teacher-forced pass over dev (costed as one more decode: an
                     upper bound) and 2 x decode(min(dev, CONFIRM_ROWS)), the two values confirmed; any
                     other rule: (grid values + 1) x decode(dev), every value decodes
    exit training    epochs x ceil(rows / B) x (3 x trainable forward) + one backbone pass over the rows
                     (the feature cache keeps it for later epochs; MuE and LeeBERT `joint` run the layer
                     copies every step: 3 x L x layer_prefill)
    VisDial          each round ranks 100 options in one batch: a prefill of 100 rows, no decoding

where layer_prefill(R, T) and the head are timed at T = prompt (+ target for training) positions.
On a CPU the probe runs in float32 on at most PROBE_TOKENS tokens and is scaled linearly in rows,
so its hours are CPU hours: GPU-hours need the probe on a GPU (`earlyexit bench SPEC --dry-run
--device cuda`). Beside it, `roofline_hours` gives an H100 figure from arithmetic and memory
traffic alone (ASSUMED_GPU: 40 % of bf16 dense peak, 70 % of HBM bandwidth), a stated assumption
rather than a measurement.

Data sizes are counted from the local files when they are there, else taken from KNOWN_SIZES
(the data sets' published split sizes). Peak memory is `models.estimate` for the cell's
training and decoding phases, whichever is larger.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time

from earlyexit.bench.runner import data_unavailable, hardware, plan, test_source
from earlyexit.core.strategy import Strategy
from earlyexit.data.splits import load_split, splits_for
from earlyexit.errors import EarlyExitError
from earlyexit.evaluation.calibrate import CONFIRM_ROWS
from earlyexit.models import estimate as est
from earlyexit.util.provenance import provenance

# Published split sizes, in the unit a run iterates: images for captioning (COCO Karpathy
# 113,287 / 5,000 / 5,000 with restval in train; NoCaps 4,500 val), questions for VQA (VQAv2
# 2.0, OK-VQA 1.1, GQA balanced, VizWiz 2020), rounds for VisDial 1.0 (10 per dialog).
KNOWN_SIZES = {
    "coco": {"train": 113_287, "val": 5_000, "test": 5_000},
    "nocaps": {"val": 4_500, "test": 10_600},
    "vqav2": {"train": 443_757, "val": 214_354, "test-dev": 107_394},
    "okvqa": {"train": 9_009, "val": 5_046},
    "gqa": {"train": 943_000, "val": 132_062, "testdev": 12_578},
    "vizwiz": {"train": 20_523, "val": 4_319},
    "visdial": {"train": 1_232_870, "val": 20_640},
}
CAPTIONS_PER_IMAGE = {"coco": 5, "nocaps": 10}  # every caption is an exit-training row
# Prompt text, training target and (VisDial) option lengths in tokens, besides the 32 query tokens.
PROMPT_TOKENS, TARGET_TOKENS = est.PROMPT_TOKENS, est.TARGET_TOKENS
model_config = est.model_config
TASKS = {"coco": "caption", "nocaps": "caption", "visdial": "dialog"}  # others: vqa
VISDIAL_OPTIONS = 100
PROBE_TOKENS = 512  # on a CPU, at most this many tokens per probe call (scaled linearly)
ASSUMED_GPU = {"name": "H100 SXM", "flops": 0.4 * 989e12, "bytes_per_s": 0.7 * 3.35e12}


@dataclasses.dataclass
class Probe:
    """Seconds on the probed device, each for the given rows (scale linearly in rows)."""

    device: str
    dtype: str
    layer_prefill: float  # one decoder layer over rows x positions
    head_prefill: float  # the LM head over the same
    layer_step: float  # one decoder layer, one new position per row, cache of `positions`
    head_step: float
    vision_image: float  # the whole vision tower, per image
    rows: int  # rows the prefill numbers were measured at
    step_rows: int


def split_size(data: str, split: str) -> tuple[int, str]:
    """(items, "local" or "published") of a split: counted from the files when present."""
    if not data_unavailable(data, (split,)):
        try:
            return len(load_split(data, split, None)), "local"
        except (EarlyExitError, OSError):
            pass
    name = data.partition(":")[0]
    base, _, part = split.partition(":")
    size = KNOWN_SIZES.get(name, {}).get(base)
    if size is None:
        return 0, "unknown"
    if part:
        start, stop = (float(x) for x in part.split("-"))
        size = round(size * (stop - start))
    return size, "published"


def _timed(module, record: list):
    """Hooks that add `module`'s forward seconds to record[0] (synchronising a GPU first)."""
    import torch

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def before(*_):
        sync()
        record.append(time.perf_counter())

    def after(*_):
        sync()
        record[0] += time.perf_counter() - record.pop()

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


def _one_layer(config, device: str, dtype: str):
    """The language model of `config` with one decoder (and encoder) layer, random weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    text = config.text_config.__class__(**{**config.text_config.to_dict(), "num_hidden_layers": 1, "num_layers": 1,
                                           "num_decoder_layers": 1})
    auto = AutoModelForSeq2SeqLM if text.is_encoder_decoder else AutoModelForCausalLM
    with torch.device(device):
        model = auto.from_config(text, dtype=getattr(torch, dtype)).eval()
    layers = [m for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)
              and name.split(".")[-2:] in (["decoder", "layers"], ["model", "layers"], ["decoder", "block"])]
    return model, layers[0][0], model.get_output_embeddings(), text


@functools.lru_cache(maxsize=32)
def probe(config_json: str, device: str, dtype: str, rows: int, positions: int, step_rows: int) -> Probe:
    """Time one decoder layer and the head at (rows, positions) and at one new position for
    `step_rows` rows with a cache of `positions`; the vision tower per image."""
    import torch
    from transformers import Blip2VisionConfig, Blip2VisionModel

    config = _config(config_json)
    if device == "cpu":  # CPU: float32 (its bf16 matmuls are not what a GPU does) and fewer rows
        dtype, rows, step_rows = "float32", max(1, min(rows, PROBE_TOKENS // positions)), min(step_rows, 64)
    model, layer, head, text = _one_layer(config, device, dtype)
    width = getattr(text, "hidden_size", None) or text.d_model
    layer_s, head_s = [0.0], [0.0]
    hooks = _timed(layer, layer_s) + _timed(head, head_s)
    kind = dict(dtype=getattr(torch, dtype), device=device)
    with torch.no_grad():
        def run(embeds, **extra):
            if text.is_encoder_decoder:  # the decoder's step; cross-attention over the prompt
                return model(inputs_embeds=embeds, decoder_inputs_embeds=embeds[:, -1:], use_cache=True, **extra)
            return model(inputs_embeds=embeds, use_cache=True, **extra)

        run(torch.randn(1, 8, width, **kind))  # warm-up: allocator, kernels
        layer_s[0] = head_s[0] = 0.0
        run(torch.randn(rows, positions, width, **kind))
        prefill = (layer_s[0], head_s[0])
        cache = run(torch.randn(step_rows, positions, width, **kind)).cache
        layer_s[0] = head_s[0] = 0.0
        if text.is_encoder_decoder:
            run(torch.randn(step_rows, positions, width, **kind))
        else:
            model(inputs_embeds=torch.randn(step_rows, 1, width, **kind), cache=cache, use_cache=True)
        step = (layer_s[0], head_s[0])
    for hook in hooks:
        hook.remove()
    # InstructBLIP's vision tower is BLIP-2's (EVA ViT-g), so one class times both
    vision = Blip2VisionConfig(**{**config.vision_config.to_dict(), "num_hidden_layers": 1})
    with torch.device(device):
        tower = Blip2VisionModel(vision).to(getattr(torch, dtype)).eval()
    images = 2 if device == "cpu" else 16
    pixels = torch.randn(images, 3, vision.image_size, vision.image_size, **kind)
    with torch.no_grad():
        tower(pixel_values=pixels)
        began = time.perf_counter()
        tower(pixel_values=pixels)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        vision_image = (time.perf_counter() - began) / images * config.vision_config.num_hidden_layers
    return Probe(device, dtype, prefill[0], prefill[1], step[0], step[1], vision_image, rows, step_rows)


@dataclasses.dataclass
class Work:
    """What a cell does, in the units the cost formulas take."""

    config_json: str  # the model's config, hashable (probes are cached on it)
    shape: est.Shape
    memory: est.Settings  # decoding; `training` adds the exit-training phase
    training: est.Settings | None
    sizes: dict  # phase -> [items, "local" / "published" / "unknown"]
    rows: int  # decoded (or, VisDial, ranked) at once
    dialog: bool
    epochs: float
    grid: int  # knob values calibration decodes (0: nothing to calibrate)
    calibration_items: int  # dev items decoded in all by calibration (module docstring)
    trainable_layers: int  # decoder layers that train (copies) or run per step (FREE's exit layers)
    trainable_heads: int  # read-outs that train (classifier exits) or run (FREE's exits)


@functools.lru_cache(maxsize=8)
def _shape(config_json: str) -> est.Shape:
    return est.model_shape(_config(config_json))


def _config(config_json: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(**json.loads(config_json))


def cell_work(cell, registry) -> Work | None:
    """The cell's shapes, sizes and phases, or None when its model's shape is unknown."""
    config = model_config(cell.settings["model"])
    if config is None:
        return None
    config_json = json.dumps({"model_type": config.model_type, **config.to_dict()}, default=str, sort_keys=True)
    s, shape, strategy, options = cell.settings, _shape(config_json), registry.strategy(cell.strategy), cell.options
    test_data, test_split = test_source(cell)
    task, train_task = TASKS.get(test_data.partition(":")[0], "vqa"), TASKS.get(cell.data.partition(":")[0], "vqa")
    train_split, dev_split, _ = splits_for(cell.data)
    sizes = {"train": split_size(cell.data, train_split), "dev": split_size(cell.data, dev_split),
             "test": split_size(test_data, test_split)}
    exits = len(s["exit_layers"] or strategy.default_exit_layers(shape.num_layers))
    dialog = task == "dialog"
    memory = est.Settings(strategy=cell.strategy, options=dict(options), exits=exits, dtype=s["dtype"] or "float32",
                          batch_size=s["batch_size"], num_beams=s["num_beams"], max_new_tokens=s["max_new_tokens"],
                          prompt_tokens=PROMPT_TOKENS[task], option_rows=VISDIAL_OPTIONS if dialog else 0)
    trains = strategy.training_modules is not Strategy.training_modules  # the class has modules to train
    train_rows = sizes["train"][0] * CAPTIONS_PER_IMAGE.get(cell.data.partition(":")[0], 1)
    training = dataclasses.replace(memory, train=True, train_items=train_rows, prompt_tokens=PROMPT_TOKENS[train_task],
                                   train_tokens=TARGET_TOKENS[train_task], option_rows=0) if trains else None
    copies = est.trains_layer_copies(cell.strategy, options)
    free = cell.strategy in est.OWN_ATTENTION
    grid = len(s["grid"] or strategy.knob_grid or ()) if strategy.knob else 0
    return Work(config_json, shape, memory, training, {k: list(v) for k, v in sizes.items()},
                VISDIAL_OPTIONS if dialog else s["batch_size"] * s["num_beams"], dialog,
                getattr(strategy.Config(**options), "epochs", None) or 3.0, grid,
                calibration_items(cell, strategy, grid, sizes["dev"][0], dialog, shape),
                shape.num_layers if copies else exits * free, 1 if copies else exits)


def calibration_items(cell, strategy, grid: int, dev: int, dialog: bool, shape) -> int:
    """Dev items calibration decodes: the replay's three passes and two confirmations where it
    applies (`evaluation.calibrate.replay_refusal` names the same conditions), else the grid."""
    s = cell.settings
    if not grid or s["threshold"] is not None:
        return 0
    replays = (strategy.knob_is_confidence and not dialog and s["num_beams"] == 1 and s["kv_policy"] == "catchup"
               and not (s["gate"] != "none" and s["gate_mode"] == "replace") and not shape.encoder_decoder)
    return 2 * dev + 2 * min(dev, CONFIRM_ROWS) if replays else (grid + 1) * dev


def probe_hours(work: Work, device: str) -> dict:
    """Hours per phase on `device`, from probes at the cell's shapes (module docstring)."""
    m, L = work.memory, work.shape.num_layers
    prompt = work.shape.query_tokens + m.prompt_tokens + (TARGET_TOKENS["dialog"] if work.dialog else 0)
    p = probe(work.config_json, device, m.dtype, work.rows, prompt, 1 if work.dialog else work.rows)
    prefill = (L * p.layer_prefill + p.head_prefill) * work.rows / p.rows
    if work.dialog:  # one prefill of the round's options, the image once
        per_item = p.vision_image + prefill
    else:
        step = (L * p.layer_step + p.head_step) * work.rows / p.step_rows
        per_item = (m.batch_size * p.vision_image + prefill + m.max_new_tokens * step) / m.batch_size
    hours = {"exit_training": 0.0, "calibration": work.calibration_items * per_item / 3600,
             "test": 2 * work.sizes["test"][0] * per_item / 3600}
    t = work.training
    if t is not None and t.train_items:
        q = probe(work.config_json, device, m.dtype, t.batch_size, work.shape.query_tokens + t.prompt_tokens
                  + t.train_tokens, 1)
        layer, head = q.layer_prefill * t.batch_size / q.rows, q.head_prefill * t.batch_size / q.rows
        steps = math.ceil(t.train_items / t.batch_size)
        backbone = steps * (t.batch_size * q.vision_image + L * layer + head)  # once: the feature cache keeps it
        trained = work.trainable_layers * layer + work.trainable_heads * head
        hours["exit_training"] = (backbone + work.epochs * steps * 3 * trained) / 3600  # forward + backward = 3x
    return hours


def roofline_hours(work: Work) -> float:
    """ASSUMED_GPU hours from arithmetic (2 x parameters per token; training 6 x for what trains)
    and, per decode step, max(its arithmetic, the weights and K/V read once) at ASSUMED_GPU."""
    gpu, m, shape = ASSUMED_GPU, work.memory, work.shape
    b, language = est.DTYPE_BYTES[m.dtype], shape.parameters["language"]
    vision = 2 * shape.parameters["vision"] * 257  # per image: 256 patches and the class token
    prompt = shape.query_tokens + m.prompt_tokens
    if work.dialog:
        per_item = (vision + 2 * language * work.rows * (prompt + TARGET_TOKENS["dialog"])) / gpu["flops"]
    else:
        step = max(2 * language * work.rows / gpu["flops"],
                   (language * b + est.kv_bytes(shape, work.rows, prompt, m.max_new_tokens, b)) / gpu["bytes_per_s"])
        prompt_pass = (vision + 2 * language * m.num_beams * prompt) / gpu["flops"]
        per_item = prompt_pass + m.max_new_tokens * step / m.batch_size
    seconds = per_item * (work.calibration_items + 2 * work.sizes["test"][0])
    t = work.training
    if t is not None:
        tokens = t.train_items * (shape.query_tokens + t.prompt_tokens + t.train_tokens)
        trained = work.trainable_layers * shape.layer_parameters + work.trainable_heads * shape.readout_parameters
        seconds += (tokens * 2 * language + work.epochs * tokens * 6 * trained + t.train_items * vision) / gpu["flops"]
    return seconds / 3600


def cell_cost(cell, registry, device: str | None = None) -> dict | None:
    """A cell's peak memory and roofline GPU-hours and, with a `device` to probe, its measured
    hours per phase there; None when its model's shape is unknown."""
    work = cell_work(cell, registry)
    if work is None:
        return None
    peak = max(est.estimate(work.shape, s)["total"] for s in (work.memory, work.training) if s is not None)
    cost = {"peak_bytes": peak, "roofline_gpu_hours": roofline_hours(work), "sizes": work.sizes}
    if device is not None:
        cost["phases"] = probe_hours(work, device)
        cost["hours"] = sum(cost["phases"].values())
    return cost


def plan_costs(spec, registry, device: str | None = None) -> dict:
    """Every distinct cell's cost and each table's totals (a cell shared by tables counts in each)."""
    work = plan(spec, registry)
    cells = {key: cell_cost(cell, registry, device) for key, cell in work.cells.items()}
    tables = {}
    for name, keys in work.tables.items():
        known = [cells[k] for k in dict.fromkeys(keys) if cells[k] is not None]
        totals = {"cells": len(set(keys)), "cells_without_cost": len(set(keys)) - len(known),
                  "roofline_gpu_hours": sum(c["roofline_gpu_hours"] for c in known),
                  "peak_bytes": max((c["peak_bytes"] for c in known), default=0)}
        if device is not None:
            totals["hours"] = sum(c["hours"] for c in known)
        tables[name] = totals
    return {"cells": cells, "tables": tables}


def cost_line(cost: dict | None, device: str | None, available: int | None = None) -> str:
    """One dry-run line for a cell (or a table's totals); flagged when its peak exceeds the
    `available` bytes of the probed device."""
    if cost is None:
        return "cost: unknown (no config.json for the model and not one of the paper's checkpoints)"
    measured = ""
    if "hours" in cost:
        unit = "GPU-h" if str(device).startswith("cuda") else f"{str(device).upper()}-h (not GPU-h)"
        phases = cost.get("phases")
        measured = f"{cost['hours']:.1f} {unit}" + (" (train {exit_training:.1f}, calibrate {calibration:.1f}, test "
                                                     "{test:.1f})".format(**phases) if phases else "") + ", "
    fits = "" if available is None or cost["peak_bytes"] <= available else (
        f" [does not fit the {available / est.GiB:.1f} GiB free on {device}]")
    return (f"cost: {measured}~{cost['roofline_gpu_hours']:.2f} {ASSUMED_GPU['name']}-h by roofline, "
            f"peak {cost['peak_bytes'] / est.GiB:.1f} GiB{fits}")


NOTE = ("hours are measured by a probe (one decoder layer, the head and one vision layer, random weights, at each "
        "cell's shapes) on the device named here and scaled by layer counts and data sizes; on a CPU they are CPU "
        "hours in float32 at reduced rows (scaled linearly), not GPU-hours: run the same command with --device cuda "
        "on a GPU for GPU-hours. roofline_gpu_hours is arithmetic and memory traffic at ASSUMED_GPU's achieved "
        "throughput, a lower bound that ignores launch overheads and Python (see docs/planning.md)")


def plan_report(spec, registry, device: str | None, command: str) -> dict:
    """The plan as a JSON-ready record: every cell's cost, table totals, assumptions, provenance."""
    load = os.getloadavg()  # a busy machine slows the probe: its timings say how busy this one was
    work, costs = plan(spec, registry), plan_costs(spec, registry, device)
    cells = {key: {"label": cell.label, "strategy": cell.strategy, "data": cell.data,
                   "tables": [t for t, keys in work.tables.items() if key in keys],
                   "settings": {k: cell.settings[k] for k in ("model", "dtype", "batch_size", "num_beams",
                                                             "max_new_tokens", "noise", "test_split")},
                   **(costs["cells"][key] or {"cost": "unknown"})} for key, cell in work.cells.items()}
    return {"command": command, "spec": spec.name, "probe_device": device, "note": NOTE,
            "assumptions": {"assumed_gpu": ASSUMED_GPU, "prompt_tokens": PROMPT_TOKENS, "target_tokens": TARGET_TOKENS,
                            "visdial_options": VISDIAL_OPTIONS, "captions_per_image": CAPTIONS_PER_IMAGE,
                            "known_sizes": KNOWN_SIZES, "probe_tokens_on_cpu": PROBE_TOKENS},
            "load_average_before": load, "load_average_after": os.getloadavg(), "tables": costs["tables"],
            "cells": cells, "provenance": provenance(), "hardware": hardware()}
