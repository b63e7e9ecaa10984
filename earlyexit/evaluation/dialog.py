"""VisDial scored as the benchmark intends: rank each round's candidate answers by the model's
likelihood and report MRR, R@1/5/10 and the mean rank of the ground truth.

Each round's prompt is the image, the caption, the dialog history and the question
("{caption}. Question: {q1} Answer: {a1}. ... Question: {q} Answer:"; the oldest rounds are
dropped when the prompt would not fit the context). An option's score is the mean log-probability
of its tokens and the end-of-sequence token after them, teacher forced. The tokens are forced
through `generate` one decoding step at a time, so with a strategy every option token leaves at
its own exit and is scored from that exit's logits: the ranking measures the early-exit model,
and the same traces give the speed-ups. Ties rank the ground truth last (pessimistic).
"""

from __future__ import annotations

import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from earlyexit.core.accounting import CostModel, summarize
from earlyexit.core.engine import EarlyExitForCausalLM
from earlyexit.data.prompts import fitting_prompt, longest_option
from earlyexit.errors import ConfigError
from earlyexit.evaluation.common import add_noise, run_config, wall_clock
from earlyexit.metrics.dialog import dialog_scores, rank_of_ground_truth
from earlyexit.util.progress import progress_bar
from earlyexit.util.provenance import provenance
from earlyexit.util.ranks import process_group, shared_from_main

OPTION_ROWS = 100  # options scored in one batch (VisDial has 100 per round)


