"""How fast could early exits on `smol` be at best? Ceilings set by how often the exits agree
with the final layer, on the dev split, with this machine's layer and head costs.

    python benchmarks/smol_ceiling.py --exits ~/.cache/earlyexit/exits/minigpt4-llama-...-free-... \
        --json benchmarks/results/smol-ceiling.json

smol writes its own greedy caption for every dev image; the backbone then runs teacher forced on
those tokens, and at every position each exit's token is compared with the final layer's. From
the agreement alone, with no decision rule and no engine:

- **oracle early exit**: every position leaves at the first exit whose token is the final
  layer's (a rule that never errs and costs nothing to ask). Its mean depth gives a decode-phase
  ceiling at zero token loss, by layer equivalents ((N + h) / (depth + m + h), h the head, m the
  exit's own modules, by parameters) and by the timed one-row costs of the layers and the head,
  both as if the K/V of the skipped layers were never needed; and timed once more under
  `catchup` (the engine's default), where the skipped layers run later as extra rows of the next
  position that goes deeper.
- **self-speculative ceiling**: teacher forcing on the model's own tokens gives exactly the drafts
  greedy self-speculative decoding makes while its drafts are accepted (the shallow layers' and
  the exit's K/V are exact in both), so the rounds are replayed position by position for draft
  lengths 1-4 at every exit. A round costs k drafts (the layers up to the exit and the exit's
  modules, one row each), the last draft's shallow layers, the deeper layers on k + 1 rows and
  the head on k + 1 rows, all timed here without the engine around them; plain decoding costs
  N layers and the head on one row per token.
- **rules, decisions free**: what the confidence rule (over a grid of α) and two-exit patience
  (leave where an exit's token equals the previous exit's) reach over the same exits: mean depth,
  the share of tokens equal to the final layer's, and the layer speed-up as for the oracle. The
  gap to the oracle is the rule's; the gap from here to `earlyexit run` is the decisions' cost.

Drafts are read out over the whole vocabulary here (a draft vocabulary can only lower the
acceptance). Every timing is the median of --repeats calls on the idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from earlyexit.models.loading import load_backend

DRAFT_LENGTHS = (1, 2, 3, 4)


def agreement(backend, strategies: dict, dataset, batch_size: int) -> dict:
    """{name: [per caption: (exits, decode positions) bool tensor]}: whether each exit's token is
    the final layer's at every position after the first (the prompt pass writes the first)."""
    import torch

    from earlyexit.training.features import teacher_forced_features

    n = backend.num_layers
    found = {name: [] for name in strategies}
    for features in teacher_forced_features(backend, dataset, None, batch_size):
        where = features.targets != -100
        final = features.final_logits[:, :-1].argmax(-1)
        for name, strategy in strategies.items():
            if strategy is None:  # the untrained shared head after every layer
                logits = [backend.logits(features.hidden[d][:, :-1]) for d in range(1, n)]
            else:
                logits = [strategy.exit_logits(e, state[:, :-1])
                          for e, state in enumerate(strategy.teacher_forced_states(features))]
            # (rows, exits, positions): each exit's token, and its probability (the confidence rule's)
            best = [x.softmax(-1).max(-1) for x in logits]
            confidence = torch.stack([b.values for b in best], 1)
            tokens = torch.stack([b.indices for b in best], 1)
            for row in range(tokens.shape[0]):
                columns = where[row].nonzero().flatten()[1:]
                found[name].append({"agrees": tokens[row][:, columns] == final[row, columns],
                                    "tokens": tokens[row][:, columns], "confidence": confidence[row][:, columns]})
    return found


def rule_points(rows, exit_layers, n: int, head_layers: float, module_layers: float) -> list[dict]:
    """What practical rules over these exits reach, decisions free: the confidence rule (leave at
    the first exit whose token has probability >= α) and two-exit patience (leave at the first
    exit whose token equals the exit before's). Mean depth, the share of tokens equal to the final
    layer's, and the decode-phase layer speed-up as in the oracle."""
    import torch

    layers = torch.tensor(list(exit_layers) + [n])

    def point(rule: str, leaves: list) -> dict:
        depths, same = [], []
        for caption, leave in zip(rows, leaves):
            leave = torch.cat([leave, torch.ones(1, leave.shape[1], dtype=torch.bool)])
            first = leave.float().argmax(0)
            depths += layers[first].tolist()
            agrees = torch.cat([caption["agrees"], torch.ones(1, leave.shape[1], dtype=torch.bool)])
            same += agrees.gather(0, first[None])[0].tolist()
        depth = sum(depths) / len(depths)
        return {"rule": rule, "mean_depth": depth, "token_agreement": sum(same) / len(same),
                "decode_layer_speedup": (n + head_layers) / (depth + module_layers + head_layers)}

    points = [point(f"confidence >= {alpha}", [c["confidence"] >= alpha for c in rows])
              for alpha in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)]
    patience = [torch.cat([torch.zeros(1, c["tokens"].shape[1], dtype=torch.bool),
                           c["tokens"][1:] == c["tokens"][:-1]]) for c in rows]
    points.append(point("patience 2", patience))
    points += [point(f"patience 2 and confidence >= {alpha}",
                     [p & (c["confidence"] >= alpha) for p, c in zip(patience, rows)]) for alpha in (0.5, 0.7)]
    return points


