"""`earlyexit bench` on a micro model: every table and figure is written, the formats agree with each
other, a re-run computes nothing and a changed strategy option recomputes only its own cells."""

import csv
import json
import os
import re
import shutil

import pytest
from helpers import make_backend
from PIL import Image

from earlyexit.bench import figures
from earlyexit.cli import main
from earlyexit.evaluation.evaluate import score as original_score

MICRO_DEFAULTS = """
backend = "blip2-opt"
model = "{model}"
exit_layers = [1, 2]
train_limit = 6
dev_limit = 6
test_limit = 4
grid = [0.2, 0.9]
batch_size = 4
max_new_tokens = 4
gate = "none"
"""

SPEC = """
name = "micro"
[defaults]""" + MICRO_DEFAULTS + """[strategies]
conf = {{ strategy = "confidence" }}
deebert = {{ strategy = "deebert", options = {{ epochs = 1, batch_size = 4, learning_rate = {lr} }} }}
[tables.t2]
data = ["scenes-vqa", "okvqa:{{data_root}}/okvqa"]
[tables.t4]
data = ["scenes"]
[tables.t6]
group_by = "noise"
data = ["scenes-vqa"]
strategies = ["deebert"]
noise = [0.0, 0.2]
[tables.t11]
layout = "histogram"
data = ["scenes"]
[tables.elsewhere]
data = ["scenes-vqa"]
strategies = ["conf"]
test_split = "dev"
[figures.fig1]
kind = "token-exits"
table = "t4"
strategy = "deebert"
[figures.fig3]
kind = "per-exit-accuracy"
table = "t4"
[figures.fig4a]
kind = "ablation-bars"
table = "t2"
[figures.fig4b]
kind = "quality-vs-speed"
table = "t4"
"""
TABLES = ("t2", "t4", "t6", "t11", "elsewhere")
FIGURES = {"fig1": "token-exits", "fig3": "per-exit-accuracy", "fig4a": "ablation-bars", "fig4b": "quality-vs-speed"}


def quick_caption_score(dataset, predictions, quick=False):
    """CIDEr alone for captions: METEOR's Java start-up would cost seconds per evaluation."""
    return original_score(dataset, predictions, quick=quick or dataset.task == "caption")


