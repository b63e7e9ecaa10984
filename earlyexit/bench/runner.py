"""Running a bench: list the cells, compute those not in the store, render tables and figures.

A cell is one `earlyexit.pipeline.run.run` (exits trained or reused, knob calibrated on dev, scored on test).
Under torchrun every rank runs every cell in step (each trains and evaluates its share); rank 0
decides which cells to run and alone writes the store. Each cell loads its own backbone and frees
it before the next: a backbone is not shared between cells because a cell changes it (its exits
bind to it, the engine routes its linear layers through its kernels, exit training switches its
gradients off, and a strategy may train backbone weights in place), and nothing proves it is as
loaded afterwards; the reload is small next to a cell's training and evaluation.
What it keeps: quality and the three speed-ups of each model it scored, the calibration sweep (the
quality-versus-speed curve), the per-exit accuracy untrained vs trained, the exit histogram, a few
examples with their tokens and exit layers, per-domain quality where the data has domains.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import os
import platform
import time

import torch

from earlyexit.bench.spec import Spec
from earlyexit.bench.store import CellStore, cell_key
from earlyexit.data.registry import LAYOUTS, task_name
from earlyexit.data.splits import load_split, splits_for
from earlyexit.errors import ConfigError, DataError, EarlyExitError, ModelNotAvailableError
from earlyexit.evaluation.evaluate import score
from earlyexit.pipeline.run import RunSettings, run
from earlyexit.util.devices import distributed_backend
from earlyexit.util.progress import progress_bar
from earlyexit.util.ranks import barrier, join_process_group, launched_world_size, shared_from_main


@dataclasses.dataclass
class Plan:
    """The distinct cells of a spec (cells shared by tables are computed once) and their keys."""

    cells: dict  # key -> Cell
    parts: dict  # key -> fingerprints
    tables: dict  # table name -> [key, ...] in the table's order


def plan(spec: Spec, registry) -> Plan:
    cells, parts, tables = {}, {}, {}
    for name, table in spec.tables.items():
        keys = []
        for cell in table.cells:
            registry.strategy(cell.strategy)  # unknown names fail before any work, with "did you mean"
            registry.backend(cell.settings["backend"])
            key, fingerprints = cell_key(cell, registry)
            cells.setdefault(key, cell)
            parts[key] = fingerprints
            keys.append(key)
        tables[name] = keys
    return Plan(cells, parts, tables)


def test_source(cell) -> tuple[str, str]:
    """(data set, split) the cell is scored on."""
    data = cell.settings.get("test_data") or cell.data
    return data, cell.settings.get("test_split") or splits_for(data)[2]


@functools.lru_cache(maxsize=64)
def data_unavailable(data: str, splits: tuple) -> str | None:
    """Why a data set cannot be read here (each split is tried once per process)."""
    name, _, root = data.partition(":")
    if name not in LAYOUTS:
        return None
    if not root or not os.path.isdir(root):
        return f"{name} not found at {root or '(no folder)'}: put {LAYOUTS[name]} (ROOT = {root}) or pass --data-root"
    for split in splits:
        try:
            load_split(data, split, 1)
        except (DataError, ConfigError, OSError) as error:
            return f"{name} at {root}: {' '.join(str(error).split())}"
    return None


def unavailable_reason(cell) -> str | None:
    """Why this cell cannot run on this machine (its data set or model is missing), with the fix."""
    test_data, test_split = test_source(cell)
    if cell.settings["decode"] == "speculative" and task_name(test_data) == "dialog":
        return "VisDial is scored by ranking answer options: nothing is decoded, so no speculative decoding"
    for data, splits in ((cell.data, splits_for(cell.data)[:2]), (test_data, (test_split,))):
        reason = data_unavailable(data, splits)
        if reason:
            return reason
    model = cell.settings["model"]
    if (os.sep in model or model.startswith(".")) and not os.path.isdir(model):
        return f"model folder {model} not found: download the model there (save_pretrained layout)"
    return None


def compute_cell(cell, key: str, output: str, registry, log) -> dict | None:
    """The record of one cell: its trimmed run report, or why it could not be computed (None on
    ranks other than 0)."""
    settings = dict(cell.settings)
    decode = settings.pop("decode")
    settings.pop("draft_length")
    run_settings = RunSettings(strategy=cell.strategy, data=cell.data, options=cell.options,
                               speculative=decode == "speculative", draft_length=cell.settings["draft_length"],
                               draft_anyway=True,  # a speculative cell measures its drafter, paying or not
                               output=os.path.join(output, "runs", key), progress=False, compare_untrained=False,
                               grid=tuple(grid) if (grid := settings.pop("grid")) else None, **settings)
    began = time.perf_counter()
    try:
        report = run(run_settings, registry, log=log)
    except (ModelNotAvailableError, DataError) as error:
        return {"unavailable": " ".join(str(error).split())}
    if report is None:  # another rank of a multi-process bench: rank 0 keeps the record
        return None
    seconds = time.perf_counter() - began
    label = report["strategy_label"]
    if decode == "speculative":  # the row of the drafter that drafted: the exits, or one of its own
        drafter = run_settings.drafter
        own = drafter is not None and not registry.drafter(drafter).uses_exits
        label = f"{drafter} speculative" if own else f"{cell.strategy} speculative"
    tokenizer = report.pop("tokenizer")
    results = {}
    for name, result in report["results"].items():
        kept = {k: result[k] for k in ("quality", "speed", "exit_layer_histogram", "num_layers", "config", "ranks")
                if k in result}  # ranks: VisDial's ground-truth rank per round
        kept["examples"] = [{**e, "tokens": [tokenizer.decode([t]) for t in e["token_ids"]]} if "token_ids" in e
                            else e for e in result["examples"]]  # ranked dialog rounds have no tokens
        results[name] = kept
    test = load_split(*test_source(cell), run_settings.test_limit)
    domains = sorted({s.extra.get("domain") for s in test if s.extra and s.extra.get("domain")})
    if domains:  # NoCaps: quality per domain (in, near, out) as the paper's Table 1 shows it

        for name, result in report["results"].items():
            results[name]["quality_by_domain"] = {
                d: score(dataclasses.replace(test, samples=[s for s in test if s.extra.get("domain") == d]),
                         {s.id: result["predictions"][s.id] for s in test if s.extra.get("domain") == d})
                for d in domains}
    kept_report = {k: report[k] for k in ("threshold", "knob", "parameters", "exit_layers", "strategy_config",
                                          "calibration", "mid_crisis", "timings", "num_layers", "draft_exit_layer")}
    kept_report.update(results=results, row=label, task=task_name(test_source(cell)[0]))
    return {"report": json.loads(json.dumps(kept_report, default=str)), "seconds": seconds,
            "provenance": report["provenance"]}


def hardware() -> dict:
    info = {"machine": platform.machine(), "processor": platform.processor() or None, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "system": platform.platform()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def free_memory() -> None:
    """Free what the last cell loaded before the next cell loads its own: models sit in reference
    cycles (modules that point at each other, bound methods) that only the collector breaks, and
    CUDA's caching allocator holds freed blocks until it is emptied."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def join_for(cells: list) -> tuple[int, int]:
    """(rank, world): under a launcher, the process group every cell's run uses, joined once with
    the backend the cells' device needs (nccl on GPUs, gloo on CPUs), so the cells must agree."""
    if launched_world_size() == 1:
        return 0, 1
    devices = {cell.settings.get("device") or "cpu" for cell in cells} or {"cpu"}
    if len({distributed_backend(d) for d in devices}) > 1:
        raise ConfigError(f"under torchrun the cells share one process group, but they run on "
                          f"{', '.join(sorted(devices))}; pass --device to run every cell on one kind of device")
    return join_process_group(sorted(devices)[0])


