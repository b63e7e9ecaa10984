"""Replay drafters before building them: how many tokens a round a drafter would give, what it
costs, and the decode speed-up that follows, from the model's own greedy outputs and this
machine's timed costs, with no engine path for the drafter.

    python benchmarks/drafter_replay.py --model tiny --json benchmarks/results/replay-drafters-tiny.json
    python benchmarks/drafter_replay.py --model smol --json benchmarks/results/replay-drafters-smol.json

The full model writes its greedy caption for every image of the exit-training split (the corpus)
and of the test split (the captions replayed). Greedy speculative decoding of a test image
accepts a draft exactly while it equals the model's own next token, so each round is replayed
on those tokens: the drafter proposes up to k tokens from the tokens so far, the longest prefix
equal to the caption is accepted, and the verification adds the model's own next token.

- **corpus**: the longest suffix of the tokens so far (the prompt's start included) found in a
  suffix index over the corpus, then its most frequent continuation, stopped early where that
  continuation's share of the corpus falls below τ (`drafters/suffix_index.py`).

Costs are timed on one row with the engine (exits off) at a mid-caption context: a plain decode
step, a verification of m = 1 … k + 1 positions (the head reads all m), and the drafter's own
lookup. A round that proposes d tokens costs lookup + verify(d + 1); plain decoding costs one
step per token. Estimated decode speed-up = tokens · step / Σ rounds' cost (batch 1).

`--measure N` then decodes the first N test images for real, one row at a time, alternating the
backbone's own `generate` and speculative decoding with the corpus drafter (`DraftVerifyDecoder`)
at the replay's best setting and at k = 4, τ = 0: measured α, tokens per round, and wall-clock
speed-ups end to end and for the decode phase, beside the estimate. The drafter's tokens must
equal the backbone's (checked).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from earlyexit.drafters.suffix_index import SuffixIndex

LENGTHS = (1, 2, 3, 4, 6, 8)
STOP_BELOW = (0.0, 0.2, 0.4, 0.6)


def replay_corpus(index: SuffixIndex, captions: list[list[int]], ended: list[bool], length: int,
                  stop_below: float, max_match: int) -> dict:
    """The rounds greedy speculative decoding with the corpus drafter would run on `captions`
    (the model's own tokens; `ended`: whether each ends with end-of-sequence)."""
    rounds = drafted = accepted = tokens = 0
    proposed = []  # per round: how many tokens were drafted
    lookup_seconds = 0.0
    for caption, has_end in zip(captions, ended):
        p = 1  # the prompt pass wrote the first token
        while p < len(caption):
            room = len(caption) - p if has_end else len(caption) - p - 1  # a draft may be the end token
            began = time.perf_counter()
            drafts, _ = index.continuation(caption[:p], min(length, room), stop_below, max_match) if room > 0 else ([], [])
            lookup_seconds += time.perf_counter() - began
            good = 0
            while good < len(drafts) and p + good < len(caption) and drafts[good] == caption[p + good]:
                good += 1
            rounds += 1
            drafted += len(drafts)
            accepted += good
            proposed.append(len(drafts))
            new = min(good + 1, len(caption) - p)
            tokens += new
            p += new
    return {"length": length, "stop_below": stop_below, "rounds": rounds, "drafted": drafted, "accepted": accepted,
            "decode_tokens": tokens, "acceptance_rate": accepted / drafted if drafted else float("nan"),
            "tokens_per_round": tokens / rounds if rounds else float("nan"),
            "lookup_ms": 1000 * lookup_seconds / rounds if rounds else 0.0, "proposed": proposed}


def timed_costs(backend, context_tokens: int, lengths, repeats: int) -> dict:
    """Milliseconds of one plain decode step and of verifying m positions at once (one row,
    engine with exits off, `context_tokens` generated after the prompt)."""
    import torch

    from earlyexit.core.engine import EarlyExitForCausalLM
    from earlyexit.data.splits import load_split
    from earlyexit.data.tasks import task_of

    model = EarlyExitForCausalLM(backend, None)
    sample = load_split("scenes", "test", 1)
    inputs = backend.prepare_inputs([sample[0].load_image()], [task_of(sample).prompt(sample[0], backend)])
    cache = model.new_cache()
    with torch.no_grad():
        embeds = backend.decoder_inputs_embeds(inputs["pixel_values"], inputs["input_ids"],
                                               **backend.vision_inputs(inputs))
        model.prompt_pass(embeds, torch.ones_like(inputs["input_ids"]), cache)
        token = torch.tensor([[backend.processor.tokenizer.convert_tokens_to_ids("a") or 1]])
        for _ in range(context_tokens):
            model(input_ids=token, attention_mask=torch.ones(1, cache.total_length + 1, dtype=torch.long), cache=cache)

        def once(m: int, read_all: bool) -> float:
            length = cache.total_length
            model.read_block = read_all
            began = time.perf_counter()
            model(input_ids=token.repeat(1, m), attention_mask=torch.ones(1, length + m, dtype=torch.long),
                  cache=cache)
            seconds = time.perf_counter() - began
            model.read_block = False
            cache.crop(length)
            del cache.steps[-1:]
            return seconds

        # every shape in turn, repeat after repeat: a drift of the machine's speed touches them all alike
        shapes = [(1, False)] + [(m, True) for m in range(1, max(lengths) + 2)]
        times = {shape: [] for shape in shapes}
        for repeat in range(repeats + 2):
            for shape in shapes:
                seconds = once(*shape)
                if repeat >= 2:
                    times[shape].append(seconds)
        plain = 1000 * statistics.median(times[(1, False)])
        verify = {m: 1000 * statistics.median(times[(m, True)]) for m in range(1, max(lengths) + 2)}
    return {"context": cache.total_length, "step_ms": plain, "verify_ms": verify}


def measure(backend, index_drafter, dataset, max_new_tokens: int) -> dict:
    """Wall clock of plain decoding and of speculative decoding with `index_drafter`, row by row
    on `dataset`, alternating on the same inputs; the outputs must be identical."""
    import torch

    from earlyexit.core.engine import EarlyExitForCausalLM
    from earlyexit.core.generation import count_tokens, timed
    from earlyexit.core.speculative import DraftVerifyDecoder
    from earlyexit.data.tasks import task_of

    decoder = DraftVerifyDecoder(EarlyExitForCausalLM(backend), index_drafter)
    eos = backend.language_model.generation_config.eos_token_id
    sides = {"plain": [0.0, 0.0, 0], "speculative": [0.0, 0.0, 0]}  # seconds, prompt seconds, tokens
    task = task_of(dataset)
    for sample in dataset:
        inputs = backend.prepare_inputs([sample.load_image()], [task.prompt(sample, backend)])
        prompt = inputs["input_ids"].shape[1]
        with torch.no_grad():
            plain, seconds, prompt_seconds = timed(backend.plain_generate, inputs,
                                                   {"max_new_tokens": max_new_tokens, "do_sample": False})
            tokens = count_tokens(plain, prompt, eos)
            sides["plain"] = [a + b for a, b in zip(sides["plain"], (seconds, prompt_seconds, tokens))]
            drafted, seconds, _ = timed(decoder.generate, inputs, {"max_new_tokens": max_new_tokens})
            sides["speculative"] = [a + b for a, b in zip(sides["speculative"],
                                                          (seconds, decoder.last_prompt_seconds, tokens))]
        if drafted[0, prompt:prompt + tokens].tolist() != plain[0, prompt:prompt + tokens].tolist():
            raise AssertionError(f"{sample.id}: speculative decoding differs from the backbone's own tokens")
    (plain_s, plain_prompt, tokens), (spec_s, spec_prompt, _) = sides["plain"], sides["speculative"]
    stats = decoder.total_stats
    decode_tokens = tokens - len(dataset)  # the prompt pass writes each row's first token
    return {"images": len(dataset), "tokens": tokens, "plain_seconds": plain_s, "speculative_seconds": spec_s,
            "plain_prompt_seconds": plain_prompt, "speculative_prompt_seconds": spec_prompt,
            "wall_speedup": plain_s / spec_s,
            "decode_wall_speedup": (plain_s - plain_prompt) / (spec_s - spec_prompt),
            "acceptance_rate": stats.acceptance_rate,
            "tokens_per_round": decode_tokens / stats.rounds if stats.rounds else float("nan"),
            "rounds": stats.rounds, "drafted": stats.drafted, "accepted": stats.accepted}


def measure_batched(backend, drafter, dataset, batch_size: int, max_new_tokens: int) -> dict:
    """Wall clock of the backbone's batched `generate` and of batched speculative decoding with
    `drafter` (`BatchedDraftVerifyDecoder`) on the same batches, alternating; identical outputs."""
    import torch

    from earlyexit.core.engine import EarlyExitForCausalLM
    from earlyexit.core.generation import count_tokens, timed
    from earlyexit.core.speculative import BatchedDraftVerifyDecoder
    from earlyexit.data.tasks import task_of

    decoder = BatchedDraftVerifyDecoder(EarlyExitForCausalLM(backend), drafter)
    eos = backend.language_model.generation_config.eos_token_id
    task = task_of(dataset)
    plain_s = plain_prompt = spec_s = spec_prompt = 0.0
    tokens = 0
    samples = dataset.samples
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        inputs = backend.prepare_inputs([s.load_image() for s in batch], [task.prompt(s, backend) for s in batch])
        prompt = inputs["input_ids"].shape[1]
        with torch.no_grad():
            plain, seconds, prompt_seconds = timed(backend.plain_generate, inputs,
                                                   {"max_new_tokens": max_new_tokens, "do_sample": False})
            plain_s, plain_prompt = plain_s + seconds, plain_prompt + prompt_seconds
            drafted, seconds, _ = timed(decoder.generate, inputs, {"max_new_tokens": max_new_tokens})
            spec_s, spec_prompt = spec_s + seconds, spec_prompt + decoder.last_prompt_seconds
        tokens += count_tokens(plain, prompt, eos)
        for r in range(len(batch)):
            want = plain[r, prompt:].tolist()
            want = want[:want.index(eos) + 1] if eos in want else want
            if drafted[r, prompt:prompt + len(want)].tolist() != want:
                raise AssertionError(f"{batch[r].id}: batched speculative decoding differs from the backbone's tokens")
    stats = decoder.total_stats
    return {"batch_size": batch_size, "images": len(samples), "tokens": tokens, "plain_seconds": plain_s,
            "speculative_seconds": spec_s, "wall_speedup": plain_s / spec_s,
            "decode_wall_speedup": (plain_s - plain_prompt) / (spec_s - spec_prompt),
            "acceptance_rate": stats.acceptance_rate, "rounds_per_row": stats.rounds / len(samples)}


def estimate(replay: dict, costs: dict) -> float:
    """Decode speed-up at batch 1: plain steps for the tokens, against each round's lookup and
    verification of its drafts plus one."""
    spent = sum(costs["verify_ms"][d + 1] for d in replay["proposed"]) + replay["lookup_ms"] * replay["rounds"]
    return replay["decode_tokens"] * costs["step_ms"] / spent if spent else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny or smol (the embedded models)")
    parser.add_argument("--backend", default=None, help="default: blip2-opt for tiny, minigpt4-llama for smol")
    parser.add_argument("--corpus-limit", type=int, default=None, help="exit-training images (default: all)")
    parser.add_argument("--test-limit", type=int, default=None, help="test images (default: all)")
    parser.add_argument("--max-match", type=int, default=8, help="longest history suffix matched")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--measure", type=int, default=0, metavar="N",
                        help="also decode the first N test images for real, beside plain decoding")
    parser.add_argument("--batches", default="", help="also measure batched speculative decoding at these batch "
                                                          "sizes (comma-separated) on the --measure images")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)

    import torch

    from earlyexit.data.splits import load_split, splits_for
    from earlyexit.drafters.corpus import CorpusDrafter
    from earlyexit.models.loading import load_backend
    from earlyexit.plugins.registry import get_registry
    from earlyexit.util.files import write_json_atomically
    from earlyexit.util.provenance import provenance

    torch.set_num_threads(int(os.environ.get("EARLYEXIT_THREADS", "2")))
    name = args.backend or ("minigpt4-llama" if args.model == "smol" else "blip2-opt")
    backend = load_backend(get_registry(load_entrypoints=False).backend(name), args.model)
    train_split, _, test_split = splits_for("scenes")
    began = time.perf_counter()
    corpus, _ = backbone_outputs(backend, load_split("scenes", train_split, args.corpus_limit), args)
    captions, ended = backbone_outputs(backend, load_split("scenes", test_split, args.test_limit), args)
    outputs_seconds = time.perf_counter() - began
    began = time.perf_counter()
    index = SuffixIndex(depth=args.max_match + max(LENGTHS) + 1)
    for tokens in corpus:
        index.add(tokens)
    build_seconds = time.perf_counter() - began
    costs = timed_costs(backend, context_tokens=10, lengths=LENGTHS, repeats=args.repeats)
    print(f"{name}:{args.model}: corpus {len(corpus)} captions ({index.tokens} tokens, index built in "
          f"{build_seconds:.2f} s); {len(captions)} test captions; plain step {costs['step_ms']:.2f} ms, verify "
          + " ".join(f"{m}:{ms:.2f}" for m, ms in costs["verify_ms"].items()) + " ms")
    rows = []
    for stop_below in STOP_BELOW:
        for length in LENGTHS:
            replay = replay_corpus(index, captions, ended, length, stop_below, args.max_match)
            replay["c"] = replay["lookup_ms"] / costs["step_ms"]
            replay["estimated_decode_speedup"] = estimate(replay, costs)
            print(f"  corpus k={length} τ={stop_below}: α {replay['acceptance_rate']:.3f}, "
                  f"{replay['tokens_per_round']:.2f} tokens/round, {replay['drafted'] / replay['rounds']:.2f} drafted/round, "
                  f"c {replay['c']:.4f}, est. decode {replay['estimated_decode_speedup']:.2f}x")
            rows.append({k: v for k, v in replay.items() if k != "proposed"})
    best = max(rows, key=lambda r: r["estimated_decode_speedup"])
    print(f"best: k={best['length']} τ={best['stop_below']}: est. decode {best['estimated_decode_speedup']:.2f}x")
    measured = []
    if args.measure:
        test = load_split("scenes", test_split, args.measure)
        for length, stop_below in dict.fromkeys([(best["length"], best["stop_below"]), (4, 0.0)]):
            drafter = CorpusDrafter(backend, CorpusDrafter.Config(draft_length=length, stop_below=stop_below,
                                                                  max_match=args.max_match))
            drafter.fit(corpus, log=lambda *_: None)
            result = measure(backend, drafter, test, args.max_new_tokens)
            replayed = next(r for r in rows if r["length"] == length and r["stop_below"] == stop_below)
            result.update(length=length, stop_below=stop_below,
                          estimated_decode_speedup=replayed["estimated_decode_speedup"],
                          replayed_acceptance_rate=replayed["acceptance_rate"],
                          replayed_tokens_per_round=replayed["tokens_per_round"])
            measured.append(result)
            print(f"  measured k={length} τ={stop_below} on {result['images']} images, batch 1: decode "
                  f"{result['decode_wall_speedup']:.2f}x (estimated {result['estimated_decode_speedup']:.2f}x), end "
                  f"to end {result['wall_speedup']:.2f}x; α {result['acceptance_rate']:.3f} (replay "
                  f"{result['replayed_acceptance_rate']:.3f}), {result['tokens_per_round']:.2f} tokens/round")
    batched = []
    for size in [int(b) for b in args.batches.split(",") if b]:
        drafter = CorpusDrafter(backend, CorpusDrafter.Config(draft_length=4, max_match=args.max_match))
        drafter.fit(corpus, log=lambda *_: None)
        result = measure_batched(backend, drafter, load_split("scenes", test_split, args.measure or 64), size,
                                 args.max_new_tokens)
        batched.append(result)
        print(f"  measured k=4 τ=0 at batch {size} on {result['images']} images: decode {result['decode_wall_speedup']:.2f}x, "
              f"end to end {result['wall_speedup']:.2f}x; α {result['acceptance_rate']:.3f}")
    write_json_atomically(args.json, {
        "command": "python benchmarks/drafter_replay.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "backend": name, "model": args.model, "corpus_captions": len(corpus), "corpus_tokens": index.tokens,
        "test_captions": len(captions), "index_build_seconds": build_seconds, "outputs_seconds": outputs_seconds,
        "timed_ms": costs, "corpus": rows, "best": best, "measured_batch1": measured,
        "measured_batched": batched, "provenance": provenance(),
    })
    print(f"wrote {args.json}")
    return 0


def backbone_outputs(backend, dataset, args):
    from earlyexit.training.drafters import backbone_token_outputs

    return backbone_token_outputs(backend, dataset, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)


if __name__ == "__main__":
    raise SystemExit(main())
