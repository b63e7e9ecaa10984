"""Time planning, earlyexit.bench.costs (`earlyexit bench SPEC --dry-run`): split sizes, hours from probe numbers worked
by hand, the roofline at the paper's shape, and the dry-run's lines and JSON."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from earlyexit.bench import load_spec
from earlyexit.bench import costs as costs
from earlyexit.cli import main
from earlyexit.models import estimate as est
from earlyexit.plugins.registry import get_registry

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def test_split_sizes_come_from_local_files_else_the_published_sizes():
    assert costs.split_size("coco:/no/such/folder", "val:0.0-0.8") == (4000, "published")
    assert costs.split_size("vqav2:/no/such/folder", "val:0.9-1.0") == (21435, "published")
    assert costs.split_size("coco:/no/such/folder", "test") == (5000, "published")
    assert costs.split_size(f"coco:{FIXTURES}/coco", "train") == (2, "local")  # train + restval images
    assert costs.split_size("nosuch:/x", "val") == (0, "unknown")


@pytest.fixture(scope="module")
def paper_cells():
    spec = load_spec("paper", data_root="/no/such/folder")
    registry = get_registry()
    cells = {(name, c.strategy): c for name, t in spec.tables.items() for c in t.cells if c.settings["noise"] == 0}
    return cells, registry


def test_hours_follow_the_phase_formulas_from_the_probe(paper_cells, monkeypatch):
    cells, registry = paper_cells
    cell = cells[("table1", "deebert")]  # paper, COCO -> NoCaps: batch 16 x 5 beams, 30 new tokens, 6 thresholds
    work = costs.cell_work(cell, registry)
    assert (work.rows, work.grid, work.sizes["dev"][0], work.trainable_heads, work.trainable_layers) == (80, 6, 1000,
                                                                                                        3, 0)
    fake = costs.Probe("cpu", "float32", layer_prefill=1.0, head_prefill=2.0, layer_step=0.1, head_step=0.5,
                            vision_image=0.25, rows=40, step_rows=20)
    monkeypatch.setattr(costs, "probe", lambda *args: fake)
    hours = costs.probe_hours(work, "cpu")
    prefill = (32 * 1.0 + 2.0) * 80 / 40  # measured at 40 rows, scaled to 80
    step = (32 * 0.1 + 0.5) * 80 / 20
    per_image = (16 * 0.25 + prefill + 30 * step) / 16
    assert hours["calibration"] == pytest.approx(7 * 1000 * per_image / 3600)  # 6 thresholds + the full model
    assert hours["test"] == pytest.approx(2 * 4500 * per_image / 3600)  # NoCaps val: early exit + full model
    steps = -(-4000 * 5 // 16)  # 4,000 COCO images x 5 captions, batch 16
    layer, head = 1.0 * 16 / 40, 2.0 * 16 / 40
    expected = steps * (16 * 0.25 + 32 * layer + head) + 3.0 * steps * 3 * (3 * head)
    assert hours["exit_training"] == pytest.approx(expected / 3600)


def test_calibration_counts_the_replay_for_a_confidence_rule_and_the_grid_otherwise(paper_cells):
    cells, registry = paper_cells
    beamed = cells[("table1", "free")]  # the paper decodes with 5 beams: the replay follows greedy decoding only
    assert costs.cell_work(beamed, registry).calibration_items == (costs.cell_work(beamed, registry).grid + 1) * 1000
    greedy = dataclasses.replace(beamed, settings={**beamed.settings, "num_beams": 1, "kv_policy": "catchup",
                                                   "threshold": None})
    work = costs.cell_work(greedy, registry)
    dev = work.sizes["dev"][0]
    # the full model's decode, the teacher-forced pass, two values confirmed on at most 500 rows
    assert work.calibration_items == 2 * dev + 2 * min(dev, 500)
    replace = dataclasses.replace(greedy, settings={**greedy.settings, "gate": "learned", "gate_mode": "replace"})
    assert costs.cell_work(replace, registry).calibration_items == (work.grid + 1) * dev
    beams = costs.cell_work(cells[("table1", "deebert")], registry)  # DeeBERT's entropy rule: the whole grid
    assert beams.calibration_items == 7 * 1000
    fixed = dataclasses.replace(greedy, settings={**greedy.settings, "threshold": 0.9})
    assert costs.cell_work(fixed, registry).calibration_items == 0


def test_roofline_of_a_decode_step_is_the_weights_read_once(paper_cells):
    cells, registry = paper_cells
    work = costs.cell_work(cells[("table4", "free")], registry)
    no_data = dataclasses.replace(work, training=None, grid=0, calibration_items=0, sizes={"train": [0, ""], "dev": [0, ""],
                                                                      "test": [1, ""]})  # one image
    gpu, shape = costs.ASSUMED_GPU, work.shape
    language = shape.parameters["language"]
    prompt = 32 + costs.PROMPT_TOKENS["caption"]
    step = max(2 * language * 80 / gpu["flops"],
               (language * 2 + 2 * 32 * 80 * (prompt + 30) * 2560 * 2) / gpu["bytes_per_s"])
    assert step == (language * 2 + 2 * 32 * 80 * (prompt + 30) * 2560 * 2) / gpu["bytes_per_s"]  # memory-bound
    image = (2 * shape.parameters["vision"] * 257 + 2 * language * 5 * prompt) / gpu["flops"] + 30 * step / 16
    assert costs.roofline_hours(no_data) == pytest.approx(2 * image / 3600)


def test_a_cpu_probe_runs_float32_on_fewer_rows():
    config = est.paper_config("Salesforce/blip2-opt-2.7b")
    small = dict(hidden_size=64, word_embed_proj_dim=64, ffn_dim=128, num_attention_heads=4, vocab_size=500)
    config.text_config.update(small)
    config.vision_config.update(dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, image_size=28))
    config_json = json.dumps({"model_type": config.model_type, **config.to_dict()}, default=str, sort_keys=True)
    probe = costs.probe(config_json, "cpu", "bfloat16", 80, 64, 80)
    assert (probe.dtype, probe.rows, probe.step_rows) == ("float32", 512 // 64, 64)
    assert min(probe.layer_prefill, probe.head_prefill, probe.layer_step, probe.vision_image) > 0


def test_dry_run_prints_costs_per_cell_and_table_and_writes_the_plan(tmp_path, capsys):
    path = tmp_path / "plan.json"
    assert main(["bench", "paper", "--dry-run", "--data-root", str(tmp_path), "--output", str(tmp_path),
                 "--only", "table4", "--plan-json", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("H100 SXM-h by roofline") == 6  # five cells and the table's total
    assert "table table4    5 cells  cost: ~" in out
    plan = json.loads(path.read_text())
    assert plan["probe_device"] is None and "not GPU-hours" in plan["note"] and plan["command"].startswith("earlyexit")
    mue = next(c for c in plan["cells"].values() if c["strategy"] == "mue")
    assert mue["peak_bytes"] > 50 * 2**30  # layer copies with AdamW state: more than a 48 GB card
    assert mue["sizes"]["test"] == [5000, "published"]
    assert main(["bench", "paper", "--probe"]) == 2
    assert "--probe and --plan-json go with --dry-run" in capsys.readouterr().err


def test_a_cell_that_does_not_fit_the_probed_device_is_flagged():
    cost = {"peak_bytes": 53 * 2**30, "roofline_gpu_hours": 0.07, "hours": 2.0,
            "phases": {"exit_training": 1.0, "calibration": 0.5, "test": 0.5}}
    line = costs.cost_line(cost, "cuda:0", available=40 * 2**30)
    assert line == ("cost: 2.0 GPU-h (train 1.0, calibrate 0.5, test 0.5), ~0.07 H100 SXM-h by roofline, "
                    "peak 53.0 GiB [does not fit the 40.0 GiB free on cuda:0]")
    assert "does not fit" not in costs.cost_line(cost, "cuda:0", available=80 * 2**30)
    assert "CPU-h (not GPU-h)" in costs.cost_line(cost, "cpu")
