"""What generating (`evaluate`) and ranking (`evaluate_dialog`) evaluations share: this process's
part of the samples, the early-exit model, what the part collected (per-sample columns, traces,
each side's work), the gather on rank 0 across processes, and the report.

Two sides do the work: the early-exit model ("early") and, with a strategy and `measure_wall`,
the full model timed next to it on the same inputs ("full").
"""

from __future__ import annotations

import dataclasses

from earlyexit.core.engine import EarlyExitForCausalLM
from earlyexit.evaluation.common import run_config, wall_clock
from earlyexit.util.progress import progress_bar
from earlyexit.util.provenance import provenance
from earlyexit.util.ranks import gather_on_main, process_group, shared_from_main

SIDES = ("early", "full")


def empty_sides() -> dict:
    return {name: {"seconds": 0.0, "prompt_seconds": 0.0, "tokens": 0, "rows": 0} for name in SIDES}


@dataclasses.dataclass
class Share:
    """What one process collected: `columns[name][sample id]` (predictions, exit layers, ranks, ...),
    the engine's traces, speculative decoding's records and stats, and each side's work."""

    columns: dict
    traces: list = dataclasses.field(default_factory=list)
    records: list = dataclasses.field(default_factory=list)
    stats: object = None
    sides: dict = dataclasses.field(default_factory=empty_sides)

    @classmethod
    def merged(cls, shares: list[Share]) -> Share:
        """Every process's share as one, in rank order (each process's stats counted once)."""
        total = cls({name: {} for name in shares[0].columns})
        for share in shares:
            for name, values in share.columns.items():
                total.columns[name].update(values)
            total.traces.extend(share.traces)
            total.records.extend(share.records)
            for name, side in share.sides.items():
                for key, value in side.items():
                    total.sides[name][key] += value
            if share.stats is not None and total.stats is None:
                total.stats = share.stats
            elif share.stats is not None:
                total.stats.add(share.stats)
        return total


class EvalRun:
    """One evaluation: `dataset` (the first `settings.limit` samples: what is scored and reported),
    `part` (this process's share of it), `model`, and `share` (what the part collected; after
    `gather`, on rank 0, every process's)."""

    def __init__(self, backend, strategy, dataset, settings, kv_policy: str, gate, decode: str, columns: tuple):
        self.backend, self.strategy, self.settings = backend, strategy, settings
        self.kv_policy, self.gate, self.decode = kv_policy, gate, decode
        self.dataset = self.part = dataset.subset(settings.limit)
        self.rank, self.world = process_group()
        if self.world > 1:  # each rank works on its share; rank 0 gathers, scores and reports
            self.part = dataclasses.replace(self.dataset, samples=self.dataset.samples[self.rank::self.world])
        self.model = EarlyExitForCausalLM(backend, strategy, kv_policy=kv_policy, gate=gate)
        # the full model is the comparison whenever something other than it decodes
        self.timing_full = (strategy is not None or decode == "speculative") and settings.measure_wall
        self.share = Share({name: {} for name in columns})

    def progress(self, verb: str, unit: str):
        return progress_bar(total=len(self.part), desc=f"{verb} {self.part.name}/{self.part.split}", unit=unit,
                            disable=not self.settings.progress or self.rank)

    def add_work(self, side: str, seconds: float, prompt_seconds: float, tokens: int, rows: int) -> None:
        """Work one side did: seconds end to end, of them the prompt pass, tokens and rows."""
        counters = self.share.sides[side]
        counters["seconds"] += seconds
        counters["prompt_seconds"] += prompt_seconds
        counters["tokens"] += tokens
        counters["rows"] += rows

    def gather(self) -> bool:
        """Every process's share on rank 0 (True there); False on the other ranks, which then
        return `self.shared(None)` to receive rank 0's report."""
        if self.world == 1:
            return True
        shares = gather_on_main(self.share, self.world)  # sent as plain Python: no (CUDA) tensor is pickled
        if shares is None:
            return False
        self.share = Share.merged(shares)
        return True

    def shared(self, report: dict | None) -> dict:
        return shared_from_main(report, self.world)

    def wall(self) -> dict:
        """The wall-clock comparison of the two sides, as the speed entry carries it."""
        wall = wall_clock(self.share.sides["early"], self.share.sides["full"] if self.timing_full else None)
        return {"wall_speedup": wall.get("wall_speedup"), "decode_wall_speedup": wall.get("decode_wall_speedup"),
                "tokens_per_s": wall["early_exit"]["tokens_per_s"], "wall": wall}

    def report(self, quality: dict, speed: dict, examples: list, **extra) -> dict:
        """The report every rank returns (rank 0's); `extra` entries follow the predictions."""
        return self.shared({
            "quality": quality,
            "speed": speed,
            "exit_layer_histogram": speed.pop("exit_layer_histogram"),
            "num_layers": self.backend.num_layers,
            "examples": examples,
            "predictions": self.share.columns["predictions"],
            **extra,
            "processes": self.world,
            "config": run_config(self.backend, self.strategy, self.dataset, self.settings, self.kv_policy,
                                 self.gate, self.decode),
            "provenance": provenance(),
        })