def execute(spec: Spec, output: str, registry, *, force: bool = False, progress: bool = True, log=print) -> dict:
    """Compute every cell of `spec` not yet in the store; returns counts and the seconds spent
    (`rank`: the process's rank; only rank 0's counts and store are the bench's)."""
    work = plan(spec, registry)
    store = CellStore(os.path.join(output, "cells"))
    rank, world = join_for(list(work.cells.values()))
    # rank 0 decides what runs: every rank must run the same cells, in step
    pending = shared_from_main([k for k in work.cells if force or not store.done(k)], world)
    counts = {"cells": len(work.cells), "cached": len(work.cells) - len(pending), "computed": 0,
              "unavailable": 0, "failed": 0, "rank": rank}
    began = time.perf_counter()
    with progress_bar(total=len(pending), desc=f"bench {spec.name}", unit="cell", disable=not progress or rank) as bar:
        for key in pending:
            cell = work.cells[key]
            bar.set_postfix_str(f"{cell.label} on {cell.data.partition(':')[0]}")
            record = compute_or_explain(cell, key, output, registry, world)
            free_memory()
            bar.update(1)
            if rank != 0:  # rank 0 keeps the records
                continue
            state = "computed" if "report" in record else ("unavailable" if "unavailable" in record else "failed")
            counts[state] += 1
            record.update(key=key, label=cell.label, config=cell.config(), fingerprints=work.parts[key],
                          hardware=hardware())
            store.put(key, record)
            if state != "computed":
                log(f"cell {key} ({cell.label} on {cell.data}): {state}: {record.get(state)}")
    barrier()  # the store is complete before any rank goes on to read it
    counts["seconds"] = time.perf_counter() - began
    return counts


