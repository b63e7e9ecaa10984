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
Mistakes in a spec are one-line ConfigErrors, raised before any cell runs, that name the file, table,
key and value and say what the value must be (`spec.toml: [defaults] batch_size = "4": must be a
positive integer`). Settings are checked by the same rules as `earlyexit run`'s flags
(earlyexit/core/validation.py), strategy options by the strategy's own Config.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import tomllib
from importlib import resources

from earlyexit.core import validation as checks
from earlyexit.data.splits import refuse_unanswered, splits_for
from earlyexit.errors import ConfigError, EarlyExitError
from earlyexit.plugins.registry import get_registry

# settings a spec may give in [defaults] or a table, with their defaults (those of `earlyexit run`,
# except progress bars and speculative decoding, which a cell turns on only for decode = "speculative")
SETTINGS = {
    "backend": "blip2-opt", "model": "tiny", "device": None, "dtype": None, "exit_layers": None,
    "threshold": None, "rule": "budget", "budget": 0.01, "epsilon": 0.1, "grid": None, "kv_policy": "catchup",
    "gate": "learned", "gate_mode": "filter", "gate_threshold": 0.3, "speed_target": "layer",
    "decode": "early-exit", "draft_length": 4, "drafter": None, "test_limit": None, "dev_limit": None,
    "train_limit": None,
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
        source = builtin_text(spec)
    elif os.path.isfile(spec):
        source = _read_text(spec)
    else:
        raise ConfigError(f"spec {spec!r} is neither a built-in ({', '.join(BUILT_IN)}) nor a TOML file; "
                          "pass a path to a .toml spec")
    try:
        raw = tomllib.loads(source)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"spec {spec}: not valid TOML ({error}); fix the file")
    return parse_spec(raw, source, name=os.path.splitext(os.path.basename(spec))[0], data_root=data_root, only=only,
                      file=os.path.basename(spec) if spec not in BUILT_IN else f"{spec}.toml")


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except UnicodeDecodeError:
        raise ConfigError(f"spec {path}: not a text file (not UTF-8); pass a TOML spec") from None


class _Errors:
    """One-line errors that name the spec file, the table and the key (and the value, where one is wrong)."""

    def __init__(self, file: str, registry):
        self.file = file
        self.registry = registry  # backend and strategy names are the registry's to know

    def __call__(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"{self.file}: {where}: {message}")

    def value(self, where: str, key: str, value, problem: str) -> ConfigError:
        return ConfigError(f"{self.file}: {where} {key} = {checks.shown(value)}: {problem}")

    def keys(self, where: str, given: dict, allowed) -> None:
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            raise self(where, f"unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")

    def table(self, where: str, key: str, value, example: str) -> dict:
        if not isinstance(value, dict):
            raise self.value(where, key, value, f"must be a table such as {example}")
        return value

    def settings(self, where: str, given: dict) -> None:
        """Every setting's type, range and allowed names, as `earlyexit run` checks its flags."""
        for key, value in given.items():
            problem = checks.setting_problem(key, value)
            if problem:
                raise self.value(where, key, value, problem)
            if key in ("backend", "drafter"):
                try:
                    getattr(self.registry, key)(value)
                except EarlyExitError as error:  # its answer lists the names there are
                    raise self.value(where, key, value, str(error)) from None

    def as_list(self, where: str, key: str, value, check=None) -> list:
        """A non-empty list whose items all pass `check` (a validation check, or None)."""
        if not isinstance(value, list) or not value:
            raise self.value(where, key, value, "must be a non-empty list such as [\"a\", \"b\"]")
        for item in value:
            problem = check(item) if check else None
            if problem:
                raise self.value(where, key, value, f"{checks.shown(item)} {problem}")
        return value


