"""The cell store: one JSON per evaluated cell, named by a key of everything that shapes its result.

key = hash(resolved cell configuration, model fingerprint, data fingerprint, code fingerprint).
- model: `tiny` -> its build recipe and weight file; a folder -> config.json and each weight file's
  name, size and modification time (not the bytes: hashing a 15 GB model on every run costs more
  than it protects); a hub id -> the id alone (pin a revision by downloading it to a folder);
- data: the embedded scenes -> generator version and scene config; a folder -> name, size and
  modification time of each annotation file in it (images are not read);
- code: the source of every module that shapes a result (earlyexit's core, its backends and
  strategies, the plugin module of the cell's strategy and backend; not the CLI or the bench's own
  rendering), with the earlyexit, torch and transformers versions. Any edit there makes every cell
  stale, on purpose: a number is only reused when the code that made it is byte-identical.
- the exits: `earlyexit run` trains them under a recipe that is part of the cell's configuration
  (strategy, options, exit layers, data, train limit, seed) and the backbone's weight digest, so a
  cell key determines its exits. Not covered: exits retrained in place under the same recipe
  (`earlyexit run --retrain`), an edited scene cache, a changed hub model under the same id —
  rerun with `--force` after such changes.
Results that could not be computed (data or model missing, an error) are kept beside the results
but are checked again on every run, so fetching the data is all it takes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

import earlyexit
from earlyexit import backends, strategies
from earlyexit.data.scenes import GENERATOR_VERSION, SceneConfig
from earlyexit.models import embedded
from earlyexit.util.files import write_json_atomically

IGNORED_SOURCES = ("cli", "bench", "specs", "placement.py")  # commands, rendering, search: no effect on a cell


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_stamp(path: str) -> list:
    stat = os.stat(path)
    return [os.path.basename(path), stat.st_size, stat.st_mtime_ns]


def model_fingerprint(model: str) -> str:
    if model == embedded.NAME:
        folder = embedded.model_path()
        built = [_file_stamp(os.path.join(folder, f)) for f in sorted(os.listdir(folder))
                 if f.endswith(".safetensors")] if os.path.isdir(folder) else "not built yet"
        return _digest(["tiny", embedded.fingerprint(), built])
    if os.path.isdir(model):
        files = sorted(os.listdir(model))
        config = os.path.join(model, "config.json")
        content = open(config, "rb").read().decode(errors="replace") if os.path.isfile(config) else None
        return _digest(["folder", content, [_file_stamp(os.path.join(model, f)) for f in files
                                            if f.endswith((".safetensors", ".bin", ".gguf", ".pth"))]])
    return _digest(["hub-or-name", model])


def data_fingerprint(data: str) -> str:
    name, _, root = data.partition(":")
    if name in ("scenes", "scenes-vqa"):
        import dataclasses


        return _digest([name, GENERATOR_VERSION, dataclasses.asdict(SceneConfig())])
    if not root or not os.path.isdir(root):
        return _digest([name, root, "missing"])
    stamps = []
    for folder in (root, os.path.join(root, "Annotations")):  # VizWiz keeps its JSON one level down
        if os.path.isdir(folder):
            stamps += [_file_stamp(os.path.join(folder, f)) for f in sorted(os.listdir(folder))
                       if f.endswith(".json")]
    return _digest([name, stamps])


@functools.cache
def code_fingerprint(*extra_files: str) -> str:
    """Digest of the source that shapes results (see the module docstring) and the versions."""
    import torch
    import transformers


    digest = hashlib.sha256()
    roots = [os.path.dirname(earlyexit.__file__), *backends.__path__, *strategies.__path__]
    files = set(extra_files)
    for root in roots:
        for folder, subfolders, names in os.walk(root):
            subfolders[:] = sorted(s for s in subfolders
                                   if not (folder == roots[0] and s in IGNORED_SOURCES) and s != "__pycache__")
            files.update(os.path.join(folder, n) for n in names
                         if n.endswith(".py") and not (folder == roots[0] and n in IGNORED_SOURCES))
    for path in sorted(files):
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as handle:
            digest.update(handle.read())
    digest.update(f"{earlyexit.__version__} {torch.__version__} {transformers.__version__}".encode())
    return digest.hexdigest()[:16]


def plugin_sources(registry, cell) -> tuple:
    """The module files of the cell's strategy and backend classes (third-party plugins included)."""
    import inspect

    files = []
    for cls in (registry.strategy(cell.strategy), registry.backend(cell.settings["backend"])):
        try:
            files.append(inspect.getsourcefile(cls))
        except TypeError:
            pass
    return tuple(sorted(f for f in files if f))


def cell_key(cell, registry) -> tuple[str, dict]:
    """(key, the fingerprints it is made of)."""
    parts = {"config": cell.config(), "model": model_fingerprint(cell.settings["model"]),
             "data": data_fingerprint(cell.data), "code": code_fingerprint(*plugin_sources(registry, cell))}
    if cell.settings.get("test_data"):
        parts["test_data"] = data_fingerprint(cell.settings["test_data"])
    return _digest(parts), parts


class CellStore:
    """`folder/<key>.json`, each written atomically: an interrupted bench loses at most the cell it
    was computing."""

    def __init__(self, folder: str):
        self.folder = folder

    def path(self, key: str) -> str:
        return os.path.join(self.folder, f"{key}.json")

    def get(self, key: str) -> dict | None:
        try:
            with open(self.path(key), encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, json.JSONDecodeError):
            return None  # absent or damaged: computed again

    def done(self, key: str) -> bool:
        """A computed result (not a record of a cell that could not be computed)."""
        record = self.get(key)
        return record is not None and "report" in record

    def put(self, key: str, record: dict) -> str:
        write_json_atomically(self.path(key), record)
        return self.path(key)
