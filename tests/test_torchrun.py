"""Several processes (torchrun): `bench` and `run` finish and match one process, every file is
written once by rank 0, the process group's backend follows the device, ranks exchange plain
Python only, and a split without answers is refused before any training.

The two torchrun launches cost about a minute each on 2 cores (two torch processes slow each
other down); EARLYEXIT_SKIP_TORCHRUN=1 skips them."""

import collections
import gc
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
from helpers import launcher_env

from earlyexit.bench import runner
from earlyexit.bench.spec import load_spec
from earlyexit.cli import main
from earlyexit.core.accounting import ExitVisit, StepRecord, Trace
from earlyexit.data.splits import UNANSWERED, refuse_unanswered
from earlyexit.errors import ConfigError, EarlyExitError
from earlyexit.evaluation.loop import Share
from earlyexit.pipeline.run import RunSettings, run
from earlyexit.util import ranks
from earlyexit.util.devices import distributed_backend

launches = pytest.mark.skipif(os.environ.get("EARLYEXIT_SKIP_TORCHRUN") == "1", reason="EARLYEXIT_SKIP_TORCHRUN=1")

# every final rename (os.replace: atomic_write and atomic_folder place files and folders with it),
# logged with the rank that made it
RECORD_REPLACES = """
import os

_replace = os.replace


def replace(source, target, *args, **kwargs):
    _replace(source, target, *args, **kwargs)
    with open(os.environ["REPLACE_LOG"], "a") as log:
        log.write(os.environ.get("RANK", "-") + "\\t" + os.fspath(target) + "\\n")


os.replace = replace
"""


