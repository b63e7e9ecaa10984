"""Caption grounding on the scene data: does a caption name what is really in the picture?

CIDEr rewards the references' shared wording, so a captioner that ignores the pixels ("a picture
with two shapes") can score well. The scenes' ground truth lets us check the content words:
for colours, shapes and numbers, the share of captions that name one (`mention_rate`) and the
share of named ones that are true of the scene (`precision`). A number is true when it counts all
objects, or the objects of one shape or one colour. `blind_baseline` is the precision of always
naming the training captions' most frequent word of each kind: what a model blind to the image
would reach.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from earlyexit.data.scenes import COLORS, NUMBER_WORDS, SHAPES, split_words

KINDS = ("color", "shape", "number")
IRREGULAR_PLURALS = {"crosses": "cross"}


def _singular(word: str) -> str:
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    return word[:-1] if word.endswith("s") and word[:-1] in SHAPES else word


def named_words(caption: str) -> dict[str, list[str]]:
    """The colour, shape (singular) and number words of a caption, in order."""
    words = [_singular(w) for w in split_words(caption.lower())]
    return {"color": [w for w in words if w in COLORS], "shape": [w for w in words if w in SHAPES],
            "number": [w for w in words if w in NUMBER_WORDS[1:]]}


def scene_truth(objects: Iterable[Mapping]) -> dict[str, set[str]]:
    """What a caption may truly name about a scene given as its objects (dicts with shape, color)."""
    objects = list(objects)
    counts = {len(objects)} | set(Counter(o["shape"] for o in objects).values()) | set(
        Counter(o["color"] for o in objects).values())
    return {"color": {o["color"] for o in objects}, "shape": {o["shape"] for o in objects},
            "number": {NUMBER_WORDS[k] for k in counts if k < len(NUMBER_WORDS)}}


def caption_grounding(captions: Mapping[str, str], scenes: Mapping[str, Iterable[Mapping]]) -> dict:
    """{kind: {"mention_rate", "precision"}} over captions (id -> text) of scenes (id -> objects);
    precision is None when no caption names a word of that kind."""
    if not captions:
        raise ValueError("no captions to score")
    rows, mentions, correct = Counter(), Counter(), Counter()
    for image_id, caption in captions.items():
        truth = scene_truth(scenes[image_id])
        for kind, words in named_words(caption).items():
            rows[kind] += bool(words)
            mentions[kind] += len(words)
            correct[kind] += sum(w in truth[kind] for w in words)
    return {kind: {"mention_rate": rows[kind] / len(captions),
                   "precision": correct[kind] / mentions[kind] if mentions[kind] else None} for kind in KINDS}


def blind_baseline(training_captions: Iterable[str], scenes: Mapping[str, Iterable[Mapping]]) -> dict:
    """{kind: {"guess", "precision"}}: always naming the most frequent training word of each kind."""
    counts = {kind: Counter() for kind in KINDS}
    for caption in training_captions:
        for kind, words in named_words(caption).items():
            counts[kind].update(words)
    truths = [scene_truth(objects) for objects in scenes.values()]
    result = {}
    for kind in KINDS:
        guess = counts[kind].most_common(1)[0][0] if counts[kind] else None
        result[kind] = {"guess": guess, "precision": sum(guess in t[kind] for t in truths) / len(truths)}
    return result
