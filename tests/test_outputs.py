"""Nothing a user already has is deleted or replaced without a word (the rule: the docstring of
earlyexit/util/files.py and docs/commands.md).

- folders earlyexit writes whole are replaced only when it wrote them (its `.earlyexit` marker) or
  with --overwrite, and the user's files in them are carried over byte for byte;
- `train backbone`, `run`, `bench` and `build-tiny` into folders holding user files keep every one;
- `--json` at a link, a device or a FIFO is one line before any work, the link never replaced;
  `--json -` writes the JSON to standard output;
- an interrupted (re)training's `.work` folder is resumed or removed, with a `note:` line.
"""

import glob
import json
import os
import stat

import pytest

from earlyexit.cli import main
from earlyexit.errors import ConfigError
from earlyexit.util.files import (MARKER, atomic_folder, atomic_write, check_replaceable, check_writable,
                                  project_entries, write_json_atomically)

TINY_RANDOM = ["--backend", "blip2-opt", "--model", "tiny-random"]


def plant(root, relative_paths) -> dict:
    """The user's files: distinct bytes (text and binary) at each path; returns {path: bytes}."""
    files = {}
    for n, relative in enumerate(relative_paths):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        data = f"mine {n}: {relative}\n".encode() + bytes(range(n, n + 40))
        path.write_bytes(data)
        files[path] = data
    return files


def assert_intact(files: dict) -> None:
    for path, data in files.items():
        assert path.is_file() and not path.is_symlink(), path
        assert path.read_bytes() == data, path


def one_line(capsys, code, *fragments) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(fragment in err for fragment in fragments), err
    return err


