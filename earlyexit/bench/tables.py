"""Tables in the paper's layouts, from the cell store only, as Markdown, LaTeX, CSV and JSON.

`quality-speed` (the paper's Tables 1-4 and 6): one row per strategy (and per setting that varies
besides the column groups), column groups by data set, noise level or NoCaps domain; each group
has its quality metrics and three labelled speed columns: Spd (param) is the paper's
parameter-based speed-up, layer× counts every layer-equivalent spent (exit modules, LM heads,
catch-up), wall× is clock time per generated token of the full model over this one.
`histogram` (Table 11): the share of generated tokens leaving at each layer.
A value that is missing shows "n/a" with a footnote saying why (and how to fix it).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import statistics

from earlyexit.bench.spec import AXES
from earlyexit.data.registry import task_name

SPEEDS = (("Spd (param)", "param_speedup"), ("layer×", "layer_speedup"), ("wall×", "wall_speedup"))
SPEED_NOTE = ("Spd (param): the paper's speed-up (backbone parameters per token); layer×: full-model cost over "
              "cost spent in layer-equivalents (exit modules, LM heads, catch-up included); wall×: clock time per "
              "generated token, full model over this one, same batches")
CAPTION_METRICS = ("BLEU-4", "METEOR", "CIDEr", "SPICE")
DEFAULT_METRICS = {"caption": list(CAPTION_METRICS), "vqa": ["accuracy"], "dialog": ["MRR"]}
METRIC_TASKS = {**{m: "caption" for m in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr",
                                          "SPICE")},
                "accuracy": "vqa", **{m: "dialog" for m in ("MRR", "R@1", "R@5", "R@10", "mean_rank")}}
SCALED = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"}  # x100, as papers print
DIALOG_SCALED = {"MRR", "R@1", "R@5", "R@10"}  # fractions x100, beside VQA accuracy in percent
DOMAINS = ("in-domain", "near-domain", "out-domain")


@dataclasses.dataclass
class Rendered:
    name: str
    title: str
    columns: list
    rows: list  # {"label", "values": [float | None], "display": [str], "cells": [key]}
    notes: list  # numbered footnotes, in order
    remarks: list  # unnumbered lines (what the speed columns mean, scales)
    provenance: dict


class Notes:
    def __init__(self):
        self.items = []

    def mark(self, text: str) -> str:
        if text not in self.items:
            self.items.append(text)
        return f"n/a[{self.items.index(text) + 1}]"


def metric_value(quality: dict, metric: str):
    key = {"accuracy": "overall"}.get(metric, metric)
    value = quality.get(key)
    if value is None:
        return None
    return 100 * value if metric in SCALED or metric in DIALOG_SCALED else value


def scored_task(cell) -> str:
    """The task of the data a cell is scored on (its `test_data` where given)."""
    return task_name(cell.settings.get("test_data") or cell.data)


def metrics_for(table, task: str) -> list:
    """The table's metrics that apply to `task` (a metric of no known task applies to every
    task), or the task's defaults when none does: Table 3's VisDial column shows MRR beside the
    VQA columns' accuracy."""
    if not table.metrics:
        return DEFAULT_METRICS[task]
    fitting = [m for m in table.metrics if METRIC_TASKS.get(m, task) == task]
    return fitting or DEFAULT_METRICS[task]


def why_missing(record: dict | None, metric: str | None = None) -> str:
    if record is None:
        return "not computed yet: run the bench (without --render-only)"
    if "unavailable" in record:
        return record["unavailable"]
    if "failed" in record:
        return f"failed: {record['failed']}"
    skipped = {}
    for result in record["report"]["results"].values():
        skipped.update(result["quality"].get("skipped") or {})
    return f"{metric}: {skipped.get(metric, 'not reported for this data set')}"


def _group_of(cell, group_by: str) -> str:
    return cell.data.partition(":")[0] if group_by == "data" else f"noise {cell.settings['noise']:g}"


def _row_label(cell, varying: list) -> str:
    extra = [f"{s.replace('_', ' ')} {cell.settings[s] if s != 'data' else cell.data.partition(':')[0]}"
             for s in varying]
    return cell.label + (f" ({', '.join(extra)})" if extra else "")


def _varying(cells, exclude: set) -> list:
    names = [s for s in list(dict.fromkeys(AXES.values())) + ["data"] if s not in exclude]
    return [s for s in names if len({str(c.config()[s] if s != "data" else c.data) for c in cells}) > 1]


