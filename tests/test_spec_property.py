"""A property of `earlyexit bench`: whatever TOML value lands in any [defaults] key or any table axis,
the bench either gets as far as its first cell, or answers with exit 2 and one stderr line (no
traceback) before any cell starts. "Gets as far" is a marker put where the cells would run, so
the property costs no model and no training.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_inputs import call, shown_lines

import earlyexit.bench
from earlyexit.bench.spec import AXES, SETTINGS
from earlyexit.core.choices import DECODES, GATE_MODES, GATES, KV_POLICIES, RULES, SPEED_TARGETS


class CellStarted(BaseException):
    """Raised where the bench would start its first cell: a BaseException, so no handler hides it."""


class CellWouldFail(BaseException):
    """A cell whose settings the spec's checks let through but `run`'s checks refuse."""


def cells_start(spec, output, *args, **kwargs):
    """Where the cells would run: every cell's settings pass `run`'s own checks (as a cell builds
    them, so a value the spec let through cannot fail cell by cell), then the marker."""
    from earlyexit.errors import EarlyExitError
    from earlyexit.pipeline.settings import RunSettings, check_settings

    for table in spec.tables.values():
        for cell in table.cells:
            given = {k: v for k, v in cell.settings.items() if k not in ("decode", "grid")}
            try:
                check_settings(RunSettings(strategy=cell.strategy, data=cell.data, options=cell.options,
                                           grid=tuple(cell.settings["grid"] or ()) or None, **given))
            except EarlyExitError as error:
                raise CellWouldFail(f"{cell.settings}: {error}")
    raise CellStarted


def toml(value) -> str:
    """A value as TOML writes it (tomllib reads, there is no writer in the standard library)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string of printable text is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(map(toml, value)) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {toml(v)}" for k, v in value.items()) + " }"


NAMES = ("tiny", "scenes", "blip2-opt", "none", "float32", "cpu", *DECODES, *GATE_MODES, *GATES, *KV_POLICIES,
         *RULES, *SPEED_TARGETS)
SCALARS = st.one_of(
    st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(NAMES), st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=8))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(("backend", "model", "exit_layers", "x")), inner, max_size=2)), max_leaves=4)
BASE = ('name = "p"\n[defaults]\nmodel = "tiny"\ntest_limit = 2\n{defaults}\n'
        '[strategies]\nconf = {{ strategy = "confidence" }}\n[tables.t]\ndata = ["scenes"]\n{table}\n')


def outcome(text: str) -> tuple[str, int | None, str]:
    """'cells' when the bench reached its cells, else 'answer' with the exit code and stderr."""
    original, earlyexit.bench.execute = earlyexit.bench.execute, cells_start
    err = io.StringIO()
    try:
        with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stderr(err):
            spec = os.path.join(folder, "spec.toml")
            with open(spec, "w", encoding="utf-8") as handle:
                handle.write(text)
            code, _ = call(["bench", spec, "--output", os.path.join(folder, "out")])
        return "answer", code, err.getvalue()
    except CellStarted:
        return "cells", None, err.getvalue()
    finally:
        earlyexit.bench.execute = original


def check(text: str) -> None:
    kind, code, err = outcome(text)
    assert "Traceback" not in err and "internal error" not in err, err
    if kind == "answer":
        assert code == 2, err
        assert len(shown_lines(err)) == 1, err


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(key=st.sampled_from(sorted(SETTINGS)), value=VALUES)
def test_any_value_in_defaults_runs_or_is_one_line(key, value):
    check(BASE.format(defaults=f"{key} = {toml(value)}", table=""))


@FAST
@given(key=st.sampled_from(sorted(AXES)), value=VALUES)
def test_any_axis_runs_or_is_one_line(key, value):
    check(BASE.format(defaults="", table=f"{key} = {toml(value)}"))


def test_the_property_can_fail():
    """A value the checks miss would reach the cells; a crash would show a traceback: both are seen."""
    assert outcome(BASE.format(defaults="batch_size = 4", table=""))[0] == "cells"
    assert outcome(BASE.format(defaults="batch_size = 0", table=""))[:2] == ("answer", 2)
