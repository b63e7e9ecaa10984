"""Property-based fuzzing (hypothesis) of what users feed the model: images of any mode, size and
file format, and prompts of any length and script, through the reader, the backend's processor and
a 2-token early-exit generate on a tiny model. Nothing may crash; a prompt beyond the context must
be a clean ConfigError that says so. Example counts are fixed and the search is derandomised, so
the run is reproducible and bounded (well under a minute)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from helpers import make_backend
from hypothesis import HealthCheck, example, given, settings, strategies as st
from PIL import Image

from earlyexit.core.engine import EarlyExitForCausalLM
from earlyexit.data.images import read_image, to_rgb
from earlyexit.data.tokenizer import DEFAULT_WORDS
from earlyexit.errors import ConfigError

MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "I", "I;16", "F", "CMYK", "YCbCr")
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # NaN or overflow in pixel maths is a bug too
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
RAN = {"images": 0, "modes": 0, "prompts": 0, "beyond_context": 0, "placeholder": 0}


def savable_modes(file_format: str) -> tuple[str, ...]:
    """The modes this Pillow writes in `file_format` (probed, so the test follows Pillow)."""
    modes = []
    for mode in MODES:
        try:
            Image.new(mode, (2, 2)).save(io.BytesIO(), file_format)
            modes.append(mode)
        except (OSError, ValueError, KeyError):
            pass
    return tuple(modes)


SAVABLE = {f: savable_modes(f) for f in FORMATS}


def pixels(mode: str, width: int, height: int, seed: int) -> Image.Image:
    """Random content of the mode's own range (16-bit, negative and float values included)."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "I":
        high = int(rng.choice([256, 65536, 2**31 - 1]))
        return Image.fromarray(rng.integers(-high // 2 if seed % 3 == 0 else 0, high, (height, width), dtype=np.int32))
    if mode == "F":
        scale = float(rng.choice([1.0, 255.0, 1e6]))
        return Image.fromarray((rng.random((height, width)) * scale).astype(np.float32))
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    return rgba.convert(mode)


@st.composite
def image_files(draw):
    file_format = draw(st.sampled_from(FORMATS))
    mode = draw(st.sampled_from(SAVABLE[file_format]))
    side = st.integers(1, 300)
    width, height = draw(st.one_of(st.tuples(side, side),
                                   st.tuples(st.just(1), side), st.tuples(side, st.just(1))))  # extreme aspect ratios
    buffer = io.BytesIO()
    pixels(mode, width, height, draw(st.integers(0, 2**16))).save(buffer, file_format)
    return file_format, mode, (width, height), buffer.getvalue()


@pytest.fixture(scope="module")
def model():
    backend = make_backend(seed=2, num_layers=4)
    strategy_cls = __import__("earlyexit.plugins.registry", fromlist=["get_registry"]).get_registry(
        load_entrypoints=False).strategy("confidence")
    return EarlyExitForCausalLM(backend, strategy_cls(backend, [1, 2], strategy_cls.Config(threshold=0.1)))


def generate_two(model, image, prompt: str):
    inputs = model.backend.prepare_inputs([image], [prompt])
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[0] == 1 and inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 2
    return inputs


@FUZZ
@given(image=image_files())
def test_any_image_file_reads_as_rgb_and_generates(model, image):
    file_format, mode, size, data = image
    rgb = read_image(io.BytesIO(data))
    assert rgb.mode == "RGB" and rgb.size == size, (file_format, mode)
    inputs = generate_two(model, rgb, "what is shown?")
    assert inputs["pixel_values"].isfinite().all()
    RAN["images"] += 1


@FUZZ
@given(mode=st.sampled_from(MODES + ("La", "RGBa")), width=st.integers(1, 64), height=st.integers(1, 64),
       seed=st.integers(0, 2**16))
def test_any_image_mode_in_memory_converts_faithfully(mode, width, height, seed):
    image = pixels("RGBA", width, height, seed).convert(mode) if mode in ("La", "RGBa") else \
        pixels(mode, width, height, seed)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (width, height)
    if mode == "I;16":  # 16-bit values scale onto 8 bits (65535 -> 255), never clip to white
        expected = np.round(np.asarray(image, dtype=np.float64) / 257).astype(np.uint8)
        assert np.array_equal(np.asarray(rgb)[..., 0], expected)
    RAN["modes"] += 1


WORDS = st.sampled_from(DEFAULT_WORDS + ["?", ":", "</s>", "<pad>", "<unk>", "Answer:", "Question:"])
PROMPTS = st.one_of(
    st.text(max_size=400),  # any script, control characters, punctuation runs
    st.integers(0, 600).flatmap(lambda n: st.lists(WORDS, min_size=n, max_size=n)).map(" ".join),  # up to 2x context
    st.lists(st.one_of(WORDS, st.just("<image>")), max_size=20).map(" ".join),  # the image placeholder's text
)


@FUZZ
@given(prompt=PROMPTS)
@example(prompt="")
@example(prompt="<image> " * 20)
@example(prompt="red " * 300)
def test_any_prompt_generates_or_is_refused_as_beyond_the_context(model, prompt):
    image = Image.new("RGB", (16, 16), (200, 30, 30))
    limit = model.backend.text_config.max_position_embeddings
    try:
        inputs = generate_two(model, image, prompt)
    except ConfigError as error:
        message = str(error)
        assert "\n" not in message
        if "<image>" in prompt and "image tokens" in message:  # the placeholder's text: refused, not misread
            RAN["placeholder"] += 1
        else:
            length = model.backend.prepare_inputs([image], [prompt])["input_ids"].shape[1]
            assert "exceeds the model's context" in message and length + 2 > limit, message
            RAN["beyond_context"] += 1
    else:
        assert inputs["input_ids"].shape[1] + 2 <= limit
    RAN["prompts"] += 1


def test_the_fuzzing_ran(capsys):
    """Runs after the properties in this file: how many cases each fed (see the module docstring)."""
    if RAN["images"] == 0:
        pytest.skip("run together with the properties above")
    with capsys.disabled():
        print(f"\nfuzz: {RAN['images']} image files, {RAN['modes']} in-memory images, {RAN['prompts']} prompts "
              f"({RAN['beyond_context']} beyond the context and {RAN['placeholder']} with the image placeholder, "
              "refused cleanly)")
    assert RAN["images"] >= 150 and RAN["prompts"] >= 150 and RAN["beyond_context"] >= 10
