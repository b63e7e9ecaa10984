"""Caption data sets in their official files: Karpathy's COCO/Flickr splits and NoCaps.

The small `JsonFile` reader at the top is shared by the VQA and VisDial loaders too: every
problem with an input file becomes one DataError line naming the file, the place and a fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from earlyexit.data import Dataset, Sample, image_from_file
from earlyexit.errors import ConfigError, DataError

# JSON's own names, so messages read like the file rather than like Python
_TYPE_NAMES = {dict: "object", list: "list", str: "string", int: "integer", float: "number",
               bool: "boolean", type(None): "null"}


def _kinds(kind) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _type_name(kind) -> str:
    return " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in _kinds(kind))


def _article(kind) -> str:
    name = _type_name(kind)
    return ("an " if name[0] in "aeiou" else "a ") + name


class JsonFile:
    """A parsed JSON file that knows what it should have been, for one-line error messages."""

    def __init__(self, path, expected: str):
        self.path = Path(path)
        self.expected = expected  # e.g. "Karpathy's dataset_coco.json"
        if not self.path.is_file():
            raise DataError(f"{self.path}: file not found; download {expected} or fix the path")
        try:
            with open(self.path, encoding="utf-8") as handle:
                self.data = json.load(handle)
        except json.JSONDecodeError as error:
            self.fail(f"is not valid JSON ({error.msg} at line {error.lineno})")
        except (OSError, UnicodeDecodeError) as error:
            self.fail(f"cannot be read ({error})")

    def fail(self, problem: str):
        raise DataError(f"{self.path}: {problem}; is this {self.expected}?")

    def check(self, value, kind, where: str):
        """`value` itself must be of `kind` (used for the top level and list items)."""
        # bool is an int subclass, but True is never a valid id or index in these formats
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
            self.fail(f"{where} should be {_article(kind)}, not {_type_name(type(value))}")
        return value

    def field(self, record, key: str, kind, where: str, *, optional: bool = False) -> Any:
        """`record[key]`, which must exist (unless optional: then None) and be of `kind`."""
        if not isinstance(record, dict):
            self.fail(f"{where} should be an object, not {_type_name(type(record))}")
        if key not in record:
            if optional:
                return None
            self.fail(f"{where} has no '{key}' {_type_name(kind)}")
        return self.check(record[key], kind, f"{where} field '{key}'")


def require_folder(path, what: str) -> Path:
    """Image folders are checked up front (cheap); the images themselves load lazily."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found; pass the folder holding {what}")
    return folder


def check_split(split: str, allowed: tuple[str, ...], loader: str) -> None:
    if split not in allowed:
        raise ConfigError(f"{loader}: unknown split {split!r}; choose one of {', '.join(allowed)}")


# ---------------------------------------------------------------------------------------------
# Karpathy splits (dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json)


def load_karpathy(json_path, image_root, split: str, *, restval_in_train: bool = True) -> Dataset:
    """Karpathy's split file: image_root/filepath/filename, captions = the raw sentences.

    `restval` images count as training data by default, as in most captioning papers.
    Flickr files have no `filepath` or `cocoid`; their images sit directly in image_root and
    the id falls back to `imgid`.
    """
    check_split(split, ("train", "val", "test"), "load_karpathy")
    source = JsonFile(json_path, "Karpathy's dataset_coco.json (or dataset_flickr*.json)")
    root = require_folder(image_root, "the data set's images (e.g. the COCO root with val2014/)")
    images = source.field(source.check(source.data, dict, "the top level"), "images", list,
                          "the top level")
    wanted = {split, "restval"} if split == "train" and restval_in_train else {split}

    samples, splits_seen = [], set()
    for index, image in enumerate(images):
        where = f"image {index}"
        image_split = source.field(image, "split", str, where)
        splits_seen.add(image_split)
        if image_split not in wanted:
            continue
        image_id = source.field(image, "cocoid", (int, str), where, optional=True)
        if image_id is None:
            image_id = source.field(image, "imgid", (int, str), where)
        folder = source.field(image, "filepath", str, where, optional=True) or ""
        filename = source.field(image, "filename", str, where)
        sentences = source.field(image, "sentences", list, where)
        captions = [
            source.field(sentence, "raw", str, f"{where} sentence {number}").strip()
            for number, sentence in enumerate(sentences)
        ]
        samples.append(Sample(
            id=str(image_id),
            image=image_from_file(str(root / folder / filename)),
            captions=captions,
            extra={"filename": filename, "karpathy_split": image_split},
        ))
    if not samples:
        source.fail(f"has no images in split {split!r} (found: {', '.join(sorted(splits_seen))})")
    name = source.data.get("dataset")
    name = f"{name}-karpathy" if isinstance(name, str) else "karpathy"
    return Dataset(name=name, task="caption", split=split, samples=samples)


# ---------------------------------------------------------------------------------------------
# NoCaps (nocaps_val_4500_captions.json, nocaps_test_image_info.json)

NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")


def load_nocaps(json_path, image_root, split: str = "val", *, domain: str | None = None) -> Dataset:
    """NoCaps in COCO caption format: image_root/file_name; extra["domain"] for per-domain scores.

    The test file has no annotations, so its samples have no captions (the official server
    scores them). `domain` keeps only one of in-domain, near-domain, out-domain.
    """
    check_split(split, ("val", "test"), "load_nocaps")
    if domain is not None and domain not in NOCAPS_DOMAINS:
        raise ConfigError(f"load_nocaps: unknown domain {domain!r}; choose one of "
                          f"{', '.join(NOCAPS_DOMAINS)}")
    expected = "nocaps_val_4500_captions.json" if split == "val" else "nocaps_test_image_info.json"
    source = JsonFile(json_path, expected)
    root = require_folder(image_root, f"the NoCaps {split} images")
    top = source.check(source.data, dict, "the top level")
    images = source.field(top, "images", list, "the top level")
    # the val file must carry captions, otherwise it is probably the image-info file
    annotations = source.field(top, "annotations", list, "the top level",
                               optional=(split == "test"))

    captions_by_image: dict[Any, list[str]] = {}
    for index, annotation in enumerate(annotations or []):
        where = f"annotation {index}"
        image_id = source.field(annotation, "image_id", (int, str), where)
        caption = source.field(annotation, "caption", str, where)
        captions_by_image.setdefault(image_id, []).append(caption.strip())

    samples = []
    for index, image in enumerate(images):
        where = f"image {index}"
        image_id = source.field(image, "id", (int, str), where)
        image_domain = source.field(image, "domain", str, where)
        if domain is not None and image_domain != domain:
            continue
        file_name = source.field(image, "file_name", str, where)
        open_images_id = source.field(image, "open_images_id", str, where, optional=True)
        samples.append(Sample(
            id=str(image_id),
            image=image_from_file(str(root / file_name)),
            captions=captions_by_image.get(image_id, []),
            extra={"domain": image_domain, "open_images_id": open_images_id},
        ))
    return Dataset(name="nocaps", task="caption", split=split, samples=samples)