def oracle_depth(rows, exit_layers, n: int) -> float:
    """Mean depth at which a position first meets an exit that agrees (n where none does)."""
    import torch

    depths = []
    for agrees in rows:
        layer = torch.tensor(list(exit_layers) + [n])
        hit = torch.cat([agrees, torch.ones(1, agrees.shape[1], dtype=torch.bool)]).float().argmax(0)
        depths += layer[hit].tolist()
    return sum(depths) / len(depths)


def oracle_catchup_ms(rows, exit_layers, n: int, layer_ms: dict, extra_ms: float) -> float:
    """Mean milliseconds a position costs when it leaves at the oracle's depth under `catchup`
    (batch 1): the layers it skips run later, as extra rows of the next position that goes deeper
    (`layer_ms[r]`: one layer on r rows, extended linearly past the rows timed); `extra_ms` is
    what each position pays besides its layers (exit module and head)."""
    import torch

    most = max(layer_ms)
    per_row = (layer_ms[most] - layer_ms[1]) / (most - 1)

    def layer(rows: int) -> float:
        return layer_ms[rows] if rows in layer_ms else layer_ms[most] + per_row * (rows - most)

    spent = positions = 0
    for agrees in rows:
        layers = torch.tensor(list(exit_layers) + [n])
        hits = torch.cat([agrees, torch.ones(1, agrees.shape[1], dtype=torch.bool)]).float().argmax(0)
        waiting = [0] * (n + 1)
        for depth in layers[hits].tolist():
            for j in range(1, depth + 1):
                spent += layer(1 + waiting[j])
                waiting[j] = 0
            for j in range(depth + 1, n + 1):
                waiting[j] += 1
            spent += extra_ms
            positions += 1
    return spent / positions


def replay_rounds(rows, exit_index: int, length: int) -> dict:
    """Self-speculative rounds drafting `length` at one exit, replayed over every caption."""
    rounds = drafted = accepted = tokens = 0
    for agrees in rows:
        flags = agrees[exit_index].tolist()
        position = 0
        while position < len(flags):
            drafts = min(length, len(flags) - position)
            taken = 0
            while taken < drafts and flags[position + taken]:
                taken += 1
            rounds, drafted, accepted = rounds + 1, drafted + drafts, accepted + taken
            made = min(taken + 1, len(flags) - position)  # the correction or bonus token
            tokens += made
            position += made
    return {"rounds": rounds, "tokens": tokens, "acceptance_rate": accepted / drafted if drafted else None,
            "tokens_per_round": tokens / rounds if rounds else None}


