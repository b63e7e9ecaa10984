"""Plugin loading: built-ins, third-party entry points, broken plugins, clashes, unknown names."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap

import pluggy
import pytest

from earlyexit import hookimpl
from earlyexit.cli import main
from earlyexit.core.strategy import Strategy
from earlyexit.errors import PluginError
from earlyexit.plugins import hookspecs
from earlyexit.plugins.registry import (BUILTIN_PLUGINS, BUILTIN_SOURCE, DISABLE_AUTOLOAD_ENV, Registry, get_registry,
                                        make_plugin_manager)

TOY_PLUGIN = """
    from earlyexit import hookimpl
    from earlyexit.backend import Backend
    from earlyexit.strategy import Strategy

    class ToyStrategy(Strategy):
        name = "toy-strategy"
        description = "A strategy from a third-party distribution"

    class ToyBackend(Backend):
        name = "toy-backend"
        description = "A backend from a third-party distribution"

    @hookimpl
    def earlyexit_register_strategies():
        return [ToyStrategy]

    @hookimpl
    def earlyexit_register_backends():
        return [ToyBackend]
"""

CLASHING_PLUGIN = """
    from earlyexit import hookimpl
    from earlyexit.strategy import Strategy

    class AnotherFixed(Strategy):
        name = "{name}"
        description = "Clashes with a name registered elsewhere"

    @hookimpl
    def earlyexit_register_strategies():
        return [AnotherFixed]
