"""DeepSpeed ZeRO as the training engine: same losses as plain PyTorch, two processes, resume."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("deepspeed")

from helpers import launcher_env, make_backend, make_images, no_eos  # noqa: E402

from earlyexit.core.engine import EarlyExitForCausalLM  # noqa: E402
from earlyexit.data.scenes import SceneConfig, load_scenes  # noqa: E402
from earlyexit.models.adapters import load_exits  # noqa: E402
from earlyexit.strategies.free import FreeConfig, FreeStrategy  # noqa: E402
from earlyexit.training.deepspeed_config import zero_config  # noqa: E402
from earlyexit.training.exits import train_exits  # noqa: E402

MICRO = SceneConfig(train=10, val=10, test=5)


def console_script(name: str) -> str:
    """The installed script beside this interpreter (a PATH lookup may find a shell shim)."""
    return os.path.join(os.path.dirname(sys.executable), name)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return load_scenes("exit_train", config=MICRO, cache_dir=tmp_path_factory.mktemp("scenes"))


def fresh_free():
    backend = make_backend(seed=31, num_layers=4, image_size=64, patch_size=16, init_std=0.1)
    return backend, FreeStrategy(backend, [1, 2], FreeConfig(epochs=1, batch_size=4, learning_rate=1e-3))


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_gives_the_plain_losses_in_one_process(scenes, tmp_path, stage):
    backend, strategy = fresh_free()
    plain = train_exits(strategy, backend, scenes, str(tmp_path / "plain"), progress=False)
    backend, strategy = fresh_free()
    zero = train_exits(strategy, backend, scenes, str(tmp_path / f"zero{stage}"), progress=False,
                       deepspeed_config=zero_config(stage, 4, 1.0))
    assert len(plain) == len(zero) == 10  # 8 images x 5 captions, batches of 4
    for a, b in zip(plain, zero):  # tolerance: reduction order differs between the two engines
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5)


def test_zero3_trains_and_consolidates(scenes, tmp_path):
    backend, strategy = fresh_free()
    plain = train_exits(strategy, backend, scenes, str(tmp_path / "plain"), progress=False)
    expected = {k: v.clone() for k, v in strategy.exit_modules().state_dict().items()}
    backend, strategy = fresh_free()
    zero = train_exits(strategy, backend, scenes, str(tmp_path / "zero3"), progress=False,
                       deepspeed_config=zero_config(3, 4, 1.0))
    assert [round(x["gen"], 4) for x in zero] == [round(x["gen"], 4) for x in plain]
    consolidated = strategy.exit_modules().state_dict()
    assert all(consolidated[k].shape == v.shape for k, v in expected.items())
    for k, v in expected.items():
        torch.testing.assert_close(consolidated[k], v, rtol=1e-3, atol=2e-4)  # 10 Adam steps, other sum order


def test_resumed_zero2_run_continues_the_same_trajectory(scenes, tmp_path):
    backend, strategy = fresh_free()
    straight = train_exits(strategy, backend, scenes, str(tmp_path / "straight"), progress=False,
                           deepspeed_config=zero_config(2, 4, 1.0))

    class Interrupt(Exception):
        pass

    backend, strategy = fresh_free()
    step_fn = strategy.training_step
    calls = []

    def crash_after_5(batch, engine):
        if len(calls) == 5:
            raise Interrupt()
        calls.append(1)
        return step_fn(batch, engine)

    strategy.training_step = crash_after_5
    with pytest.raises(Interrupt):
        train_exits(strategy, backend, scenes, str(tmp_path / "resumed"), progress=False,
                    deepspeed_config=zero_config(2, 4, 1.0))
    backend, strategy = fresh_free()
    resumed = train_exits(strategy, backend, scenes, str(tmp_path / "resumed"), progress=False,
                          deepspeed_config=zero_config(2, 4, 1.0))
    assert len(resumed) == len(straight) == 10
    for a, b in zip(straight, resumed):
        assert b["gen"] == pytest.approx(a["gen"], rel=1e-5) and b["fc"] == pytest.approx(a["fc"], rel=1e-5)


SCRIPT = """
    import sys
    import torch
    from earlyexit.models.adapters import save_exits
    from earlyexit.backends.blip2_opt import Blip2OptBackend
    from earlyexit.data.scenes import SceneConfig, load_scenes
    from earlyexit.training.deepspeed_config import zero_config
    from earlyexit.training.exits import train_exits
    from earlyexit.strategies.free import FreeConfig, FreeStrategy

    model, output, cache, stage = sys.argv[1:5]
    backend = Blip2OptBackend.from_pretrained(model)
    scenes = load_scenes("exit_train", config=SceneConfig(train=10, val=10, test=5), cache_dir=cache)
    strategy = FreeStrategy(backend, [1, 2], FreeConfig(epochs=1, batch_size=4, learning_rate=1e-3))
    losses = train_exits(strategy, backend, scenes, output + "/work", progress=False,
                         deepspeed_config=zero_config(int(stage), 4, 1.0))
    if torch.distributed.get_rank() == 0:
        save_exits(strategy, output + "/exits", backbone_name=model)
        print("LOSSES", [round(x["gen"], 6) for x in losses])
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # exiting with gloo's group open can abort in its teardown
"""


@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_train_exits_that_load_and_generate(scenes, tmp_path, registry, stage):
    backend, _ = fresh_free()
    backend.save_pretrained(str(tmp_path / "model"))
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = launcher_env()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29611 + stage),
         str(script), str(tmp_path / "model"), str(tmp_path), str(tmp_path / "scenes"), str(stage)],
        capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOSSES" in result.stdout
    reloaded = load_exits(str(tmp_path / "exits"), make_backend(seed=31, num_layers=4, image_size=64,
                                                                 patch_size=16, init_std=0.1), registry)
    trained = reloaded.exit_transformers[0].self_attn.q_proj.weight
    original = reloaded.backend.decoder_layers()[1].self_attn.q_proj.weight
    assert not torch.equal(trained, original)  # the exits did train
    model = EarlyExitForCausalLM(reloaded.backend, reloaded)
    inputs = reloaded.backend.prepare_inputs(make_images(1, size=64), [""])
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, **no_eos(reloaded.backend))
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


def test_train_backbone_cli_with_the_deepspeed_launcher(tmp_path):
    """`deepspeed --num_gpus 2 earlyexit train backbone --zero 2`: two ranks, one saved model."""
    make_backend(seed=5, num_layers=2, image_size=64, patch_size=16).save_pretrained(str(tmp_path / "start"))
    env = launcher_env(EARLYEXIT_CACHE=str(tmp_path / "cache"))
    command = [console_script("deepspeed"), "--num_gpus", "2", "--master_port", "29631", console_script("earlyexit"),
               "train", "backbone",
               "--backend", "blip2-opt", "--model", str(tmp_path / "start"), "--data", "scenes", "--split", "dev",
               "--output", str(tmp_path / "out"), "--steps", "3", "--batch-size", "4", "--checkpoint-every", "2",
               "--zero", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert result.stdout.count("trained 3 steps") == 1  # rank 0 reports
    from earlyexit.backends.blip2_opt import Blip2OptBackend

    trained = Blip2OptBackend.from_pretrained(str(tmp_path / "out" / "model"))
    start = Blip2OptBackend.from_pretrained(str(tmp_path / "start"))
    assert not torch.equal(trained.decoder_layers()[0].fc1.weight, start.decoder_layers()[0].fc1.weight)


def test_deepspeed_config_with_an_optimizer_is_refused(tmp_path, capsys):
    import json

    from earlyexit.cli import main

    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}))
    code = main(["train", "backbone", "--backend", "blip2-opt", "--model", "tiny-random", "--data", "scenes",
                 "--output", str(tmp_path / "o"), "--deepspeed", str(config)])
    assert code == 2 and "declares an optimizer" in capsys.readouterr().err


def test_eval_sharded_over_two_processes_matches_one(tmp_path):
    import json

    make_backend(seed=6, num_layers=3, image_size=64, patch_size=16).save_pretrained(str(tmp_path / "model"))
    env = launcher_env(EARLYEXIT_CACHE=str(tmp_path / "cache"))
    arguments = ["eval", "--backend", "blip2-opt", "--model", str(tmp_path / "model"), "--data", "scenes",
                 "--split", "dev", "--limit", "7", "--batch-size", "2", "--max-new-tokens", "4",
                 "--strategy", "confidence", "--threshold", "0.05", "--exit-layers", "1,2"]
    single = subprocess.run([console_script("earlyexit"), *arguments, "--json", str(tmp_path / "one.json")],
                            capture_output=True, text=True, timeout=240, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29641", console_script("earlyexit"), *arguments,
                             "--json", str(tmp_path / "two.json")], capture_output=True, text=True, timeout=240, env=env)
    assert double.returncode == 0, double.stderr[-2000:]
    assert double.stdout.count("quality:") == 1  # rank 0 reports for both
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["processes"] == 2 and one["processes"] == 1
    assert one["predictions"] == two["predictions"] and len(two["predictions"]) == 7
    assert one["quality"]["CIDEr"] == pytest.approx(two["quality"]["CIDEr"])
    assert one["exit_layer_histogram"] == two["exit_layer_histogram"]
    assert one["speed"]["layer_speedup"] == pytest.approx(two["speed"]["layer_speedup"])


class Planted:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_a_planted_pickle_in_a_deepspeed_checkpoint_is_refused(scenes, tmp_path):
    from earlyexit.errors import CheckpointError

    backend, strategy = fresh_free()
    output = tmp_path / "run"
    train_exits(strategy, backend, scenes, str(output), progress=False, deepspeed_config=zero_config(2, 4, 1.0))
    states = sorted(output.glob("checkpoint-*/**/*model_states.pt"))
    assert states, "DeepSpeed wrote no model states"
    marker = tmp_path / "code-ran"
    torch.save({"module": Planted(str(marker))}, states[-1])
    backend, strategy = fresh_free()
    with pytest.raises(CheckpointError, match="more than tensors"):
        train_exits(strategy, backend, scenes, str(output), progress=False, deepspeed_config=zero_config(2, 4, 1.0))
    assert not marker.exists()


def test_run_in_two_processes_matches_one(tmp_path):
    """`torchrun --nproc_per_node 2 earlyexit run`: every rank trains its gate, calibrates and
    evaluates its share in step; one report, the same as one process's."""
    import json

    make_backend(seed=6, num_layers=4, image_size=64, patch_size=16).save_pretrained(str(tmp_path / "model"))
    env = launcher_env(EARLYEXIT_CACHE=str(tmp_path / "cache"))
    arguments = ["run", "--backend", "blip2-opt", "--strategy", "confidence", "--model", str(tmp_path / "model"),
                 "--exit-layers", "1,2", "--test-limit", "6", "--dev-limit", "6", "--train-limit", "6",
                 "--batch-size", "2", "--max-new-tokens", "4", "--grid", "0.05,0.5", "--no-speculative",
                 "--output", str(tmp_path / "runs")]
    single = subprocess.run([console_script("earlyexit"), *arguments, "--json", str(tmp_path / "one.json")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29651", console_script("earlyexit"), *arguments,
                             "--json", str(tmp_path / "two.json")], capture_output=True, text=True, timeout=300,
                            env=env)
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count("earlyexit run:") == 1  # rank 0 reports for both
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["threshold"] == two["threshold"]
    for name, result in one["results"].items():
        assert two["results"][name]["predictions"] == result["predictions"]
        assert two["results"][name]["processes"] == 2 and result["processes"] == 1
