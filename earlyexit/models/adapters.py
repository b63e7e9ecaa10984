"""Exit weights are adapters: only the exit modules and a small JSON config are saved.

    exits.safetensors   the strategy's exit modules (e.g. FREE's exit transformers)
    backbone.safetensors  only for strategies that fine-tune decoder layers (MuE): their copies
    exit_config.json    strategy, backend, backbone name, exit layers, strategy config
                        (threshold included) and a fingerprint of the backbone

Loading checks the fingerprint, so exits are never silently attached to another backbone.
Weights are read with safetensors only (no pickle). Saving writes a temporary folder and renames
it into place: a crash never leaves a half-written adapter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
import weakref

from earlyexit.core.model_folder import safetensors_problem
from earlyexit.errors import CheckpointError, ConfigError, CorruptAdapterError, first_line
from earlyexit.util.files import atomic_folder

WEIGHTS, CONFIG = "exits.safetensors", "exit_config.json"


def weights_file(stem: str) -> str:
    return f"{stem}.safetensors"
FORMAT_VERSION = 1
_VOLATILE_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
                  "_attn_implementation", "_attn_implementation_autoset")


def backbone_fingerprint(backend) -> str:
    """The language model's architecture plus checksums of every weight of the model (vision
    tower, Q-Former and language model), so a backbone changed anywhere, even in one middle
    layer, gets another fingerprint and stale exits are never reused. Computed once per model
    and reused until a weight changes (every in-place change bumps a tensor's version)."""
    config = {k: v for k, v in backend.text_config.to_dict().items() if k not in _VOLATILE_KEYS}
    state = sorted(backend.model.state_dict(keep_vars=True).items())  # the tensors themselves: stable ids
    versions = tuple((id(t), t._version) for _, t in state)
    cached = _FINGERPRINTS.get(backend.model)
    if cached is not None and cached[0] == versions:
        return cached[1]
    digest = hashlib.blake2b(json.dumps(config, sort_keys=True, default=str).encode(), digest_size=16)
    for (name, tensor), sums in zip(state, _weight_checksums([t for _, t in state])):
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype} {sums}".encode())
    _FINGERPRINTS[backend.model] = (versions, digest.hexdigest()[:16])
    return _FINGERPRINTS[backend.model][1]


_FINGERPRINTS = weakref.WeakKeyDictionary()  # model -> (tensor versions, fingerprint)
_CHUNK = 1 << 24  # elements per reduction: bounds the int32 temporaries (64 MiB each) on the device
_GOLDEN = -1640531527  # 2^32 / golden ratio as a signed int32: spreads positions over the bits
_BITS = {1: "uint8", 2: "int16", 4: "int32", 8: "int32"}  # each element's bits as integers (8 bytes: two int32)


def _weight_checksums(tensors) -> list[tuple[int, int]]:
    """Two exact checksums per tensor, computed where the tensor lives: its bits as integers,
    summed plain and weighted by position in wrapping int32 arithmetic, which is exact and
    order-free (a GPU and a CPU agree; a changed bit or a swap of two values shows). No host
    copy of the weights: one small transfer per device at the end."""
    import torch

    sums, weights = [], {}
    length = min(_CHUNK, 2 * max((t.numel() for t in tensors), default=1))
    for tensor in tensors:
        flat = tensor.detach().reshape(-1)  # 0-dim buffers (BatchNorm's count) too
        bits = flat.view(getattr(torch, _BITS[flat.element_size()]))
        if flat.device not in weights:  # odd weights: invertible mod 2^32, so no change cancels out
            weights[flat.device] = torch.arange(length, dtype=torch.int32, device=flat.device) * _GOLDEN | 1
        plain = weighted = torch.zeros((), dtype=torch.int32, device=flat.device)
        for k, start in enumerate(range(0, bits.numel(), length)):
            chunk = bits[start:start + length].int()
            plain = plain + chunk.sum(dtype=torch.int32)
            weighted = weighted + (2 * k + 1) * (chunk * weights[flat.device][:chunk.numel()]).sum(dtype=torch.int32)
        sums.append(torch.stack([plain, weighted]))
    result = [None] * len(sums)
    by_device = {}
    for i, pair in enumerate(sums):
        by_device.setdefault(pair.device, []).append(i)
    for indices in by_device.values():
        for i, value in zip(indices, torch.stack([sums[i] for i in indices]).tolist()):
            result[i] = tuple(value)
    return result