"""


@pytest.fixture
def thirdparty(install_distribution):
    install_distribution("earlyexit-thirdparty", {"ee_thirdparty": TOY_PLUGIN}, {"thirdparty": "ee_thirdparty"})


def test_builtins_register_through_the_plugin_hooks(monkeypatch):
    pm = make_plugin_manager(load_entrypoints=False)
    for module_name in BUILTIN_PLUGINS:
        assert pm.get_plugin(module_name) is sys.modules[module_name]
    registry = Registry(pm)
    assert {"confidence", "fixed"} <= set(registry.names("strategy"))
    assert "blip2-opt" in registry.names("backend")
    assert registry.plugin_of("strategy", "fixed") == BUILTIN_SOURCE
    assert registry.strategy("fixed").name == "fixed"
    assert registry.failures == []


def test_third_party_entry_point_is_registered_with_its_distribution_name(thirdparty):
    registry = get_registry()
    strategy, backend = registry.strategy("toy-strategy"), registry.backend("toy-backend")
    assert strategy is sys.modules["ee_thirdparty"].ToyStrategy
    assert backend is sys.modules["ee_thirdparty"].ToyBackend
    assert registry.plugin_of("strategy", "toy-strategy") == "earlyexit-thirdparty"
    assert registry.plugin_of("backend", "toy-backend") == "earlyexit-thirdparty"
    assert registry.plugin_of("strategy", "fixed") == BUILTIN_SOURCE


def test_list_json_shows_third_party_entries(thirdparty, capsys):
    assert main(["list", "--json"]) == 0
    entries = {(e["kind"], e["name"]): e for e in json.loads(capsys.readouterr().out)}
    assert entries["strategy", "toy-strategy"] == {
        "name": "toy-strategy",
        "kind": "strategy",
        "plugin": "earlyexit-thirdparty",
        "description": "A strategy from a third-party distribution",
    }
    assert entries["backend", "toy-backend"]["plugin"] == "earlyexit-thirdparty"
    assert entries["strategy", "fixed"]["plugin"] == BUILTIN_SOURCE


@pytest.mark.parametrize(
    "broken_source, expected_error",
    [
        ("raise ImportError('needs libfoo')", "ImportError: needs libfoo"),
        ("import ee_module_that_does_not_exist", "ModuleNotFoundError"),
        # Imports fine, but its hook breaks when called: also only that plugin is dropped.
        (
            "from earlyexit import hookimpl\n"
            "@hookimpl\n"
            "def earlyexit_register_strategies():\n"
            "    raise RuntimeError('bad config file')\n",
            "RuntimeError: bad config file",
        ),
        ("from earlyexit import hookimpl\n@hookimpl\ndef earlyexit_register_strategies():\n    return [int]\n",
         "not a Strategy subclass"),
        # A hook with arguments its spec does not have is rejected by pluggy at registration.
        ("from earlyexit import hookimpl\n@hookimpl\ndef earlyexit_batch_stats(stats, extra):\n    pass\n",
         "PluginValidationError"),
    ],
)
def test_broken_plugin_is_reported_and_the_rest_keep_working(
    install_distribution, thirdparty, capsys, broken_source, expected_error
):
    install_distribution("earlyexit-broken", {"ee_broken": broken_source}, {"broken": "ee_broken"})

    registry = get_registry()
    assert len(registry.failures) == 1
    failure = registry.failures[0]
    assert (failure.plugin, failure.distribution) == ("broken", "earlyexit-broken")
    assert expected_error in failure.error
    assert "\n" not in str(failure)
    assert registry.strategy("toy-strategy") and registry.strategy("fixed")

    assert main(["list"]) == 0
    captured = capsys.readouterr()
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: plugin 'broken' from earlyexit-broken failed to load")
    assert "toy-strategy" in captured.out and "fixed" in captured.out


def test_entry_point_to_a_missing_module_is_a_failure_not_a_crash(install_distribution):
    install_distribution("earlyexit-ghost", {}, {"ghost": "ee_ghost_module"})
    registry = get_registry()
    assert [(f.plugin, f.distribution) for f in registry.failures] == [("ghost", "earlyexit-ghost")]
    assert "ModuleNotFoundError" in registry.failures[0].error


def test_name_clash_with_a_builtin_names_both_plugins(install_distribution, capsys):
    install_distribution("earlyexit-dupe", {"ee_dupe": CLASHING_PLUGIN.format(name="fixed")}, {"dupe": "ee_dupe"})
    with pytest.raises(PluginError, match="strategy 'fixed' is registered twice") as excinfo:
        get_registry()
    assert BUILTIN_SOURCE in str(excinfo.value) and "earlyexit-dupe" in str(excinfo.value)

    assert main(["list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: strategy 'fixed' is registered twice")


def test_name_clash_between_two_third_party_plugins_names_both(install_distribution):
    install_distribution("earlyexit-one", {"ee_one": CLASHING_PLUGIN.format(name="toy")}, {"one": "ee_one"})
    install_distribution("earlyexit-two", {"ee_two": CLASHING_PLUGIN.format(name="toy")}, {"two": "ee_two"})
    with pytest.raises(PluginError) as excinfo:
        get_registry()
    assert "'toy'" in str(excinfo.value)
    assert "earlyexit-one" in str(excinfo.value) and "earlyexit-two" in str(excinfo.value)


@pytest.mark.parametrize("value, loaded", [("1", False), ("true", False), ("0", True), ("", True)])
def test_autoload_switch(thirdparty, monkeypatch, value, loaded):
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, value)
    registry = get_registry()
    assert ("toy-strategy" in registry.names("strategy")) is loaded
    assert {"confidence", "fixed"} <= set(registry.names("strategy"))
    # An explicit argument wins over the environment.
    assert "toy-strategy" not in get_registry(load_entrypoints=False).names("strategy")
    assert "toy-strategy" in get_registry(load_entrypoints=True).names("strategy")


class Fixed(Strategy):
    name = "fixed"


class Confidence(Strategy):
    name = "confidence"


class OnlyTwoStrategies:
    @staticmethod
    @hookimpl
    def earlyexit_register_strategies():
        return [Fixed, Confidence]


@pytest.fixture
def two_strategy_registry():
    pm = pluggy.PluginManager("earlyexit")
    pm.add_hookspecs(hookspecs)
    pm.register(OnlyTwoStrategies, name="only-two")
    return Registry(pm)


def test_unknown_name_suggests_the_closest_match(two_strategy_registry):
    with pytest.raises(PluginError) as excinfo:
        two_strategy_registry.strategy("fixd")
    assert str(excinfo.value) == "unknown strategy 'fixd'. Did you mean 'fixed'? Available: confidence, fixed"
    assert two_strategy_registry.plugin_of("strategy", "fixed") == "only-two"


def test_unknown_name_without_a_close_match_lists_what_is_available(two_strategy_registry):
    with pytest.raises(PluginError) as excinfo:
        two_strategy_registry.strategy("zzz")
    assert str(excinfo.value) == "unknown strategy 'zzz'. Available: confidence, fixed"
    with pytest.raises(PluginError, match=r"^unknown backend 'blip2'\. Available: none$"):
        two_strategy_registry.backend("blip2")


def test_a_plugin_that_exits_on_import_is_isolated(install_distribution):
    from earlyexit.plugins.registry import get_registry

    install_distribution("earlyexit-quitter", {"ee_quitter": "import sys\nsys.exit(3)\n"}, {"quitter": "ee_quitter"})
    registry = get_registry()
    assert "blip2-opt" in registry.names("backend")
    assert [(f.plugin, f.distribution) for f in registry.failures] == [("quitter", "earlyexit-quitter")]


LOGGER = """
    import json, os
    from earlyexit import hookimpl

    def _log(event, **data):
        with open(os.environ["EE_TEST_EVENTS"], "a") as handle:
            handle.write(json.dumps({"event": event, **data}, default=str) + "\\n")

    @hookimpl
    def earlyexit_run_start(config):
        _log("run_start", command=config.get("command"))

    @hookimpl
    def earlyexit_batch_stats(stats):
        _log("batch_stats", samples=stats.get("samples"), phase=stats.get("phase"))

    @hookimpl
    def earlyexit_run_end(config, results):
        _log("run_end", metrics=sorted(results.get("quality", {})))
