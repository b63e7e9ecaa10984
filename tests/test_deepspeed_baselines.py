"""The baselines train under DeepSpeed ZeRO like FREE: ZeRO-2 in one process gives the plain
losses, and two ZeRO-2 processes train exits that load and generate, with losses that follow
the one-process run."""

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
from earlyexit.training.deepspeed_config import zero_config  # noqa: E402
from earlyexit.training.exits import train_exits  # noqa: E402

MICRO = SceneConfig(train=10, val=10, test=5)
STRATEGIES = ("deebert", "pabee", "leebert", "mue")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return load_scenes("exit_train", config=MICRO, cache_dir=tmp_path_factory.mktemp("scenes"))


def fresh(registry, name):
    backend = make_backend(seed=31, num_layers=4, image_size=64, patch_size=16, init_std=0.1)
    cls = registry.strategy(name)
    return backend, cls(backend, [1, 2], cls.Config(epochs=1, batch_size=4, learning_rate=1e-3))


@pytest.mark.parametrize("name", STRATEGIES)
def test_zero2_in_one_process_gives_the_plain_losses(registry, scenes, tmp_path, name):
    backend, strategy = fresh(registry, name)
    plain = train_exits(strategy, backend, scenes, str(tmp_path / "plain"), progress=False)
    backend, strategy = fresh(registry, name)
    zero = train_exits(strategy, backend, scenes, str(tmp_path / "zero"), progress=False,
                       deepspeed_config=zero_config(2, 4, 1.0))
    assert len(plain) == len(zero) >= 5
    for a, b in zip(plain, zero):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key


SCRIPT = """
    import sys
    import torch
    from earlyexit.models.adapters import save_exits
    from earlyexit.backends.blip2_opt import Blip2OptBackend
    from earlyexit.data.scenes import SceneConfig, load_scenes
    from earlyexit.training.deepspeed_config import zero_config
    from earlyexit.training.exits import train_exits
    from earlyexit.plugins import get_registry

    model, output, cache, name = sys.argv[1:5]
    backend = Blip2OptBackend.from_pretrained(model)
    scenes = load_scenes("exit_train", config=SceneConfig(train=10, val=10, test=5), cache_dir=cache)
    cls = get_registry(load_entrypoints=False).strategy(name)
    strategy = cls(backend, [1, 2], cls.Config(epochs=1, batch_size=4, learning_rate=1e-3))
    losses = train_exits(strategy, backend, scenes, output + "/work", progress=False,
                         deepspeed_config=zero_config(2, 4, 1.0))
    mean = torch.tensor([x["loss"] for x in losses], dtype=torch.float64)
    torch.distributed.all_reduce(mean)
    if torch.distributed.get_rank() == 0:
        save_exits(strategy, output + "/exits", backbone_name=model)
        print("LOSSES", (mean / 2).tolist())
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # exiting with gloo's group open can abort in its teardown
"""


@pytest.mark.parametrize("name", STRATEGIES)
def test_two_zero2_processes_follow_one_and_their_adapter_generates(registry, scenes, tmp_path, name):
    backend, strategy = fresh(registry, name)
    plain = [x["loss"] for x in train_exits(strategy, backend, scenes, str(tmp_path / "plain"), progress=False)]
    backend.save_pretrained(str(tmp_path / "model"))
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = launcher_env()
    port = 29700 + STRATEGIES.index(name)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(script), str(tmp_path / "model"), str(tmp_path), str(tmp_path / "scenes"), name],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("LOSSES"))
    two = [float(v) for v in line[len("LOSSES"):].strip(" []").split(",")]
    assert len(two) == len(plain)
    # the mean of the two ranks' losses is the global batch's up to the per-rank token weighting
    # (each rank averages over its own target tokens); the first step starts from the same weights
    assert two[0] == pytest.approx(plain[0], rel=0.1)
    assert sum(two) / len(two) == pytest.approx(sum(plain) / len(plain), rel=0.1)
    reloaded = load_exits(str(tmp_path / "exits"), fresh(registry, name)[0], registry)
    trained = reloaded.adapter_modules()
    untouched = fresh(registry, name)[1].adapter_modules()
    assert any(not torch.equal(a, b) for stem in trained for a, b in
               zip(trained[stem].state_dict().values(), untouched[stem].state_dict().values()))
    model = EarlyExitForCausalLM(reloaded.backend, reloaded)
    inputs = reloaded.backend.prepare_inputs(make_images(1, size=64), [""])
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, **no_eos(reloaded.backend))
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
