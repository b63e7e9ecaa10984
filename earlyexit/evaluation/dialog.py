"""VisDial scored as the benchmark intends: rank each round's candidate answers by the model's
likelihood and report MRR, R@1/5/10 and the mean rank of the ground truth.

Each round's prompt is the image, the caption, the dialog history and the question
("{caption}. Question: {q1} Answer: {a1}. ... Question: {q} Answer:"; the oldest rounds are
dropped when the prompt would not fit the context). An option's score is the mean log-probability
of its tokens and the end-of-sequence token after them, teacher forced. The tokens are forced
through `generate` one decoding step at a time, so with a strategy every option token leaves at
its own exit and is scored from that exit's logits: the ranking measures the early-exit model,
and the same traces give the speed-ups. Ties rank the ground truth last (pessimistic).

A round's image is preprocessed and encoded once and its prompt embeddings are shared by every
option row; the options go through `generate` in chunks (`option_rows`: 20 rows, fewer where
their K/V would pass 2 GiB), so 100 options never hold 100 rows of K/V at once. The full model
timed beside it (`measure_wall`) is the backbone's own language model on the same embeddings.
"""

from __future__ import annotations

import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from earlyexit.core.accounting import CostModel, summarize
from earlyexit.core.engine import cache_bytes_per_row
from earlyexit.data.tasks import task_of
from earlyexit.evaluation.common import add_noise
from earlyexit.errors import ConfigError
from earlyexit.evaluation.loop import EvalRun
from earlyexit.metrics.dialog import rank_of_ground_truth

OPTION_ROWS = 20  # candidate answers scored together at most (VisDial has 100 per round)
OPTION_KV_BYTES = 2 << 30  # and fewer when their K/V would pass this (a 7B backbone's long rounds)


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


def option_rows(backend, positions: int, rows: int | None = None) -> int:
    """Options per chunk: `rows` if given, else `OPTION_ROWS`, fewer where their K/V and logits
    (`positions` each) would pass `OPTION_KV_BYTES`; at least one."""
    if rows is not None:
        if rows < 1:
            raise ConfigError(f"options are scored in chunks of at least one row (got {rows})")
        return rows
    per_row = cache_bytes_per_row(backend, positions, backend.num_layers)
    return max(1, min(OPTION_ROWS, OPTION_KV_BYTES // per_row))


@torch.no_grad()
def encode_round(backend, image, prompt: str, saturation: float | None = None) -> dict:
    """One round's prompt as `generate` takes it, the image preprocessed and encoded once:
    `inputs_embeds` and `attention_mask` of one row (each chunk of options repeats them).
    `saturation`: stop the vision tower early as the strategy asks (MuE's encoder side)."""
    inputs = backend.prepare_inputs([image], [prompt])
    vision = backend.vision_inputs(inputs)
    features = backend.image_features(inputs["pixel_values"], saturation, **vision)[0] if saturation else None
    embeds = backend.decoder_inputs_embeds(inputs["pixel_values"], inputs["input_ids"], features, **vision)
    return {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}


def option_scores(generate, backend, image, prompt: str, options: list[str], on_chunk=None, rows: int | None = None,
                  saturation: float | None = None) -> tuple[list[float], dict]:
    """Each option's mean log-probability given image and prompt, scored with `generate` (the
    early-exit model's, or the backbone's language model's: anything that reads `inputs_embeds`),
    and the work it took: seconds, prompt-pass seconds, forced tokens and rows. The image is
    encoded once (`encode_round`); options go in chunks of `option_rows` rows, so a round's K/V
    stays within budget. `on_chunk()` runs after every chunk."""
    tokenizer = backend.processor.tokenizer
    eos = backend.language_model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    sequences = [tokenizer(" " + option, add_special_tokens=False)["input_ids"] + [eos] for option in options]
    began = time.perf_counter()
    round_inputs = encode_round(backend, image, prompt, saturation)
    encoded = time.perf_counter() - began  # the image's encoding belongs to the round's prompt pass
    scores = []
    work = {"seconds": encoded, "prompt_seconds": encoded, "tokens": sum(map(len, sequences)), "rows": len(sequences)}
    step = option_rows(backend, round_inputs["attention_mask"].shape[1] + max(map(len, sequences)), rows)
    for start in range(0, len(options), step):
        chunk = sequences[start:start + step]
        inputs = {name: value.expand(len(chunk), *value.shape[1:]) for name, value in round_inputs.items()}
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


def evaluate_dialog(backend, strategy, dataset, settings, kv_policy: str = "catchup", gate=None,
                    decode: str = "early-exit", on_batch=None) -> dict:
    """`evaluate` for dialog data: the ground truth's rank among each round's options, MRR,
    R@1/5/10 and mean rank, with the three speed-ups of the forced decoding. Every rank returns
    rank 0's report."""
    task = task_of(dataset)
    task.check(dataset, decode, settings.num_beams)  # what ranking cannot do, refused before any work
    run = EvalRun(backend, strategy, dataset, settings, kv_policy, gate, decode, columns=("ranks", "predictions"))
    part = run.part
    with run.progress("rank", "round") as bar:
        for index, sample in enumerate(part.samples):
            rank = rank_round(run, task, sample, index)
            bar.update(1)
            if on_batch is not None:
                on_batch({"phase": "eval", "data": part.name, "split": part.split, "batch": index,
                          "samples": 1, "options": len(sample.extra["options"]), "rank": rank})
    if not run.gather():
        return run.shared(None)
    ranks, predictions = run.share.columns["ranks"], run.share.columns["predictions"]
    speed = summarize(run.share.traces, CostModel.for_model(run.model))
    speed.update(run.wall())
    examples = [{"id": s.id, "prediction": predictions[s.id], "ground_truth": s.extra["options"][s.extra["gt_index"]],
                 "rank": ranks[s.id]} for s in run.dataset.samples[:5]]
    return run.report(task.score(run.dataset, ranks), speed, examples, ranks=ranks)


def rank_round(run: EvalRun, task, sample, index: int) -> int:
    """Rank one round's options with the early-exit model (and, with a strategy, time the full
    model on the same options); its rank and top-ranked option go to the run. Returns the rank."""
    settings, backend, model = run.settings, run.backend, run.model
    image = add_noise(sample.load_image(), settings.noise, settings.seed * 1_000_003 + index)
    options = sample.extra["options"]
    prompt = task.prompt(sample, backend, beside=options)
    saturation = model.strategy.vision_saturation() if model.strategy is not None else None
    scores, work = option_scores(model.generate, backend, image, prompt, options, saturation=saturation,
                                 on_chunk=lambda: run.share.traces.append(model.last_trace))
    run.add_work("early", **work)
    if run.timing_full:  # the backbone's own language model on the same embeddings: like with like
        _, work = option_scores(backend.language_model.generate, backend, image, prompt, options)
        run.add_work("full", **work)
    rank = run.share.columns["ranks"][sample.id] = rank_of_ground_truth(scores, sample.extra["gt_index"])
    run.share.columns["predictions"][sample.id] = options[max(range(len(scores)), key=scores.__getitem__)]
    return rank