"""


def test_lifecycle_hooks_reach_a_plugin(install_distribution, tmp_path, monkeypatch, capsys):
    import json
    import shutil

    if shutil.which("java") is None:
        pytest.skip("caption metrics need Java")
    from helpers import make_backend

    from earlyexit.cli import main

    events = tmp_path / "events.jsonl"
    monkeypatch.setenv("EE_TEST_EVENTS", str(events))
    install_distribution("earlyexit-logger", {"ee_logger": LOGGER}, {"logger": "ee_logger"})
    make_backend(seed=4, num_layers=4, image_size=64, patch_size=16).save_pretrained(str(tmp_path / "model"))
    assert main(["eval", "--backend", "blip2-opt", "--model", str(tmp_path / "model"), "--data", "scenes",
                 "--split", "dev", "--limit", "5", "--batch-size", "2", "--max-new-tokens", "3"]) == 0
    received = [json.loads(line) for line in events.read_text().splitlines()]
    assert [e["event"] for e in received] == ["run_start"] + ["batch_stats"] * 3 + ["run_end"]
    assert received[0]["command"] == "eval" and [e["samples"] for e in received[1:4]] == [2, 2, 1]
    assert "CIDEr" in received[-1]["metrics"]


# -- contract versions ------------------------------------------------------------------------
OLD_CONTRACT_PLUGIN = """
    import dataclasses

    import torch

    from earlyexit import Strategy, StrategyConfig, config_field, hookimpl

    SEEN = []  # (logits shape, hidden shape) of every call

    class FirstExitV1(Strategy):
        name = "first-exit-v1"
        description = "leaves at the first exit; written for contract version 1"
        knob = None

        def should_exit(self, exit_index, logits, hidden, context):
            SEEN.append((tuple(logits.shape), tuple(hidden.shape)))
            return torch.full((logits.shape[0],), exit_index == 0, dtype=torch.bool, device=logits.device)

    @dataclasses.dataclass
    class Threshold(StrategyConfig):
        threshold: float = config_field(0.9, "leave when the top softmax probability reaches this")

    class ConfidenceV1(Strategy):
        name = "confidence-v1"
        description = "the confidence rule, written for contract version 1"
        Config = Threshold

        # the names do not matter when the version is declared
        contract_version = 1

        def should_exit(self, e, exit_logits, state, ctx):
            return exit_logits.float().softmax(-1).amax(-1) >= self.config.threshold

    @hookimpl
    def earlyexit_register_strategies():
        return [FirstExitV1, ConfidenceV1]
