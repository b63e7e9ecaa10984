"""`--data NAME[:ROOT]`: every data set by name, with the official file layout under ROOT.

Embedded sets need no ROOT: `scenes` (captions), `scenes-vqa` (questions), `easy-vqa`.
The paper's data sets read the files as their authors publish them; ROOT is the folder that
holds them (see `LAYOUTS` for the file names looked for).
"""

from __future__ import annotations

import os

from earlyexit.data import Dataset
from earlyexit.data.coco import load_karpathy, load_nocaps
from earlyexit.data.easyvqa import load_easy_vqa
from earlyexit.data.scenes import load_scenes
from earlyexit.data.visdial import load_visdial
from earlyexit.data.vqa import load_gqa, load_okvqa, load_vizwiz, load_vqav2
from earlyexit.errors import ConfigError, DataError

EMBEDDED = {
    "scenes": "procedural scenes, 5 captions per image (embedded, offline)",
    "scenes-vqa": "procedural scenes, VQAv2-style questions with 10 answers (embedded, offline)",
    "easy-vqa": "easy-VQA from its PyPI package (offline)",
}
LAYOUTS = {
    "coco": "ROOT/dataset_coco.json (Karpathy splits) and the COCO images under ROOT/<filepath>/",
    "flickr30k": "ROOT/dataset_flickr30k.json (Karpathy splits) and ROOT/flickr30k-images/",
    "nocaps": "ROOT/nocaps_val_4500_captions.json or nocaps_test_image_info.json, images in ROOT/<split>/",
    "vqav2": "ROOT/v2_OpenEnded_mscoco_<sub>_questions.json, v2_mscoco_<sub>_annotations.json, images ROOT/<sub>/",
    "okvqa": "ROOT/OpenEnded_mscoco_<sub>_questions.json, mscoco_<sub>_annotations.json, images ROOT/<sub>/",
    "vizwiz": "ROOT/Annotations/<split>.json and images ROOT/<split>/",
    "gqa": "ROOT/<split>_balanced_questions.json and ROOT/images/",
    "visdial": "ROOT/visdial_1.0_<split>.json and images ROOT/VisualDialog_<split>2018/",
}
COCO_SUBTYPES = {"train": "train2014", "val": "val2014", "test-dev": "test-dev2015", "test": "test2015"}


def names() -> dict[str, str]:
    return {**EMBEDDED, **LAYOUTS}


def load_dataset(spec: str, split: str) -> Dataset:
    name, _, root = spec.partition(":")
    if name in EMBEDDED:
        return _embedded(name, split)
    if name not in LAYOUTS:
        import difflib

        close = difflib.get_close_matches(name, names(), n=1)
        hint = f"Did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"unknown data set {name!r}. {hint}Available: {', '.join(names())}")
    if not root:
        raise ConfigError(f"data set {name} needs its folder: --data {name}:ROOT with {LAYOUTS[name]}")
    if not os.path.isdir(root):
        raise DataError(f"{root} is not a folder; --data {name}:ROOT expects {LAYOUTS[name]}")
    return _official(name, root, split)


def _embedded(name: str, split: str) -> Dataset:
    if name == "easy-vqa":
        return load_easy_vqa(split)

    return load_scenes(split, task="vqa" if name == "scenes-vqa" else "caption")


def _official(name: str, root: str, split: str) -> Dataset:
    join = os.path.join
    if name in ("coco", "flickr30k"):
        json_file = "dataset_coco.json" if name == "coco" else "dataset_flickr30k.json"
        images = root if name == "coco" else join(root, "flickr30k-images")
        return load_karpathy(join(root, json_file), images, split)
    if name == "nocaps":
        json_file = "nocaps_val_4500_captions.json" if split == "val" else "nocaps_test_image_info.json"
        return load_nocaps(join(root, json_file), join(root, split), split)
    if name in ("vqav2", "okvqa"):
        sub = COCO_SUBTYPES.get(split, split)
        annotations = f"v2_mscoco_{sub}_annotations.json" if name == "vqav2" else f"mscoco_{sub}_annotations.json"
        questions = (f"v2_OpenEnded_mscoco_{sub}_questions.json" if name == "vqav2"
                     else f"OpenEnded_mscoco_{sub}_questions.json")
        annotations_path = join(root, annotations)
        loader = load_vqav2 if name == "vqav2" else load_okvqa
        return loader(join(root, questions), annotations_path if os.path.exists(annotations_path) else None,
                      join(root, sub), split)
    if name == "vizwiz":
        return load_vizwiz(join(root, "Annotations", f"{split}.json"), join(root, split), split)
    if name == "gqa":
        return load_gqa(join(root, f"{split}_balanced_questions.json"), join(root, "images"), split)

    return load_visdial(join(root, f"visdial_1.0_{split}.json"), join(root, f"VisualDialog_{split}2018"), split)


def task_name(data: str) -> str:
    """caption, vqa or dialog, from a data set's name (`NAME` or `NAME:ROOT`), before loading it."""
    name = data.partition(":")[0]
    if name in ("scenes", "coco", "flickr30k", "nocaps"):
        return "caption"
    return "dialog" if name == "visdial" else "vqa"
