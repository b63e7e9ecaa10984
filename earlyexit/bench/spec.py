"""A bench spec: which models, strategies, data sets and settings, and which tables and figures.

A spec is a TOML file (or the name of one shipped in `earlyexit/specs/`):

    name = "mine"
    [defaults]                 # every cell starts from these (fields of `earlyexit run`)
    backend = "blip2-opt"
    model = "tiny"
    test_limit = 200
    [strategies]               # row label -> strategy and its options
    free = { strategy = "free" }
    "free, no adversarial" = { strategy = "free", options = { adversarial = false } }
    [tables.table4]            # one table: the cross product of its axes is its cells
    layout = "quality-speed"   # or "histogram"
    data = ["scenes"]
    strategies = ["free"]
    noise = [0.0, 0.1]         # list axes: noise, seeds, kv_policies, decodes, batch_sizes, models
    group_by = "noise"         # column groups: data (default), noise or domain
    [figures.fig4b]
    kind = "quality-vs-speed"  # token-exits, per-exit-accuracy, ablation-bars, quality-vs-speed
    table = "table4"

Every cell is one `earlyexit run` (train or reuse the exits, calibrate on dev, score on test).
Mistakes in a spec are one-line ConfigErrors that name the key and how to fix it.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import tomllib
from importlib import resources

from earlyexit.data.splits import refuse_unanswered, splits_for
from earlyexit.errors import ConfigError

# settings a spec may give in [defaults] or a table, with their defaults (those of `earlyexit run`,
# except progress bars and speculative decoding, which a cell turns on only for decode = "speculative")
SETTINGS = {
    "backend": "blip2-opt", "model": "tiny", "device": None, "dtype": None, "exit_layers": None,
    "threshold": None, "rule": "budget", "budget": 0.01, "epsilon": 0.1, "grid": None, "kv_policy": "catchup",
    "gate": "learned", "gate_mode": "filter", "gate_threshold": 0.3, "speed_target": "layer",
    "decode": "early-exit", "draft_length": 4, "test_limit": None, "dev_limit": None, "train_limit": None,
    "batch_size": 32, "num_beams": 1, "max_new_tokens": 20, "seed": 0, "noise": 0.0,
    "test_data": None, "test_split": None,  # score elsewhere: NoCaps val with exits trained on COCO
}
AXES = {"noise": "noise", "seeds": "seed", "kv_policies": "kv_policy", "decodes": "decode",
        "batch_sizes": "batch_size", "models": "model"}  # list key in a table -> the setting it varies
LAYOUTS = ("quality-speed", "histogram")
GROUP_BY = ("data", "noise", "domain")
FIGURE_KINDS = ("token-exits", "per-exit-accuracy", "ablation-bars", "quality-vs-speed")
TABLE_KEYS = {"layout", "title", "data", "strategies", "group_by", "metrics", "note", *AXES, *SETTINGS}
BUILT_IN = ("embedded", "paper")


@dataclasses.dataclass
class Cell:
    """One evaluation: a strategy (row label) on a data set with fully resolved settings."""

    label: str
    strategy: str
    options: dict
    data: str
    settings: dict

    def config(self) -> dict:
        """Everything that shapes the result (the label is only a name and stays out)."""
        return {"strategy": self.strategy, "options": self.options, "data": self.data, **self.settings}


@dataclasses.dataclass
class Table:
    name: str
    title: str
    layout: str
    group_by: str
    metrics: list | None
    note: str | None
    cells: list  # of Cell


@dataclasses.dataclass
class Figure:
    name: str
    kind: str
    table: str
    strategy: str | None = None
    title: str | None = None


@dataclasses.dataclass
class Spec:
    name: str
    description: str
    source: str  # the TOML text, recorded in every table's provenance
    tables: dict  # name -> Table
    figures: dict  # name -> Figure
    needs: list  # what must be downloaded first, and where it goes (shown by --dry-run)
    data_root: str


def builtin_text(name: str) -> str:
    return resources.files("earlyexit.specs").joinpath(f"{name}.toml").read_text()


def load_spec(spec: str, data_root: str | None = None, only: list[str] | None = None) -> Spec:
    """A spec from a built-in name or a TOML file path; `data_root` fills `{data_root}` in data names
    (default: the spec's `data_root`, else $EARLYEXIT_DATA, else ./data)."""
    if spec in BUILT_IN:
        text = builtin_text(spec)
    elif os.path.isfile(spec):
        with open(spec, encoding="utf-8") as handle:
            text = handle.read()
    else:
        raise ConfigError(f"spec {spec!r} is neither a built-in ({', '.join(BUILT_IN)}) nor a TOML file; "
                          "pass a path to a .toml spec")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"spec {spec}: not valid TOML ({error}); fix the file")
    return parse_spec(raw, text, name=os.path.splitext(os.path.basename(spec))[0], data_root=data_root, only=only)


def _check_keys(where: str, given: dict, allowed) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(f"spec {where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")


def _as_list(where: str, value) -> list:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"spec {where}: expected a non-empty list such as [\"a\", \"b\"], got {value!r}")
    return value