def parse_spec(raw: dict, text: str = "", name: str = "spec", data_root: str | None = None,
               only: list[str] | None = None, file: str = "spec", registry=None) -> Spec:
    """The spec, every value checked before any cell runs; `file` names the spec in errors."""
    registry = registry or get_registry()
    errors = _Errors(file, registry)
    errors.keys("top level", raw, {"name", "description", "defaults", "strategies", "tables", "figures", "needs",
                                   "data_root"})
    _check_top_level(errors, raw)
    defaults = errors.table("top level", "defaults", raw.get("defaults", {}), "{ batch_size = 8 }")
    errors.keys("[defaults]", defaults, SETTINGS)
    errors.settings("[defaults]", defaults)
    strategies = errors.table("top level", "strategies", raw.get("strategies") or {},
                              "{ free = { strategy = \"free\" } }")
    if not strategies:
        raise errors("[strategies]", "none given; add e.g. free = { strategy = \"free\" }")
    _check_strategies(errors, strategies, registry)
    root = data_root or raw.get("data_root") or os.environ.get("EARLYEXIT_DATA") or "data"
    tables = {}
    raw_tables = errors.table("top level", "tables", raw.get("tables") or {}, "[tables.NAME]")
    for table_name, entry in raw_tables.items():
        if only and table_name not in only:
            continue
        entry = errors.table("[tables]", table_name, entry, "[tables.NAME] with data = [...]")
        tables[table_name] = _parse_table(errors, table_name, entry, {**SETTINGS, **defaults}, strategies, root)
    if only:
        missing = sorted(set(only) - set(tables))
        if missing:
            raise ConfigError(f"--only {missing[0]}: no such table; the spec has {', '.join(raw_tables)}")
    if not tables:
        raise errors("[tables]", "none given; add at least one [tables.NAME]")
    figures = {}
    for figure_name, entry in errors.table("top level", "figures", raw.get("figures") or {}, "[figures.NAME]").items():
        where = f"[figures.{figure_name}]"
        entry = errors.table("[figures]", figure_name, entry, "[figures.NAME] with kind and table")
        errors.keys(where, entry, {"kind", "table", "strategy", "title"})
        if entry.get("kind") not in FIGURE_KINDS:
            raise errors.value(where, "kind", entry.get("kind"), f"must be one of {', '.join(FIGURE_KINDS)}")
        if not isinstance(entry.get("table"), str) or entry["table"] not in raw_tables:
            raise errors.value(where, "table", entry.get("table"), "must name a table of the spec")
        if entry["table"] in tables:  # figures of tables left out by --only are left out too
            figures[figure_name] = Figure(figure_name, entry["kind"], entry["table"], entry.get("strategy"),
                                          entry.get("title"))
    return Spec(raw.get("name", name), raw.get("description", ""), text, tables, figures,
                [n.replace("{data_root}", root) for n in raw.get("needs", [])], root)


def _check_top_level(errors: _Errors, raw: dict) -> None:
    for key in ("name", "description", "data_root"):
        if key in raw and not isinstance(raw[key], str):
            raise errors.value("top level", key, raw[key], "must be a string")
    if "needs" in raw:
        errors.as_list("top level", "needs", raw["needs"], checks.text)


def _check_strategies(errors: _Errors, strategies: dict, registry) -> None:
    """Each row's strategy exists and its options build the strategy's Config: an unknown option,
    a wrong type, NaN or inf fails here, before any cell trains."""
    for label, entry in strategies.items():
        where = f"[strategies] {checks.shown(label)}"
        errors.table("[strategies]", checks.shown(label), entry, "{ strategy = \"NAME\", options = { ... } }")
        if "strategy" not in entry:
            raise errors(where, "expected { strategy = \"NAME\", options = { ... } }")
        errors.keys(where, entry, {"strategy", "options", "exit_layers"})
        if "exit_layers" in entry and checks.layer_list(entry["exit_layers"]):
            raise errors.value(where, "exit_layers", entry["exit_layers"], checks.layer_list(entry["exit_layers"]))
        if not isinstance(entry["strategy"], str):
            raise errors.value(where, "strategy", entry["strategy"], "must be a strategy's name")
        try:
            cls = registry.strategy(entry["strategy"])
        except EarlyExitError as error:  # unknown: the registry's answer lists the strategies there are
            raise errors.value(where, "strategy", entry["strategy"], str(error)) from None
        options = errors.table(where, "options", entry.get("options", {}), "{ epochs = 1 }")
        fields = [f.name for f in dataclasses.fields(cls.Config)]
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise errors.value(where, "options", options, f"{entry['strategy']} has no option {unknown[0]!r}; "
                                                          f"its options: {', '.join(fields) or 'none'}")
        for key, value in options.items():
            problem = checks.option_value_problem(cls.Config, key, value)
            if problem:
                raise errors.value(where, f"options.{key}", value, problem)
        try:
            cls.Config(**options)
        except (ConfigError, TypeError, ValueError) as error:  # a plugin's own check may trip on a wrong type
            raise errors.value(where, "options", options, str(error)) from None


