"""COCO caption metrics through pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr (+ SPICE).

Conventions (those of the COCO caption evaluation, so numbers match published ones):
- both predictions and references go through the Stanford PTB tokenizer first (lower-cases,
  splits, drops punctuation); METEOR and the tokenizer run on Java;
- values are on pycocoevalcap's scale: fractions in [0, 1], CIDEr in [0, 10]; papers print x100;
- BLEU is corpus-level (clipped n-gram counts summed over all images, brevity penalty from the
  "closest" reference length), not a mean of sentence BLEUs;
- CIDEr takes its idf from the references of the whole set: a set of one image always scores 0,
  and a per-item CIDEr depends on which other images were scored with it;
- SPICE needs Stanford CoreNLP jars that pycocoevalcap downloads on first use. This module never
  downloads: without the jars SPICE is skipped and the result says why.

Use `caption_scores` for a one-off evaluation, or a `CaptionScorer` (a context manager) to keep
one METEOR Java process for several evaluations.
"""

from __future__ import annotations

import functools
import importlib
import os
import shutil
from collections.abc import Mapping

from earlyexit.errors import ConfigError, DataError
from earlyexit.metrics import check_same_ids
from earlyexit.util.quiet import QuietSubprocess

METRIC_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
# What pycocoevalcap's get_stanford_models() would download into pycocoevalcap/spice/lib.
_SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
_JAVA_HINT = ("Java not found on PATH: install a Java runtime (e.g. `apt-get install "
              "openjdk-17-jre-headless`); the PTB tokenizer and METEOR of pycocoevalcap need it")


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(f"cannot import {module} ({error}): `pip install pycocoevalcap`") from None


def _require_java() -> None:
    if shutil.which("java") is None:
        raise ConfigError(_JAVA_HINT)


def spice_unavailable_reason() -> str | None:
    """None when SPICE can run offline, else a one-line reason."""
    spice_dir = os.path.dirname(_import("pycocoevalcap.spice.spice").__file__)
    missing = [jar for jar in _SPICE_JARS if not os.path.exists(os.path.join(spice_dir, "lib", jar))]
    if missing:
        return (f"Stanford CoreNLP jars missing from {os.path.join(spice_dir, 'lib')} "
                f"({', '.join(missing)}); copy them there to enable SPICE (no download attempted)")
    return None


def _check_inputs(predictions: Mapping, references: Mapping) -> list:
    check_same_ids(predictions, references, "id", "caption", "references")
    for item_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise DataError(f"id {item_id!r}: the prediction must be a string, "
                            f"got {type(caption).__name__}")
        refs = references[item_id]
        if isinstance(refs, str) or not isinstance(refs, (list, tuple)) or not refs:
            raise DataError(f"id {item_id!r}: references must be a non-empty list of strings")
        if not all(isinstance(ref, str) for ref in refs):
            raise DataError(f"id {item_id!r}: every reference must be a string")
    return list(predictions)


def _tokenize(captions: dict[object, list[str]]) -> dict[object, list[str]]:
    """PTB-tokenize {id: [captions]}; the tokenizer is line-based, so every kind of line break
    inside a caption (\\r, \\u2028, ...) is flattened first or the lines would shift."""
    module = _import("pycocoevalcap.tokenizer.ptbtokenizer")
    module.subprocess = QuietSubprocess()  # its "PTBTokenizer tokenized N tokens" line: not on the terminal
    tokenizer = module.PTBTokenizer()
    flat = {item_id: [{"caption": " ".join(text.split())} for text in texts]
            for item_id, texts in captions.items()}
    tokenized = tokenizer.tokenize(flat)
    if any(len(tokenized.get(item_id, ())) != len(texts) for item_id, texts in captions.items()):
        raise ConfigError("the PTB tokenizer (Java) returned fewer lines than captions: "
                          "check that `java -version` works")
    return tokenized


def _tokenized_inputs(predictions: Mapping, references: Mapping) -> tuple[list, dict, dict]:
    """Validated ids plus tokenized references and predictions, both in the order of `ids`
    (pycocoevalcap returns per-item scores in the key order of what it is given)."""
    ids = _check_inputs(predictions, references)
    _require_java()
    gts = _tokenize({item_id: list(references[item_id]) for item_id in ids})
    res = _tokenize({item_id: [predictions[item_id]] for item_id in ids})
    return ids, {item_id: gts[item_id] for item_id in ids}, {item_id: res[item_id] for item_id in ids}


@functools.cache
def _closable_meteor_class():
    meteor_module = _import("pycocoevalcap.meteor.meteor")

    class ClosableMeteor(meteor_module.Meteor):
        """pycocoevalcap's Meteor with an idempotent close(). Its own __del__ waits on a lock
        that a failed compute_score never releases, which hangs at interpreter exit."""

        def close(self) -> None:
            process = getattr(self, "meteor_p", None)
            if process is None:
                return
            self.meteor_p = None
            if process.poll() is None:
                process.kill()
            process.wait()
            for stream in (process.stdin, process.stdout, process.stderr):
                try:
                    stream.close()
                except OSError:  # stdin may still hold unsent bytes for the dead process
                    pass

        __del__ = close

    return ClosableMeteor