def timed_costs(backend, max_rows: int, context: int, repeats: int) -> dict:
    """Milliseconds of one decoder layer (the mean over all layers) and of the head, on 1..max_rows
    new positions after `context` cached ones, and of a FREE exit module's one-row pass."""
    import torch
    from transformers import DynamicCache

    model = backend.language_model
    decoder, width = model.model, model.config.hidden_size
    layers = list(decoder.layers)

    def median_ms(function) -> float:
        function()
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            function()
            times.append(time.perf_counter() - began)
        return 1000 * statistics.median(times)

    layer_ms, head_ms = {}, {}
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        prefix = torch.randn(1, context, width)
        positions = torch.arange(context)[None]
        rotary = decoder.rotary_emb(prefix, positions)
        for layer in layers:
            layer(prefix, attention_mask=None, position_ids=positions, cache=cache, use_cache=True,
                  position_embeddings=rotary)
        for rows in range(1, max_rows + 1):
            hidden = torch.randn(1, rows, width)
            positions = torch.arange(context, context + rows)[None]
            rotary = decoder.rotary_emb(hidden, positions)
            mask = None
            if rows > 1:
                mask = torch.zeros(1, 1, rows, context + rows)
                mask[..., context:] = torch.triu(torch.full((rows, rows), float("-inf")), 1)

            def all_layers():
                for layer in layers:
                    layer(hidden, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                          position_embeddings=rotary)
                cache.crop(-rows)

            layer_ms[rows] = median_ms(all_layers) / len(layers)
            head_ms[rows] = median_ms(lambda: backend.logits(hidden[0]))
    return {"context": context, "layer_ms": layer_ms, "head_ms": head_ms}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exits", action="append", default=[],
                        help="a saved exits folder (repeatable); the untrained shared head is always measured")
    parser.add_argument("--json", required=True)
    parser.add_argument("--dev-limit", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--max-rows", type=int, default=8, help="rows the layer and head timings go up to")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    import torch

    from earlyexit.data.splits import load_split
    from earlyexit.models.adapters import load_exits
    from earlyexit.plugins.registry import get_registry
    from earlyexit.training.exits import backbone_captions, with_own_targets
    from earlyexit.util.files import write_json_atomically
    from earlyexit.util.provenance import provenance

    torch.set_num_threads(int(os.environ.get("EARLYEXIT_THREADS", "2")))
    registry = get_registry(load_entrypoints=False)
    backend = load_backend(registry.backend("minigpt4-llama"), "smol")
    n = backend.num_layers
    strategies = {"untrained": None}
    for folder in args.exits:
        strategy = load_exits(os.path.expanduser(folder), backend, registry)
        strategies[f"{strategy.name} ({os.path.basename(os.path.normpath(folder))})"] = strategy
    dev = load_split("scenes", "dev", args.dev_limit)
    began = time.perf_counter()
    own = with_own_targets(dev, backbone_captions(backend, dev, progress=False))
    found = agreement(backend, strategies, own, args.batch_size)
    rows = {name: [caption["agrees"] for caption in captions] for name, captions in found.items()}
    costs = timed_costs(backend, max(args.max_rows, max(DRAFT_LENGTHS) + 1), context=48, repeats=args.repeats)
    t_layer, t_head = costs["layer_ms"], costs["head_ms"]
    plain_ms = n * t_layer[1] + t_head[1]
    layer_params = sum(p.numel() for p in backend.decoder_layers()[0].parameters())
    head_layers = backend.language_model.lm_head.weight.numel() / layer_params

    report = {}
    for name, strategy in strategies.items():
        exit_layers = list(range(1, n)) if strategy is None else list(strategy.exit_layers)
        module_layers = 0.0
        if strategy is not None and getattr(strategy, "exit_transformers", None) is not None:
            module_layers = sum(p.numel() for p in strategy.exit_transformers[0].parameters()) / layer_params
        positions = sum(r.shape[1] for r in rows[name])
        every = torch.cat(rows[name], 1).float().mean(1).tolist()
        depth = oracle_depth(rows[name], exit_layers, n)
        extra_ms = module_layers * t_layer[1] + t_head[1]
        oracle_ms = depth * t_layer[1] + extra_ms
        catchup_ms = oracle_catchup_ms(rows[name], exit_layers, n, t_layer, extra_ms)
        entry = {
            "exit_layers": exit_layers,
            "decode_positions": positions,
            "agreement_with_final_layer": {layer: a for layer, a in zip(exit_layers, every)},
            "exit_module_layer_equivalents": module_layers,
            "oracle_early_exit": {
                "mean_depth": depth,
                "decode_layer_speedup": (n + head_layers) / (depth + module_layers + head_layers),
                "decode_timed_speedup": plain_ms / oracle_ms,
                "decode_timed_speedup_with_catchup": plain_ms / catchup_ms,
            },
        }
        if strategy is not None:
            entry["rules_without_decision_costs"] = rule_points(found[name], exit_layers, n, head_layers,
                                                                module_layers)
        if strategy is None or name.startswith("free"):  # exits cheap enough to draft with
            speculative = {}
            for e, layer in enumerate(exit_layers):
                for length in DRAFT_LENGTHS:
                    replay = replay_rounds(rows[name], e, length)
                    draft_ms = layer * t_layer[1] + module_layers * t_layer[1]
                    round_ms = (length * draft_ms + layer * t_layer[1] + (n - layer) * t_layer[length + 1]
                                + t_head[length + 1])
                    replay["decode_timed_speedup"] = plain_ms * replay["tokens"] / (replay["rounds"] * round_ms)
                    speculative[f"{layer}/{length}"] = replay
            best = max(speculative, key=lambda key: speculative[key]["decode_timed_speedup"])
            entry["speculative_ceiling"] = {"best": best, **speculative[best], "by_exit_and_length": speculative}
        report[name] = entry
        print(f"{name}: agreement " + " ".join(f"{l}:{a:.2f}" for l, a in zip(exit_layers, every)
                                               if strategy is not None or l % 5 == 0 or l == n - 1))
        oracle = entry["oracle_early_exit"]
        print(f"  oracle early exit: mean depth {depth:.1f}, decode {oracle['decode_layer_speedup']:.2f}x by layers, "
              f"{oracle['decode_timed_speedup']:.2f}x timed, "
              f"{oracle['decode_timed_speedup_with_catchup']:.2f}x timed with the skipped layers caught up")
        if "speculative_ceiling" in entry:
            ceiling = entry["speculative_ceiling"]
            print(f"  speculative ceiling: {ceiling['decode_timed_speedup']:.2f}x decode at layer/length {best} "
                  f"({ceiling['acceptance_rate']:.2f} accepted, {ceiling['tokens_per_round']:.2f} tokens a round)")
        for point in entry.get("rules_without_decision_costs", []):
            print(f"  {point['rule']}: mean depth {point['mean_depth']:.1f}, "
                  f"{point['token_agreement']:.3f} of tokens the final layer's, "
                  f"{point['decode_layer_speedup']:.2f}x by layers")
    result = {
        "command": "python benchmarks/smol_ceiling.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "dev_images": len(dev), "num_layers": n, "head_layer_equivalents": head_layers,
        "timed_ms": costs, "plain_token_ms": plain_ms, "exits": report,
        "seconds": time.perf_counter() - began, "provenance": provenance(),
    }
    write_json_atomically(args.json, result)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
