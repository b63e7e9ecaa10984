"""Procedural scenes: the project's embedded offline data set for captioning and VQA.

Each image holds 1-4 coloured shapes on a plain background. Its 5 COCO-like captions (from
"some shapes on a white background" to "a small red circle to the left of a big blue square")
and its VQAv2-like questions (10 annotator answers each) are derived from the same scene, so
every text is true of its picture. Everything is a pure function of (seed, split, index):
`generate_scene` builds the description, `render_scene` draws it, and `load_scenes` renders a
whole split once into a cache folder (one .npz of uint8 images + one JSON of annotations).
Texts are lower case, without final period; `split_words` is how they split into vocabulary words.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import warnings
import zipfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from earlyexit.data import Dataset, Sample
from earlyexit.errors import ConfigError, DataError
from earlyexit.util.files import atomic_write

GENERATOR_VERSION = 2  # bump whenever a change alters pixels or texts: old caches are then ignored

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
COLORS = {"red": (220, 30, 30), "green": (30, 150, 50), "blue": (30, 70, 220), "yellow": (235, 200, 0),
          "orange": (245, 130, 20), "purple": (130, 50, 180), "pink": (250, 120, 190), "black": (25, 25, 25)}
BACKGROUNDS = {"white": (255, 255, 255), "gray": (222, 222, 222), "beige": (242, 234, 214)}
RADIUS = {"small": 0.09, "large": 0.16}  # fraction of the image side
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}  # captions vary the wording
COLUMNS, ROWS = ("left", "center", "right"), ("top", "middle", "bottom")
PLACES = {("top", "left"): "in the top left corner", ("top", "center"): "at the top",
          ("top", "right"): "in the top right corner", ("middle", "left"): "on the left",
          ("middle", "center"): "in the center", ("middle", "right"): "on the right",
          ("bottom", "left"): "in the bottom left corner", ("bottom", "center"): "at the bottom",
          ("bottom", "right"): "in the bottom right corner"}
OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of",
            "above": "below", "below": "above"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
# what a careless annotator may answer instead of the exact word (VQA accuracy forgives 1-2 of them)
SYNONYMS = {"purple": "violet", "pink": "magenta", "yellow": "gold", "black": "dark", "circle": "round",
            "square": "rectangle", "triangle": "triangular", "cross": "plus", "ring": "donut",
            "left": "left side", "right": "right side", "top": "upper", "bottom": "lower",
            "small": "tiny", "large": "big"}
FUNCTION_WORDS = """a an the and there is are in on of at with some simple picture image drawing
    geometric colored plain background shape shapes object objects single only to left right above
    below next overlapping top bottom center corner what color how many which side or size any
    yes no small little large big tiny upper lower""".split()
SPLITS = ("train", "val", "test")
VAL_PARTS = ("exit_train", "dev")
EXIT_TRAIN_IMAGES = 400  # val's first images train the exits (the paper's 80 % of val); the rest is dev
CAPTIONS_PER_IMAGE, QUESTIONS_PER_IMAGE, ANSWERS_PER_QUESTION = 5, 5, 10


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    seed: int = 0
    image_size: int = 64
    train: int = 6000  # Karpathy-like proportions, small enough for CPU training
    # 400 images train the exits and 500 are dev: as many as test, so a budget met on dev is
    # measured as finely as on test (with 100 dev images, 0.0 % on dev was 0.5 % on test)
    val: int = 900
    test: int = 500
    max_objects: int = 4

    def __post_init__(self):
        if not 32 <= self.image_size <= 96:
            raise ConfigError(f"scene image_size must be 32..96 pixels, got {self.image_size}")
        if not 1 <= self.max_objects <= 6:
            raise ConfigError(f"scene max_objects must be 1..6, got {self.max_objects}")
        for split in SPLITS:
            if getattr(self, split) < 0:
                raise ConfigError(f"scene split size {split}={getattr(self, split)} is negative")


@dataclasses.dataclass
class SceneObject:
    shape: str
    color: str
    size: str  # "small" or "large"
    x: float  # centre, as a fraction of the image side
    y: float
    column: str  # region of the centre: one of COLUMNS
    row: str  # one of ROWS


@dataclasses.dataclass
class Question:
    text: str
    answer: str  # the true answer; most annotators give exactly this
    answers: list[str]
    question_type: str  # color, shape, count, position, relation, existence, size
    answer_type: str  # "yes/no", "number" or "other", as in VQAv2


@dataclasses.dataclass
class SceneRecord:
    split: str
    index: int
    background: str
    objects: list[SceneObject]
    captions: list[str]
    questions: list[Question]

    @property
    def id(self) -> str:
        return f"{self.split}-{self.index:05d}"


def split_words(text: str) -> list[str]:
    """Words as `vocabulary` lists them: runs of letters/digits, and punctuation ("?", ",")."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text)