class ForcedOptions(LogitsProcessor):
    """Forces each row to emit its own token sequence and adds up the log-probability the model
    gave each forced token (rows past their sequence are ignored)."""

    def __init__(self, sequences: list[list[int]], filler: int):
        self.step = 0  # calls so far: one per generated token, whatever the family's input layout
        self.lengths = torch.tensor([len(s) for s in sequences])
        width = int(self.lengths.max())
        self.targets = torch.full((len(sequences), width), filler, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            self.targets[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        self.log_probability = torch.zeros(len(sequences), dtype=torch.float64)
        self.first_call_at: float | None = None  # the end of the prompt pass, for decode-phase timing

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first_call_at is None:
            self.first_call_at = time.perf_counter()
        step, self.step = self.step, self.step + 1
        targets = self.targets[:, min(step, self.targets.shape[1] - 1)].to(scores.device)
        chosen = scores.float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
        active = (step < self.lengths).to(scores.device)
        self.log_probability += torch.where(active, chosen, torch.zeros_like(chosen)).double().cpu()
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter(1, targets[:, None], 0.0)

    def mean_log_probability(self) -> list[float]:
        return (self.log_probability / self.lengths).tolist()


def option_scores(generate, backend, image, prompt: str, options: list[str], on_chunk=None) -> tuple[list[float], dict]:
    """Each option's mean log-probability given image and prompt, scored with `generate` (the
    early-exit model's or the backbone's own), and the work it took: seconds, prompt-pass
    seconds, forced tokens and rows. `on_chunk()` runs after every batch of options."""
    tokenizer = backend.processor.tokenizer
    eos = backend.language_model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    sequences = [tokenizer(" " + option, add_special_tokens=False)["input_ids"] + [eos] for option in options]
    scores = []
    work = {"seconds": 0.0, "prompt_seconds": 0.0, "tokens": sum(map(len, sequences)), "rows": len(sequences)}
    for start in range(0, len(options), OPTION_ROWS):
        chunk = sequences[start:start + OPTION_ROWS]
        inputs = backend.prepare_inputs([image] * len(chunk), [prompt] * len(chunk))
        forcing = ForcedOptions(chunk, filler=eos)
        began = time.perf_counter()
        with torch.no_grad():
            generate(**inputs, max_new_tokens=int(forcing.lengths.max()), do_sample=False, num_beams=1,
                     logits_processor=LogitsProcessorList([forcing]))
        work["seconds"] += time.perf_counter() - began
        work["prompt_seconds"] += forcing.first_call_at - began
        scores += forcing.mean_log_probability()
        if on_chunk is not None:
            on_chunk()
    return scores, work


def check_dialog_data(dataset, settings, decode: str) -> None:
    """Refuse, before any work, what ranking cannot do."""
    if any(s.extra.get("gt_index") is None for s in dataset):
        raise ConfigError(f"{dataset.name}/{dataset.split} has no ground-truth answers to rank against; "
                          "use --split val")
    if decode != "early-exit":
        raise ConfigError("VisDial is scored by ranking answer options, not by decoding; drop --decode speculative")
    if settings.num_beams > 1:
        raise ConfigError("VisDial is scored by ranking answer options, not by beam search; drop --num-beams")


def evaluate_dialog(backend, strategy, dataset, settings, kv_policy: str = "catchup", gate=None,
                    decode: str = "early-exit", on_batch=None) -> dict | None:
    """`evaluate` for dialog data: the ground truth's rank among each round's options, MRR,
    R@1/5/10 and mean rank, with the three speed-ups of the forced decoding (None on ranks > 0)."""
    import dataclasses


    check_dialog_data(dataset, settings, decode)
    dataset = full_dataset = dataset.subset(settings.limit)
    rank, world = process_group()
    if world > 1:  # each rank ranks its share; rank 0 gathers and reports
        dataset = dataclasses.replace(dataset, samples=dataset.samples[rank::world])
    model = EarlyExitForCausalLM(backend, strategy, kv_policy=kv_policy, gate=gate)
    timing_full = strategy is not None and settings.measure_wall
    sides = {name: {"seconds": 0.0, "prompt_seconds": 0.0, "tokens": 0, "rows": 0} for name in ("early", "full")}
    ranks, predictions, traces = {}, {}, []
    with progress_bar(total=len(dataset), desc=f"rank {dataset.name}/{dataset.split}", unit="round",
                      disable=not settings.progress or rank) as bar:
        for index, sample in enumerate(dataset.samples):
            image = add_noise(sample.load_image(), settings.noise, settings.seed * 1_000_003 + index)
            options = sample.extra["options"]
            prompt = fitting_prompt(backend, sample, longest_option(backend, options))
            scores, work = option_scores(model.generate, backend, image, prompt, options,
                                         on_chunk=lambda: traces.append(model.last_trace))
            _add_work(sides["early"], work)
            if timing_full:
                _, work = option_scores(backend.plain_generate, backend, image, prompt, options)
                _add_work(sides["full"], work)
            ranks[sample.id] = rank_of_ground_truth(scores, sample.extra["gt_index"])
            predictions[sample.id] = options[max(range(len(scores)), key=scores.__getitem__)]
            bar.update(1)
            if on_batch is not None:
                on_batch({"phase": "eval", "data": dataset.name, "split": dataset.split, "batch": index,
                          "samples": 1, "options": len(options), "rank": ranks[sample.id]})
    if world > 1:
        shares = [None] * world
        torch.distributed.all_gather_object(shares, (ranks, predictions, traces, sides))
        if rank != 0:
            return shared_from_main(None, world)
        ranks, predictions, traces = {}, {}, []
        sides = {name: {key: 0 for key in sides[name]} for name in sides}
        for share_ranks, share_predictions, share_traces, share_sides in shares:
            ranks.update(share_ranks), predictions.update(share_predictions), traces.extend(share_traces)
            for name in sides:
                for key in sides[name]:
                    sides[name][key] += share_sides[name][key]
        dataset = full_dataset
    speed = summarize(traces, CostModel.for_model(model))
    wall = wall_clock(sides["early"], sides["full"] if timing_full else None)
    speed.update(wall_speedup=wall.get("wall_speedup"), decode_wall_speedup=wall.get("decode_wall_speedup"),
                 tokens_per_s=wall["early_exit"]["tokens_per_s"], wall=wall)
    quality = {**dialog_scores([ranks[s.id] for s in dataset.samples]), "rounds": len(ranks),
               "scoring": "rank of the ground truth among the options by mean token log-probability (ties last)"}
    examples = [{"id": s.id, "prediction": predictions[s.id], "ground_truth": s.extra["options"][s.extra["gt_index"]],
                 "rank": ranks[s.id]} for s in dataset.samples[:5]]
    return shared_from_main({
        "quality": quality,
        "speed": speed,
        "exit_layer_histogram": speed.pop("exit_layer_histogram"),
        "num_layers": backend.num_layers,
        "examples": examples,
        "predictions": predictions,
        "ranks": ranks,
        "processes": world,
        "config": run_config(backend, strategy, dataset, settings, kv_policy, gate, decode),
        "provenance": provenance(),
    }, world)


def _add_work(side: dict, work: dict) -> None:
    for key in side:
        side[key] += work[key]