class CaptionScorer:
    """Holds the METEOR Java process (started on first use) so it is paid for once.

    spice: None = compute SPICE when its jars are present, else skip with a reason;
    True = require it (ConfigError when it cannot run); False = never compute it.
    """

    def __init__(self, spice: bool | None = None):
        if spice not in (None, True, False):
            raise ConfigError(f"spice must be None, True or False, not {spice!r}")
        self._spice = spice
        self._meteor = None
        if spice is True:
            reason = spice_unavailable_reason()
            if reason:
                raise ConfigError(f"SPICE requested but unavailable: {reason}")

    def score(self, predictions: Mapping[object, str], references: Mapping[object, list[str]],
              per_item: bool = False) -> dict:
        """{"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr"[, "SPICE"]: float, "skipped":
        {metric: reason}} plus "per_item" {id: {metric: float}} when per_item=True."""
        ids, gts, res = _tokenized_inputs(predictions, references)
        result: dict = {}
        items: dict = {item_id: {} for item_id in ids}

        bleu = _import("pycocoevalcap.bleu.bleu").Bleu(4)
        corpus_bleu, sentence_bleu = bleu.compute_score(gts, res, verbose=0)
        for n in range(4):
            result[f"BLEU-{n + 1}"] = float(corpus_bleu[n])
            for item_id, value in zip(ids, sentence_bleu[n]):
                items[item_id][f"BLEU-{n + 1}"] = float(value)

        result["METEOR"], per_meteor = self._meteor_score(gts, res)
        for item_id, value in zip(ids, per_meteor):
            items[item_id]["METEOR"] = float(value)

        for key, module, name in (("ROUGE-L", "pycocoevalcap.rouge.rouge", "Rouge"),
                                  ("CIDEr", "pycocoevalcap.cider.cider", "Cider")):
            mean, per_id = getattr(_import(module), name)().compute_score(gts, res)
            result[key] = float(mean)
            for item_id, value in zip(ids, per_id):
                items[item_id][key] = float(value)

        result["skipped"] = {}
        if self._spice is False:
            result["skipped"]["SPICE"] = "not requested (spice=False)"
        else:
            reason = spice_unavailable_reason()
            if reason is None:
                reason = self._add_spice(gts, res, result, items)
            if reason is not None:
                if self._spice:
                    raise ConfigError(f"SPICE requested but failed: {reason}")
                result["skipped"]["SPICE"] = reason

        if per_item:
            result["per_item"] = items
        return result

    def _meteor_score(self, gts, res) -> tuple[float, list[float]]:
        if self._meteor is None:
            self._meteor = _closable_meteor_class()()
        try:
            mean, per_id = self._meteor.compute_score(gts, res)
        except Exception as error:
            # The Java side is now out of step with us: drop it; the next call starts afresh.
            self._close_meteor()
            raise ConfigError(f"METEOR (Java) failed: {error!r}; check `java -version` and "
                              "that the machine has 2 GB of free memory") from None
        return float(mean), per_id

    @staticmethod
    def _add_spice(gts, res, result, items) -> str | None:
        """Runs SPICE into result/items; returns a one-line reason when it fails."""
        try:
            mean, per_id = _import("pycocoevalcap.spice.spice").Spice().compute_score(gts, res)
            per_item = {item_id: float(scores["All"]["f"])  # Spice returns ids sorted
                        for item_id, scores in zip(sorted(gts), per_id)}
        except Exception as error:  # Java/CoreNLP trouble: report it rather than lose the rest
            return f"SPICE failed: {error!r}".replace("\n", " ")
        result["SPICE"] = float(mean)
        for item_id, value in per_item.items():
            items[item_id]["SPICE"] = value
        return None

    def _close_meteor(self) -> None:
        meteor, self._meteor = self._meteor, None
        if meteor is not None:
            meteor.close()

    def close(self) -> None:
        """Stops the METEOR process; the scorer can still be used (it restarts one)."""
        self._close_meteor()

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def caption_scores(predictions: Mapping[object, str], references: Mapping[object, list[str]],
                   spice: bool | None = None, per_item: bool = False) -> dict:
    """Scores captions (id -> caption) against references (id -> list of captions).

    Returns {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"[, "SPICE"]:
    float, "skipped": {metric: one-line reason}} plus "per_item" {id: {metric: float}} when
    per_item=True. See the module docstring for scales and conventions.
    """
    with CaptionScorer(spice=spice) as scorer:
        return scorer.score(predictions, references, per_item=per_item)


def cider_per_item(predictions: Mapping[object, str],
                   references: Mapping[object, list[str]]) -> dict:
    """{id: CIDEr} without starting METEOR. The idf comes from all references passed in."""
    ids, gts, res = _tokenized_inputs(predictions, references)
    _, per_id = _import("pycocoevalcap.cider.cider").Cider().compute_score(gts, res)
    return {item_id: float(value) for item_id, value in zip(ids, per_id)}
