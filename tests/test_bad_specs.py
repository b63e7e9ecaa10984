"""Bad bench specs through `earlyexit bench`, in this process: each must exit 2 with exactly one line
on stderr that names the file, table, key and value (`spec.toml: [defaults] batch_size = "4": ...`),
never a traceback, and no cell may start (the cell loop is replaced by a marker that fails the case).
"""

from __future__ import annotations

import pytest
from test_bad_inputs import assert_one_clean_line, call

import earlyexit.bench

STRATEGIES = 'conf = { strategy = "confidence" }\nfree = { strategy = "free", options = { epochs = 1 } }\n'


class CellStarted(BaseException):
    """Raised where the bench would start its first cell: a BaseException, so no handler hides it."""


def cells_start(*args, **kwargs):
    raise CellStarted


def spec_text(defaults: str = "", strategies: str = STRATEGIES, table: str = "", top: str = "",
              tail: str = "") -> str:
    """A small spec with lines added to its top level, [defaults], [strategies] and its one table."""
    return (f'name = "bad"\n{top}\n[defaults]\nmodel = "tiny"\ntest_limit = 2\n{defaults}\n'
            f'[strategies]\n{strategies}\n[tables.t]\ndata = ["scenes"]\n{table}\n{tail}')


def options(text: str) -> str:
    return STRATEGIES + f'tuned = {{ strategy = "free", options = {{ {text} }} }}\n'