@pytest.fixture(autouse=True)
def nothing_is_renamed_onto_dev(monkeypatch):
    """Should the refusal ever break, a test run as root must fail, not replace /dev/null or the
    /dev/stdout link of the machine."""
    rename = os.replace

    def guarded(source, target, *args, **kwargs):
        if os.path.abspath(os.fspath(target)).startswith("/dev/"):
            raise AssertionError(f"renamed a file onto {target}")
        return rename(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", guarded)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache of this test's own (exits, gates, models), sharing the session's scene data."""
    shared = os.path.join(os.environ["EARLYEXIT_CACHE"], "scenes")
    os.makedirs(shared, exist_ok=True)
    own = tmp_path / "cache"
    own.mkdir()
    (own / "scenes").symlink_to(shared)
    monkeypatch.setenv("EARLYEXIT_CACHE", str(own))
    return own


# -- the helper ---------------------------------------------------------------------------------------
def write_folder(final, files: dict, overwrite=False):
    with atomic_folder(str(final), overwrite=overwrite) as folder:
        for name, text in files.items():
            os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
            with open(os.path.join(folder, name), "w") as handle:
                handle.write(text)


def test_replacing_a_folder_earlyexit_wrote_keeps_every_user_file(tmp_path):
    final = tmp_path / "model"
    write_folder(final, {"config.json": "old", "shard-2.bin": "old only", "state/a.pt": "old"})
    assert project_entries(str(final)) == ("ours", {"config.json", "shard-2.bin", "state/a.pt"})
    mine = plant(final, ["notes.txt", "plots/curve.png", "plots/deep/raw.bin", "state/mine.txt"])
    (final / "link-of-mine").symlink_to("notes.txt")
    (final / "empty-folder-of-mine").mkdir()
    check_replaceable(str(final))  # earlyexit's: no --overwrite needed
    write_folder(final, {"config.json": "new", "weights.bin": "new", "state/a.pt": "new"})
    assert_intact(mine)
    assert os.readlink(final / "link-of-mine") == "notes.txt" and (final / "empty-folder-of-mine").is_dir()
    assert (final / "config.json").read_text() == "new" and (final / "weights.bin").read_text() == "new"
    assert (final / "state" / "a.pt").read_text() == "new"
    assert not (final / "shard-2.bin").exists()  # earlyexit's own, no longer written: gone
    assert json.loads((final / MARKER).read_text())["entries"] == ["config.json", "state/a.pt", "weights.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or aside left


def test_a_user_file_under_a_name_earlyexit_now_writes_is_kept_beside(tmp_path, capsys):
    final = tmp_path / "adapter"
    write_folder(final, {"exit_config.json": "{}"})
    mine = plant(final, ["weights.bin"])  # the user's, not listed by the marker
    write_folder(final, {"exit_config.json": "{}", "weights.bin": "earlyexit's"})
    assert (final / "weights.bin").read_text() == "earlyexit's"
    assert (final / "weights.bin.kept").read_bytes() == mine[final / "weights.bin"]
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "weights.bin.kept" in notes[0]


def test_a_folder_earlyexit_did_not_write_is_refused_unless_overwrite(tmp_path):
    final = tmp_path / "model"
    mine = plant(final, ["mine.txt", "config.json"])
    with pytest.raises(ConfigError, match="--overwrite") as error:
        check_replaceable(str(final))
    assert len(str(error.value).splitlines()) == 1
    check_replaceable(str(final), overwrite=True)
    check_replaceable(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    check_replaceable(str(tmp_path / "empty"))
    (tmp_path / "older").mkdir()
    (tmp_path / "older" / "earlyexit_build.json").write_text("{}")  # written before markers existed
    check_replaceable(str(tmp_path / "older"))
    # --overwrite: the names earlyexit writes are replaced, nothing else of the folder is touched
    write_folder(final, {"config.json": "earlyexit's"}, overwrite=True)
    assert (final / "config.json").read_text() == "earlyexit's" and not (final / "config.json.kept").exists()
    assert_intact({final / "mine.txt": mine[final / "mine.txt"]})


def test_a_link_or_file_where_a_folder_goes_is_refused_and_left_alone(tmp_path):
    target = tmp_path / "real"
    write_folder(target, {"config.json": "theirs"})
    link = tmp_path / "model"
    link.symlink_to(target)
    for call in (lambda: check_replaceable(str(link)), lambda: write_folder(link, {"config.json": "new"})):
        with pytest.raises(ConfigError, match="symbolic link"):
            call()
    assert link.is_symlink() and (target / "config.json").read_text() == "theirs"
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ConfigError, match="is a file"):
        write_folder(tmp_path / "file", {"a": "b"})
    assert (tmp_path / "file").read_text() == "mine"


def test_a_swap_killed_half_way_is_put_back_first(tmp_path, capsys):
    final = tmp_path / "model"
    write_folder(final, {"config.json": "old"})
    mine = plant(final, ["mine.txt"])
    aside = tmp_path / ".model-replaced-abc123"  # a kill after moving the old folder aside
    aside.mkdir()
    os.replace(final, aside / "model")
    (tmp_path / ".model-x1y2z3").mkdir()  # and the new one's temporary, never renamed
    write_folder(final, {"config.json": "new"})
    assert "put back" in capsys.readouterr().err
    assert (final / "config.json").read_text() == "new"
    assert_intact(mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# -- result files: links, devices, FIFOs, standard output ----------------------------------------------
@pytest.fixture
def specials(tmp_path):
    real = tmp_path / "real.json"
    real.write_text('{"mine": true}\n')
    link = tmp_path / "link.json"
    link.symlink_to(real)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    return {"link": link, "real": real, "fifo": fifo}


def assert_specials_untouched(specials):
    assert specials["link"].is_symlink() and os.readlink(specials["link"]) == str(specials["real"])
    assert specials["real"].read_text() == '{"mine": true}\n'
    assert stat.S_ISFIFO(os.lstat(specials["fifo"]).st_mode)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_the_writer_refuses_links_devices_and_fifos(specials):
    for path, kind in ((specials["link"], "symbolic link"), ("/dev/null", "character device"),
                       (specials["fifo"], "FIFO")):
        with pytest.raises(ConfigError, match=kind):
            check_writable(str(path), option="--json")
        with pytest.raises(ConfigError, match=kind):
            write_json_atomically(str(path), {"new": 1})
        with pytest.raises(ConfigError, match=kind):
            with atomic_write(str(path), "wb") as handle:
                handle.write(b"new")
    assert_specials_untouched(specials)
    assert sorted(p.name for p in specials["real"].parent.iterdir()) == ["fifo", "link.json", "real.json"]


def test_dash_writes_the_json_to_standard_output(capsys):
    check_writable("-", option="--json")
    write_json_atomically("-", {"a": [1, 2]})
    assert json.loads(capsys.readouterr().out) == {"a": [1, 2]}


@pytest.mark.parametrize("command", [
    ["run", *TINY_RANDOM, "--strategy", "confidence"],
    ["eval", *TINY_RANDOM, "--data", "scenes-vqa", "--limit", "2"],
])
def test_json_at_a_link_a_device_or_a_fifo_is_one_line_before_any_work(command, specials, tmp_path, capsys):
    stdout_kind = "symbolic link" if os.path.islink("/dev/stdout") else "not a regular file"
    for path, kind in ((specials["link"], "symbolic link"), ("/dev/null", "character device"),
                       (specials["fifo"], "FIFO"), ("/dev/stdout", stdout_kind)):
        output = ["--output", str(tmp_path / "runs")] if command[0] == "run" else []
        err = one_line(capsys, main([*command, *output, "--json", str(path)]), kind, "--json -")
        assert "standard output" in err
    assert_specials_untouched(specials)
    assert os.path.islink("/dev/stdout") == (stdout_kind == "symbolic link")  # the link itself is never replaced
    assert not (tmp_path / "runs").exists()  # refused before any work


def test_eval_json_dash_prints_the_json_alone_on_standard_output(capsys):
    code = main(["eval", *TINY_RANDOM, "--data", "scenes-vqa", "--split", "dev", "--limit", "2", "--batch-size", "2",
                 "--max-new-tokens", "2", "--no-wall", "--json", "-"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)  # nothing but the JSON
    assert result["config"]["samples"] == 2 and "quality" in result
    assert "wrote" not in captured.out and "blip2-opt" in captured.err  # the report went to stderr


# -- train backbone ------------------------------------------------------------------------------------
def test_train_backbone_keeps_every_user_file(tmp_path, capsys):
    output = tmp_path / "K"
    mine = plant(output, ["keep.txt", "model/mine.txt", "model/sub/also-mine.bin"])
    argv = ["train", "backbone", *TINY_RANDOM, "--data", "scenes", "--split", "val", "--steps", "1",
            "--batch-size", "2", "--output", str(output)]
    # K/model holds only the user's files: earlyexit did not write it, so it is not replaced
    one_line(capsys, main(argv), str(output / "model"), "--overwrite")
    assert_intact(mine)
    assert sorted(p.name for p in output.iterdir()) == ["keep.txt", "model"]  # refused before any work

    assert main(argv + ["--overwrite"]) == 0, capsys.readouterr().err
    assert_intact(mine)
    marker = json.loads((output / "model" / MARKER).read_text())
    assert "config.json" in marker["entries"] and "mine.txt" not in marker["entries"]
    first = os.stat(output / "model" / "config.json").st_ino

    # the case: K/model written by earlyexit, with a file of the user's in it
    assert main(argv) == 0, capsys.readouterr().err
    assert_intact(mine)
    assert os.stat(output / "model" / "config.json").st_ino != first  # replaced, not left stale
    from earlyexit.backends.blip2_opt import Blip2OptBackend

    assert Blip2OptBackend.from_pretrained(str(output / "model")).num_layers == 12
    assert not [p for p in output.iterdir() if p.name.startswith(".model-")]


# -- run: output folder, cached adapters, an interrupted retrain ----------------------------------------
RUN = ["run", *TINY_RANDOM, "--strategy", "deebert", "--exit-layers", "3,5", "--option", "epochs=1",
       "--option", "batch_size=2", "--train-limit", "4", "--dev-limit", "2", "--test-limit", "2", "--batch-size", "2",
       "--threshold", "0.5", "--gate", "none", "--no-speculative", "--max-new-tokens", "2"]


def adapter_of(cache) -> str:
    folder, = [p for p in glob.glob(str(cache / "exits" / "blip2-opt-*-deebert-*")) if not p.endswith(".work")]
    return folder


def snapshot(folder) -> dict:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name))}


def exit_weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "exits.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert set(a) == set(b)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def notes(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("note:")]


@pytest.fixture
def quick_metrics(monkeypatch):
    """CIDEr alone for captions: METEOR's Java start-up would cost seconds per evaluation."""
    from earlyexit.evaluation import evaluate

    original = evaluate.score
    monkeypatch.setattr(evaluate, "score", lambda dataset, predictions, quick=False: original(
        dataset, predictions, quick=True))


def test_run_keeps_user_files_and_a_killed_retrain_is_resumed(cache, tmp_path, capsys, registry, quick_metrics):
    runs = tmp_path / "runs"
    mine = plant(runs, ["keep.txt", "blip2-opt-deebert/my-notes.md"])
    argv = RUN + ["--output", str(runs)]

    assert main(argv + ["--json", "-"]) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert json.loads(captured.out)["strategy_label"] == "deebert"  # `--json -`: the JSON alone on stdout
    assert "exits: training" in captured.err
    assert_intact(mine)
    assert os.path.getsize(runs / "blip2-opt-deebert" / "mid_crisis.csv") > 0
    adapter = adapter_of(cache)
    trained = exit_weights(adapter)

    # a file of the user's inside the cached adapter survives a --retrain, which still replaces it
    mine.update(plant(cache / "exits", [os.path.join(os.path.basename(adapter), "mine.txt")]))
    config_inode = os.stat(os.path.join(adapter, "exit_config.json")).st_ino
    assert main(argv + ["--retrain"]) == 0, capsys.readouterr().err
    assert_intact(mine)
    assert os.stat(os.path.join(adapter, "exit_config.json")).st_ino != config_inode
    assert_same_weights(exit_weights(adapter), trained)
    before = snapshot(adapter)

    # a --retrain killed after its first checkpoint: the adapter stays byte-identical, .work stays
    deebert = registry.strategy("deebert")
    original = deebert.training_step

    def dies_after_a_checkpoint(self, *args, **kwargs):
        if glob.glob(str(cache / "exits" / "*.work" / "checkpoint-*" / "trainer_state.json")):
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(deebert, "training_step", dies_after_a_checkpoint)
        assert main(argv + ["--retrain"]) == 130
    capsys.readouterr()
    work = adapter + ".work"
    assert glob.glob(os.path.join(work, "checkpoint-*")) and snapshot(adapter) == before
    assert_intact(mine)

    # the next --retrain resumes it, says so, and leaves no .work and the right adapter
    assert main(argv + ["--retrain"]) == 0
    said = notes(capsys.readouterr().err)
    assert len(said) == 1 and said[0].startswith("note: resuming the interrupted retrain from its checkpoint at step")
    assert not os.path.exists(work)
    assert_same_weights(exit_weights(adapter), trained)  # as if it had never been interrupted
    assert_intact(mine)

    # a checkpoint of other settings is removed, with a word, and the retrain starts over
    stale = os.path.join(work, "checkpoint-1")
    os.makedirs(stale)
    with open(os.path.join(stale, "trainer_state.json"), "w") as handle:
        json.dump({"step": 1, "losses": [], "schedule": {"steps": 999}, "world_size": 1}, handle)
    assert main(argv + ["--retrain"]) == 0
    said = notes(capsys.readouterr().err)
    assert len(said) == 1 and said[0].startswith(f"note: removed {work}") and "other settings" in said[0]
    assert not os.path.exists(work)
    assert_same_weights(exit_weights(adapter), trained)

    # a run without --retrain uses the cached exits and removes what an interrupted retrain left
    os.makedirs(stale)
    assert main(argv) == 0
    err = capsys.readouterr().err
    said = notes(err)
    assert "exits: reusing" in err and len(said) == 1 and "interrupted --retrain" in said[0]
    assert not os.path.exists(work)
    assert_intact(mine)


# -- bench ---------------------------------------------------------------------------------------------
BENCH_SPEC = """
name = "outputs"
[defaults]
backend = "blip2-opt"
model = "tiny-random"
exit_layers = [1, 2]
dev_limit = 2
test_limit = 2
grid = [0.5]
batch_size = 2
max_new_tokens = 2
gate = "none"
[strategies]
conf = { strategy = "confidence" }
[tables.t]
data = ["scenes-vqa"]
"""


def test_bench_keeps_every_user_file(cache, tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(BENCH_SPEC)
    output = tmp_path / "out"
    mine = plant(output, ["keep.txt", "cells/keep.json", "tables/keep.md", "figures/keep.png", "runs/keep.txt"])
    argv = ["bench", str(spec), "--output", str(output)]
    for extra in ([], ["--force"]):  # computed, then recomputed and rendered again
        code = main(argv + extra)
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert " 0 failed" in captured.out and " 0 computed" not in captured.out
        assert_intact(mine)
    assert (output / "bench.json").is_file() and (output / "tables" / "t.md").is_file()


# -- build-tiny ----------------------------------------------------------------------------------------
def test_build_tiny_keeps_user_files_in_its_cache_folder(cache, capsys, monkeypatch):
    from earlyexit.models import embedded

    recipe = embedded.with_overrides(
        model={"num_layers": 1, "hidden_size": 32, "ffn_dim": 64, "vision_hidden": 32, "vision_layers": 1,
               "num_query_tokens": 2, "patch_size": 32},
        scenes={"seed": 0, "image_size": 32, "train": 8, "val": 0, "test": 0},
        encoder_pretrain={"steps": 1, "batch_size": 2}, train={"steps": 1, "batch_size": 2})
    monkeypatch.setattr(embedded, "recipe_of", lambda name: recipe)
    assert main(["build-tiny"]) == 0, capsys.readouterr().err
    path = embedded.model_path(recipe)
    assert embedded.is_built(recipe)
    mine = plant(cache / "models", ["keep.txt", os.path.join(os.path.basename(path), "mine.txt")])
    first = os.stat(os.path.join(path, "earlyexit_build.json")).st_ino

    assert main(["build-tiny", "--force"]) == 0, capsys.readouterr().err  # the cache folder is earlyexit's
    assert_intact(mine)
    assert os.stat(os.path.join(path, "earlyexit_build.json")).st_ino != first  # rebuilt
    assert embedded.is_built(recipe) and embedded.build_info(recipe)["recipe"] == recipe
    assert "mine.txt" not in json.loads(open(os.path.join(path, MARKER)).read())["entries"]
    assert sorted(p.name for p in (cache / "models").iterdir()) == sorted(["keep.txt", os.path.basename(path)])
