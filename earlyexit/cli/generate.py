"""`earlyexit generate`: caption or answer about one image, showing where each token left."""

from __future__ import annotations

import argparse
import json
import sys

from earlyexit.cli.common import (add_generation_arguments, add_model_arguments, cli_drafter, draft_exit_index,
                                  load_model,
                                  open_image, report_plugin_failures)
from earlyexit.errors import ConfigError
from earlyexit.plugins.registry import get_registry


def describe_tokens(tokenizer, token_ids: list[int], exit_layers: list[int]) -> list[dict]:
    return [{"token": tokenizer.decode([t]), "id": t, "exit_layer": k} for t, k in zip(token_ids, exit_layers)]


class GenerateCommand:
    """`earlyexit generate`: generate text for one image and show each token's exit layer."""

    @staticmethod
    def add_parser(subparsers) -> argparse.ArgumentParser:
        parser = subparsers.add_parser("generate", help="generate text for an image with early exits",
                                       description=GenerateCommand.__doc__)
        add_model_arguments(parser)
        parser.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
        parser.add_argument("--prompt", default="", help="text prompt, e.g. 'Question: what colour? Answer:'")
        add_generation_arguments(parser)
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        return parser

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        registry = get_registry()
        report_plugin_failures(registry)
        image = open_image(args.image)  # before loading weights: fail fast on a typo
        backend, strategy, model = load_model(registry, args)
        check_prompt(backend, args.prompt)
        return print_generation(args, backend, strategy, model, image, registry)


def check_prompt(backend, prompt: str) -> None:
    """The processor turns the image placeholder's text into placeholder tokens wherever it occurs,
    so a prompt that contains it would claim image features the image does not have."""
    placeholder = getattr(backend.processor, "image_token", None)
    placeholder = getattr(placeholder, "content", placeholder)
    if isinstance(placeholder, str) and placeholder and placeholder in prompt:
        raise ConfigError(f"--prompt contains {placeholder!r}, the model's image placeholder; rephrase the prompt "
                          "without it (the image is added for you)")


def print_generation(args, backend, strategy, model, image, registry=None) -> int:
    from earlyexit.core.accounting import CostModel, summarize  # lazy: keeps --help and list free of torch

    inputs = backend.prepare_inputs([image], [args.prompt])
    if args.decode == "speculative":
        from earlyexit.core.generation import count_tokens  # lazy: keeps --help and list free of torch
        # lazy: keeps --help and list free of torch
        from earlyexit.core.speculative import DEFAULT_DRAFT_LENGTH, speculative_decoder, speculative_summary

        if args.num_beams > 1:
            raise ConfigError("speculative decoding is greedy; drop --num-beams")
        drafter = cli_drafter(registry, args, backend)
        decoder = speculative_decoder(model, drafter, draft_exit_index(args, strategy) if drafter is None else None,
                                      args.draft_length or DEFAULT_DRAFT_LENGTH)
        sequences = decoder.generate(**inputs, max_new_tokens=args.max_new_tokens)
        length = count_tokens(sequences, inputs["input_ids"].shape[1], model.generation_config.eos_token_id)
        exit_layers = [backend.num_layers] * length
        summary = {"param_speedup": 1.0, **speculative_summary(decoder.last_records, CostModel.for_model(model),
                                                               decoder.last_stats)}
    else:
        sequences = model.generate(**inputs, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                                   do_sample=False)
        exit_layers = model.last_trace.per_sequence()[0]
        summary = summarize(model.last_trace, CostModel.for_model(model))
    token_ids = sequences[0, inputs["input_ids"].shape[1]:].tolist()[: len(exit_layers)]
    tokenizer = backend.processor.tokenizer
    result = {
        "text": tokenizer.decode(token_ids, skip_special_tokens=True).strip(),
        "token_ids": token_ids,
        "exit_layers": exit_layers,
        "tokens": describe_tokens(tokenizer, token_ids, exit_layers),
        "num_layers": backend.num_layers,
        "backend": backend.name,
        "strategy": strategy.name if strategy else None,
        "strategy_config": strategy.config.to_dict() if strategy else None,
        "exit_layer_choices": strategy.exit_layers if strategy else [],
        "kv_policy": model.kv_policy,
        "gate": model.gate.kind if model.gate is not None else None,
        "decode": args.decode,
        "param_speedup": summary["param_speedup"],
        "layer_speedup": summary["layer_speedup"],
        "decode_layer_speedup": summary["decode_layer_speedup"],
    }
    if args.decode == "speculative":
        result["speculative"] = {k: summary[k] for k in ("acceptance_rate", "mean_draft_length", "drafted", "accepted")}
        result["speculative"]["drafter"] = decoder.drafter_name
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(result["text"])
    marked = " ".join(f"{t['token'].strip() or repr(t['token'])}[{t['exit_layer']}]" for t in result["tokens"])
    print(f"tokens[exit layer of {backend.num_layers}]: {marked}")
    print(f"speed-up: param {summary['param_speedup']:.2f}x, layer {summary['layer_speedup']:.2f}x end to end, "
          f"{summary['decode_layer_speedup']:.2f}x decoding (layer counts heads, exit modules and catch-up; "
          "wall-clock: earlyexit eval or benchmarks/speed.py)", file=sys.stdout)
    return 0