# -- scene layout ---------------------------------------------------------------------------------
def _sample_objects(rng: random.Random, max_objects: int) -> list[SceneObject]:
    count = rng.randint(1, max_objects)
    objects, used = [], set()
    for cell in rng.sample(range(9), count):  # distinct 3x3 cells: every region word is exact
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        while (shape, color) in used:  # a colour + shape always names one object
            shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        used.add((shape, color))
        size = rng.choice(("small", "large"))
        column, row = cell % 3, cell // 3
        # jitter within the cell, clamped inside the image; neighbours may overlap
        x = min(max((column + 0.5 + rng.uniform(-0.3, 0.3)) / 3, RADIUS[size]), 1 - RADIUS[size])
        y = min(max((row + 0.5 + rng.uniform(-0.3, 0.3)) / 3, RADIUS[size]), 1 - RADIUS[size])
        objects.append(SceneObject(shape, color, size, round(x, 4), round(y, 4), COLUMNS[column], ROWS[row]))
    return objects


def _overlap(a: SceneObject, b: SceneObject) -> bool:
    return ((a.x - b.x) ** 2 + (a.y - b.y) ** 2) ** 0.5 < 0.85 * (RADIUS[a.size] + RADIUS[b.size])


def _relations(a: SceneObject, b: SceneObject) -> list[str]:
    """Relations true of `a` with respect to `b`, by region, so they are never borderline."""
    ca, cb, ra, rb = COLUMNS.index(a.column), COLUMNS.index(b.column), ROWS.index(a.row), ROWS.index(b.row)
    relations = [name for name, holds in (("to the left of", ca < cb), ("to the right of", ca > cb),
                                          ("above", ra < rb), ("below", ra > rb)) if holds]
    if ra == rb and abs(ca - cb) == 1:
        relations.append("next to")
    if _overlap(a, b):
        relations.append("overlapping")
    return relations


# -- captions -------------------------------------------------------------------------------------
def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith("ss") else "s")


def _describe(obj: SceneObject, rng: random.Random, size: bool = False) -> str:
    return " ".join(([rng.choice(SIZE_WORDS[obj.size])] if size else []) + [obj.color, obj.shape])


def _generic(objects, background, rng):  # easy: mostly frequent words
    if len(objects) == 1:
        return rng.choice([f"a shape on a {background} background", "a simple picture of a colored shape",
                           "a drawing of a geometric shape", "a single object on a plain background"])
    return rng.choice([f"some shapes on a {background} background", "a simple picture of colored shapes",
                       "a drawing of geometric shapes", "colored objects on a plain background"])


def _counting(objects, background, rng):
    if len(objects) == 1:
        return rng.choice(["there is one shape in the picture", f"one object on a {background} background",
                           "a picture with a single shape", "only one shape in the image"])
    number = NUMBER_WORDS[len(objects)]
    return rng.choice([f"there are {number} shapes in the picture",
                       f"{number} objects on a {background} background",
                       f"a picture with {number} shapes", f"{number} colored shapes in an image"])


def _listing(objects, background, rng):
    sizes = rng.random() < 0.5
    text = _join([_article(_describe(o, rng, sizes)) for o in rng.sample(objects, len(objects))])
    return text + (f" on a {background} background" if rng.random() < 0.3 else "")