def build(table, keys: list, cells: dict, store, provenance: dict) -> Rendered:
    pairs = [(cells[k], k, store.get(k)) for k in keys]
    notes = Notes()
    if table.layout == "histogram":
        columns, rows = _histogram(pairs, notes)
    else:
        columns, rows = _quality_speed(table, pairs, notes)
    remarks = [SPEED_NOTE] if table.layout != "histogram" else ["share of generated tokens (%) leaving at each "
                                                                "decoder layer on the test split"]
    if any(c in SCALED for col in columns for c in col.split(" ")):
        remarks.append("caption metrics x100 (pycocoevalcap scale x100, as the paper prints them)")
    if any(c in DIALOG_SCALED for col in columns for c in col.split(" ")):
        remarks.append("VisDial MRR and R@k x100: the ground truth ranked among each round's answer options by the "
                       "(early-exit) model's likelihood; speed-ups are of that scoring")
    if len({c.settings["seed"] for c, _, _ in pairs}) > 1:
        remarks.append("values are means over the seeds " + ", ".join(sorted({str(c.settings['seed'])
                                                                               for c, _, _ in pairs})))
    if table.note:
        remarks.append(table.note)
    computed = [r for _, _, r in pairs if r and "report" in r]
    made = {"git_revisions": sorted({str(r["provenance"].get("git_revision")) for r in computed}),
            "code_fingerprints": sorted({r["fingerprints"]["code"] for r in computed}),
            "first": min((r["provenance"]["date"] for r in computed), default=None),
            "last": max((r["provenance"]["date"] for r in computed), default=None),
            "hardware": list({json.dumps(r["hardware"], sort_keys=True): r["hardware"] for r in computed}.values())}
    return Rendered(table.name, table.title, columns, rows, notes.items, remarks,
                    {**provenance, "table": table.name, "cells": list(dict.fromkeys(keys)), "cells_made": made})


def _mean(values: list):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _quality_speed(table, pairs: list, notes: Notes) -> tuple[list, list]:
    group_setting = {"data": "data", "noise": "noise", "domain": None}[table.group_by]
    varying = _varying([c for c, _, _ in pairs], {group_setting, "seed"})
    if table.group_by == "domain":
        groups = [*DOMAINS, "full"]
    else:
        groups = list(dict.fromkeys(_group_of(c, table.group_by) for c, _, _ in pairs))
    task_of_group = {}  # group -> the task it is scored on (a data column: its data set's)
    for cell, _, _ in pairs:
        task_of_group.setdefault("all" if table.group_by == "domain" else _group_of(cell, table.group_by),
                                 scored_task(cell))
    first_task = scored_task(pairs[0][0])
    group_metrics = {g: metrics_for(table, task_of_group.get(g, first_task)) for g in groups}
    prefix = (lambda g: f"{g} ") if len(groups) > 1 else (lambda g: "")
    columns = []
    for g in groups:
        columns += [prefix(g) + m for m in group_metrics[g]]
        if table.group_by != "domain":
            columns += [prefix(g) + s for s, _ in SPEEDS]
    if table.group_by == "domain":
        columns += [s for s, _ in SPEEDS]

    by_row = {}  # row label -> group -> [(key, record)]
    full_rows = {}  # model -> group -> [(key, record)]
    for cell, key, record in pairs:
        group = "all" if table.group_by == "domain" else _group_of(cell, table.group_by)
        by_row.setdefault(_row_label(cell, varying), {}).setdefault(group, []).append((key, record))
        model_label = "full model" + (f" (model {cell.settings['model']})" if "model" in varying else "")
        full_rows.setdefault(model_label, {}).setdefault(group, []).append((key, record))

    def qualities(entries, name, domain=None):
        out = []
        for _, record in entries:
            if record and "report" in record:
                report = record["report"]
                result = report["results"][report["row"] if name is None else name]
                if domain in DOMAINS:
                    out.append(result.get("quality_by_domain", {}).get(domain, {}))
                else:
                    out.append(result["quality"])
        return out

    def row_values(entries_by_group, name):
        values, display, keys = [], [], []
        for g in groups:
            entries = entries_by_group.get("all" if table.group_by == "domain" else g, [])
            keys += [k for k, _ in entries]
            quality = qualities(entries, name, g if table.group_by == "domain" else None)
            first = entries[0][1] if entries else None
            for m in group_metrics[g]:
                value = _mean([metric_value(q, m) for q in quality])
                values.append(value)
                display.append(f"{value:.1f}" if value is not None else notes.mark(why_missing(first, m)))
            if table.group_by != "domain":
                speed = _speeds(entries, name, first, notes)
                values += speed[0]
                display += speed[1]
        if table.group_by == "domain":
            entries = entries_by_group.get("all", [])
            speed = _speeds(entries, name, entries[0][1] if entries else None, notes)
            values += speed[0]
            display += speed[1]
        return values, display, list(dict.fromkeys(keys))

    rows = []
    for label, groups_entries in full_rows.items():
        values, display, keys = row_values(groups_entries, "full")
        rows.append({"label": label, "values": values, "display": display, "cells": keys})
    for label, groups_entries in by_row.items():
        values, display, keys = row_values(groups_entries, None)
        rows.append({"label": label, "values": values, "display": display, "cells": keys})
    return columns, rows


