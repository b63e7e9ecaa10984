"""Replay the feature drafter (EAGLE family, `drafters/feature.py`), then measure it in the engine:
train one on the frozen backbone's own outputs (the product's own `fit`, as `run --drafter
feature` does), measure offline how often its drafts would be accepted, what a draft costs, and
the decode speed-up that follows at batch 1; with `--measure N`, decode N test images for real.

    python benchmarks/feature_drafter_replay.py --model smol --measure 40 --json benchmarks/results/feature-drafter-smol.json

The drafter: at position p it reads the backbone's top-layer state f_p (before the final norm)
and the embedding of the next input, concatenated and projected to the model's width, then a
trainable copy of the backbone's last layer over the drafter's earlier positions; its output
predicts f_{p+1}, and the frozen final norm and head, read out over the N tokens the backbone
writes most on the training split (FR-Spec), give the draft x_{p+2}. Trained with smooth-L1 to
the next top-layer state plus cross-entropy to the backbone's own next token, and
"training-time test" (HASS, EAGLE-3).

Replay on the test split's own captions, teacher forced: pass j feeds the drafter its own
predictions from pass j - 1 in place of the top-layer states, so pass j's token at p is the j-th
draft of a round begun after x_{p+1}. This is pessimistic for j > 1: in decoding, positions
before the round hold verified states, here every earlier position holds predicted ones. Rounds
are then replayed as for the corpus drafter (`drafter_replay.py`), with the verification costs
timed there and the drafter's own cost (its layer, projection and read-out on one row) timed
here: c = draft cost / plain step.

Trees are replayed the same way (`replay_tree`), before any is built: the chain with each draft's
second choice as a sibling leaf, and two chains from the first and second choice at depth 1; both
verify 2k + 1 positions a round.

`--measure N`: the first N test images decoded one at a time, alternating the backbone's own
`generate` and speculative decoding (`DraftVerifyDecoder`) with the feature drafter and with the
hybrid (corpus where it is sure, feature otherwise; the corpus from the same training outputs),
at `--draft-length`; the tokens must equal the backbone's (checked).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

LENGTHS = (1, 2, 3, 4)


def draft_flags(module, data, passes: int):
    """Per caption, per pass j: whether the j-th draft after each position is the backbone's token;
    and whether the drafter's second choice there is (what a tree's sibling would catch)."""
    import torch

    captions, seconds = [], []
    with torch.no_grad():
        for features, top, embeds, ahead, scored in data:
            tops, per_pass, second = top, [], []
            for j in range(passes):
                predicted = module.states(tops, embeds, features.mask, features.positions)
                best = module.vocabulary[module.read_out(predicted).topk(2, -1).indices]
                # at q, pass j reads predicted states (of its j earlier drafts) and drafts x_{q+2}: the
                # (j+1)-th draft of the round begun at q - j (the embeddings are the true tokens',
                # which a draft equals until the round's first refusal, where the round stops anyway)
                per_pass.append(best[..., 0] == ahead)
                second.append(best[..., 1] == ahead)
                tops = torch.cat([top[:, :1], predicted[:, :-1]], 1)
            for row in range(top.shape[0]):
                columns = scored[row].nonzero().flatten()
                captions.append(torch.stack([flags[row, columns] for flags in per_pass]))
                seconds.append(torch.stack([flags[row, columns] for flags in second]))
    return captions, seconds


def replay_tree(captions, seconds, length: int, shape: str) -> dict:
    """Rounds of tree drafting, replayed as `replay` does chains: `leaves`, the chain of `length`
    first choices with each one's second choice as a sibling leaf (2k nodes, drafted at a chain's
    cost: the second choice is in the same read-out); `two chains`, the first and second choice
    at depth 1, each followed by first choices (2k nodes, drafted as two rows)."""
    rounds = nodes = accepted = tokens = 0
    for flags, second in zip(captions, seconds):
        positions = flags.shape[1]

        def run(p: int, start: int, k: int) -> int:  # first choices kept from depth `start`
            good = start
            while good < k and p + good < positions and bool(flags[good, p + good]):
                good += 1
            return good

        p = 0
        while p < positions:
            k = min(length, positions - p)
            good = run(p, 0, k)
            if shape == "leaves" and good < k and bool(second[good, p + good]):
                good += 1  # the sibling at the first refused depth was right: kept, and the round ends there
            elif shape == "two chains" and good == 0 and bool(second[0, p]):
                good = run(p, 1, k)  # the second choice's chain
            rounds += 1
            nodes += 2 * k
            accepted += good
            made = min(good + 1, positions - p)
            tokens += made
            p += made
    return {"length": length, "shape": shape, "rounds": rounds, "nodes": nodes, "accepted": accepted,
            "decode_tokens": tokens, "tokens_per_round": tokens / rounds if rounds else float("nan")}


def replay(captions, length: int) -> dict:
    """Rounds of greedy speculative decoding: after each verified token, up to `length` drafts."""
    rounds = drafted = accepted = tokens = 0
    for flags in captions:  # (passes, positions): flags[j, q] whether pass j's draft at q is right
        positions = flags.shape[1]
        p = 0
        while p < positions:
            k = min(length, positions - p)
            good = 0
            while good < k and bool(flags[good, p + good] if p + good < positions else False):
                good += 1
            rounds += 1
            drafted += k
            accepted += good
            made = min(good + 1, positions - p)  # the verification's own token, unless the caption ended
            tokens += made
            p += made
    return {"length": length, "rounds": rounds, "drafted": drafted, "accepted": accepted, "decode_tokens": tokens,
            "acceptance_rate": accepted / drafted if drafted else float("nan"),
            "tokens_per_round": tokens / rounds if rounds else float("nan")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smol")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--train-limit", type=int, default=400)
    parser.add_argument("--test-limit", type=int, default=200)
    parser.add_argument("--vocabulary", type=int, default=1024, help="tokens the drafter reads out over")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--measure", type=int, default=0, help="then decode this many test images for real, batch 1, "
                        "with the feature and hybrid drafters beside the backbone's own generate")
    parser.add_argument("--draft-length", type=int, default=3, help="k of the measured feature drafter")
    parser.add_argument("--hybrid-length", type=int, default=6, help="k of the measured hybrid (its default)")
    parser.add_argument("--corpus-length", type=int, default=4, help="k of the measured corpus drafter")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from drafter_replay import measure, timed_costs

    from earlyexit.data.splits import load_split, splits_for
    from earlyexit.drafters.feature import FeatureDrafter, HybridDrafter, training_batches
    from earlyexit.models.loading import load_backend
    from earlyexit.plugins.registry import get_registry
    from earlyexit.training.drafters import backbone_token_outputs
    from earlyexit.training.exits import backbone_captions, with_own_targets
    from earlyexit.util.files import write_json_atomically
    from earlyexit.util.provenance import provenance

    torch.set_num_threads(int(os.environ.get("EARLYEXIT_THREADS", "2")))
    torch.manual_seed(0)
    name = args.backend or ("minigpt4-llama" if args.model == "smol" else "blip2-opt")
    backend = load_backend(get_registry(load_entrypoints=False).backend(name), args.model)
    train_split, _, test_split = splits_for("scenes")
    began = time.perf_counter()
    train_set = load_split("scenes", train_split, args.train_limit)
    outputs, _ = backbone_token_outputs(backend, train_set)
    test_set = load_split("scenes", test_split, args.test_limit)
    own_test = backbone_captions(backend, test_set, progress=False)
    test_data = training_batches(backend, with_own_targets(test_set, own_test), args.batch_size)
    prepare_seconds = time.perf_counter() - began
    config = dict(vocabulary=args.vocabulary, epochs=args.epochs, learning_rate=args.learning_rate,
                  batch_size=args.batch_size, draft_length=args.draft_length)
    drafter = FeatureDrafter(backend, FeatureDrafter.Config(**config))
    print(f"{name}:{args.model}: {len(outputs)} training outputs, {len(own_test)} test captions; training")
    drafter.fit(outputs, samples=train_set)  # the product's own fit: what `run --drafter feature` trains
    module = drafter.module
    captions, seconds = draft_flags(module, test_data, max(LENGTHS))
    alpha = [float(torch.cat([c[j] for c in captions]).float().mean()) for j in range(max(LENGTHS))]

    # costs: one plain step and verifications (the engine, exits off), and one draft on one row
    costs = timed_costs(backend, context_tokens=10, lengths=range(1, 2 * max(LENGTHS) + 1), repeats=args.repeats)
    width = backend.text_config.hidden_size
    with torch.no_grad():  # one row, one position: the drafter's attention over its few earlier drafts is
        one = torch.randn(1, 1, 2 * width)  # left out (at caption lengths it is small beside the projections)
        at = torch.tensor([[48]])

        def draft_once(rows: int):
            state = backend.run_layer(module.layer, module.project(one.repeat(rows, 1, 1)), attention_mask=None,
                                      position_ids=at.repeat(rows, 1), cache=None)
            module.read_out(state[:, -1]).argmax(-1)

        times = {1: [], 2: []}
        for repeat in range(args.repeats + 1):
            for rows in times:
                began = time.perf_counter()
                draft_once(rows)
                if repeat:
                    times[rows].append(time.perf_counter() - began)
    draft_ms = 1000 * statistics.median(times[1])
    draft_two_ms = 1000 * statistics.median(times[2])  # two rows in step: a tree's two chains
    c = draft_ms / costs["step_ms"]
    rows = []
    for length in LENGTHS:
        result = replay(captions, length)
        spent = result["rounds"] * (length * draft_ms + costs["verify_ms"][length + 1])
        result["estimated_decode_speedup"] = result["decode_tokens"] * costs["step_ms"] / spent
        rows.append(result)
        print(f"  feature k={length}: α {result['acceptance_rate']:.3f}, {result['tokens_per_round']:.2f} tokens/round, "
              f"c {c:.3f}, est. decode {result['estimated_decode_speedup']:.2f}x")
    trees = []  # verified as 2k + 1 positions at once (timed with a causal mask: a tree mask costs no less)
    for shape, per_draft in (("leaves", draft_ms), ("two chains", draft_two_ms)):
        for length in LENGTHS:
            result = replay_tree(captions, seconds, length, shape)
            spent = result["rounds"] * (length * per_draft + costs["verify_ms"][2 * length + 1])
            result["estimated_decode_speedup"] = result["decode_tokens"] * costs["step_ms"] / spent
            trees.append(result)
            print(f"  tree ({shape}) k={length}: {result['tokens_per_round']:.2f} tokens/round over "
                  f"{2 * length} nodes, est. decode {result['estimated_decode_speedup']:.2f}x")
    print(f"per-step acceptance (pass 1..{max(LENGTHS)}): " + " ".join(f"{a:.3f}" for a in alpha)
          + f"; draft {draft_ms:.2f} ms against a plain step of {costs['step_ms']:.2f} ms; trained in "
          f"{drafter.train_seconds:.0f} s")
    measured = {}
    if args.measure:  # the engine path, batch 1, side by side with the backbone's own generate
        from earlyexit.drafters.corpus import CorpusDrafter

        corpus = CorpusDrafter(backend, CorpusDrafter.Config(draft_length=args.corpus_length))
        corpus.fit(outputs, log=lambda *_: None)
        hybrid = HybridDrafter(backend, HybridDrafter.Config(**{**config, "draft_length": args.hybrid_length}))
        hybrid.corpus.fit(outputs, log=lambda *_: None)
        hybrid.feature.module = module  # the one trained above
        for label, used in (("corpus", corpus), ("feature", drafter), ("hybrid", hybrid)):
            measured[label] = {"draft_length": used.config.draft_length,
                               **measure(backend, used, test_set.subset(args.measure), 20)}
            if label == "hybrid":
                measured[label]["rounds_from_corpus"] = hybrid.from_corpus
                measured[label]["rounds_from_feature"] = hybrid.from_feature
            m = measured[label]
            print(f"  measured {label}, k={used.config.draft_length}, batch 1: α {m['acceptance_rate']:.3f}, "
                  f"{m['tokens_per_round']:.2f} tokens/round, {m['decode_wall_speedup']:.2f}x decode, "
                  f"{m['wall_speedup']:.2f}x end to end (tokens identical)")
    write_json_atomically(args.json, {
        "command": "python benchmarks/feature_drafter_replay.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "backend": name, "model": args.model, "train_outputs": len(outputs), "test_captions": len(own_test),
        "vocabulary": len(module.vocabulary), "epochs": args.epochs, "train_seconds": drafter.train_seconds,
        "prepare_seconds": prepare_seconds, "per_pass_acceptance": alpha, "draft_ms": draft_ms, "c": c,
        "draft_two_rows_ms": draft_two_ms, "timed_ms": costs, "feature": rows, "trees": trees, "measured_batch1": measured,
        "provenance": provenance(),
    })
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
