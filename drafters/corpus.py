"""The corpus drafter: drafts at no model cost from the backbone's own outputs on the
exit-training split, by the longest suffix match (`SuffixIndex`); captions are formulaic, so
the model often writes what it wrote before."""

from __future__ import annotations

import dataclasses
import json
import os

from earlyexit import hookimpl
from earlyexit.core.drafter import DraftContext, Drafter, DrafterConfig
from earlyexit.core.strategy import config_field
from earlyexit.drafters.suffix_index import SuffixIndex
from earlyexit.errors import ConfigError, CorruptAdapterError

CORPUS_FILE = "corpus.json"


@dataclasses.dataclass
class CorpusConfig(DrafterConfig):
    max_match: int = config_field(8, "longest suffix of the tokens so far matched against the corpus")

    def __post_init__(self):
        super().__post_init__()
        if self.max_match < 1:
            raise ConfigError(f"max_match must be at least 1 (got {self.max_match})")


class CorpusDrafter(Drafter):
    name = "corpus"
    description = "suffix match over the backbone's own outputs on the exit-training split (no model cost)"
    Config = CorpusConfig

    def __init__(self, backend, config=None):
        super().__init__(backend, config)
        self.outputs: list[list[int]] = []
        self.index = self._new_index()

    def _new_index(self) -> SuffixIndex:
        return SuffixIndex(depth=self.config.max_match + self.config.draft_length + 1)

    def fit(self, outputs, log=print) -> None:
        self.outputs = [list(map(int, tokens)) for tokens in outputs if tokens]
        self.index = self._new_index()
        for tokens in self.outputs:
            self.index.add(tokens)
        log(f"drafter corpus: {len(self.outputs)} outputs, {self.index.tokens} tokens indexed")

    def with_drafting(self, **knobs):
        super().with_drafting(**knobs)
        if self.index.depth < self._new_index().depth:  # longer drafts: index deeper suffixes (seconds)
            self.fit(self.outputs, log=lambda *_: None)
        return self

    def save(self, folder: str) -> None:
        with open(os.path.join(folder, CORPUS_FILE), "w") as file:
            json.dump({"outputs": self.outputs}, file)

    def load(self, folder: str) -> None:
        path = os.path.join(folder, CORPUS_FILE)
        try:
            with open(path) as file:
                outputs = json.load(file)["outputs"]
            if not all(isinstance(t, int) for tokens in outputs for t in tokens):
                raise ValueError("token ids must be integers")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CorruptAdapterError(f"{path}: not a corpus drafter's file ({error}); delete the folder to "
                                      "build it again") from None
        self.fit(outputs, log=lambda *_: None)

    def propose(self, context: DraftContext, count: int) -> list[int]:
        drafts, _ = self.index.continuation(context.tokens, count, self.config.stop_below, self.config.max_match)
        return drafts


@hookimpl
def earlyexit_register_drafters():
    return [CorpusDrafter]