def _speeds(entries, name, first, notes) -> tuple[list, list]:
    values, display = [], []
    for _, field in SPEEDS:
        got = []
        for _, record in entries:
            if record and "report" in record:
                report = record["report"]
                got.append(1.0 if name == "full" else report["results"][report["row"]]["speed"].get(field))
        value = _mean(got)
        values.append(value)
        display.append(f"{value:.2f}" if value is not None else notes.mark(why_missing(first, field)))
    return values, display


def _histogram(pairs: list, notes: Notes) -> tuple[list, list]:
    varying = _varying([c for c, _, _ in pairs], {"seed"})
    rows_entries = {}
    for cell, key, record in pairs:
        rows_entries.setdefault(_row_label(cell, varying), []).append((key, record))
    layers = set()  # the layers some token left at (the others would be columns of zeros)
    for _, _, record in pairs:
        if record and "report" in record:
            histogram = record["report"]["results"][record["report"]["row"]]["exit_layer_histogram"]
            layers.update(int(k) for k, v in histogram.items() if v)
    layers = sorted(layers)
    columns = [f"layer {k}" for k in layers] + ["mean exit layer"]
    rows = []
    for label, entries in rows_entries.items():
        shares = {k: [] for k in layers}
        means = []
        for _, record in entries:
            if record and "report" in record:
                result = record["report"]["results"][record["report"]["row"]]
                histogram = {int(k): v for k, v in result["exit_layer_histogram"].items()}
                total = sum(histogram.values()) or 1
                for k in layers:
                    shares[k].append(100 * histogram.get(k, 0) / total)
                means.append(result["speed"]["mean_exit_layer"])
        values = [_mean(shares[k]) for k in layers] + [_mean(means)]
        first = entries[0][1]
        display = [f"{v:.1f}" if v is not None else notes.mark(why_missing(first)) for v in values[:-1]]
        display.append(f"{values[-1]:.2f}" if values[-1] is not None else notes.mark(why_missing(first)))
        if not layers:
            values, display = [None], [notes.mark(why_missing(first))]
        rows.append({"label": label, "values": values, "display": display, "cells": [k for k, _ in entries]})
    return (columns if layers else ["exit layers"]), rows


# -- formats ---------------------------------------------------------------------------------------
def markdown(t: Rendered) -> str:
    lines = [f"**{t.title}**", "", "| | " + " | ".join(t.columns) + " |", "|---" * (len(t.columns) + 1) + "|"]
    lines += ["| " + r["label"] + " | " + " | ".join(r["display"]) + " |" for r in t.rows]
    for text in [f"[{i}] {n}" for i, n in enumerate(t.notes, 1)] + list(t.remarks):
        lines += ["", text]  # a paragraph each
    return "\n".join(lines) + "\n"


TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{",
       "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "×": r"$\times$", "σ": r"$\sigma$"}


def _tex(text: str) -> str:
    return "".join(TEX.get(ch, ch) for ch in str(text))


def latex(t: Rendered) -> str:
    lines = [f"% {t.name}: generated by earlyexit bench (git {t.provenance.get('git_revision')})",
             r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(t.title)}}}",
             r"\begin{tabular}{l" + "c" * len(t.columns) + "}", r"\hline",
             " & " + " & ".join(_tex(c) for c in t.columns) + r" \\", r"\hline"]
    lines += [_tex(r["label"]) + " & " + " & ".join(_tex(d) for d in r["display"]) + r" \\" for r in t.rows]
    lines += [r"\hline", r"\end{tabular}"]
    for i, note in enumerate(t.notes, 1):
        lines.append(rf"\par{{\footnotesize [{i}] {_tex(note)}}}")
    for remark in t.remarks:
        lines.append(rf"\par{{\footnotesize {_tex(remark)}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def to_csv(t: Rendered) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["row", *t.columns])
    for r in t.rows:
        writer.writerow([r["label"], *[repr(v) if v is not None else d for v, d in zip(r["values"], r["display"])]])
    return buffer.getvalue()


def to_json(t: Rendered) -> str:
    return json.dumps(dataclasses.asdict(t), indent=2, default=str) + "\n"


FORMATS = {"md": markdown, "tex": latex, "csv": to_csv, "json": to_json}