def save_exits(strategy, folder: str, backbone_name: str | None = None) -> None:
    from safetensors.torch import save_file

    files = {weights_file(stem): {n: p.detach().contiguous() for n, p in module.state_dict().items()}
             for stem, module in strategy.adapter_modules().items()}
    config = {
        "format_version": FORMAT_VERSION,
        "strategy": strategy.name,
        "backend": strategy.backend.name,
        "backbone": backbone_name,
        "backbone_fingerprint": backbone_fingerprint(strategy.backend),
        "exit_layers": strategy.exit_layers,
        "strategy_config": strategy.config.to_dict(),
    }
    with atomic_folder(folder) as temporary:
        for name, weights in files.items():
            if weights:
                save_file(weights, os.path.join(temporary, name))
        with open(os.path.join(temporary, CONFIG), "w") as handle:
            json.dump(config, handle, indent=2)


def read_exit_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder} holds no {CONFIG}; pass a folder written by save_exits / earlyexit run")
    with open(path) as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{path} is not valid JSON ({error}); re-train or re-save the exits")


def load_exits(folder: str, backend, registry, **config_overrides):
    """The strategy saved in `folder`, attached to `backend` (refused if the fingerprints differ)."""
    from safetensors.torch import load_file

    check_adapter_files(folder)
    saved = read_exit_config(folder)
    if saved.get("backend") != backend.name:
        raise CheckpointError(f"{folder} holds exits for backend {saved.get('backend')!r}, not {backend.name!r}")
    expected, actual = saved.get("backbone_fingerprint"), backbone_fingerprint(backend)
    if expected != actual:
        raise CheckpointError(
            f"{folder} was trained on another backbone ({saved.get('backbone')}, fingerprint {expected}); this "
            f"one's fingerprint is {actual}. Train exits for this backbone instead")
    cls = registry.strategy(saved["strategy"])
    config_path = os.path.join(folder, CONFIG)
    check_config_types(cls.Config, saved["strategy_config"], config_path)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    values = {k: v for k, v in {**saved["strategy_config"], **config_overrides}.items() if k in fields}
    try:
        config = cls.Config(**values)
    except ConfigError as error:  # a range the config refuses (epochs 0, a negative threshold)
        raise CorruptAdapterError(f"{config_path}: {first_line(error)}; {_REDO}") from None
    strategy = cls(backend, saved["exit_layers"], config)
    modules = strategy.adapter_modules()
    check_weight_shapes(folder, modules)  # every file before any tensor is loaded
    for stem, module in modules.items():
        path = os.path.join(folder, weights_file(stem))
        if not os.path.isfile(path):  # a module without tensors (check_weight_shapes passed it)
            continue
        missing, unexpected = module.load_state_dict(load_file(path), strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{path} does not fit {saved['strategy']} at exits {saved['exit_layers']} "
                                  f"(missing {len(missing)}, unexpected {len(unexpected)} tensors)")
    return strategy


# -- damaged adapters -------------------------------------------------------------------------------
_REDO = "train or save the exits again (earlyexit run --retrain rebuilds its cache)"
_CONFIG_FIELDS = {"strategy": str, "backend": str, "backbone_fingerprint": str, "exit_layers": list,
                  "strategy_config": dict}