def torchrun(arguments: list, tmp_path, port: int) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 earlyexit ARGUMENTS`, its renames logged to tmp_path/replaces.log."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(RECORD_REPLACES)
    env = launcher_env(REPLACE_LOG=str(tmp_path / "replaces.log"),
                       PYTHONPATH=os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), "-m", "earlyexit.cli", *arguments], capture_output=True, text=True,
                          timeout=420, env=env)


def renames(tmp_path, under: str) -> collections.Counter:
    """(rank, final path) of every rename into place under `under` (moves of a replaced folder aside excluded)."""
    lines = (tmp_path / "replaces.log").read_text().splitlines()
    pairs = [line.split("\t") for line in lines]
    return collections.Counter((rank, path) for rank, path in pairs
                               if path.startswith(under) and "-replaced-" not in path)


def leftovers(folder) -> list:
    """Temporary files and folders (`.NAME-*`, `.NAME.*.tmp`) a write left behind."""
    return [os.path.join(here, name) for here, folders, files in os.walk(folder) for name in folders + files
            if name.startswith(".") and name != ".earlyexit"]


# -- bench -----------------------------------------------------------------------------------------
BENCH_SPEC = """
name = "two"
[defaults]
backend = "blip2-opt"
model = "tiny-random"
exit_layers = [4, 8]
test_limit = 4
threshold = 0.2
batch_size = 1  # batches of one: no padding, so no prompt-pass cost that depends on which rows share a batch
max_new_tokens = 3
gate = "none"
[strategies]
conf = { strategy = "confidence" }
[tables.t]
group_by = "noise"
data = ["scenes-vqa"]
noise = [0.0, 0.2]
"""


def cell_values(output) -> dict:
    """What must not depend on the number of processes: per cell, the threshold and each row's
    quality, exit histogram, layer-based speed-ups and examples (timings excluded)."""
    values = {}
    for path in sorted((output / "cells").glob("*.json")):
        record = json.loads(path.read_text())
        report = record["report"]
        values[json.dumps(record["config"], sort_keys=True)] = {"threshold": report["threshold"], "rows": {
            name: {"quality": r["quality"], "histogram": r["exit_layer_histogram"],
                   "speed": {k: r["speed"][k] for k in ("param_speedup", "layer_speedup", "decode_layer_speedup")},
                   "examples": [(e["id"], e["prediction"], e["exit_layers"]) for e in r["examples"]]}
            for name, r in report["results"].items()}}
    return values


@launches
def test_bench_under_torchrun_matches_one_process_and_writes_each_cell_once(tmp_path, capsys, monkeypatch):
    spec = tmp_path / "two.toml"
    spec.write_text(BENCH_SPEC)
    monkeypatch.setenv("EARLYEXIT_CACHE", str(tmp_path / "cache"))
    assert main(["bench", str(spec), "--output", str(tmp_path / "one")]) == 0
    assert "cells: 2 (0 cached, 2 computed" in capsys.readouterr().out
    double = torchrun(["bench", str(spec), "--output", str(tmp_path / "two")], tmp_path, 29721)
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count("cells: 2 (0 cached, 2 computed") >= 1  # rank 0 computed both
    one, two = cell_values(tmp_path / "one"), cell_values(tmp_path / "two")
    assert len(one) == 2 and one == two
    written = renames(tmp_path, str(tmp_path / "two" / "cells"))
    assert len(written) == 2 and set(written.values()) == {1} and {rank for rank, _ in written} == {"0"}
    assert not leftovers(tmp_path / "two") and not leftovers(tmp_path / "cache")


def test_bench_frees_each_cells_models_before_the_next(tmp_path, capsys, monkeypatch):
    """The collector runs between cells: a backbone held only by reference cycles (bound
    methods, modules pointing at each other) is gone before the next cell loads its own."""
    from earlyexit.pipeline import exits

    spec = tmp_path / "two.toml"
    spec.write_text(BENCH_SPEC.replace("noise = [0.0, 0.2]", "noise = [0.0, 0.2]\ntest_limit = 2"))
    loaded, alive_at_load = [], []
    original = exits.load_backend

    def load_backend(*args, **kwargs):
        alive_at_load.append(sum(ref() is not None for ref in loaded))
        backend = original(*args, **kwargs)
        backend.cycle = backend  # held by a cycle only, as real models are
        loaded.append(weakref.ref(backend))
        return backend

    monkeypatch.setattr(exits, "load_backend", load_backend)
    gc.disable()  # only bench's own collection may free the first cell's backbone
    try:
        assert main(["bench", str(spec), "--output", str(tmp_path / "out")]) == 0
    finally:
        gc.enable()
    assert len(loaded) == 2 and alive_at_load == [0, 0]


# -- run -------------------------------------------------------------------------------------------
RUN = ["run", "--backend", "blip2-opt", "--strategy", "deebert", "--model", "tiny-random", "--data", "scenes-vqa",
       "--exit-layers", "4,8",
       "--option", "epochs=1", "--option", "batch_size=4", "--train-limit", "8", "--dev-limit", "4", "--test-limit",
       "4", "--batch-size", "2", "--max-new-tokens", "3", "--grid", "0.2,0.9", "--no-speculative"]


@launches
def test_run_under_torchrun_writes_every_file_once_and_matches_one_process(tmp_path, monkeypatch):
    """Exit training (data parallel), the learned gates, the calibration curve, the scenes cache
    and the JSON: each written by rank 0 alone, once, nothing left behind; the same quality as
    one process. (VQA data: caption metrics start Java for every scoring.)"""
    cache = tmp_path / "cache"
    monkeypatch.setenv("EARLYEXIT_CACHE", str(cache))
    double = torchrun([*RUN, "--output", str(tmp_path / "two"), "--json", str(tmp_path / "two.json")], tmp_path, 29731)
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count("earlyexit run:") == 1
    written = renames(tmp_path, str(tmp_path))
    assert {rank for rank, _ in written} == {"0"}, written  # rank 0 writes every file
    assert set(written.values()) == {1}, [path for path, n in written.items() if n > 1]  # once each
    paths = {path for _, path in written}
    for wanted in ("two.json", "calibration.csv", "checkpoint-", "scenes"):
        assert any(wanted in path for path in paths), wanted
    assert len(os.listdir(cache / "exits")) == 1 and len(os.listdir(cache / "gates")) == 2  # .work removed
    assert not leftovers(tmp_path / "two") and not leftovers(cache)
    assert main([*RUN, "--output", str(tmp_path / "one"), "--json", str(tmp_path / "one.json"), "--retrain"]) == 0
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["threshold"] == two["threshold"] and one["results"].keys() == two["results"].keys()
    for name, result in one["results"].items():
        assert two["results"][name]["quality"] == pytest.approx(result["quality"]), name
        assert two["results"][name]["predictions"] == result["predictions"], name
        assert (result["processes"], two["results"][name]["processes"]) == (1, 2)


# -- the process group -----------------------------------------------------------------------------
def test_the_collective_backend_follows_the_device():
    assert [distributed_backend(d) for d in ("cpu", "cuda", "cuda:1", torch.device("cpu"), "mps")] == [
        "gloo", "nccl", "nccl", "gloo", "gloo"]


@pytest.mark.parametrize("device, local_rank, backend, gpu", [
    ("cpu", "1", "gloo", None), ("cuda", "1", "nccl", 1), ("cuda:0", "1", "nccl", 0)])
def test_joining_under_a_launcher_creates_the_group_for_the_device(monkeypatch, device, local_rank, backend, gpu):
    created, chosen = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: bool(created))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: created.append(backend))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert ranks.join_process_group(device) == (1, 2)
    assert created == [backend] and chosen == ([] if gpu is None else [gpu])


@pytest.fixture
def world_of_one(monkeypatch):
    """A real gloo group of one process, destroyed afterwards (other tests run without a group)."""
    from earlyexit.training.deepspeed import _free_port

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(key, value)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_deepspeed_adopts_the_group_run_created_and_a_wrong_group_is_refused(world_of_one):
    pytest.importorskip("deepspeed")
    from earlyexit.training.deepspeed import init_distributed

    assert ranks.join_process_group("cpu", alone=True) == (0, 1)
    group = torch.distributed.group.WORLD
    assert init_distributed("cpu") == (0, 1)
    assert torch.distributed.group.WORLD is group and torch.distributed.get_backend() == "gloo"
    with pytest.raises(EarlyExitError, match="created with gloo but the model is on cuda, which needs nccl"):
        init_distributed("cuda")  # ZeRO's CUDA collectives cannot go through gloo


# -- what ranks send each other ----------------------------------------------------------------------
def tensors_in(value) -> list:
    """Every torch.Tensor pickling `value` would write."""
    found = []

    class Finder(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, torch.Tensor):
                found.append(obj)
            return None

    Finder(io.BytesIO()).dump(value)
    return found


def a_share() -> Share:
    step = StepRecord(exit_layer=torch.tensor([2, 4, -1]), new_positions=1, widths=[1, 1, 1, 1],
                      exits=[ExitVisit(0, 2, module_rest=0.5, read_rest=0.25)], kv_policy="catchup", prefill=False)
    trace = Trace(exit_layers=torch.tensor([[2, 4], [4, -1]]), steps=[step, step], num_layers=4,
                  vision_layers=torch.tensor([3.0, 4.0]))
    return Share({"predictions": {"a": "a cat"}, "token_ids": {"a": [5, 6]}}, traces=[trace], records=[[step]])


def test_the_results_gather_sends_plain_python_and_rank_0_gets_the_tensors_back(monkeypatch):
    share = a_share()
    sent = []

    def all_gather_object(out, value):
        sent.append(value)
        out[:] = [pickle.loads(pickle.dumps(value))] * len(out)  # what the wire carries

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    shares = ranks.gather_on_main(share, 2)
    assert tensors_in(share) and not tensors_in(sent[0])  # the share holds tensors; what is sent holds none
    merged = Share.merged(shares)
    trace, step = merged.traces[0], merged.traces[0].steps[0]
    assert torch.equal(trace.exit_layers, torch.tensor([[2, 4], [4, -1]])) and trace.exit_layers.dtype == torch.long
    assert torch.equal(step.exit_layer, torch.tensor([2, 4, -1])) and torch.equal(trace.vision_layers,
                                                                                   torch.tensor([3.0, 4.0]))
    assert trace.per_sequence() == [[2, 4], [4]] and step.exits[0].read_rest == 0.25
    assert merged.columns == share.columns and len(merged.traces) == 2 and len(merged.records) == 2


def test_rank_0s_report_is_broadcast_as_plain_python(monkeypatch):
    sent = []

    def broadcast_object_list(box, src):
        sent.append(box[0])
        box[0] = pickle.loads(pickle.dumps(box[0]))

    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast_object_list)
    report = {"quality": {"CIDEr": 0.5}, "layers": torch.zeros(2, 0, dtype=torch.int32)}
    received = ranks.shared_from_main(report, 2)
    assert not tensors_in(sent[0]) and received["quality"] == {"CIDEr": 0.5}
    assert received["layers"].shape == (2, 0) and received["layers"].dtype == torch.int32


# -- splits without answers ------------------------------------------------------------------------
def test_a_vqa_run_scored_on_test_is_refused_before_anything_loads(monkeypatch):
    from earlyexit.pipeline import exits, run as pipeline_run

    work = []
    monkeypatch.setattr(exits, "load_backend", lambda *a, **k: work.append("load"))
    monkeypatch.setattr(pipeline_run, "join_process_group", lambda *a, **k: work.append("join"))
    for data, split in (("vqav2:/data/vqav2", "test"), ("gqa:/data/gqa", "test"), ("vizwiz:/data/vizwiz", "test"),
                        ("vqav2:/data/vqav2", "test-dev")):
        settings = RunSettings(backend="blip2-opt", strategy="free", data=data, test_split=split)
        with pytest.raises(ConfigError, match=rf"{data.split(':')[0]}/{split} is published without answers") as error:
            run(settings, None)
        assert "\n" not in str(error.value)
    assert work == []  # no model loaded, no process group joined: nothing trained


def test_a_bench_cell_scored_on_test_fails_the_spec_before_any_cell_runs(tmp_path, capsys):
    spec = tmp_path / "vqa.toml"
    spec.write_text(textwrap.dedent("""
        [strategies]
        conf = { strategy = "confidence" }
        [tables.fine]
        data = ["scenes"]
        [tables.vqa]
        data = ["vqav2:/data/vqav2"]
        test_split = "test"
    """))
    assert main(["bench", str(spec), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[tables.vqa]" in err and "vqav2/test is published without answers" in err
    assert not (tmp_path / "out" / "cells").exists()  # not even the answered table's cell ran


def test_paper_spec_scores_every_cell_on_a_split_with_answers(tmp_path):
    spec = load_spec("paper", data_root=str(tmp_path))
    scored = {runner.test_source(cell) for table in spec.tables.values() for cell in table.cells}
    by_name = {data.partition(":")[0]: split for data, split in scored}
    assert by_name == {"coco": "test", "nocaps": "val", "vqav2": "val:0.9-1.0", "okvqa": "val:0.9-1.0",
                       "vizwiz": "val:0.9-1.0", "visdial": "val:0.9-1.0", "gqa": "testdev"}
    for data, split in scored:
        assert split.partition(":")[0] not in UNANSWERED.get(data.partition(":")[0], ())
        refuse_unanswered(data, split)  # raises nothing


# -- two writers beside each other ---------------------------------------------------------------------
def test_a_live_writers_temporary_folder_is_not_cleaned_as_a_leftover(tmp_path):
    """Another process writing the same folder (another rank) leaves this one's temporary alone;
    what a killed writer left (no one holds it) is still removed."""
    from earlyexit.util.files import atomic_folder

    final = tmp_path / "exits"
    dead = tmp_path / ".exits-killed"
    dead.mkdir()
    with atomic_folder(str(final)) as first:
        (tmp_path / first / "a.txt").write_text("a")
        with atomic_folder(str(final)) as second:
            (tmp_path / second / "b.txt").write_text("b")
        assert os.path.isfile(os.path.join(first, "a.txt")) and not dead.exists()
    assert (final / "a.txt").read_text() == "a" and sorted(os.listdir(tmp_path)) == ["exits"]


def test_an_unbuilt_embedded_model_is_refused_under_torchrun_before_any_rank_waits(monkeypatch):
    from earlyexit.models import embedded
    from earlyexit.pipeline import exits

    monkeypatch.setattr(embedded, "is_built", lambda recipe: False)
    exits.refuse_building_under_torchrun("tiny")  # one process builds it as before
    monkeypatch.setattr(exits, "process_group", lambda: (1, 2))
    exits.refuse_building_under_torchrun("tiny-random")  # nothing to build
    with pytest.raises(ConfigError, match=r"not built yet; build it once in one process \(earlyexit build-tiny\)"):
        exits.refuse_building_under_torchrun("tiny")