# (case id, the spec's content (text or bytes), a fragment the one line must contain)
CASES = [
    ("binary file", b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01", "not a text file"),
    ("not TOML", "[defaults\n", "not valid TOML"),
    ("defaults not a table", 'name = "bad"\ndefaults = 3\n[strategies]\n' + STRATEGIES
     + '[tables.t]\ndata = ["scenes"]\n', "spec.toml: top level defaults = 3: must be a table"),
    ("strategies not a table", 'name = "bad"\nstrategies = 3\n[tables.t]\ndata = ["scenes"]\n',
     "top level strategies = 3: must be a table"),
    ("strategy entry not a table", spec_text(strategies=STRATEGIES + "odd = 3\n"),
     '[strategies] "odd" = 3: must be a table'),
    ("options not a table", spec_text(strategies=STRATEGIES + 'odd = { strategy = "free", options = 5 }\n'),
     '[strategies] "odd" options = 5: must be a table'),
    ("table not a table", spec_text(tail="[tables]\nu = 3\n"), "[tables] u = 3: must be a table"),
    ("batch_size a string", spec_text('batch_size = "4"'),
     'spec.toml: [defaults] batch_size = "4": must be a positive integer'),
    ("batch_size zero", spec_text("batch_size = 0"), "[defaults] batch_size = 0: must be a positive integer"),
    ("threshold a word", spec_text('threshold = "high"'), '[defaults] threshold = "high": must be a number'),
    ("threshold negative", spec_text(table="threshold = -0.5"), "[tables.t] threshold = -0.5: must be a number"),
    ("noise axis of strings", spec_text(table='noise = ["a", "b"]'),
     '[tables.t] noise = ["a", "b"]: "a" must be a number'),
    ("noise axis with NaN", spec_text(table="noise = [0.0, nan]"), "NaN must be a number"),
    ("noise negative", spec_text("noise = -0.1"), "[defaults] noise = -0.1: must be a number"),
    ("exit_layers a string", spec_text('exit_layers = "3,6"'),
     '[defaults] exit_layers = "3,6": must be a non-empty list of layer numbers'),
    ("strategy exit_layers of zero",
     spec_text(strategies=STRATEGIES + 'z = { strategy = "free", exit_layers = [0] }\n'),
     '[strategies] "z" exit_layers = [0]: layer 0 is out of range: layers count from 1'),
    ("unknown strategy", spec_text(strategies=STRATEGIES + 'odd = { strategy = "confidense" }\n'),
     '[strategies] "odd" strategy = "confidense"'),
    ("unknown strategy option", spec_text(strategies=options("bogus = 1")), "free has no option 'bogus'"),
    ("option of the wrong type", spec_text(strategies=options('epochs = "many"')),
     'options.epochs = "many": must be a number'),
    ("option a string for a bool", spec_text(strategies=options('adversarial = "no"')), "must be true or false"),
    ("option inf", spec_text(strategies=options("learning_rate = inf")),
     "options.learning_rate = Infinity: must be a number"),
    ("option nan", spec_text(strategies=options("adversarial_weight = nan")),
     "options.adversarial_weight = NaN: must be a number"),
    ("option negative", spec_text(strategies=options("classifier_width = -1")),
     "options.classifier_width = -1: must be a number"),
    ("unknown kv_policy", spec_text('kv_policy = "magic"'),
     '[defaults] kv_policy = "magic": must be one of catchup, propagate, skip'),
    ("kv_policies axis with an unknown", spec_text(table='kv_policies = ["skip", "magic"]'), '"magic" must be one of'),
    ("test_limit negative", spec_text(table="test_limit = -1"),
     "[tables.t] test_limit = -1: must be a positive integer"),
    ("max_new_tokens a fraction", spec_text("max_new_tokens = 2.5"),
     "max_new_tokens = 2.5: must be a positive integer"),
    ("unknown gate", spec_text('gate = "psychic"'),
     '[defaults] gate = "psychic": must be one of none, learned, cosine'),
    ("unknown gate mode", spec_text('gate_mode = "veto"'), "must be one of replace, filter"),
    ("gate threshold NaN", spec_text('gate = "cosine"\ngate_threshold = nan'), "gate_threshold = NaN"),
    ("gate threshold 2", spec_text("gate_threshold = 2"), "[defaults] gate_threshold = 2: must be a number"),
    ("learned gate threshold negative", spec_text("gate_threshold = -0.5"),
     "a learned gate's threshold must be a number in [0, 1]"),
    ("unknown decode in an axis", spec_text(table='decodes = ["early-exit", "greedy"]'),
     '"greedy" must be one of early-exit, speculative'),
    ("seeds axis of fractions", spec_text(table="seeds = [1.5]"), "1.5 must be an integer"),
    ("empty batch_sizes axis", spec_text(table="batch_sizes = []"), "batch_sizes = []: must be a non-empty list"),
    ("models axis of numbers", spec_text(table="models = [3]"), "3 must be a non-empty string"),
    ("models axis with an unknown key", spec_text(table='models = [{ model = "tiny", size = 3 }]'),
     "unknown key 'size'"),
    ("models axis entry without a model", spec_text(table='models = [{ backend = "blip2-opt" }]'),
     "needs a model key"),
    ("unknown backend", spec_text('backend = "blip2-opx"'), '[defaults] backend = "blip2-opx": unknown backend'),
    ("unknown drafter", spec_text('drafter = "corpuss"'), '[defaults] drafter = "corpuss": unknown drafter'),
    ("unknown dtype", spec_text('dtype = "float64"'), "must be one of float32, bfloat16, float16"),
    ("budget above 1", spec_text("budget = 1.5"), "budget = 1.5: must be a number in [0, 1)"),
    ("epsilon zero", spec_text("epsilon = 0"), "epsilon = 0: must be a number in (0, 1)"),
    ("grid of words", spec_text('grid = ["a"]'), 'grid = ["a"]: must be a non-empty list of numbers'),
    ("unknown rule", spec_text('rule = "fastest"'), "must be one of best, budget, risk"),
    ("unknown speed target", spec_text('speed_target = "sound"'), "must be one of wall, layer"),
    ("draft_length zero", spec_text("draft_length = 0"), "draft_length = 0: must be a positive integer"),
    ("data of numbers", spec_text(tail="[tables.u]\ndata = [1]\n"),
     "[tables.u] data = [1]: 1 must be a non-empty string"),
    ("unknown table strategy", spec_text(table='strategies = ["nope"]'), '"nope" is not in [strategies]'),
    ("unknown figure kind", spec_text(tail='[figures.f]\nkind = "pie"\ntable = "t"\n'), '[figures.f] kind = "pie"'),
    ("name not a string", spec_text().replace('name = "bad"', "name = 3"), "top level name = 3: must be a string"),
]


@pytest.fixture
def no_cells(monkeypatch):
    monkeypatch.setattr(earlyexit.bench, "execute", cells_start)  # the CLI imports it at call time


@pytest.mark.parametrize("case,content,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_spec_is_one_line_and_exit_2(tmp_path, capsys, no_cells, case, content, fragment):
    spec = tmp_path / "spec.toml"
    spec.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, _ = call(["bench", str(spec), "--output", str(tmp_path / "out")])  # CellStarted fails the case
    err = capsys.readouterr().err
    assert_one_clean_line(code, err, fragment)
    assert not (tmp_path / "out").exists()  # nothing written either


def test_the_good_spec_reaches_the_cells(tmp_path, capsys, no_cells):
    """The cases' base spec itself is fine: each case fails for its one change, not for the rest."""
    spec = tmp_path / "spec.toml"
    spec.write_text(spec_text(table='decodes = ["early-exit", "speculative"]\nnoise = [0.0, 0.1]\nseeds = [0, 1]'))
    with pytest.raises(CellStarted):
        call(["bench", str(spec), "--output", str(tmp_path / "out")])


def test_the_table_is_broad():
    assert len(CASES) >= 40