def check_adapter_files(folder: str) -> dict:
    """The adapter's config, once its files are known to be whole; a CorruptAdapterError (one
    line) for a missing, unreadable or malformed exit_config.json or a truncated weights file,
    so that a cache can rebuild the entry and a user learns what to redo."""
    redo = _REDO
    path = os.path.join(folder, CONFIG)
    if not os.path.isdir(folder):
        raise CorruptAdapterError(f"exit adapter folder {folder} does not exist; pass a folder written by save_exits "
                                  "or earlyexit run")
    try:
        with open(path) as handle:
            saved = json.load(handle)
    except FileNotFoundError:
        raise CorruptAdapterError(f"{folder} holds no {CONFIG}; pass a folder written by save_exits or "
                                  "earlyexit run") from None
    except (OSError, ValueError, UnicodeDecodeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
        raise CorruptAdapterError(f"{path} is not readable JSON ({reason}); {redo}") from None
    if not isinstance(saved, dict):
        raise CorruptAdapterError(f"{path} holds a JSON {type(saved).__name__}, not an object; {redo}")
    for key, kind in _CONFIG_FIELDS.items():
        if not isinstance(saved.get(key), kind):
            problem = "lacks" if key not in saved else f"has a {type(saved[key]).__name__} for"
            raise CorruptAdapterError(f"{path} {problem} {key!r}; {redo}")
    if not saved["exit_layers"] or not all(isinstance(k, int) and not isinstance(k, bool)
                                           for k in saved["exit_layers"]):
        raise CorruptAdapterError(f"{path}: 'exit_layers' must be a list of layer numbers; {redo}")
    for name in sorted(os.listdir(folder)):  # the exits and, for MuE-like strategies, the layer copies
        if name.endswith(".safetensors"):
            problem = safetensors_problem(os.path.join(folder, name))
            if problem is not None:
                raise CorruptAdapterError(f"{os.path.join(folder, name)} is {problem}; {redo}")
    return saved


def _json_kinds(annotation) -> tuple[type, ...]:
    """The JSON value types a config field of `annotation` accepts (an int where a float goes
    too: JSON writes 3.0 as 3 in some tools); () when the field is of a type not checked here."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(kind for arg in args for kind in _json_kinds(arg))
    if annotation is type(None):
        return (type(None),)
    if annotation is float:
        return (float, int)
    if annotation in (bool, int, str):
        return (annotation,)
    if typing.get_origin(annotation) in (list, tuple) or annotation in (list, tuple):
        return (list,)
    return ()


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             list: "a list", type(None): "null"}
    shown = [k for k in kinds if not (k is int and float in kinds)]  # an int is a number already
    return " or ".join(dict.fromkeys(names[k] for k in shown))


def check_config_types(config_class, values: dict, path: str) -> None:
    """Each saved strategy_config value against the type of its field in `config_class`, before
    the config is built (its range checks compare numbers: a string there is a TypeError). A
    CorruptAdapterError names the file, the key and the value. Keys the class no longer has are
    ignored (an older adapter keeps loading)."""
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        if field.name not in values:
            continue
        value, kinds = values[field.name], _json_kinds(hints.get(field.name))
        if not kinds:
            continue
        wrong = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
        if not wrong and isinstance(value, float) and not math.isfinite(value):
            raise CorruptAdapterError(f"{path}: strategy_config {field.name} = {value!r} must be a finite number; "
                                      f"{_REDO}")
        if wrong:
            raise CorruptAdapterError(f"{path}: strategy_config {field.name} = {json.dumps(value)} must be "
                                      f"{_kind_name(kinds)}; fix the value or {_REDO}")


def check_weight_shapes(folder: str, modules: dict) -> None:
    """Every weights file the strategy needs, present and with exactly its tensors at their
    shapes, read from the files' headers (no tensor is loaded); one line names the file and the
    first mismatch."""
    from safetensors import safe_open

    for stem, module in modules.items():
        path = os.path.join(folder, weights_file(stem))
        expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
        if not expected:
            continue
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder} has no {weights_file(stem)}; the adapter is incomplete, save it again")
        with safe_open(path, framework="pt") as handle:
            saved = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        shapes = sorted(n for n in set(expected) & set(saved) if expected[n] != saved[n])
        if shapes:
            name = shapes[0]
            raise CorruptAdapterError(f"{path}: tensor {name} has shape {list(saved[name])}, but the strategy built for "
                                      f"this backbone needs {list(expected[name])}; {_REDO}")
        if missing or unexpected:
            first = f"lacks tensor {missing[0]}" if missing else f"holds an unknown tensor {unexpected[0]}"
            raise CorruptAdapterError(f"{path} {first} ({len(missing)} missing, {len(unexpected)} unknown); "
                                      f"{_REDO}")
