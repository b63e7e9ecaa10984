"""`earlyexit build-tiny`: train the embedded `tiny` model (done automatically on first use)."""

from __future__ import annotations

import argparse

from .common import quiet_transformers


class BuildTinyCommand:
    """`earlyexit build-tiny`: train the embedded `tiny` model (done automatically on first use)."""

    @staticmethod
    def add_parser(subparsers) -> argparse.ArgumentParser:
        parser = subparsers.add_parser("build-tiny", help="(re)build the embedded tiny model",
                                       description=BuildTinyCommand.__doc__)
        parser.add_argument("--force", action="store_true", help="rebuild even if a built model is cached")
        return parser

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from .. import embedded

        quiet_transformers()
        path = embedded.ensure_built(force=args.force)
        info = embedded.build_info() or {}
        print(f"tiny model: {path}")
        if info:
            print(f"trained in {info['train_seconds']:.0f} s, final loss {info['final_loss']:.3f}")
        return 0
