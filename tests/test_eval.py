"""Evaluation: JSON contents, noise, tokenizer/processor round trip, data registry."""

import json

import numpy as np
import pytest
import torch
from helpers import make_backend

from earlyexit.cli import main
from earlyexit.data.registry import load_dataset
from earlyexit.errors import ConfigError, DataError
from earlyexit.evaluation.common import EvalSettings, add_noise
from earlyexit.evaluation.evaluate import evaluate


@pytest.fixture(scope="module")
def backend64():
    return make_backend(seed=4, num_layers=4, image_size=64, patch_size=16)


def test_eval_json_has_quality_speed_and_provenance(backend64, registry, tmp_path, capsys):
    folder = tmp_path / "model"
    backend64.save_pretrained(str(folder))
    out = tmp_path / "eval.json"
    code = main(["eval", "--backend", "blip2-opt", "--model", str(folder), "--data", "scenes", "--split", "dev",
                 "--limit", "6", "--batch-size", "4", "--strategy", "confidence", "--threshold", "0.05",
                 "--exit-layers", "1,2", "--max-new-tokens", "5", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "BLEU-4" in printed and "wall" in printed
    result = json.loads(out.read_text())
    assert {"BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"} <= set(result["quality"])
    speed = result["speed"]
    assert speed["param_speedup"] > 1 and speed["layer_speedup"] > 0 and speed["wall_speedup"] > 0
    assert sum(result["exit_layer_histogram"].values()) == speed["tokens"] > 0
    assert set(int(k) for k in result["exit_layer_histogram"]) <= {1, 2, 4}
    assert len(result["predictions"]) == 6
    config = result["config"]
    assert config["strategy"] == "confidence" and config["strategy_config"] == {"threshold": 0.05}
    assert config["data"] == "scenes" and config["split"] == "dev" and config["samples"] == 6
    provenance = result["provenance"]
    assert provenance["torch"] == torch.__version__ and provenance["date"].startswith("20")
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).parent.parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    if head:  # a git checkout (CI clones one): the revision recorded is exactly HEAD
        assert provenance["git_revision"] == head
    else:
        assert provenance["git_revision"] is None


def test_vqa_eval_scores_answers(backend64):
    data = load_dataset("scenes-vqa", "dev").subset(8)
    result = evaluate(backend64, None, data, EvalSettings(batch_size=8, max_new_tokens=3, progress=False))
    assert 0 <= result["quality"]["overall"] <= 100 and result["quality"]["num_questions"] == 8
    assert result["speed"]["wall_speedup"] is None  # no strategy: nothing to compare
    assert set(result["exit_layer_histogram"]) == {4}


def test_noise_is_gaussian_and_deterministic():
    from PIL import Image

    image = Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8))
    noisy = np.asarray(add_noise(image, 0.1, seed=3), dtype=np.float32) / 255
    assert np.asarray(add_noise(image, 0.1, seed=3)).tolist() == np.asarray(add_noise(image, 0.1, seed=3)).tolist()
    assert abs(noisy.std() - 0.1) < 0.01 and abs(noisy.mean() - 128 / 255) < 0.01
    assert add_noise(image, 0.0, seed=3) is image
    with pytest.raises(ConfigError):
        EvalSettings(noise=-1)


def test_processor_round_trip(backend64, tmp_path):
    from transformers import AutoProcessor

    backend64.save_pretrained(str(tmp_path))
    loaded = AutoProcessor.from_pretrained(str(tmp_path))
    image = add_noise(load_dataset("scenes", "dev")[0].load_image(), 0.0, 0)
    original = backend64.processor(images=[image], text=["Question: what color is the circle? Answer:"],
                                   return_tensors="pt")
    again = loaded(images=[image], text=["Question: what color is the circle? Answer:"], return_tensors="pt")
    assert torch.equal(original["input_ids"], again["input_ids"])
    torch.testing.assert_close(original["pixel_values"], again["pixel_values"])
    tokenizer = loaded.tokenizer
    assert tokenizer.decode(tokenizer("a red circle")["input_ids"], skip_special_tokens=True) == "a red circle"
    assert tokenizer.unk_token_id not in tokenizer("what color is the circle?")["input_ids"]
    assert (original["input_ids"][0, :4] == backend64.model.config.image_token_id).all()


def test_registry_errors():
    with pytest.raises(ConfigError, match="Did you mean 'scenes'"):
        load_dataset("scene", "test")
    with pytest.raises(ConfigError, match="needs its folder"):
        load_dataset("vqav2", "val")
    with pytest.raises(DataError, match="is not a folder"):
        load_dataset("coco:/no/such/dir", "test")


def test_registry_reads_official_fixture():
    import os

    root = os.path.join(os.path.dirname(__file__), "fixtures", "coco")
    data = load_dataset(f"coco:{root}", "test")
    assert data.task == "caption" and len(data) > 0 and data[0].captions


def test_eval_reads_exits_and_drafts_over_the_backbones_own_tokens(backend64, tmp_path, capsys):
    folder = tmp_path / "model"
    backend64.save_pretrained(str(folder))
    common = ["eval", "--backend", "blip2-opt", "--model", str(folder), "--data", "scenes", "--split", "dev",
              "--limit", "4", "--batch-size", "4", "--max-new-tokens", "5", "--exit-layers", "1,2"]
    out = tmp_path / "exits.json"
    assert main(common + ["--strategy", "confidence", "--threshold", "0.0", "--exit-vocabulary", "4",
                          "--json", str(out)]) == 0
    assert "exits read out" in capsys.readouterr().out
    result = json.loads(out.read_text())
    vocabulary = result["exit_vocabulary"]
    assert 1 <= len(vocabulary) <= 4 and result["speed"]["exit_vocabulary"] == len(vocabulary)
    exited = [token for example in result["examples"]
              for token, layer in zip(example["token_ids"], example["exit_layers"]) if layer < result["num_layers"]]
    assert exited and all(token in vocabulary for token in exited)  # threshold 0: every decoded token left early

    full, drafted = tmp_path / "full.json", tmp_path / "drafted.json"
    assert main(common[:-2] + ["--json", str(full)]) == 0
    assert main(common + ["--strategy", "free", "--decode", "speculative", "--draft-vocabulary", "3",
                          "--json", str(drafted)]) == 0
    assert " over " in capsys.readouterr().out
    speculative = json.loads(drafted.read_text())
    assert speculative["speed"]["draft_vocabulary"] <= 3
    assert speculative["predictions"] == json.loads(full.read_text())["predictions"]  # still the full model's


@pytest.mark.parametrize("extra,fragment", [
    (["--exit-vocabulary", "4"], "pass --strategy or --exits"),
    (["--strategy", "confidence", "--draft-vocabulary", "4"], "--draft-vocabulary is for --decode speculative"),
])
def test_eval_vocabulary_misuse_is_one_line(backend64, tmp_path, capsys, extra, fragment):
    folder = tmp_path / "model"
    backend64.save_pretrained(str(folder))
    code = main(["eval", "--backend", "blip2-opt", "--model", str(folder), "--data", "scenes", "--split", "dev",
                 "--limit", "2", *extra])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1