def parse_spec(raw: dict, text: str = "", name: str = "spec", data_root: str | None = None,
               only: list[str] | None = None) -> Spec:
    _check_keys("top level", raw, {"name", "description", "defaults", "strategies", "tables", "figures", "needs",
                                   "data_root"})
    defaults = raw.get("defaults", {})
    _check_keys("[defaults]", defaults, SETTINGS)
    strategies = raw.get("strategies") or {}
    if not strategies:
        raise ConfigError("spec: no [strategies]; add e.g. free = { strategy = \"free\" }")
    for label, entry in strategies.items():
        if not isinstance(entry, dict) or "strategy" not in entry:
            raise ConfigError(f"spec [strategies] {label!r}: expected {{ strategy = \"NAME\", options = {{...}} }}")
        _check_keys(f"[strategies] {label!r}", entry, {"strategy", "options", "exit_layers"})
    root = data_root or raw.get("data_root") or os.environ.get("EARLYEXIT_DATA") or "data"
    tables = {}
    for table_name, entry in (raw.get("tables") or {}).items():
        if only and table_name not in only:
            continue
        tables[table_name] = _parse_table(table_name, entry, {**SETTINGS, **defaults}, strategies, root)
    if only:
        missing = sorted(set(only) - set(tables))
        if missing:
            raise ConfigError(f"--only {missing[0]}: no such table; the spec has {', '.join(raw.get('tables', {}))}")
    if not tables:
        raise ConfigError("spec: no [tables.NAME]; add at least one table")
    figures = {}
    for figure_name, entry in (raw.get("figures") or {}).items():
        _check_keys(f"[figures.{figure_name}]", entry, {"kind", "table", "strategy", "title"})
        if entry.get("kind") not in FIGURE_KINDS:
            raise ConfigError(f"spec [figures.{figure_name}]: kind must be one of {', '.join(FIGURE_KINDS)}")
        if entry.get("table") not in (raw.get("tables") or {}):
            raise ConfigError(f"spec [figures.{figure_name}]: table {entry.get('table')!r} is not a table of the spec")
        if entry["table"] in tables:  # figures of tables left out by --only are left out too
            figures[figure_name] = Figure(figure_name, entry["kind"], entry["table"], entry.get("strategy"),
                                          entry.get("title"))
    return Spec(raw.get("name", name), raw.get("description", ""), text, tables, figures,
                [n.replace("{data_root}", root) for n in raw.get("needs", [])], root)


def _parse_table(name: str, entry: dict, defaults: dict, strategies: dict, root: str) -> Table:
    where = f"[tables.{name}]"
    _check_keys(where, entry, TABLE_KEYS)
    layout = entry.get("layout", "quality-speed")
    if layout not in LAYOUTS:
        raise ConfigError(f"spec {where}: layout must be one of {', '.join(LAYOUTS)} (got {layout!r})")
    group_by = entry.get("group_by", "data")
    if group_by not in GROUP_BY:
        raise ConfigError(f"spec {where}: group_by must be one of {', '.join(GROUP_BY)} (got {group_by!r})")
    labels = _as_list(f"{where} strategies", entry.get("strategies", list(strategies)))
    for label in labels:
        if label not in strategies:
            raise ConfigError(f"spec {where}: strategy {label!r} is not in [strategies] "
                              f"({', '.join(strategies)})")
    data = [d.replace("{data_root}", root) for d in _as_list(f"{where} data", entry.get("data"))]
    base = {**defaults, **{k: v for k, v in entry.items() if k in SETTINGS}}
    base = {k: v.replace("{data_root}", root) if isinstance(v, str) else v for k, v in base.items()}
    axes = {setting: _as_list(f"{where} {key}", entry[key]) for key, setting in AXES.items() if key in entry}
    cells = []
    for label, data_name in itertools.product(labels, data):
        for values in itertools.product(*axes.values()) if axes else [()]:
            settings = {**base, **dict(zip(axes, values))}
            if isinstance(settings["model"], dict):  # models = [{ backend = ..., model = ..., exit_layers = ... }]
                _check_keys(f"{where} models", settings["model"], {"backend", "model", "exit_layers"})
                settings = {**settings, **settings["model"]}
            entry_s = strategies[label]
            if "exit_layers" in entry_s:
                settings["exit_layers"] = entry_s["exit_layers"]
            cells.append(Cell(label, entry_s["strategy"], dict(entry_s.get("options", {})), data_name, settings))
            _refuse_unanswered(where, cells[-1])
    return Table(name, entry.get("title", name), layout, group_by, entry.get("metrics"), entry.get("note"), cells)


def _refuse_unanswered(where: str, cell: Cell) -> None:
    """A cell scored on a split without answers fails the spec, before any cell runs (not after
    its exits trained and its knob was calibrated)."""
    data = cell.settings.get("test_data") or cell.data
    try:
        refuse_unanswered(data, cell.settings.get("test_split") or splits_for(data)[2])
    except ConfigError as error:
        raise ConfigError(f"spec {where}: {error}") from None
