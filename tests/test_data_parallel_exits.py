"""Exit training in two processes without DeepSpeed (torchrun, gloo on the CPU): each rank trains
on its own rows of every global batch, gradients are averaged, rank 0 alone writes checkpoints,
and the trained exits are those of one process on the same global batches."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import launcher_env

from earlyexit.errors import ConfigError
from earlyexit.training.engines import TrainingEngine
from earlyexit.training.loop import TrainConfig

SCRIPT = '''
import dataclasses
import json
import os
import sys

import torch

from earlyexit.backends.blip2_opt import Blip2OptBackend
from earlyexit.data.scenes import SceneConfig, load_scenes
from earlyexit.strategies.deebert import DeeBertConfig, DeeBertStrategy
from earlyexit.training.exits import train_exits


def data(scenes_dir):
    """8 images, every caption the same sentence: every row has as many target tokens, so the
    mean of two shards' mean losses is the global batch's mean loss, and two processes must
    train what one does."""
    scenes = load_scenes("exit_train", config=SceneConfig(train=8, val=10, test=4), cache_dir=scenes_dir)
    return dataclasses.replace(scenes, samples=[dataclasses.replace(s, captions=["a red circle on the left"])
                                                for s in scenes.samples[:8]])


def build():
    backend = Blip2OptBackend.from_tiny_config(seed=21, num_layers=4, image_size=64, patch_size=16, init_std=0.1)
    torch.manual_seed(0)
    return backend, DeeBertStrategy(backend, [1, 2], DeeBertConfig(epochs=2, batch_size=4, learning_rate=1e-2))


def train(output_dir, scenes_dir, on_backend=None):
    """DeeBERT exits, 2 epochs at 4 rows a step: 4 steps."""
    backend, strategy = build()
    if on_backend:
        on_backend(backend)
    losses = train_exits(strategy, backend, data(scenes_dir), output_dir, progress=False)
    return strategy, losses


if __name__ == "__main__":
    from earlyexit.training.loop import PlainEngine

    output, scenes_dir = sys.argv[1:3]
    rank = int(os.environ["RANK"])
    rows, writes = [], []

    def record_rows(backend):
        original = backend.teacher_forcing_inputs

        def recorded(batch, layers):  # the rows this rank's backbone pass sees: their images' pixel sums
            rows.append([round(float(x), 3) for x in batch["pixel_values"].float().sum((1, 2, 3))])
            return original(batch, layers)

        backend.teacher_forcing_inputs = recorded

    save = PlainEngine.save

    def recorded_save(engine, folder):
        writes.append(os.path.basename(folder))
        save(engine, folder)

    PlainEngine.save = recorded_save
    strategy, losses = train(output + "/work", scenes_dir, record_rows)
    if rank == 0:
        torch.save(strategy.classifiers.state_dict(), output + "/classifiers.pt")
    with open(f"{output}/rank{rank}.json", "w") as handle:
        json.dump({"losses": losses, "rows": rows, "writes": writes, "steps": len(losses), "world": torch.distributed.get_world_size(),
                   "backend": torch.distributed.get_backend()}, handle)
'''


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dp")
    path = folder / "train_dp.py"
    path.write_text(textwrap.dedent(SCRIPT))
    spec = importlib.util.spec_from_file_location("train_dp", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module, folder / "scenes"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_train_the_exits_one_process_trains(script, tmp_path):
    path, module, scenes_dir = script
    one, one_losses = module.train(str(tmp_path / "one"), str(scenes_dir))  # this process: a world of one

    env = launcher_env(EARLYEXIT_FEATURE_CACHE_GB="1e-9")  # each rank spills its own features to disk too
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), str(path), str(tmp_path / "two"), str(scenes_dir)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["backend"] == "gloo"

    # both ranks took as many steps as one process; each computed features for its own 2 rows of
    # each of the 2 distinct global batches (later epochs read them back from its spill)
    steps = len(one_losses)
    assert steps == 4 and [r["steps"] for r in ranks] == [steps, steps]
    for mine, theirs in zip(ranks[0]["losses"], one_losses, strict=True):  # what optimize returns: the ranks' mean
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
    assert [len(r["rows"]) for r in ranks] == [2, 2] and all(len(rows) == 2 for r in ranks for rows in r["rows"])
    batches = global_batches(one.backend, module, scenes_dir)
    for rank, record in enumerate(ranks):
        for index, rows in enumerate(record["rows"]):
            assert rows == batches[index][rank::2]

    # only rank 0 wrote checkpoint files, once per checkpoint; the spills are gone
    assert ranks[1]["writes"] == [] and len(ranks[0]["writes"]) == steps == len(set(ranks[0]["writes"]))
    work = tmp_path / "two" / "work"
    assert sorted(os.listdir(work)) == [f"checkpoint-{steps}"]
    assert sorted(os.listdir(work / f"checkpoint-{steps}")) == ["optimizer.pt", "trainable.safetensors",
                                                                 "trainer_state.json"]

    trained = torch.load(tmp_path / "two" / "classifiers.pt", weights_only=True)
    reference = one.classifiers.state_dict()
    initial = module.build()[1].classifiers.state_dict()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)  # the exits did train
    for name, value in reference.items():
        # measured: 3e-8 apart; without the gradient all-reduce, 1e-5 to 4e-4
        torch.testing.assert_close(trained[name], value, atol=1e-6, rtol=0)


def global_batches(backend, module, scenes_dir) -> list[list[float]]:
    """The pixel sums of each first-epoch global batch's rows, as one process builds them."""
    from earlyexit.training.batching import TrainingBatches

    batches = TrainingBatches(backend, [module.data(scenes_dir)], batch_size=4, seed=0)
    return [[round(float(x), 3) for x in batches(step)["pixel_values"].float().sum((1, 2, 3))] for step in (0, 1)]


def test_a_batch_smaller_than_the_world_is_one_line():
    engine = TrainingEngine.__new__(TrainingEngine)
    engine.rank, engine.world_size = 1, 4
    with pytest.raises(ConfigError, match="raise the batch size to at least 4"):
        engine.shard({"input_ids": torch.zeros(3, 5)})
    assert torch.equal(engine.shard({"input_ids": torch.arange(8)})["input_ids"], torch.tensor([1, 5]))


def test_one_process_has_no_collectives(tmp_path):
    w = torch.nn.Parameter(torch.ones(3))
    engine = TrainingEngine({"g": {"w": w}}, TrainConfig(output_dir=str(tmp_path), steps=2, progress=False))
    assert (engine.rank, engine.world_size) == (0, 1)
    batch = {"input_ids": torch.arange(4)}
    assert engine.shard(batch) is batch
    engine.barrier()  # no process group needed
