"""Choose the feature drafter's training recipe and the hybrid's rule on the dev split (never on
test): tokens a round of real greedy speculative decoding, one image at a time.

    python benchmarks/drafter_dev_tuning.py --model smol --json benchmarks/results/drafter-dev-tuning-smol.json

Tokens a round is what the drafters differ in here: each round costs one verification, and a
draft of the feature drafter costs about 2 % of a step on `smol` (`feature_drafter_replay.py`
times it), so the count decides before the clock does. Each recipe trains the product's own
`FeatureDrafter.fit` on the backbone's outputs for the first `--train-limit` exit-training images
and drafts k = 4 on `--dev-limit` dev images. The hybrid's candidate rules then run with the
first recipe's drafter:

- `corpus`: the corpus alone (k = 4; and k = 8 with τ = 0.2, its best replayed setting);
- `feature`: the feature drafter alone (k = 3, 4);
- `match m`: the corpus where its longest match covers at least m tokens, else the feature drafter;
- `share`: the corpus where its share of its first token is at least the feature drafter's
  probability of its own first token (what `hybrid` does), k = 4 and 6.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

RECIPES = ((60, 1e-3), (30, 1e-3), (30, 3e-4))  # (epochs, learning rate); the first is the default


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smol")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--train-limit", type=int, default=400)
    parser.add_argument("--dev-limit", type=int, default=40)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)

    import torch

    from earlyexit.core.engine import EarlyExitForCausalLM
    from earlyexit.core.speculative import DraftVerifyDecoder
    from earlyexit.data.splits import load_split, splits_for
    from earlyexit.data.tasks import task_of
    from earlyexit.drafters.feature import FeatureDrafter, HybridDrafter
    from earlyexit.models.loading import load_backend
    from earlyexit.plugins.registry import get_registry
    from earlyexit.training.drafters import backbone_token_outputs
    from earlyexit.util.files import write_json_atomically
    from earlyexit.util.provenance import provenance

    torch.set_num_threads(int(os.environ.get("EARLYEXIT_THREADS", "2")))
    name = args.backend or ("minigpt4-llama" if args.model == "smol" else "blip2-opt")
    backend = load_backend(get_registry(load_entrypoints=False).backend(name), args.model)
    train_split, dev_split, _ = splits_for("scenes")
    train = load_split("scenes", train_split, args.train_limit)
    outputs, _ = backbone_token_outputs(backend, train)
    dev = load_split("scenes", dev_split, args.dev_limit)
    task = task_of(dev)
    inputs = [backend.prepare_inputs([s.load_image()], [task.prompt(s, backend)]) for s in dev.samples]

    def decode(drafter) -> dict:
        decoder = DraftVerifyDecoder(EarlyExitForCausalLM(backend), drafter)
        began = time.perf_counter()
        for one in inputs:
            decoder.generate(**one, max_new_tokens=20)
        stats = decoder.total_stats
        return {"tokens_per_round": (stats.tokens - len(inputs)) / stats.rounds, "acceptance_rate":
                stats.acceptance_rate, "rounds": stats.rounds, "seconds": time.perf_counter() - began}

    recipes, trained = [], None
    for epochs, learning_rate in RECIPES:
        drafter = FeatureDrafter(backend, FeatureDrafter.Config(draft_length=4, epochs=epochs,
                                                                learning_rate=learning_rate))
        drafter.fit(outputs, samples=train, log=lambda *_: None)
        trained = trained or drafter
        row = {"epochs": epochs, "learning_rate": learning_rate, "train_seconds": drafter.train_seconds,
               **decode(drafter)}
        recipes.append(row)
        print(f"recipe {epochs} epochs, lr {learning_rate}: {row['tokens_per_round']:.2f} tokens a round, "
              f"α {row['acceptance_rate']:.2f}, trained in {row['train_seconds']:.0f} s", flush=True)

    class Rule(HybridDrafter):
        """The hybrid under a candidate rule, with the first recipe's feature drafter."""

        def __init__(self, rule: str, length: int, stop_below: float = 0.0, least_match: int = 0):
            super().__init__(backend, HybridDrafter.Config(draft_length=length, stop_below=stop_below))
            self.corpus.fit(outputs, log=lambda *_: None)
            self.feature = trained
            self.rule, self.least_match = rule, least_match

        def propose(self, context, count):
            if self.rule == "share":
                return super().propose(context, count)
            state, position = self.feature.observe(context)
            if self.rule == "feature":
                return self.feature.draft(state, position, count)
            drafts, _ = self.corpus.index.continuation(context.tokens, count, self.config.stop_below,
                                                       self.config.max_match)
            if self.rule == "corpus":
                return drafts
            matched, _ = self.corpus.index.longest_match(context.tokens, self.config.max_match)
            if drafts and matched >= self.least_match:
                self.from_corpus += 1
                return drafts
            self.from_feature += 1
            return self.feature.draft(state, position, count)

    candidates = [("corpus", 4, 0.0, 0), ("corpus", 8, 0.2, 0), ("feature", 3, 0.0, 0), ("feature", 4, 0.0, 0),
                  ("match", 4, 0.0, 3), ("match", 4, 0.0, 5), ("match", 4, 0.0, 7), ("share", 4, 0.0, 0),
                  ("share", 6, 0.0, 0)]
    rules = []
    for rule, length, stop_below, least_match in candidates:
        drafter = Rule(rule, length, stop_below, least_match)
        row = {"rule": rule, "draft_length": length, "stop_below": stop_below, "least_match": least_match,
               **decode(drafter), "rounds_from_corpus": drafter.from_corpus, "rounds_from_feature": drafter.from_feature}
        rules.append(row)
        print(f"{rule} k={length} τ={stop_below} m={least_match}: {row['tokens_per_round']:.2f} tokens a round, "
              f"α {row['acceptance_rate']:.2f}", flush=True)
    write_json_atomically(args.json, {
        "command": "python benchmarks/drafter_dev_tuning.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "backend": name, "model": args.model, "train_outputs": len(outputs), "dev_images": len(inputs),
        "recipes": recipes, "hybrid_rules": rules, "provenance": provenance(),
    })
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
