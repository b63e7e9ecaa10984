"""Real checkpoints load as users expect: safetensors preferred, a `.bin`-only folder still loads
(with one notice), weights go straight to the target device, nothing is randomly initialised off
the meta device."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import make_backend

from earlyexit.backends.blip2_opt import Blip2OptBackend
from earlyexit.core import model_folder
from earlyexit.models import loading


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The same tiny BLIP-2 OPT saved twice: by save_pretrained (safetensors) and as a pickled
    pytorch_model.bin only, as older checkpoints ship."""
    backend = make_backend(seed=2, num_layers=2)
    root = tmp_path_factory.mktemp("checkpoints")
    safe, pickled = str(root / "safe"), str(root / "bin")
    backend.save_pretrained(safe)
    os.makedirs(pickled)
    backend.processor.save_pretrained(pickled)
    backend.model.config.save_pretrained(pickled)
    torch.save(backend.model.state_dict(), os.path.join(pickled, "pytorch_model.bin"))
    return backend, safe, pickled


def same_weights(a, b) -> bool:
    left, right = a.model.state_dict(), b.model.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_both_formats_load_the_same_weights_and_bin_says_so_once(folders, capsys):
    original, safe, pickled = folders
    assert model_folder.placement(safe, "cpu") == {"use_safetensors": True}
    assert same_weights(original, Blip2OptBackend.load(safe))
    assert "safetensors" not in capsys.readouterr().err
    assert same_weights(original, Blip2OptBackend.load(pickled))
    first = capsys.readouterr().err
    assert first.count(f"note: {pickled} holds only pickled .bin weights") == 1
    Blip2OptBackend.load(pickled)
    assert "pickled" not in capsys.readouterr().err  # once per folder and process
    assert model_folder.placement(pickled, "cpu") == {"use_safetensors": False}


def test_weights_go_straight_to_the_target_device_when_accelerate_is_there(folders, monkeypatch):
    _, safe, _ = folders
    assert model_folder.placement(safe, "cuda:1") == {"device_map": {"": "cuda:1"}, "use_safetensors": True}
    assert model_folder.placement(None, "cuda") == {"device_map": {"": "cuda"}}  # a hub id
    assert "device_map" not in model_folder.placement(safe, "cpu")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    assert model_folder.placement(safe, "cuda:1") == {"use_safetensors": True}  # no accelerate: load, then move


def test_nothing_is_randomly_initialised_off_the_meta_device(folders, monkeypatch):
    _, safe, _ = folders
    devices = spy_initialisers(monkeypatch)
    Blip2OptBackend.load(safe)
    assert devices and set(devices) == {"meta"}  # modules are built on meta: initialisers run on no memory


def spy_initialisers(monkeypatch) -> list:
    devices = []
    for name in ("normal_", "trunc_normal_", "uniform_", "kaiming_uniform_", "xavier_uniform_", "zeros_", "ones_"):
        real = getattr(torch.nn.init, name)

        def spy(*args, real=real, **kwargs):
            devices.append((args[0] if args else kwargs["tensor"]).device.type)
            return real(*args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, spy)
    return devices


def test_minigpt4_builds_its_image_side_on_meta_before_loading(tmp_path, monkeypatch):
    from earlyexit.backends.minigpt4_llama import Minigpt4LlamaBackend

    original = Minigpt4LlamaBackend.from_tiny_config(seed=1, num_layers=2)
    original.save_pretrained(str(tmp_path))
    devices = spy_initialisers(monkeypatch)
    loaded = Minigpt4LlamaBackend.load(str(tmp_path))
    assert devices and set(devices) == {"meta"}  # the ViT and Q-Former were not first filled at random
    assert same_weights(original, loaded)


def test_load_backend_places_weights_on_its_device_for_backends_that_load_on_the_cpu(folders, monkeypatch):
    # BLIP-2 OPT's from_pretrained passes no device to load_checkpoint (its code is part of tiny's
    # recipe); load_backend's device still reaches `placement`, so device_map puts weights there
    _, safe, _ = folders
    seen = []
    monkeypatch.setattr(model_folder, "placement", lambda folder, device: seen.append(device) or {})
    loading.load_backend(Blip2OptBackend, safe, device="cpu", dtype="float32")
    with model_folder.loading_onto("cuda:3"):
        Blip2OptBackend.from_pretrained(safe)
    Blip2OptBackend.from_pretrained(safe)  # outside the block: no device known, load where read
    assert seen == ["cpu", "cuda:3", None]