def _shape_counts(objects, background, rng):
    counts = Counter(o.shape for o in objects)
    items = [_article(s) if k == 1 else f"{NUMBER_WORDS[k]} {_plural(s)}" for s, k in counts.items()]
    return rng.choice(["", "an image of ", "a picture of "]) + _join(items)


def _color_counts(objects, background, rng):
    noun, counts = rng.choice(("shape", "object")), Counter(o.color for o in objects)
    return _join([_article(f"{c} {noun}") if k == 1 else f"{NUMBER_WORDS[k]} {c} {noun}s"
                  for c, k in counts.items()])


def _position(objects, background, rng):
    obj = rng.choice(objects)
    if rng.random() < 0.5:
        return f"{_article(_describe(obj, rng, rng.random() < 0.5))} {PLACES[obj.row, obj.column]}"
    return f"the {_describe(obj, rng)} is {PLACES[obj.row, obj.column]}"


def _relation(objects, background, rng):  # hard: attributes of two objects and how they relate
    if len(objects) < 2:
        return _position(objects, background, rng)
    touching = [(a, b) for a in objects for b in objects if a is not b and _overlap(a, b)]
    if touching and rng.random() < 0.6:  # an overlap is what a person would mention first
        (a, b), relation = rng.choice(touching), "overlapping"
    else:
        a, b = rng.sample(objects, 2)
        relation = rng.choice(_relations(a, b))
    sizes = rng.random() < 0.5
    if rng.random() < 0.6:
        return f"{_article(_describe(a, rng, sizes))} {relation} {_article(_describe(b, rng, sizes))}"
    return f"the {_describe(a, rng)} is {relation} the {_describe(b, rng)}"


def _captions(objects, background, rng) -> list[str]:
    # one easy, one count, one listing, then two harder ones; duplicates are drawn again
    harder = [_shape_counts, _color_counts, _position, _relation]
    makers = [_generic, _counting, _listing] + rng.sample(harder, 2)
    everything = [_listing] + harder
    captions: list[str] = []
    for attempt in range(200):
        maker = makers[attempt] if attempt < len(makers) else rng.choice(everything)
        caption = maker(objects, background, rng)
        if caption not in captions:
            captions.append(caption)
        if len(captions) == CAPTIONS_PER_IMAGE:
            break
    rng.shuffle(captions)  # so the first reference is not always the easy one
    return captions


# -- questions: each returns (text, answer, answer_type, plausible wrong answers) or None ----------
def _unique_name(obj, objects, attribute_sets) -> str | None:
    """The first attribute combination ("shape", then "size shape", ...) that names `obj` alone."""
    for attributes in attribute_sets:
        if sum(all(getattr(o, a) == getattr(obj, a) for a in attributes) for o in objects) == 1:
            return " ".join(getattr(obj, a) for a in attributes)
    return None


def _ask_attribute(objects, rng, attribute, namings, templates, choices):
    """"what <attribute> is the <name>?", naming the object by other attributes only."""
    named = [(o, n) for o in objects if (n := _unique_name(o, objects, namings))]
    if not named:
        return None
    obj, name = rng.choice(named)
    answer = getattr(obj, attribute)
    return rng.choice(templates).format(name), answer, "other", [c for c in choices if c != answer]


def _ask_color(objects, rng):
    return _ask_attribute(objects, rng, "color", [("shape",), ("size", "shape")],
                          ["what color is the {}?", "what is the color of the {}?"], list(COLORS))


def _ask_shape(objects, rng):
    return _ask_attribute(objects, rng, "shape", [("color",), ("size", "color")],
                          ["what shape is the {} object?", "what is the shape of the {} object?"], SHAPES)


def _ask_count(objects, rng):
    form = rng.randrange(3)
    if form == 0:
        text, count = rng.choice(["how many shapes are there?", "how many objects are in the picture?",
                                  "how many shapes are in the image?"]), len(objects)
    elif form == 1:  # mostly a colour that is present; sometimes one that is not (answer "0")
        color = rng.choice(list(COLORS)) if rng.random() < 0.15 else rng.choice(objects).color
        text, count = f"how many {color} shapes are there?", sum(o.color == color for o in objects)
    else:
        shape = rng.choice(SHAPES) if rng.random() < 0.15 else rng.choice(objects).shape
        text, count = f"how many {_plural(shape)} are there?", sum(o.shape == shape for o in objects)
    return text, str(count), "number", [str(k) for k in (count - 1, count + 1) if k >= 0]