"""


class FirstExit(Strategy):
    """The first-exit rule of OLD_CONTRACT_PLUGIN, written for the current contract."""

    name = "first-exit"
    knob = None

    def should_exit(self, exit_index, view, context):
        import torch

        return torch.full((view.hidden.shape[0],), exit_index == 0, dtype=torch.bool, device=view.hidden.device)


@pytest.fixture
def old_contract(install_distribution):
    install_distribution("earlyexit-oldcontract", {"ee_oldcontract": OLD_CONTRACT_PLUGIN},
                         {"oldcontract": "ee_oldcontract"})


def generated(backend, strategy, inputs):
    """(new tokens, per-token exit layers, every step's exit visits) of one greedy generation."""
    import dataclasses

    from helpers import new_tokens, no_eos

    from earlyexit.core.engine import EarlyExitForCausalLM

    model = EarlyExitForCausalLM(backend, strategy)
    sequences = model.generate(**inputs, max_new_tokens=8, do_sample=False, **no_eos(backend))
    visits = [[dataclasses.asdict(v) for v in step.exits] for step in model.last_trace.steps]
    return new_tokens(sequences, inputs), model.last_trace.exit_layers, visits


def test_strategies_state_the_contract_version_they_are_written_for(old_contract):
    from earlyexit import CONTRACT_VERSION

    module = importlib.import_module("ee_oldcontract")
    assert CONTRACT_VERSION == 2
    assert module.FirstExitV1.contract_version == 1  # read from should_exit's parameter names
    assert module.ConfidenceV1.contract_version == 1  # declared
    assert FirstExit.contract_version == Strategy.contract_version == CONTRACT_VERSION

    class Ported(module.FirstExitV1):  # a subclass's own should_exit sets its version
        def should_exit(self, exit_index, view, context):
            return super().should_exit(exit_index, view.logits(), view.hidden, context)

    assert Ported.contract_version == CONTRACT_VERSION
    registry = get_registry(load_entrypoints=False)
    for name in registry.names("strategy"):  # built-ins: the current contract, called as they are
        cls = registry.strategy(name)
        assert cls.contract_version == CONTRACT_VERSION and "adapted_from" not in vars(cls)


def test_old_contract_strategy_registers_with_a_deprecation_warning(old_contract, thirdparty, capsys):
    with pytest.warns(DeprecationWarning) as record:
        registry = get_registry()
    messages = [str(w.message) for w in record if issubclass(w.category, DeprecationWarning)]
    for name in ("first-exit-v1", "confidence-v1"):
        mine = [m for m in messages if f"strategy '{name}'" in m]
        assert len(mine) == 1, messages
        assert mine[0].startswith("plugin 'oldcontract' from earlyexit-oldcontract: ")
        assert "contract version 1" in mine[0] and "contract version 2" in mine[0] and "\n" not in mine[0]
    assert registry.failures == []
    module = sys.modules["ee_oldcontract"]
    adapted = registry.strategy("first-exit-v1")
    assert adapted.adapted_from is module.FirstExitV1 and issubclass(adapted, module.FirstExitV1)
    assert adapted.contract_version == 2 and adapted.__qualname__ == "FirstExitV1"
    assert registry.plugin_of("strategy", "first-exit-v1") == "earlyexit-oldcontract"
    assert registry.strategy("toy-strategy") is sys.modules["ee_thirdparty"].ToyStrategy  # no adapter

    with pytest.warns(DeprecationWarning):
        assert main(["list"]) == 0
    captured = capsys.readouterr()
    assert "first-exit-v1" in captured.out and "confidence-v1" in captured.out and "toy-strategy" in captured.out
    assert "failed" not in captured.err


def test_old_contract_strategy_runs_as_its_new_contract_twin(old_contract, backend6):
    from helpers import make_images

    with pytest.warns(DeprecationWarning):
        registry = get_registry()
    inputs = backend6.prepare_inputs(make_images(3, seed=5), ["a red circle", "two", "what color is the square"])
    old = registry.strategy("first-exit-v1")(backend6, [2, 4])
    tokens, layers, visits = generated(backend6, old, inputs)
    assert (layers[:, 1:] == 2).all()  # every decoded token left at the first exit
    seen = sys.modules["ee_oldcontract"].SEEN
    vocab = backend6.text_config.vocab_size
    assert seen and all(shape == ((3, vocab), (3, backend6.text_config.hidden_size)) for shape in seen)  # the rows present

    new_tokens_, new_layers, new_visits = generated(backend6, FirstExit(backend6, [2, 4]), inputs)
    assert torch_equal(tokens, new_tokens_) and torch_equal(layers, new_layers) and visits == new_visits

    # a rule that reads the logits: identical to the built-in confidence strategy, charges included
    for threshold in (0.05, 0.1):
        old = registry.strategy("confidence-v1")
        new = registry.strategy("confidence")
        got = generated(backend6, old(backend6, [2, 4], old.Config(threshold=threshold)), inputs)
        want = generated(backend6, new(backend6, [2, 4], new.Config(threshold=threshold)), inputs)
        assert torch_equal(got[0], want[0]) and torch_equal(got[1], want[1]) and got[2] == want[2]
    decoded = got[1][:, 1:]
    assert len(set(decoded.flatten().tolist())) > 1, "the rule should leave at more than one depth"


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and torch.equal(a, b)


FUTURE_CONTRACT_PLUGIN = """
    from earlyexit import Strategy, hookimpl

    class NextGeneration(Strategy):
        name = "next-generation"
        description = "written for a contract this earlyexit does not know"
        {body}

    @hookimpl
    def earlyexit_register_strategies():
        return [NextGeneration]
"""


@pytest.mark.parametrize("body, expected", [
    ("contract_version = 3",
     "strategy 'next-generation' is written for contract version 3; this earlyexit supports 1-2: upgrade earlyexit"),
    ("def should_exit(self, exit_index, view, context, plan):\n            pass",
     "strategy 'next-generation' has should_exit(exit_index, view, context, plan), which contract version 2 "
     "cannot call"),
    ("contract_version = 0", "declares contract_version 0"),
])
def test_a_strategy_the_engine_cannot_call_is_refused_in_one_line(install_distribution, thirdparty, capsys,
                                                                   body, expected):
    install_distribution("earlyexit-future", {"ee_future": FUTURE_CONTRACT_PLUGIN.format(body=body)},
                         {"future": "ee_future"})
    registry = get_registry()
    assert [(f.plugin, f.distribution) for f in registry.failures] == [("future", "earlyexit-future")]
    assert registry.failures[0].error.startswith("PluginError: strategy 'next-generation' ")
    assert expected in registry.failures[0].error
    assert "\n" not in str(registry.failures[0])
    assert "next-generation" not in registry.names("strategy")
    assert registry.strategy("toy-strategy") and registry.strategy("fixed")  # the others keep working

    assert main(["list"]) == 0
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: plugin 'future' from earlyexit-future failed to load")
    assert expected in err[0]
    assert "toy-strategy" in captured.out and "fixed" in captured.out and "next-generation" not in captured.out
