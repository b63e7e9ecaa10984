"""The exit drafter: the strategy's own exits draft (self-speculative decoding, LayerSkip-style):
every draft runs the layers up to one exit, and the verification reuses their K/V."""

from __future__ import annotations

from earlyexit import hookimpl
from earlyexit.core.drafter import Drafter


class ExitDrafter(Drafter):
    name = "exits"
    description = "the strategy's exits draft; the verification resumes from their K/V (self-speculative)"
    needs_fitting = False  # it drafts with the exits the strategy trained
    uses_exits = True

    def propose(self, context, count):  # the engine drafts at the exit (`SelfSpeculativeDecoder`)
        raise TypeError("the exit drafter drafts inside the engine; decode with SelfSpeculativeDecoder")


@hookimpl
def earlyexit_register_drafters():
    return [ExitDrafter]