def _ask_position(objects, rng):
    candidates = [o for o in objects if (o.row, o.column) != ("middle", "center")]
    if not candidates:
        return None
    obj = rng.choice(candidates)
    name = _unique_name(obj, objects, [("shape",), ("color", "shape")])
    if obj.column != "center" and (obj.row == "middle" or rng.random() < 0.5):
        text = rng.choice([f"is the {name} on the left or the right?", f"which side is the {name} on?"])
        return text, obj.column, "other", ["right" if obj.column == "left" else "left"]
    text = f"is the {name} at the top or the bottom?"
    return text, obj.row, "other", ["bottom" if obj.row == "top" else "top"]


def _ask_relation(objects, rng):
    if len(objects) < 2:
        return None
    a, b = rng.sample(objects, 2)
    relation = rng.choice([r for r in _relations(a, b) if r in OPPOSITE])
    answer = "yes" if rng.random() < 0.5 else "no"
    if answer == "no":  # the opposite of a true strict relation is false
        relation = OPPOSITE[relation]
    names = [_unique_name(o, objects, [("shape",), ("color", "shape")]) for o in (a, b)]
    text = f"is the {names[0]} {relation} the {names[1]}?"
    return text, answer, "yes/no", ["no" if answer == "yes" else "yes"]


def _ask_existence(objects, rng):
    wanted = rng.random() < 0.5  # balance yes and no
    form = rng.randrange(3)
    if form == 0:  # colour and shape; a "no" shares one attribute with a present object
        present = {(o.color, o.shape) for o in objects}
        near = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present
                and any(c == o.color or s == o.shape for o in objects)]
        color, shape = rng.choice(sorted(present) if wanted else near)
        text, answer = f"is there {_article(color + ' ' + shape)}?", (color, shape) in present
    elif form == 1:
        shapes = {o.shape for o in objects}
        shape = rng.choice([s for s in SHAPES if (s in shapes) == wanted] or SHAPES)
        text, answer = f"is there {_article(shape)} in the picture?", shape in shapes
    else:
        colors = {o.color for o in objects}
        color = rng.choice([c for c in COLORS if (c in colors) == wanted])
        text, answer = f"are there any {color} shapes?", color in colors
    answer = "yes" if answer else "no"
    return text, answer, "yes/no", ["no" if answer == "yes" else "yes"]


def _ask_size(objects, rng):
    obj = rng.choice(objects)
    name = _unique_name(obj, objects, [("shape",), ("color", "shape")])
    text = rng.choice([f"is the {name} small or large?", f"what size is the {name}?"])
    return text, obj.size, "other", ["large" if obj.size == "small" else "small"]


QUESTION_KINDS = {"color": _ask_color, "shape": _ask_shape, "count": _ask_count, "position": _ask_position,
                  "relation": _ask_relation, "existence": _ask_existence, "size": _ask_size}


def _annotate(answer: str, wrong: list[str], rng: random.Random) -> list[str]:
    """Ten annotators: usually unanimous; sometimes one or two give a synonym or a wrong answer."""
    answers = [answer] * ANSWERS_PER_QUESTION
    for slot in rng.sample(range(ANSWERS_PER_QUESTION), rng.choices((0, 1, 2), weights=(75, 18, 7))[0]):
        answers[slot] = SYNONYMS[answer] if answer in SYNONYMS and rng.random() < 0.5 else rng.choice(wrong)
    return answers


def _questions(objects, rng) -> list[Question]:
    kinds = list(QUESTION_KINDS)
    rng.shuffle(kinds)
    questions: list[Question] = []
    for kind in kinds:
        made = QUESTION_KINDS[kind](objects, rng)
        if made is not None and all(q.text != made[0] for q in questions):
            text, answer, answer_type, wrong = made
            questions.append(Question(text, answer, _annotate(answer, wrong, rng), kind, answer_type))
        if len(questions) == QUESTIONS_PER_IMAGE:
            break
    return questions


