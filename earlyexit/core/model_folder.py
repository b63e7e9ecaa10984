"""Checking what `--model` names before loading it: a usable local folder, a hub id, or a mistake.

A folder that `save_pretrained` did not finish (only `config.json`, a truncated
`model.safetensors`) would otherwise fail deep inside transformers, or worse, load with
missing weights silently initialised at random. These checks read only file headers, so
they cost microseconds.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import struct
import sys

from earlyexit.errors import CheckpointError, ConfigError, ModelNotAvailableError, first_line
from earlyexit.util.files import atomic_folder

SAFETENSORS_INDEX = "model.safetensors.index.json"
WEIGHT_FILES = ("model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin", "pytorch_model.bin.index.json")
MODEL_HELP = "pass a folder written by save_pretrained, a hub id such as Salesforce/blip2-opt-2.7b, tiny or tiny-random"


def safetensors_problem(path: str) -> str | None:
    """What is wrong with the safetensors file at `path` (missing, truncated, not safetensors),
    or None when its header is sound and the file is exactly as long as the header says."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return f"{size} bytes, too short for a safetensors header"
            (header_length,) = struct.unpack("<Q", prefix)
            if header_length > size - 8:
                return "truncated (its header runs past the end of the file)"
            header = json.loads(handle.read(header_length))
    except FileNotFoundError:
        return "missing"
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    except (ValueError, UnicodeDecodeError):
        return "not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "not a safetensors file (its header is not a JSON object)"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"not a safetensors file (tensor {name!r} has no data offsets)"
        end = max(end, offsets[1])
    expected = 8 + header_length + end
    if size < expected:
        return f"truncated ({size} of {expected} bytes)"
    if size > expected:
        return f"longer than its header says ({size} bytes, expected {expected}): not written by safetensors"
    return None


def _read_json_object(path: str, what: str) -> dict:
    try:
        with open(path) as handle:
            value = json.load(handle)
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read ({error.strerror or error}); save the model again") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({str(error)[:120]}); save the model again") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not the {what} object; save the "
                              "model again")
    return value


def check_model_folder(folder: str) -> None:
    """Raise a one-line CheckpointError unless `folder` looks like a complete `save_pretrained`
    folder: a config.json object and weights whose files are all present and whole."""
    config_path = os.path.join(folder, "config.json")
    if not os.listdir(folder):
        raise CheckpointError(f"model folder {folder} is empty; {MODEL_HELP}")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{folder} holds no config.json, so it is not a model folder; {MODEL_HELP}")
    _read_json_object(config_path, "model config")
    present = [name for name in WEIGHT_FILES if os.path.isfile(os.path.join(folder, name))]
    if not present:
        raise CheckpointError(f"{folder} has a config.json but no weights (model.safetensors): an unfinished "
                              "save? Save the model again or pass another folder")
    shards = ["model.safetensors"] if "model.safetensors" in present else []
    if not shards and SAFETENSORS_INDEX in present:
        index = _read_json_object(os.path.join(folder, SAFETENSORS_INDEX), "weight index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{os.path.join(folder, SAFETENSORS_INDEX)} has no weight_map; save the model again")
        shards = sorted(set(map(str, weight_map.values())))
    for shard in shards:
        problem = safetensors_problem(os.path.join(folder, shard))
        if problem is not None:
            raise CheckpointError(f"{os.path.join(folder, shard)} is {problem}; save the model again or pass "
                                  "another folder")


def is_local_model(name_or_path: str) -> bool:
    """True when `--model` names a local folder (then checked with `check_model_folder`), False
    when it is a hub id; a ConfigError for anything else (empty, a file, a missing path)."""
    if not name_or_path.strip():
        raise ConfigError(f"--model is empty; {MODEL_HELP}")
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        check_model_folder(path)
        return True
    if os.path.exists(path):
        raise ConfigError(f"--model {name_or_path} is a file, not a model folder; {MODEL_HELP} "
                          "(an image goes to --image)")
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
    if looks_like_path:
        raise ConfigError(f"model folder {name_or_path!r} does not exist; {MODEL_HELP}")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise ConfigError(f"--model {name_or_path!r} is neither an existing folder nor a hub id (owner/name); "
                          f"{MODEL_HELP}") from None
    return False


