"""A table of bad inputs through the CLI, in this process: each must exit 2 with exactly one line
on stderr that names the problem (the expected fragment), and never a traceback.

Every command is covered (run with its calibration options, eval, generate, train backbone, list,
build-tiny), and so are bad files: images (missing, a folder, not an image, truncated, a
decompression bomb), model folders (empty, config only, truncated or foreign weights, a config of
the wrong JSON type, `--model ''`, an image given as --model), trained exits given with --exits
(truncated weights, a config without keys, of the wrong JSON type, not JSON), DeepSpeed configs
(a list, a folder, out-of-range values) and output targets (a file as folder, a folder as file,
a path under a file, an unwritable place). Cases use a micro model saved once per module, so the
table runs in seconds.
"""

from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np
import pytest
from helpers import make_backend
from PIL import Image

from earlyexit.cli import main

UNWRITABLE = "/proc/earlyexit-test/out"  # /proc refuses new entries even for root
VISDIAL = "visdial:" + os.path.join(os.path.dirname(__file__), "fixtures", "visdial")


def png_claiming_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's signature); Pillow
    refuses it on open, before any pixel is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Files every case draws on: a micro model and trained exits for it, good and bad images,
    bad model folders, bad adapters, bad DeepSpeed configs and a caption data set with bad images."""
    root = tmp_path_factory.mktemp("bad-inputs")
    w = {"root": root}
    backend = make_backend(seed=3, num_layers=4)
    model = root / "model"
    backend.save_pretrained(str(model))
    w["model"] = str(model)

    image = root / "image.png"
    Image.fromarray(np.full((20, 20, 3), 120, dtype=np.uint8)).save(image)
    w["image"] = str(image)
    (root / "not-an-image.png").write_text("just text\n")
    w["text_image"] = str(root / "not-an-image.png")
    (root / "truncated.png").write_bytes(image.read_bytes()[:60])
    w["truncated_image"] = str(root / "truncated.png")
    (root / "bomb.png").write_bytes(png_claiming_size(40000, 40000))
    w["bomb_image"] = str(root / "bomb.png")
    (root / "folder.png").mkdir()
    w["folder_image"] = str(root / "folder.png")

    # model folders
    (root / "empty-model").mkdir()
    config_only = root / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((model / "config.json").read_text())
    truncated = root / "truncated-model"
    truncated.mkdir()
    for name in os.listdir(model):
        data = (model / name).read_bytes()
        (truncated / name).write_bytes(data[: len(data) // 2] if name == "model.safetensors" else data)
    list_config = root / "list-config"
    list_config.mkdir()
    for name in os.listdir(model):
        (list_config / name).write_bytes((model / name).read_bytes())
    (list_config / "config.json").write_text("[1, 2]")
    foreign = root / "foreign-weights"  # whole files, but the weights of another shape
    make_backend(seed=3, num_layers=4, hidden_size=64).save_pretrained(str(foreign))
    (foreign / "config.json").write_text((model / "config.json").read_text())
    w.update(empty_model=str(root / "empty-model"), config_only=str(config_only), truncated_model=str(truncated),
             list_config=str(list_config), foreign_weights=str(foreign))

    # trained exits (confidence has no weights; fixed neither: save FREE's, which have some)
    from earlyexit.models.adapters import save_exits
    from earlyexit.plugins.registry import get_registry

    free = get_registry(load_entrypoints=False).strategy("free")
    good_exits = root / "exits"
    save_exits(free(backend, [2], free.Config()), str(good_exits), backbone_name="micro")
    w["exits"] = str(good_exits)
    saved = json.loads((good_exits / "exit_config.json").read_text())

    def adapter(name: str, config_text: str | None, weights: bytes | None) -> str:
        folder = root / name
        folder.mkdir()
        if config_text is not None:
            (folder / "exit_config.json").write_text(config_text)
        if weights is not None:
            (folder / "exits.safetensors").write_bytes(weights)
        return str(folder)

    weights = (good_exits / "exits.safetensors").read_bytes()
    w["exits_truncated"] = adapter("exits-truncated", json.dumps(saved), weights[: len(weights) - 100])
    w["exits_no_keys"] = adapter("exits-no-keys", json.dumps({"format_version": 1}), weights)
    w["exits_list"] = adapter("exits-list", json.dumps([saved]), weights)
    w["exits_not_json"] = adapter("exits-not-json", "{strategy: free", weights)
    w["exits_wrong_type"] = adapter("exits-wrong-type", json.dumps({**saved, "exit_layers": "2"}), weights)
    w["exits_none"] = adapter("exits-none", None, None)
    other = make_backend(seed=4, num_layers=4)
    w["exits_other_backbone"] = str(root / "exits-other")
    save_exits(free(other, [2], free.Config()), w["exits_other_backbone"], backbone_name="other")

    # DeepSpeed configs
    def ds(name: str, content) -> str:
        path = root / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return str(path)

    w["ds_list"] = ds("ds-list.json", [{"zero_optimization": {"stage": 2}}])
    w["ds_stage"] = ds("ds-stage.json", {"zero_optimization": {"stage": 7}})
    w["ds_micro"] = ds("ds-micro.json", {"train_micro_batch_size_per_gpu": 0})
    w["ds_clip"] = ds("ds-clip.json", {"gradient_clipping": -1})
    w["ds_product"] = ds("ds-product.json", {"train_batch_size": 7, "train_micro_batch_size_per_gpu": 2})
    w["ds_zero_type"] = ds("ds-zero-type.json", {"zero_optimization": 2})
    w["ds_not_json"] = ds("ds-not-json.json", "{zero: 2")
    w["ds_optimizer"] = ds("ds-optimizer.json", {"optimizer": {"type": "Adam"}})
    (root / "ds-folder").mkdir()
    w["ds_folder"] = str(root / "ds-folder")

    # a caption data set (Karpathy format) whose images are a bomb / truncated
    def karpathy(name: str, picture: bytes) -> str:
        folder = root / name
        (folder / "val2014").mkdir(parents=True)
        (folder / "val2014" / "picture.png").write_bytes(picture)
        entry = {"split": "test", "filepath": "val2014", "filename": "picture.png", "cocoid": 1,
                 "sentences": [{"raw": "a red circle"}]}
        (folder / "dataset_coco.json").write_text(json.dumps({"images": [entry], "dataset": "coco"}))
        return f"coco:{folder}"

    w["data_bomb"] = karpathy("coco-bomb", png_claiming_size(40000, 40000))
    w["data_truncated"] = karpathy("coco-truncated", image.read_bytes()[:60])
    w["data_text"] = karpathy("coco-text", b"not a picture")
    (root / "a-file").write_text("x")
    w["file"] = str(root / "a-file")
    return w


def generate(w, *extra, **replace):
    """A `generate` call on the micro model and the good image, with options replaced or added."""
    options = {"--backend": "blip2-opt", "--model": w["model"], "--image": w["image"], "--max-new-tokens": "2"}
    options.update({"--" + k.replace("_", "-"): v for k, v in replace.items()})
    return ["generate"] + [x for kv in options.items() for x in kv] + list(extra)


def evaluate(w, *extra, data="scenes", split="dev"):
    return ["eval", "--backend", "blip2-opt", "--model", w["model"], "--data", data, "--split", split,
            "--limit", "2", "--batch-size", "2", "--max-new-tokens", "2", *extra]


def run(w, *extra):
    return ["run", "--backend", "blip2-opt", "--strategy", "confidence", "--model", w["model"], "--test-limit", "2",
            "--dev-limit", "2", "--output", str(w["root"] / "runs"), *extra]


def train(w, *extra, output=None, data="scenes", split="dev"):
    return ["train", "backbone", "--backend", "blip2-opt", "--model", w["model"], "--data", data, "--split", split,
            "--steps", "1", "--batch-size", "2", "--output", str(w["root"] / "trained") if output is None else output,
            *extra]


# (case id, argv built from the world, a fragment the one line must contain)
CASES = [
    # -- generate: flags ---------------------------------------------------------------------------
    ("generate/unknown backend", lambda w: generate(w, backend="blip2-opx"), "Did you mean 'blip2-opt'"),
    ("generate/unknown strategy", lambda w: generate(w, "--strategy", "confidense"), "Did you mean 'confidence'"),
    ("generate/exit layer out of range", lambda w: generate(w, "--strategy", "confidence", "--exit-layers", "2,9"),
     "out of range"),
    ("generate/empty exit layers", lambda w: generate(w, "--strategy", "confidence", "--exit-layers", ""),
     "3,6,9"),
    ("generate/threshold without strategy", lambda w: generate(w, "--threshold", "0.5"), "need a --strategy"),
    ("generate/negative threshold", lambda w: generate(w, "--strategy", "confidence", "--threshold", "-1"),
     "threshold must be >= 0"),
    ("generate/NaN threshold", lambda w: generate(w, "--strategy", "confidence", "--threshold", "nan"),
     "threshold must be >= 0"),
    ("generate/unknown option", lambda w: generate(w, "--strategy", "fixed", "--option", "bogus=1"), "bad --option"),
    ("generate/option of the wrong type", lambda w: generate(w, "--strategy", "fixed", "--option", "every=often"),
     "every expects a int"),
    ("generate/zero new tokens", lambda w: generate(w, max_new_tokens="0"), "expected a positive integer"),
    ("generate/beams beyond memory", lambda w: generate(w, "--num-beams", "100000000"), "lower --num-beams"),
    ("generate/beyond the context", lambda w: generate(w, max_new_tokens="5000"), "exceeds the model's context"),
    ("generate/prompt beyond the context", lambda w: generate(w, "--prompt", "red " * 400),
     "exceeds the model's context"),
    ("generate/prompt with the image placeholder", lambda w: generate(w, "--prompt", "what is <image>?"),
     "rephrase the prompt"),
    ("generate/unknown kv policy", lambda w: generate(w, "--kv-policy", "magic"), "invalid choice"),
    ("generate/unknown gate", lambda w: generate(w, "--strategy", "confidence", "--gate", "psychic"),
     "unknown --gate"),
    ("generate/gate threshold without gate", lambda w: generate(w, "--strategy", "confidence",
                                                                "--gate-threshold", "0.5"), "needs a --gate"),
    ("generate/missing learned gate", lambda w: generate(w, "--strategy", "confidence", "--gate",
                                                         "learned:/no/such/gate"), "learned gate"),
    ("generate/speculative without strategy", lambda w: generate(w, "--decode", "speculative"), "pass --strategy"),
    ("generate/speculative with beams", lambda w: generate(w, "--strategy", "confidence", "--decode", "speculative",
                                                           "--num-beams", "2"), "greedy"),
    ("generate/draft exit not an exit", lambda w: generate(w, "--strategy", "confidence", "--exit-layers", "2",
                                                           "--decode", "speculative", "--draft-exit", "3"),
     "not one of the exit layers"),
    # -- generate: images ---------------------------------------------------------------------------
    ("image/missing", lambda w: generate(w, image=str(w["root"] / "nope.png")), "does not exist"),
    ("image/a folder", lambda w: generate(w, image=w["folder_image"]), "is a folder"),
    ("image/not an image", lambda w: generate(w, image=w["text_image"]), "not an image"),
    ("image/truncated", lambda w: generate(w, image=w["truncated_image"]), "not a readable image"),
    ("image/decompression bomb", lambda w: generate(w, image=w["bomb_image"]), "too large to decode safely"),
    # -- model folders --------------------------------------------------------------------------------
    ("model/empty string", lambda w: generate(w, model=""), "--model is empty"),
    ("model/an image path", lambda w: generate(w, model=w["image"]), "is a file, not a model folder"),
    ("model/not a hub id", lambda w: generate(w, model="no such model"), "neither an existing folder nor a hub id"),
    ("model/missing folder", lambda w: generate(w, model="./no/such/folder"), "does not exist"),
    ("model/empty folder", lambda w: generate(w, model=w["empty_model"]), "is empty"),
    ("model/config only", lambda w: generate(w, model=w["config_only"]), "no weights"),
    ("model/truncated weights", lambda w: generate(w, model=w["truncated_model"]), "model.safetensors is truncated"),
    ("model/config of the wrong JSON type", lambda w: generate(w, model=w["list_config"]), "holds a JSON list"),
    ("model/weights of another shape", lambda w: generate(w, model=w["foreign_weights"]),
     "weights could not be loaded"),
    # -- trained exits given with --exits -------------------------------------------------------------
    ("exits/truncated weights", lambda w: generate(w, "--exits", w["exits_truncated"]), "exits.safetensors is"),
    ("exits/config without keys", lambda w: generate(w, "--exits", w["exits_no_keys"]), "lacks 'strategy'"),
    ("exits/config a JSON list", lambda w: generate(w, "--exits", w["exits_list"]), "holds a JSON list"),
    ("exits/config not JSON", lambda w: generate(w, "--exits", w["exits_not_json"]), "not readable JSON"),
    ("exits/config field of the wrong type", lambda w: generate(w, "--exits", w["exits_wrong_type"]),
     "has a str for 'exit_layers'"),
    ("exits/no config", lambda w: generate(w, "--exits", w["exits_none"]), "holds no exit_config.json"),
    ("exits/missing folder", lambda w: generate(w, "--exits", str(w["root"] / "nope")), "does not exist"),
    ("exits/another backbone", lambda w: generate(w, "--exits", w["exits_other_backbone"]), "another backbone"),
    ("exits/another strategy", lambda w: generate(w, "--exits", w["exits"], "--strategy", "confidence"),
     "holds free exits, not confidence"),
    ("exits/other exit layers", lambda w: generate(w, "--exits", w["exits"], "--exit-layers", "3"),
     "drop --exit-layers"),
    # -- eval ---------------------------------------------------------------------------------------
    ("eval/unknown data set", lambda w: evaluate(w, data="scene"), "Did you mean 'scenes'"),
    ("eval/data set without its folder", lambda w: evaluate(w, data="coco"), "needs its folder"),
    ("eval/data folder missing", lambda w: evaluate(w, data="coco:/no/such/dir"), "is not a folder"),
    ("eval/unknown split", lambda w: evaluate(w, split="bogus"), "scene split must be one of"),
    ("eval/negative noise", lambda w: evaluate(w, "--noise", "-1"), "--noise"),
    ("eval/NaN noise", lambda w: evaluate(w, "--noise", "nan"), "--noise"),
    ("eval/zero limit", lambda w: evaluate(w, "--limit", "0"), "expected a positive integer"),
    ("eval/json is a folder", lambda w: evaluate(w, "--json", str(w["root"])), "is a folder"),
    ("eval/json under a file", lambda w: evaluate(w, "--json", w["file"] + "/r.json"), "which is a file"),
    ("eval/json not writable", lambda w: evaluate(w, "--json", UNWRITABLE + ".json"), "not writable"),
    ("eval/decompression bomb in the data", lambda w: evaluate(w, data=w["data_bomb"], split="test"),
     "too large to decode safely"),
    ("eval/truncated image in the data", lambda w: evaluate(w, data=w["data_truncated"], split="test"),
     "not a readable image"),
    ("eval/text as image in the data", lambda w: evaluate(w, data=w["data_text"], split="test"), "not an image"),
    ("eval/corrupt exits", lambda w: evaluate(w, "--exits", w["exits_truncated"]), "exits.safetensors is"),
    # -- run (training, calibration) ------------------------------------------------------------------
    ("run/unknown strategy", lambda w: ["run", "--backend", "blip2-opt", "--strategy", "fre"], "Did you mean 'free'"),
    ("run/missing strategy", lambda w: ["run", "--backend", "blip2-opt"], "required: --strategy"),
    ("run/negative threshold", lambda w: run(w, "--threshold", "-1"), "the threshold must be >= 0"),
    ("run/budget beyond 1", lambda w: run(w, "--budget", "2"), "--budget"),
    ("run/empty grid", lambda w: run(w, "--grid", ","), "comma-separated thresholds"),
    ("run/grid value the strategy refuses", lambda w: run(w, "--grid", "0.5,-1"), "threshold must be >= 0"),
    ("run/epsilon out of range", lambda w: run(w, "--rule", "risk", "--epsilon", "2"), "--epsilon is a probability"),
    ("run/unknown rule", lambda w: run(w, "--rule", "fastest"), "invalid choice"),
    ("run/unknown option", lambda w: run(w, "--option", "bogus=1"), "bad --option"),
    ("run/exit layer out of range", lambda w: run(w, "--exit-layers", "0,2"), "out of range"),
    ("run/output is a file", lambda w: run(w, "--output", w["file"]), "is a file"),
    ("run/output not writable", lambda w: run(w, "--output", UNWRITABLE), "not writable"),
    ("run/json is a folder", lambda w: run(w, "--json", str(w["root"])), "is a folder"),
    ("run/deepspeed config a list", lambda w: run(w, "--deepspeed", w["ds_list"]), "holds a JSON list"),
    ("run/deepspeed and zero together", lambda w: run(w, "--deepspeed", w["ds_list"], "--zero", "2"),
     "not allowed with argument"),
    ("run/visdial with beams is refused before any work",
     lambda w: run(w, "--data", "visdial:" + str(w["root"]), "--num-beams", "2"),
     "not by beam search; drop --num-beams"),
    ("eval/visdial test split has no ground truth", lambda w: evaluate(w, data=VISDIAL, split="test"),
     "use --split val"),
    ("eval/visdial speculative", lambda w: evaluate(w, "--strategy", "confidence", "--decode", "speculative",
                                                    data=VISDIAL, split="val"), "drop --decode speculative"),
    # -- train backbone ---------------------------------------------------------------------------------
    ("train/NaN learning rate", lambda w: train(w, "--learning-rate", "nan"), "learning rate"),
    ("train/negative learning rate", lambda w: train(w, "--learning-rate", "-1"), "learning rate"),
    ("train/negative warm-up", lambda w: train(w, "--warmup-steps", "-1"), "expected an integer >= 0"),
    ("train/zero steps", lambda w: train(w, "--steps", "0"), "expected a positive integer"),
    ("train/zero checkpoint interval", lambda w: train(w, "--checkpoint-every", "0"), "expected a positive integer"),
    ("train/output is a file", lambda w: train(w, output=w["file"]), "is a file"),
    ("train/output under a file", lambda w: train(w, output=w["file"] + "/out"), "which is a file"),
    ("train/output not writable", lambda w: train(w, output=UNWRITABLE), "not writable"),
    ("train/unknown data set", lambda w: train(w, "--data", "cocoa"), "Did you mean 'coco'"),
    ("train/deepspeed config missing", lambda w: train(w, "--deepspeed", str(w["root"] / "no.json")), "does not exist"),
    ("train/deepspeed config a folder", lambda w: train(w, "--deepspeed", w["ds_folder"]), "is a folder"),
    ("train/deepspeed config a list", lambda w: train(w, "--deepspeed", w["ds_list"]), "holds a JSON list"),
    ("train/deepspeed config not JSON", lambda w: train(w, "--deepspeed", w["ds_not_json"]), "not valid JSON"),
    ("train/deepspeed stage out of range", lambda w: train(w, "--deepspeed", w["ds_stage"]),
     "stage must be 0, 1, 2 or 3"),
    ("train/deepspeed micro batch 0", lambda w: train(w, "--deepspeed", w["ds_micro"]), "must be a positive integer"),
    ("train/deepspeed negative clipping", lambda w: train(w, "--deepspeed", w["ds_clip"]), "gradient_clipping"),
    ("train/deepspeed batch product", lambda w: train(w, "--deepspeed", w["ds_product"]), "train_batch_size 7"),
    ("train/deepspeed zero section not an object", lambda w: train(w, "--deepspeed", w["ds_zero_type"]),
     "zero_optimization must be an object"),
    ("train/deepspeed optimizer", lambda w: train(w, "--deepspeed", w["ds_optimizer"]), "declares an optimizer"),
    ("train/zero stage out of range", lambda w: train(w, "--zero", "5"), "invalid choice"),
    ("train/truncated image in the data", lambda w: train(w, data=w["data_truncated"], split="test"),
     "not a readable image"),
    ("train/empty model folder", lambda w: train(w, "--model", w["empty_model"]), "is empty"),
    # -- list, build-tiny, the command itself --------------------------------------------------------
    ("list/unknown flag", lambda w: ["list", "--tabel"], "unrecognized arguments"),
    ("build-tiny/unknown flag", lambda w: ["build-tiny", "--forse"], "unrecognized arguments"),
    ("earlyexit/no command", lambda w: [], "required: COMMAND"),
    ("earlyexit/unknown command", lambda w: ["trian"], "invalid choice"),
]


def shown_lines(err: str) -> list[str]:
    """The non-empty lines a terminal shows for `err`: a carriage return rewinds the line, so
    only what follows the last one is visible (progress bars clear themselves that way)."""
    return [line.rsplit("\r", 1)[-1] for line in err.split("\n") if line.rsplit("\r", 1)[-1].strip()]


def call(argv) -> tuple[int, str]:
    """Exit code and stderr of one CLI call in this process (argparse errors exit via SystemExit)."""
    try:
        return main(argv), ""
    except SystemExit as exit_:
        return exit_.code, ""


def assert_one_clean_line(code: int, err: str, fragment: str) -> None:
    """A user mistake: exit 2, no traceback, exactly one line shown, and it names the problem."""
    lines = shown_lines(err)
    assert "Traceback" not in err, err
    assert code == 2, err
    assert len(lines) == 1, err
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("case,build,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(world, capsys, monkeypatch, case, build, fragment):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id must fail at once, not after network retries
    code, _ = call(build(world))
    err = capsys.readouterr().err
    assert_one_clean_line(code, err, fragment)


def test_the_table_is_broad():
    assert len(CASES) >= 40
    commands = {case.split("/")[0] for case, _, _ in CASES}
    assert {"generate", "image", "model", "exits", "eval", "run", "train", "list", "build-tiny"} <= commands


# -- accepted inputs that used to go wrong, and damaged cache entries ---------------------------------
def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped_to_white(world, tmp_path, capsys):
    from earlyexit.cli.common import open_image

    grey = np.full((20, 20), 128 * 257, dtype=np.uint16)  # 16-bit mid grey
    grey[0, 0] = 65535
    path = tmp_path / "deep.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith("I")  # Pillow reads it as a wide mode
    pixels = np.asarray(open_image(str(path)))
    assert pixels.shape == (20, 20, 3) and pixels.dtype == np.uint8
    assert (pixels[1:, 1:] == 128).all() and (pixels[0, 0] == 255).all()
    assert call(generate(world, image=str(path))) == (0, "")


@pytest.mark.parametrize("mode,extension", [("LA", "png"), ("P", "gif"), ("CMYK", "jpg"), ("F", "tiff"),
                                            ("1", "bmp"), ("I;16", "tiff")])
def test_images_of_odd_modes_generate(world, tmp_path, capsys, mode, extension):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (9, 31, 3), dtype=np.uint8))
    converted = image.convert("L").convert(mode) if mode in ("F", "I;16") else image.convert(mode)
    path = tmp_path / f"odd.{extension}"
    converted.save(path)
    code, _ = call(generate(world, image=str(path)))
    assert code == 0, capsys.readouterr().err


def test_a_damaged_embedded_model_is_rebuilt_with_a_one_line_notice(tmp_path, monkeypatch, capsys):
    from earlyexit.models import embedded

    monkeypatch.setenv("EARLYEXIT_CACHE", str(tmp_path))
    recipe = embedded.with_overrides(
        model={"num_layers": 1, "hidden_size": 32, "ffn_dim": 64, "vision_hidden": 32, "vision_layers": 1,
               "num_query_tokens": 2, "patch_size": 32},
        scenes={"seed": 0, "image_size": 32}, encoder_pretrain={"steps": 1, "batch_size": 2},
        train={"steps": 1, "batch_size": 2})
    path = embedded.ensure_built(recipe, progress=False)
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as handle:
        handle.truncate(os.path.getsize(weights) // 2)
    assert not embedded.is_built(recipe) and "truncated" in embedded.damage(recipe)
    capsys.readouterr()
    assert embedded.ensure_built(recipe, progress=False) == path
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notices) == 1 and "damaged" in notices[0] and "building it again" in notices[0]
    assert embedded.is_built(recipe)


def test_run_retrains_a_damaged_cached_adapter_with_a_notice(world, tmp_path, capsys):
    from earlyexit.backends.blip2_opt import Blip2OptBackend
    from earlyexit.models.adapters import backbone_fingerprint, save_exits
    from earlyexit.pipeline.exits import exits_cache_folder
    from earlyexit.pipeline.run import RunSettings
    from earlyexit.plugins.registry import get_registry

    backend = Blip2OptBackend.from_pretrained(world["model"])
    free = get_registry(load_entrypoints=False).strategy("free")
    strategy = free(backend, [2], free.Config(epochs=1.0, batch_size=2))  # as --option parses them
    settings = RunSettings(backend="blip2-opt", strategy="free", model=world["model"], exit_layers=[2],
                           train_limit=2)
    folder = exits_cache_folder(settings, strategy, backbone_fingerprint(backend))
    save_exits(strategy, folder)
    weights = os.path.join(folder, "exits.safetensors")
    with open(weights, "r+b") as handle:
        handle.truncate(os.path.getsize(weights) - 64)
    code = main(["run", "--backend", "blip2-opt", "--strategy", "free", "--model", world["model"], "--exit-layers",
                 "2", "--option", "epochs=1", "--option", "batch_size=2", "--train-limit", "2", "--test-limit", "2", "--dev-limit", "2",
                 "--threshold", "0.5", "--gate", "none", "--no-speculative", "--max-new-tokens", "2",
                 "--output", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "exits.safetensors is truncated" in err