# -- public: one scene ----------------------------------------------------------------------------
def generate_scene(config: SceneConfig, index: int, split: str = "train") -> SceneRecord:
    """The scene `index` of `split`: objects, captions and questions (no pixels; see render_scene)."""
    if split not in SPLITS:
        raise ConfigError(f"scene split must be one of {', '.join(SPLITS)}, got {split!r}")
    # a string seed is hashed with SHA-512 by `random`: the same stream on every machine and run
    rng = random.Random(f"earlyexit-scenes/{config.seed}/{split}/{index}")
    objects = _sample_objects(rng, config.max_objects)
    background = rng.choice(list(BACKGROUNDS))
    captions = _captions(objects, background, rng)
    return SceneRecord(split, index, background, objects, captions, _questions(objects, rng))


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, canvas: int) -> None:
    cx, cy, r, fill = obj.x * canvas, obj.y * canvas, RADIUS[obj.size] * canvas, COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, round(0.38 * r)))
    elif obj.shape == "square":
        draw.rectangle([cx - 0.82 * r, cy - 0.82 * r, cx + 0.82 * r, cy + 0.82 * r], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + 0.95 * r, cy + 0.75 * r), (cx - 0.95 * r, cy + 0.75 * r)],
                     fill=fill)
    elif obj.shape == "cross":
        arm = 0.3 * r
        draw.rectangle([cx - r, cy - arm, cx + r, cy + arm], fill=fill)
        draw.rectangle([cx - arm, cy - r, cx + arm, cy + r], fill=fill)
    else:  # star: 5 points, alternating outer and inner radius
        points = []
        for k in range(10):
            angle, radius = np.pi * k / 5 - np.pi / 2, r if k % 2 == 0 else 0.45 * r
            points.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
        draw.polygon(points, fill=fill)


def render_scene(record: SceneRecord, image_size: int = 64) -> Image.Image:
    """The scene drawn at twice the size and box-averaged down (cheap, deterministic anti-aliasing)."""
    canvas = 2 * image_size
    image = Image.new("RGB", (canvas, canvas), BACKGROUNDS[record.background])
    draw = ImageDraw.Draw(image)
    for obj in record.objects:
        _draw_shape(draw, obj, canvas)
    return image.reduce(2)


# -- vocabulary -----------------------------------------------------------------------------------
def corpus(config: SceneConfig = SceneConfig(), splits=("train",)) -> Iterator[str]:
    """Every caption, question and answer of the given splits (no rendering: fast)."""
    for split in splits:
        for index in range(getattr(config, split)):
            record = generate_scene(config, index, split)
            yield from record.captions
            for question in record.questions:
                yield question.text
                yield from question.answers


def vocabulary(config: SceneConfig = SceneConfig()) -> list[str]:
    """Every word (per `split_words`) that can appear in a caption, question or answer."""
    words = set(FUNCTION_WORDS) | set(SHAPES) | {_plural(s) for s in SHAPES} | set(COLORS) | set(BACKGROUNDS)
    words |= {w for synonym in SYNONYMS.values() for w in synonym.split()} | {"?", ","}
    words |= set(NUMBER_WORDS[1:config.max_objects + 1]) | {str(k) for k in range(config.max_objects + 2)}
    return sorted(words)


# -- cache and loading ----------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """$EARLYEXIT_CACHE/scenes, else $XDG_CACHE_HOME (or ~/.cache)/earlyexit/scenes."""
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = os.environ.get("EARLYEXIT_CACHE") or user_cache / "earlyexit"
    return Path(root) / "scenes"