def compute_or_explain(cell, key: str, output: str, registry, world: int) -> dict | None:
    """The cell's record (None on ranks other than 0), or why it cannot run here (rank 0's
    verdict, so every rank skips it alike)."""
    reason = shared_from_main(unavailable_reason(cell), world)
    if reason is not None:
        return {"unavailable": reason}
    try:
        return compute_cell(cell, key, output, registry, log=lambda text: None)
    except EarlyExitError as error:  # one failing cell does not stop the others
        return {"failed": " ".join(str(error).split())}


def describe(spec: Spec, output: str, registry) -> list[str]:
    """--dry-run: one line per cell (key, status, table, label, data, what varies), then the needs."""
    work = plan(spec, registry)
    store = CellStore(os.path.join(output, "cells"))
    lines, seen, reasons = [], set(), {}
    for key, cell in work.cells.items():
        if not store.done(key):
            reasons[key] = unavailable_reason(cell)
    for table, keys in work.tables.items():
        for key in keys:
            cell = work.cells[key]
            status = ("cached" if key not in reasons else "shared" if key in seen else
                      f"n/a: {reasons[key]}" if reasons[key] else "to run")
            seen.add(key)
            s = cell.settings
            scored = "" if not (s["test_data"] or s["test_split"]) else "scored on {}/{} ".format(*test_source(cell))
            lines.append(f"{key}  {table:<8} {cell.label:<24} {cell.data:<28} {scored}model={s['model']} "
                         f"noise={s['noise']} seed={s['seed']} kv={s['kv_policy']} decode={s['decode']} "
                         f"batch={s['batch_size']} beams={s['num_beams']} test={s['test_limit'] or 'all'}  [{status}]")
    missing = sum(1 for r in reasons.values() if r)
    lines.append(f"{len(work.cells)} distinct cells ({sum(map(len, work.tables.values()))} table entries): "
                 f"{len(work.cells) - len(reasons)} cached, {len(reasons) - missing} to compute, "
                 f"{missing} unavailable here")
    lines += [f"needs: {need}" for need in spec.needs]
    return lines
