"""Replay a feature drafter (EAGLE family) before building it: train one on the frozen backbone's
own outputs, then measure offline how often its drafts would be accepted, what a draft costs,
and the decode speed-up that follows at batch 1.

    python benchmarks/feature_drafter_replay.py --model smol --json benchmarks/results/feature-drafter-replay-smol.json

The drafter: at position p it reads the backbone's top-layer state f_p (before the final norm)
and the embedding of the next token x_{p+1}, concatenated and projected to the model's width,
then one decoder layer of the backbone's own kind (a trainable copy of its last layer, attending
over the drafter's earlier positions); its output predicts f_{p+1}, and the frozen final norm and
head, read out over the N tokens the backbone writes most on the training split (FR-Spec),
give the draft x_{p+2}. Trained on the backbone's greedy captions of the exit-training split:
smooth-L1 to the next top-layer state (both after the frozen final norm) plus cross-entropy to the
backbone's own next token, and
"training-time test" (HASS, EAGLE-3): a second pass whose inputs are the drafter's own
predictions of the states, so that chained drafts are trained as they are used.

Replay on the test split's own captions, teacher forced: pass j feeds the drafter its own
predictions from pass j - 1 in place of the top-layer states, so pass j's token at p is the j-th
draft of a round begun after x_{p+1}. This is pessimistic for j > 1: in decoding, positions
before the round hold verified states, here every earlier position holds predicted ones. Rounds
are then replayed as for the corpus drafter (`drafter_replay.py`), with the verification costs
timed there and the drafter's own cost (its layer, projection and read-out on one row) timed
here: c = draft cost / plain step. Not yet an engine path.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

LENGTHS = (1, 2, 3, 4)


class FeatureDrafter:
    """The projection, the layer and the frozen read-out (a plain holder; torch modules inside)."""

    def __init__(self, backend, vocabulary):
        import torch

        width = backend.text_config.hidden_size
        self.backend, self.vocabulary = backend, vocabulary
        self.project = torch.nn.Linear(2 * width, width)
        self.layer = copy.deepcopy(backend.decoder_layers()[-1])
        for p in list(self.project.parameters()) + list(self.layer.parameters()):
            p.requires_grad_(True)
        self.index = torch.full((backend.text_config.vocab_size,), -100, dtype=torch.long)
        self.index[vocabulary] = torch.arange(len(vocabulary))

    def parameters(self):
        return list(self.project.parameters()) + list(self.layer.parameters())

    def states(self, tops, embeds, features):
        """Predicted next top-layer states at every position from (top state, next embedding)."""
        import torch

        x = self.project(torch.cat([tops, embeds], -1))
        return self.backend.run_layer(self.layer, x, attention_mask=features.mask, position_ids=features.positions,
                                      cache=None)

    def read_out(self, states):
        return self.backend.logits(states, self.vocabulary)


def shifted(tensor):
    """tensor[:, t + 1] at t (the last position repeats: never scored)."""
    import torch

    return torch.cat([tensor[:, 1:], tensor[:, -1:]], 1)


def batches_of(backend, dataset, batch_size):
    """(features, top states, next-token embeddings, targets two ahead, scored positions) per batch."""
    import torch

    from earlyexit.training.features import teacher_forced_features

    out = []
    with torch.no_grad():
        for features in teacher_forced_features(backend, dataset, None, batch_size):
            top = features.hidden[-1]
            embeds = shifted(features.hidden[0])  # the embedding of x_{p+1} at p
            targets = features.targets  # targets[:, p] = x_{p+1}, for every position but the last
            targets = torch.cat([targets, targets.new_full((targets.shape[0], top.shape[1] - targets.shape[1]), -100)], 1)
            ahead = torch.cat([targets[:, 1:], targets[:, -1:]], 1)  # x_{p+2}: what the state predicted at p reads out to
            scored = (targets != -100) & (ahead != -100)
            features.hidden = [None] * len(features.hidden)  # keep mask and positions only
            out.append((features, top, embeds, ahead, scored))
    return out


def train(drafter, data, epochs: int, learning_rate: float, log) -> float:
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.AdamW(drafter.parameters(), lr=learning_rate)
    began = time.perf_counter()
    for epoch in range(epochs):
        total = 0.0
        for features, top, embeds, ahead, scored in data:
            loss = 0.0
            tops = top
            for _ in range(2):  # the second pass reads its own predictions: training-time test
                predicted = drafter.states(tops, embeds, features)
                target_states = shifted(top)
                # the states compared after the frozen final norm: the residual stream's scale is the norm's to undo
                normed = drafter.backend.pre_head(predicted[scored])
                regression = F.smooth_l1_loss(normed, drafter.backend.pre_head(target_states[scored]))
                labels = drafter.index[ahead[scored]]
                ce = F.cross_entropy(drafter.read_out(predicted[scored]), labels, ignore_index=-100)
                loss = loss + regression + ce
                tops = torch.cat([top[:, :1], predicted[:, :-1]], 1)  # at p: the prediction of f_p
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        if epoch % 5 == 0 or epoch == epochs - 1:
            log(f"  epoch {epoch}: loss {total / len(data):.4f}")
    return time.perf_counter() - began


def draft_flags(drafter, data, passes: int):
    """Per caption, per pass j: whether the j-th draft after each position is the backbone's token."""
    import torch

    captions = []
    with torch.no_grad():
        for features, top, embeds, ahead, scored in data:
            tops, per_pass = top, []
            for j in range(passes):
                predicted = drafter.states(tops, embeds, features)
                tokens = drafter.vocabulary[drafter.read_out(predicted).argmax(-1)]
                # at q, pass j reads predicted states (of its j earlier drafts) and drafts x_{q+2}: the
                # (j+1)-th draft of the round begun at q - j (the embeddings are the true tokens',
                # which a draft equals until the round's first refusal, where the round stops anyway)
                per_pass.append(tokens == ahead)
                tops = torch.cat([top[:, :1], predicted[:, :-1]], 1)
            for row in range(top.shape[0]):
                columns = scored[row].nonzero().flatten()
                captions.append(torch.stack([flags[row, columns] for flags in per_pass]))
    return captions


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
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from drafter_replay import timed_costs

    from earlyexit.core.speculative import draft_vocabulary_of
    from earlyexit.data.splits import load_split, splits_for
    from earlyexit.models.loading import load_backend
    from earlyexit.plugins.registry import get_registry
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
    own_train = backbone_captions(backend, train_set, progress=False)
    test_set = load_split("scenes", test_split, args.test_limit)
    own_test = backbone_captions(backend, test_set, progress=False)
    vocabulary = draft_vocabulary_of(backend, [t for texts in own_train.values() for t in texts], args.vocabulary)
    train_data = batches_of(backend, with_own_targets(train_set, own_train), args.batch_size)
    test_data = batches_of(backend, with_own_targets(test_set, own_test), args.batch_size)
    prepare_seconds = time.perf_counter() - began
    for parameter in backend.model.parameters():  # frozen: only the drafter's copy and projection train
        parameter.requires_grad_(False)
    drafter = FeatureDrafter(backend, vocabulary)
    print(f"{name}:{args.model}: {len(own_train)} training captions, {len(own_test)} test captions, read-out over "
          f"{len(vocabulary)} tokens; training")
    train_seconds = train(drafter, train_data, args.epochs, args.learning_rate, print)
    captions = draft_flags(drafter, test_data, max(LENGTHS))
    alpha = [float(torch.cat([c[j] for c in captions]).float().mean()) for j in range(max(LENGTHS))]

    # costs: one plain step and verifications (the engine, exits off), and one draft on one row
    costs = timed_costs(backend, context_tokens=10, lengths=LENGTHS, repeats=args.repeats)
    width = backend.text_config.hidden_size
    with torch.no_grad():  # one row, one position: the drafter's attention over its few earlier drafts is
        one = torch.randn(1, 1, 2 * width)  # left out (at caption lengths it is small beside the projections)
        at = torch.tensor([[48]])

        def draft_once():
            state = backend.run_layer(drafter.layer, drafter.project(one), attention_mask=None, position_ids=at,
                                      cache=None)
            drafter.read_out(state[:, -1]).argmax(-1)

        draft_once()
        times = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            draft_once()
            times.append(time.perf_counter() - began)
    draft_ms = 1000 * statistics.median(times)
    c = draft_ms / costs["step_ms"]
    rows = []
    for length in LENGTHS:
        result = replay(captions, length)
        spent = result["rounds"] * (length * draft_ms + costs["verify_ms"][length + 1])
        result["estimated_decode_speedup"] = result["decode_tokens"] * costs["step_ms"] / spent
        rows.append(result)
        print(f"  feature k={length}: α {result['acceptance_rate']:.3f}, {result['tokens_per_round']:.2f} tokens/round, "
              f"c {c:.3f}, est. decode {result['estimated_decode_speedup']:.2f}x")
    print(f"per-step acceptance (pass 1..{max(LENGTHS)}): " + " ".join(f"{a:.3f}" for a in alpha)
          + f"; draft {draft_ms:.2f} ms against a plain step of {costs['step_ms']:.2f} ms; trained in {train_seconds:.0f} s")
    write_json_atomically(args.json, {
        "command": "python benchmarks/feature_drafter_replay.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "backend": name, "model": args.model, "train_captions": len(own_train), "test_captions": len(own_test),
        "vocabulary": len(vocabulary), "epochs": args.epochs, "train_seconds": train_seconds,
        "prepare_seconds": prepare_seconds, "per_pass_acceptance": alpha, "draft_ms": draft_ms, "c": c,
        "timed_ms": costs, "feature": rows, "provenance": provenance(),
    })
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