def bench(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().out


def counts(out: str) -> dict:
    found = re.search(r"cells: (\d+) \((\d+) cached, (\d+) computed, (\d+) unavailable, (\d+) failed\)", out)
    return dict(zip(("cells", "cached", "computed", "unavailable", "failed"), map(int, found.groups())))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    from earlyexit.evaluation import evaluate

    root = tmp_path_factory.mktemp("bench")
    model = root / "micro"
    make_backend(seed=8, num_layers=4, image_size=64, patch_size=16, init_std=0.1).save_pretrained(str(model))
    spec = root / "spec.toml"
    spec.write_text(SPEC.format(model=model, lr=0.001))
    argv = ["bench", str(spec), "--output", str(root / "out"), "--data-root", str(root / "no-data")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "score", quick_caption_score)
        code = main(argv)
    return root, argv, code


@pytest.fixture
def quick_metrics(monkeypatch):
    from earlyexit.evaluation import evaluate

    monkeypatch.setattr(evaluate, "score", quick_caption_score)


def test_bench_writes_every_table_and_figure(first_run):
    root, _, code = first_run
    out = root / "out"
    assert code == 0
    summary = json.loads((out / "bench.json").read_text())
    assert summary["cells"]["computed"] == 6 and summary["cells"]["unavailable"] == 2
    assert str(out / "figures" / "fig4b.png") in summary["artifacts"]
    for name in TABLES:
        for extension in ("md", "tex", "csv", "json"):
            assert (out / "tables" / f"{name}.{extension}").stat().st_size > 0
    for name, kind in FIGURES.items():
        with Image.open(out / "figures" / f"{name}.png") as image:
            assert image.format == "PNG" and image.size == figures.pixel_size(kind)
            low, high = image.convert("L").getextrema()
            assert high - low > 100  # something is drawn, not a blank canvas


def markdown_rows(text: str) -> tuple[list, list]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return split[0][1:], [row for row in split[2:]]


def test_markdown_csv_and_latex_agree_with_the_json(first_run):
    out = first_run[0] / "out" / "tables"
    for name in TABLES:
        table = json.loads((out / f"{name}.json").read_text())
        columns, rows = markdown_rows((out / f"{name}.md").read_text())
        assert columns == table["columns"] and len(rows) == len(table["rows"])
        for row, expected in zip(rows, table["rows"]):
            assert row[0] == expected["label"] and row[1:] == expected["display"]
            for shown, value in zip(row[1:], expected["values"]):
                if value is None:
                    assert shown.startswith("n/a[")
                else:  # the number shown is the JSON's value, rounded
                    decimals = len(shown.partition(".")[2])
                    assert float(shown) == pytest.approx(round(value, decimals), abs=10 ** -decimals / 2)
        with open(out / f"{name}.csv", newline="") as handle:
            records = list(csv.reader(handle))
        assert records[0][1:] == table["columns"] and len(records) == len(table["rows"]) + 1
        for record, expected in zip(records[1:], table["rows"]):
            assert [float(v) if v[0].isdigit() else None for v in record[1:]] == \
                   [v if v is None else pytest.approx(v) for v in expected["values"]]
        tex = (out / f"{name}.tex").read_text()
        assert tex.count("{") == tex.count("}") + tex.count(r"\{") - tex.count(r"\}")
        assert tex.count(r"\begin{") == tex.count(r"\end{") == 2
        body = tex.split(r"\hline")[2]  # between the header's rule and the closing rule
        tex_rows = [r for r in body.split(r"\\") if r.strip()]
        assert len(tex_rows) == len(table["rows"])
        assert all(len(r.split(" & ")) == len(table["columns"]) + 1 for r in tex_rows)
        provenance = table["provenance"]
        for key in ("git_revision", "hardware", "date", "torch", "transformers", "spec_source", "command", "cells"):
            assert provenance[key] is not None, key


def test_missing_data_shows_na_with_a_footnote_and_the_rest_runs(first_run):
    table = json.loads((first_run[0] / "out" / "tables" / "t2.json").read_text())
    okvqa = [i for i, c in enumerate(table["columns"]) if c.startswith("okvqa")]
    scenes = [i for i, c in enumerate(table["columns"]) if c.startswith("scenes-vqa")]
    for row in table["rows"]:
        assert all(row["display"][i] == "n/a[1]" for i in okvqa)
        assert all(row["values"][i] is not None for i in scenes)
    assert "okvqa not found" in table["notes"][0] and "--data-root" in table["notes"][0]
    assert table["columns"][scenes[1]].endswith("Spd (param)") and table["columns"][scenes[2]].endswith("layer×")
    assert table["columns"][scenes[3]].endswith("wall×")
    noise = json.loads((first_run[0] / "out" / "tables" / "t6.json").read_text())
    assert noise["columns"][0] == "noise 0 accuracy" and "noise 0.2 accuracy" in noise["columns"]
    elsewhere = json.loads((first_run[0] / "out" / "tables" / "elsewhere.json").read_text())
    record = json.loads((first_run[0] / "out" / "cells" / f"{elsewhere['rows'][1]['cells'][0]}.json").read_text())
    assert record["report"]["results"]["full"]["config"]["split"] == "dev"  # test_split: scored on dev
    histogram = json.loads((first_run[0] / "out" / "tables" / "t11.json").read_text())
    for row in histogram["rows"]:  # shares of tokens per exit layer add up to 100 %
        assert sum(row["values"][:-1]) == pytest.approx(100.0)


def test_rerun_computes_nothing_and_a_changed_option_only_its_cells(first_run, tmp_path, capsys, quick_metrics):
    root, argv, _ = first_run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    argv = [*argv[:3], str(out), *argv[4:]]
    cells = out / "cells"
    done = {p.name: p.stat().st_mtime_ns for p in cells.iterdir() if "report" in json.loads(p.read_text())}
    code, printed = bench(argv, capsys)
    assert code == 0
    assert counts(printed) == {"cells": 8, "cached": 6, "computed": 0, "unavailable": 2, "failed": 0}
    assert {name: (cells / name).stat().st_mtime_ns for name in done} == done  # not even rewritten
    assert "wrote " + str(out / "tables" / "t4.md") in printed

    # an interrupted bench resumes: a cell whose result is gone is the only one computed
    computed = sorted(p for p in cells.iterdir() if "report" in json.loads(p.read_text()))
    os.remove(computed[0])
    assert counts(bench(argv, capsys)[1])["computed"] == 1

    # a changed deebert option: its three cells (two tables and the noise level) and nothing else
    spec = root / "spec.toml"
    changed = tmp_path / "spec.toml"
    changed.write_text(spec.read_text().replace("learning_rate = 0.001", "learning_rate = 0.002"))
    conf_cells = {p.name: p.stat().st_mtime_ns for p in cells.iterdir()
                  if json.loads(p.read_text())["label"] == "conf" and "report" in json.loads(p.read_text())}
    code, printed = bench(["bench", str(changed), *argv[2:]], capsys)
    assert code == 0 and counts(printed)["computed"] == 3 and counts(printed)["cached"] == 3
    assert {name: (cells / name).stat().st_mtime_ns for name in conf_cells} == conf_cells
    dry = bench(["bench", str(changed), "--dry-run", *argv[2:]], capsys)[1]
    assert "8 distinct cells (11 table entries): 6 cached, 0 to compute, 2 unavailable here" in dry


def test_bad_specs_are_one_line_errors(tmp_path, capsys):
    spec = tmp_path / "bad.toml"
    spec.write_text('[strategies]\nfree = { strategy = "free" }\n[tables.t]\ndata = ["scenes"]\nlimit = 3\n')
    assert main(["bench", str(spec), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key 'limit'" in err
    spec.write_text('[strategies]\nfree = { strategy = "fre" }\n[tables.t]\ndata = ["scenes"]\n')
    assert main(["bench", str(spec), "--dry-run"]) == 2
    assert "Did you mean" in capsys.readouterr().err
    assert main(["bench", "no-such-spec", "--dry-run"]) == 2
    assert "neither a built-in" in capsys.readouterr().err


def test_builtin_specs_list_their_cells(capsys, tmp_path):
    assert main(["bench", "paper", "--dry-run", "--data-root", str(tmp_path), "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "coco not found" in out and "needs: COCO Karpathy" in out and "31 distinct cells" in out and "0 cached, 0 to compute, 31 unavailable here" in out
    assert main(["bench", "embedded", "--dry-run", "--output", str(tmp_path)]) == 0
    assert "distinct cells" in capsys.readouterr().out


# -- exit placement under a budget of exits ----------------------------------------------------------
def test_placement_replays_the_confidence_rule_by_hand():
    import numpy as np

    from earlyexit.evaluation.placement import LayerStatistics, greedy_placement, score

    # 4 tokens, 4 layers; head cost 0.5 layer
    confidence = np.array([[0.9, 0.9, 0.9, 1.0], [0.1, 0.95, 0.9, 1.0], [0.1, 0.2, 0.3, 1.0], [0.1, 0.2, 0.99, 1.0]])
    agrees = np.array([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1]], dtype=bool)
    stats = LayerStatistics(confidence, agrees, head_cost=0.5, seconds=0.0)
    # exits {1, 3} at 0.8: token 0 leaves at 1 (agrees), token 1 at 3 (agrees), token 2 goes to 4,
    # token 3 at 3 (agrees); cost = depths 1+3+4+3 = 11 plus heads: 1 + 2 + 3 (2 checks + final) + 2 = 8 x 0.5
    agreement, speedup = score(stats, [1, 3], 0.8)
    assert agreement == 1.0 and speedup == pytest.approx(4.5 / ((11 + 4) / 4))
    # exit {2} at 0.8: token 1 leaves at 2 and disagrees
    assert score(stats, [2], 0.8)[0] == 0.75
    # with no loss allowed, greedy never takes layer 2 first; a loose budget makes 2 worth it
    strict = greedy_placement(stats, 1, budget=0.0, grid=(0.8,))
    assert strict["exits"] in ([1], [3]) and strict["sets_evaluated"] == 3
    picked = {layer: score(stats, [layer], 0.8)[1] for layer in (1, 3)}
    assert strict["exits"] == [max(picked, key=picked.get)]
    assert greedy_placement(stats, 2, budget=0.0, grid=(0.8,))["sets_evaluated"] == 3 + 2


def test_nocaps_domain_layout_from_stored_cells(tmp_path):
    """Table 1's layout (CIDEr / SPICE per NoCaps domain, then the speed-ups) from hand-made cells."""
    from earlyexit.bench import tables
    from earlyexit.bench.spec import parse_spec
    from earlyexit.bench.store import CellStore

    raw = {"strategies": {"free": {"strategy": "free"}},
           "tables": {"t1": {"data": ["nocaps:/x"], "group_by": "domain", "metrics": ["CIDEr", "SPICE"]}}}
    table = parse_spec(raw).tables["t1"]
    store = CellStore(str(tmp_path))
    by_domain = {d: {"CIDEr": c, "SPICE": 0.1} for d, c in zip(tables.DOMAINS, (0.9, 0.8, 0.5))}
    quality = {"CIDEr": 0.75, "skipped": {"SPICE": "jars missing"}}
    speed = {"param_speedup": 1.5, "layer_speedup": 1.2, "wall_speedup": 1.1}
    result = {"quality": quality, "quality_by_domain": by_domain, "speed": speed}
    store.put("k1", {"report": {"row": "free", "task": "caption", "results": {"free": result, "full": result}},
                     "provenance": {"git_revision": "abc", "date": "2026-01-01"}, "fingerprints": {"code": "c"},
                     "hardware": {}})
    rendered = tables.build(table, ["k1"], {"k1": table.cells[0]}, store, {"git_revision": "abc"})
    assert rendered.columns[:2] == ["in-domain CIDEr", "in-domain SPICE"]
    assert rendered.columns[6:] == ["full CIDEr", "full SPICE", "Spd (param)", "layer×", "wall×"]
    free = rendered.rows[1]
    assert free["display"] == ["90.0", "10.0", "80.0", "10.0", "50.0", "10.0", "75.0", "n/a[1]", "1.50", "1.20",
                               "1.10"]
    assert rendered.notes == ["SPICE: jars missing"] and rendered.rows[0]["display"][-3:] == ["1.00"] * 3
    assert tables.latex(rendered).count(r"\\") == 3  # header and two rows


VISDIAL_SPEC = """
name = "visdial"
[defaults]""" + MICRO_DEFAULTS + """num_beams = 2
[strategies]
conf = {{ strategy = "confidence" }}
[tables.t3]
data = ["visdial:{{data_root}}/visdial", "scenes-vqa"]
metrics = ["accuracy", "MRR"]
strategies = ["conf"]
[tables.captions_to_visdial]
data = ["scenes"]
test_data = "visdial:{{data_root}}/visdial"
strategies = ["conf"]
"""


def test_visdial_cells_run_and_table3_shows_mrr_beside_accuracy(tmp_path, capsys, quick_metrics):
    """Table 3's layout: the VisDial column is MRR from ranking (its val slices: calibrated on the
    dev slice, ranked on the test slice, one beam whatever the spec says), the VQA column accuracy;
    a cell trained and calibrated on captions ranks VisDial as its test data."""
    from test_dialog import visdial_layout

    from earlyexit.metrics.dialog import dialog_scores

    visdial_layout(tmp_path / "data" / "visdial")
    make_backend(seed=8, num_layers=4, image_size=64, patch_size=16, init_std=0.1).save_pretrained(
        str(tmp_path / "micro"))
    spec = tmp_path / "spec.toml"
    spec.write_text(VISDIAL_SPEC.format(model=tmp_path / "micro"))
    code, out = bench(["bench", str(spec), "--output", str(tmp_path / "out"), "--data-root", str(tmp_path / "data")],
                      capsys)
    assert code == 0 and counts(out) == {"cells": 3, "cached": 0, "computed": 3, "unavailable": 0, "failed": 0}
    table = json.loads((tmp_path / "out" / "tables" / "t3.json").read_text())
    assert table["columns"][0] == "visdial MRR" and table["columns"][4] == "scenes-vqa accuracy"
    for name, rendered in (("t3", table),
                           ("captions_to_visdial",
                            json.loads((tmp_path / "out" / "tables" / "captions_to_visdial.json").read_text()))):
        assert rendered["columns"][0].endswith("MRR") and len(rendered["rows"]) == 2
        for row in rendered["rows"]:
            cell = json.loads((tmp_path / "out" / "cells" / f"{row['cells'][0]}.json").read_text())
            result = cell["report"]["results"]["full" if row["label"] == "full model" else cell["report"]["row"]]
            assert result["config"]["data"] == "visdial" and result["config"]["split"] == "val:0.9-1.0"
            assert result["config"]["settings"]["num_beams"] == 1
            expected = 100 * dialog_scores(list(result["ranks"].values()))["MRR"]
            assert row["values"][0] == pytest.approx(expected) and row["display"][0] == f"{expected:.1f}"
    assert all(v is not None for row in table["rows"] for v in row["values"][4:5])
    first = json.loads((tmp_path / "out" / "cells" / f"{table['rows'][1]['cells'][0]}.json").read_text())
    with open(first["report"]["calibration"]["csv"]) as handle:  # calibrated on the dev slice's MRR
        assert handle.readline().split(",")[1] == "MRR"
    assert "MRR and R@k x100" in " ".join(table["remarks"])