def load_checkpoint(name_or_path: str, model_type: str, text_type: str, family: str, model_class, processor_class,
                    dtype: str, device: str | None = None) -> tuple:
    """(model, processor, folder or hub id) of a vision-language checkpoint whose config is
    `model_type` with a language model of `text_type`; `family` names it in errors. Checks a local
    folder before loading, and turns every way loading fails (offline, unreadable config, weights
    that do not fit, missing processor, another family) into one line saying what to do.

    Weights go straight to `device` when accelerate is installed (`device_map`), read from
    safetensors when the folder has them (a `.bin`-only folder still loads, with a notice).
    Transformers 5 always builds the model on the meta device first and initialises only
    weights the checkpoint lacks, so nothing is randomly initialised and then overwritten
    (`low_cpu_mem_usage` is implied: transformers 5 ignores the argument)."""
    import torch
    from transformers import AutoConfig

    local = is_local_model(name_or_path)  # a folder checked for completeness, or a hub id
    if local:
        name_or_path = os.path.expanduser(name_or_path)
    offline = hub_offline()
    try:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=offline)
    except (OSError, ValueError, KeyError, TypeError) as error:
        if local:  # present (checked above) but not a config transformers can read
            raise CheckpointError(f"{name_or_path}/config.json is not a model config transformers can read "
                                  f"({first_line(error)}); save the model again or pass another folder") from error
        if not isinstance(error, OSError):
            raise
        raise ModelNotAvailableError(
            f"model {name_or_path!r} is not available offline and the hub cannot be reached; download it on a "
            "connected machine and pass its local folder instead (set HF_HUB_OFFLINE=1 to fail at once instead of "
            "retrying the network)") from error
    found = getattr(getattr(config, "text_config", None), "model_type", None)
    if config.model_type != model_type or found != text_type:
        raise ConfigError(f"{name_or_path} is a {config.model_type}/{found} model, not {family}; pick the matching "
                          "--backend (see `earlyexit list`)")
    try:
        model = model_class.from_pretrained(name_or_path, dtype=getattr(torch, dtype), local_files_only=offline,
                                            **placement(name_or_path if local else None, device or TARGET_DEVICE.get()))
    except (OSError, ValueError, RuntimeError) as error:  # weights that do not fit the config, unreadable
        raise CheckpointError(f"{name_or_path}: the weights could not be loaded ({first_line(error)}); save the "
                              "model again or pass another folder") from error
    try:
        processor = processor_class.from_pretrained(name_or_path, local_files_only=offline)
    except (OSError, ValueError, TypeError) as error:
        raise ModelNotAvailableError(f"{name_or_path}: the processor (tokenizer and image processor) could not be "
                                     f"loaded ({first_line(error)})") from error
    return model, processor, name_or_path


_BIN_NOTICES: set = set()  # folders already told about .bin weights (once per process)

# Where the backend being loaded will run. Some backends' `from_pretrained` (BLIP-2's, whose code
# is part of the embedded model's recipe) load on the CPU and move afterwards; `loading_onto`
# lets the caller that knows the device have their weights placed there as they are read.
TARGET_DEVICE: contextvars.ContextVar[str | None] = contextvars.ContextVar("target_device", default=None)


@contextlib.contextmanager
def loading_onto(device: str | None):
    """Within this block, `load_checkpoint` places weights on `device` unless told otherwise."""
    token = TARGET_DEVICE.set(device)
    try:
        yield
    finally:
        TARGET_DEVICE.reset(token)


def placement(folder: str | None, device: str | None) -> dict:
    """`from_pretrained` arguments that load the weights straight onto `device` (when accelerate,
    which `device_map` needs, is installed) and from safetensors when `folder` has them."""
    import importlib.util

    arguments = {}
    if device and device != "cpu" and importlib.util.find_spec("accelerate") is not None:
        arguments["device_map"] = {"": device}  # every weight to this one device, shard by shard
    if folder is None:  # a hub id: transformers already prefers its safetensors
        return arguments
    names = os.listdir(folder)
    arguments["use_safetensors"] = any(n.endswith(".safetensors") or n == SAFETENSORS_INDEX for n in names)
    if not arguments["use_safetensors"] and folder not in _BIN_NOTICES:
        _BIN_NOTICES.add(folder)
        print(f"note: {folder} holds only pickled .bin weights; safetensors load faster and run no code: "
              "save_pretrained it again to convert", file=sys.stderr)
    return arguments


def hub_offline() -> bool:
    """Whether the user asked for offline mode (read at call time, unlike huggingface_hub's
    import-time constant), so loading never waits on network retries then."""
    import os

    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(f.lower() in ("1", "true", "yes", "on") for f in flags)


def save_model_folder(backend, path: str, build_info: dict | None = None, overwrite: bool = False) -> None:
    """`save_pretrained` into `path`, all or nothing: a kill during the save leaves the previous
    model (or none), never a half-written folder that later commands would take for a model.
    `build_info` is written beside it as `earlyexit_build.json` (an embedded model's build).
    Files in a previous `path` that earlyexit did not write are kept (`util.files`, rule 3;
    `overwrite`: --overwrite, for a folder earlyexit cannot tell it wrote)."""
    with atomic_folder(path, overwrite=overwrite) as folder:
        backend.save_pretrained(folder)
        if build_info is not None:
            with open(os.path.join(folder, "earlyexit_build.json"), "w") as handle:
                json.dump(build_info, handle, indent=2)