def fingerprint(config: SceneConfig) -> str:
    """What decides pixels and texts (split sizes only decide how many: they go in file names)."""
    content = {"version": GENERATOR_VERSION, "seed": config.seed, "image_size": config.image_size,
               "max_objects": config.max_objects}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _read_cache(images_path: Path, notes_path: Path, count: int, size: int):
    """(images, records) from the cache, or None when missing or unusable (then it is rebuilt)."""
    try:
        with np.load(images_path, allow_pickle=False) as archive:
            images = archive["images"]
        notes = json.loads(notes_path.read_text())
        records = notes["records"]
        if notes["version"] != GENERATOR_VERSION or len(records) != count:
            raise ValueError("annotations do not match the configuration")
        if images.dtype != np.uint8 or images.shape != (count, size, size, 3):
            raise ValueError(f"images have shape {images.shape}, expected {(count, size, size, 3)}")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        warnings.warn(f"scene cache {images_path.parent} is unreadable ({error}); regenerating it")
        return None
    return images, records


def _load_split(config: SceneConfig, split: str, cache_dir: str | os.PathLike | None):
    folder = Path(cache_dir or default_cache_dir()) / fingerprint(config)
    count, size = getattr(config, split), config.image_size
    images_path, notes_path = folder / f"{split}-{count}.npz", folder / f"{split}-{count}.json"
    cached = _read_cache(images_path, notes_path, count, size)
    if cached is not None:
        return cached
    images = np.empty((count, size, size, 3), np.uint8)
    records = []
    for index in range(count):
        record = generate_scene(config, index, split)
        images[index] = np.asarray(render_scene(record, size))
        records.append(dataclasses.asdict(record))
    notes = {"version": GENERATOR_VERSION, "config": dataclasses.asdict(config), "records": records}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(str(images_path), "wb") as stream:
            np.savez_compressed(stream, images=images)
        text = json.dumps(notes, separators=(",", ":"))
        with atomic_write(str(notes_path), "wb") as stream:
            stream.write(text.encode())
    except OSError as error:
        raise DataError(f"cannot write the scene cache in {folder} ({error}); pass cache_dir= "
                        "or set EARLYEXIT_CACHE to a writable folder") from error
    return images, records


def val_part(part: str, count: int) -> range:
    """The indices of val's part `part` among `count` images: exits train on the first
    EXIT_TRAIN_IMAGES (80 % of a smaller val) and are tuned on the rest."""
    cut = min(EXIT_TRAIN_IMAGES, round(0.8 * count))
    return range(0, cut) if part == "exit_train" else range(cut, count)


def load_scenes(split: str, task: str = "caption", config: SceneConfig | None = None,
                cache_dir: str | os.PathLike | None = None) -> Dataset:
    """A split (train, val, test, or val's parts exit_train / dev) as captioning or VQA samples.

    The split is rendered on first use into `cache_dir`/<fingerprint>/ (default cache_dir:
    `default_cache_dir()`); later calls read that cache, and rebuild it if it is damaged.
    """
    config = config or SceneConfig()
    if split not in SPLITS and split not in VAL_PARTS:
        raise ConfigError(f"scene split must be one of {', '.join(SPLITS + tuple(VAL_PARTS))}, got {split!r}")
    if task not in ("caption", "vqa"):
        raise ConfigError(f"scene task must be 'caption' or 'vqa', got {task!r}")
    images, records = _load_split(config, "val" if split in VAL_PARTS else split, cache_dir)
    indices = val_part(split, len(records)) if split in VAL_PARTS else range(len(records))

    def image_loader(index: int):
        return lambda: Image.fromarray(images[index])

    samples = []
    for index in indices:
        record = records[index]
        image_id = f"{record['split']}-{record['index']:05d}"
        scene = {"image_id": image_id, "background": record["background"], "objects": record["objects"]}
        if task == "caption":
            samples.append(Sample(image_id, image_loader(index), captions=list(record["captions"]),
                                  extra=scene))
            continue
        for k, question in enumerate(record["questions"]):
            extra = dict(scene, question_type=question["question_type"], answer_type=question["answer_type"],
                         answer=question["answer"])
            samples.append(Sample(f"{image_id}-q{k}", image_loader(index), question=question["text"],
                                  answers=list(question["answers"]), extra=extra))
    return Dataset("scenes", task, split, samples)