def _check_axis(errors: _Errors, where: str, key: str, setting: str, values) -> list:
    if setting != "model":
        return errors.as_list(where, key, values, lambda v: checks.setting_problem(setting, v)
                              if v is not None else "must be a value (TOML has no null)")
    errors.as_list(where, key, values, lambda v: (None if "model" in v else "needs a model key, e.g. "
                                                  '{ backend = "blip2-opt", model = "tiny" }')
                   if isinstance(v, dict) else checks.text(v))
    for model in values:  # models = [{ backend = ..., model = ..., exit_layers = ... }]
        if isinstance(model, dict):
            errors.keys(f"{where} models", model, {"backend", "model", "exit_layers"})
            errors.settings(f"{where} models", model)
    return values


def _parse_table(errors: _Errors, name: str, entry: dict, defaults: dict, strategies: dict, root: str) -> Table:
    where = f"[tables.{name}]"
    errors.keys(where, entry, TABLE_KEYS)
    layout = entry.get("layout", "quality-speed")
    if layout not in LAYOUTS:
        raise errors.value(where, "layout", layout, f"must be one of {', '.join(LAYOUTS)}")
    group_by = entry.get("group_by", "data")
    if group_by not in GROUP_BY:
        raise errors.value(where, "group_by", group_by, f"must be one of {', '.join(GROUP_BY)}")
    for key in ("title", "note"):
        if key in entry and not isinstance(entry[key], str):
            raise errors.value(where, key, entry[key], "must be a string")
    if "metrics" in entry:
        errors.as_list(where, "metrics", entry["metrics"], checks.text)
    labels = errors.as_list(where, "strategies", entry.get("strategies", list(strategies)),
                            lambda label: None if label in strategies else
                            f"is not in [strategies] ({', '.join(map(checks.shown, strategies))})")
    data = [d.replace("{data_root}", root) for d in errors.as_list(where, "data", entry.get("data"), checks.text)]
    own = {k: v for k, v in entry.items() if k in SETTINGS and k not in AXES}  # `noise` is a list: an axis
    errors.settings(where, own)
    base = {**defaults, **own}
    base = {k: v.replace("{data_root}", root) if isinstance(v, str) else v for k, v in base.items()}
    axes = {setting: _check_axis(errors, where, key, setting, entry[key]) for key, setting in AXES.items()
            if key in entry}
    cells = []
    for label, data_name in itertools.product(labels, data):
        for values in itertools.product(*axes.values()) if axes else [()]:
            settings = {**base, **dict(zip(axes, values))}
            if isinstance(settings["model"], dict):
                settings = {**settings, **settings["model"]}
            entry_s = strategies[label]
            if "exit_layers" in entry_s:
                settings["exit_layers"] = entry_s["exit_layers"]
            problem = checks.gate_threshold_problem(settings["gate"], settings["gate_threshold"])
            if problem:
                raise errors.value(where, "gate_threshold", settings["gate_threshold"],
                                   f"a {settings['gate']} gate's threshold {problem}")
            cells.append(Cell(label, entry_s["strategy"], dict(entry_s.get("options", {})), data_name, settings))
            _refuse_unanswered(errors, where, cells[-1])
    return Table(name, entry.get("title", name), layout, group_by, entry.get("metrics"), entry.get("note"), cells)


def _refuse_unanswered(errors: _Errors, where: str, cell: Cell) -> None:
    """A cell scored on a split without answers fails the spec, before any cell runs (not after
    its exits trained and its knob was calibrated)."""
    data = cell.settings.get("test_data") or cell.data
    try:
        refuse_unanswered(data, cell.settings.get("test_split") or splits_for(data)[2])
    except ConfigError as error:
        raise errors(where, str(error)) from None
