"""Device and dtype: --device / --dtype reach `from_pretrained`, bad values are one line (exit 2),
bf16 runs end to end on the CPU (generation with a strategy, eval, FREE's exit training) and its
full-depth tokens match fp32's on most tokens, every strategy's modules follow the backbone's
dtype, DeepSpeed picks its collective backend and mixed precision from the model. GPU paths are
written to run unchanged on a CUDA machine and are skipped here."""

import copy
import math

import pytest
import torch
from helpers import make_backend, make_images, no_eos

from earlyexit.backends.blip2_opt import Blip2OptBackend
from earlyexit.cli import main
from earlyexit.core.engine import EarlyExitForCausalLM
from earlyexit.data.scenes import SceneConfig, load_scenes
from earlyexit.errors import ConfigError
from earlyexit.training.deepspeed_config import config_from_arguments, with_precision
from earlyexit.util.devices import distributed_backend, resolve

MICRO = SceneConfig(train=10, val=10, test=5)
BUILT_IN = ("confidence", "fixed", "deebert", "pabee", "leebert", "mue", "free")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible here)")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return load_scenes("exit_train", config=MICRO, cache_dir=tmp_path_factory.mktemp("scenes"))


def micro(dtype="float32", **kwargs):
    shape = dict(seed=21, num_layers=4, image_size=64, patch_size=16, init_std=0.1)
    return make_backend(**{**shape, **kwargs}).to("cpu", dtype)


def all_parameters(strategy):
    modules = [strategy.exit_modules(), strategy.backbone_layers(), *strategy.training_modules().values()]
    return [p for m in modules if m is not None for p in m.parameters()]


# -- bf16 on the CPU, end to end ----------------------------------------------------------------
def full_depth_tokens(backend, inputs, new_tokens=8):
    model = EarlyExitForCausalLM(backend)
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, **no_eos(backend))
    return out[:, inputs["input_ids"].shape[1]:]


def test_bf16_full_depth_tokens_match_fp32_on_most_tokens():
    fp32 = micro(seed=3, num_layers=4, hidden_size=32, init_std=0.3, image_size=16, patch_size=None)
    bf16 = copy.deepcopy(fp32).to(dtype="bfloat16")
    images, prompts = make_images(8, seed=4), ["a red", "two", "", "a", "the blue", "", "one", "a green"]
    want = full_depth_tokens(fp32, fp32.prepare_inputs(images, prompts))
    inputs = bf16.prepare_inputs(images, prompts)
    assert inputs["pixel_values"].dtype == torch.bfloat16 and inputs["input_ids"].dtype == torch.long
    got = full_depth_tokens(bf16, inputs)
    share = (got == want).float().mean().item()
    print(f"bf16 vs fp32 full-depth token agreement: {share:.3f} of {want.numel()} tokens")
    assert share >= 0.8


def test_bf16_generates_with_a_strategy_and_exits_off_matches_its_own_generate():
    backend = micro("bfloat16")
    inputs = backend.prepare_inputs(make_images(2, seed=5), ["a red circle", "two"])
    plain = backend.plain_generate(**inputs, max_new_tokens=6, do_sample=False, **no_eos(backend))
    assert torch.equal(EarlyExitForCausalLM(backend).generate(**inputs, max_new_tokens=6, do_sample=False,
                                                              **no_eos(backend)), plain)
    from earlyexit.strategies.confidence import ConfidenceStrategy

    strategy = ConfidenceStrategy(backend, [1, 2], ConfidenceStrategy.Config(threshold=0.0))
    model = EarlyExitForCausalLM(backend, strategy)
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, **no_eos(backend))
    assert out.shape == plain.shape
    assert (model.last_trace.exit_layers[:, 1:] == 1).all()  # threshold 0: every decoded token at the first exit


def test_bf16_eval_on_micro_scenes(tmp_path):
    from earlyexit.evaluation.common import EvalSettings
    from earlyexit.evaluation.evaluate import evaluate
    from earlyexit.strategies.fixed import FixedStrategy

    backend = micro("bfloat16")
    test = load_scenes("test", config=MICRO, cache_dir=tmp_path).subset(4)
    strategy = FixedStrategy(backend, [2], FixedStrategy.Config())
    result = evaluate(backend, strategy, test, EvalSettings(batch_size=4, max_new_tokens=4, measure_wall=False))
    assert set(result["exit_layer_histogram"]) <= {2, 4}
    assert math.isfinite(result["speed"]["layer_speedup"]) and result["speed"]["layer_speedup"] > 0


def test_bf16_free_trains_a_few_steps(scenes, tmp_path):
    from earlyexit.strategies.free import FreeConfig, FreeStrategy
    from earlyexit.training.exits import train_exits

    backend = micro("bfloat16")
    strategy = FreeStrategy(backend, [1, 2], FreeConfig(epochs=0.8, batch_size=4, learning_rate=1e-3))
    before = [p.detach().clone() for p in strategy.exit_modules().parameters()]
    losses = train_exits(strategy, backend, scenes, str(tmp_path / "run"), progress=False)
    assert len(losses) >= 2 and all(math.isfinite(v) for entry in losses for v in entry.values()
                                    if isinstance(v, float))
    assert all(p.dtype == torch.bfloat16 for p in all_parameters(strategy))
    assert any(not torch.equal(a, b) for a, b in zip(before, strategy.exit_modules().parameters()))
    inputs = backend.prepare_inputs(make_images(2, seed=6), ["", "a"])
    EarlyExitForCausalLM(backend, strategy).generate(**inputs, max_new_tokens=3, do_sample=False)


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_strategys_modules_follow_the_backbone_dtype(registry, name):
    backend = micro("bfloat16")
    cls = registry.strategy(name)
    config = cls.Config(layerwise=True) if name == "mue" else cls.Config()
    strategy = cls(backend, cls.default_exit_layers(backend.num_layers), config)
    parameters = all_parameters(strategy)
    assert parameters or name in ("confidence", "fixed", "pabee")
    assert all(p.dtype == torch.bfloat16 and p.device == backend.device for p in parameters)


def test_a_float32_gate_moves_with_the_model():
    from earlyexit.core.gates import LearnedGate
    from earlyexit.strategies.confidence import ConfidenceStrategy

    backend = micro("bfloat16")
    strategy = ConfidenceStrategy(backend, [1, 2])
    gate = LearnedGate(backend.text_config.hidden_size, 2, threshold=0.5, mode="filter")
    model = EarlyExitForCausalLM(backend, strategy, gate=gate)
    assert all(p.dtype == torch.bfloat16 for p in gate.parameters())
    inputs = backend.prepare_inputs(make_images(1, seed=7), ["a"])
    model.generate(**inputs, max_new_tokens=3, do_sample=False)


# -- the flags ------------------------------------------------------------------------------
class Recorded(Exception):
    pass


@pytest.fixture
def record_loading(monkeypatch, tmp_path):
    """Blip2OptBackend.from_pretrained records its keyword arguments and stops the command."""
    calls = []

    def fake(cls, name_or_path, **kwargs):
        calls.append(kwargs)
        raise ConfigError("stopped after loading")

    monkeypatch.setattr(Blip2OptBackend, "from_pretrained", classmethod(fake))
    import earlyexit.data.registry as data_registry

    monkeypatch.setattr(data_registry, "load_dataset", lambda spec, split: load_scenes(
        "test", config=MICRO, cache_dir=tmp_path / "scenes"))
    return calls


def command(name: str, tmp_path) -> list[str]:
    model = str(tmp_path / "some-model")
    image = tmp_path / "image.png"
    make_images(1)[0].save(image)
    return {
        "generate": ["generate", "--backend", "blip2-opt", "--model", model, "--image", str(image)],
        "eval": ["eval", "--backend", "blip2-opt", "--model", model, "--data", "scenes", "--split", "test"],
        "run": ["run", "--backend", "blip2-opt", "--strategy", "fixed", "--model", model,
                "--output", str(tmp_path / "runs")],
        "train": ["train", "backbone", "--backend", "blip2-opt", "--model", model, "--data", "scenes",
                  "--output", str(tmp_path / "out")],
    }[name]


COMMANDS = ("generate", "eval", "run", "train")


@pytest.mark.parametrize("name", COMMANDS)
def test_flags_reach_from_pretrained(record_loading, tmp_path, capsys, name):
    assert main(command(name, tmp_path) + ["--device", "cpu", "--dtype", "bf16"]) == 2
    assert record_loading == [{"device": "cpu", "dtype": "bfloat16"}]
    assert "stopped after loading" in capsys.readouterr().err


@pytest.mark.parametrize("name", COMMANDS)
def test_defaults_follow_the_machine(record_loading, tmp_path, name):
    main(command(name, tmp_path))
    expected = {"device": "cuda", "dtype": "bfloat16"} if torch.cuda.is_available() else \
        {"device": "cpu", "dtype": "float32"}
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        expected["dtype"] = "float16"
    assert record_loading == [expected]


BAD = [
    (["--device", "gpu"], "unknown --device 'gpu'"),
    (["--device", "tpu:0"], "unknown --device"),
    (["--dtype", "int8"], "unknown --dtype 'int8'"),
    (["--dtype", "float64"], "unknown --dtype"),
]
if not torch.cuda.is_available():
    BAD.append((["--device", "cuda"], "no CUDA GPU is visible"))
    BAD.append((["--device", "cuda:1"], "no CUDA GPU is visible"))


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("flags, message", BAD)
def test_bad_device_or_dtype_is_one_line_before_any_work(record_loading, tmp_path, capsys, name, flags, message):
    assert main(command(name, tmp_path) + flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert record_loading == []  # nothing loaded
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()  # nothing written


def test_tiny_random_and_tiny_config_take_device_and_dtype(registry):
    for name in ("blip2-opt", "minigpt4-llama"):
        backend = registry.backend(name).load("tiny-random", device="cpu", dtype="bfloat16")
        assert backend.dtype == torch.bfloat16 and backend.device.type == "cpu"
        assert registry.backend(name).load("tiny-random").dtype == torch.float32  # the library default


def test_saved_folder_loads_in_the_asked_dtype(tmp_path):
    micro().save_pretrained(str(tmp_path / "m"))
    backend = Blip2OptBackend.load(str(tmp_path / "m"), dtype="bfloat16")
    assert backend.dtype == torch.bfloat16
    inputs = backend.prepare_inputs(make_images(1), ["a"])
    assert inputs["pixel_values"].dtype == torch.bfloat16


# -- DeepSpeed --------------------------------------------------------------------------------
def test_collectives_nccl_on_gpus_gloo_on_cpu():
    assert distributed_backend("cuda:1") == "nccl" and distributed_backend(torch.device("cuda", 0)) == "nccl"
    assert distributed_backend("cpu") == "gloo" and distributed_backend(torch.device("cpu")) == "gloo"


def test_mixed_precision_through_deepspeeds_own_config():
    class Args:
        zero, deepspeed = 2, None

    assert config_from_arguments(Args(), 8, dtype="bfloat16")["bf16"] == {"enabled": True}
    assert config_from_arguments(Args(), 8, dtype="float16")["fp16"] == {"enabled": True}
    plain = config_from_arguments(Args(), 8, dtype="float32")
    assert "bf16" not in plain and "fp16" not in plain
    assert with_precision({"bf16": {"enabled": True}}, "bfloat16") == {"bf16": {"enabled": True}}
    with pytest.raises(ConfigError, match="enables bf16 but the model is float32"):
        with_precision({"bf16": {"enabled": True}}, "float32")
    with pytest.raises(ConfigError, match="enables fp16 but the model is bfloat16"):
        with_precision({"fp16": {"enabled": True}}, "bfloat16")


def test_bf16_exits_train_under_deepspeed_on_the_cpu(scenes, tmp_path):
    pytest.importorskip("deepspeed")
    from earlyexit.strategies.free import FreeConfig, FreeStrategy
    from earlyexit.training.exits import train_exits

    backend = micro("bfloat16")
    strategy = FreeStrategy(backend, [1, 2], FreeConfig(epochs=0.8, batch_size=4))
    losses = train_exits(strategy, backend, scenes, str(tmp_path / "run"), progress=False,
                         deepspeed_config={"zero_optimization": {"stage": 1}, "gradient_accumulation_steps": 1,
                                           "train_micro_batch_size_per_gpu": 4})
    assert torch.distributed.get_backend() == "gloo"
    assert len(losses) >= 2 and all(math.isfinite(entry["ce"]) for entry in losses)
    assert all(p.dtype == torch.bfloat16 for p in all_parameters(strategy))


# -- GPU paths (run unchanged on a CUDA machine) ------------------------------------------------
@needs_cuda
def test_cuda_defaults_and_placement():
    assert resolve(None, None)[0] == "cuda"
    backend = micro().to("cuda", "bfloat16")
    inputs = backend.prepare_inputs(make_images(2, seed=5), ["a", "two"])
    assert all(t.device.type == "cuda" for t in inputs.values())
    from earlyexit.strategies.free import FreeStrategy

    strategy = FreeStrategy(backend, [1, 2])
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in all_parameters(strategy))
    model = EarlyExitForCausalLM(backend, strategy, kv_policy="propagate")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.device.type == "cuda"


@needs_cuda
def test_cuda_bf16_full_depth_matches_fp32_on_most_tokens():
    fp32 = micro(seed=3, hidden_size=32, init_std=0.3, image_size=16, patch_size=None).to("cuda")
    bf16 = copy.deepcopy(fp32).to(dtype="bfloat16")
    images = make_images(8, seed=4)
    want = full_depth_tokens(fp32, fp32.prepare_inputs(images, [""] * 8))
    got = full_depth_tokens(bf16, bf16.prepare_inputs(images, [""] * 8))
    assert (got == want).float().mean().item() >= 0.8


@needs_cuda
def test_cuda_free_trains_under_deepspeed_with_nccl_and_bf16(scenes, tmp_path):
    pytest.importorskip("deepspeed")
    from earlyexit.strategies.free import FreeConfig, FreeStrategy
    from earlyexit.training.exits import train_exits

    backend = micro().to("cuda", "bfloat16")
    strategy = FreeStrategy(backend, [1, 2], FreeConfig(epochs=0.1, batch_size=4))
    losses = train_exits(strategy, backend, scenes, str(tmp_path / "run"), progress=False,
                         deepspeed_config={"zero_optimization": {"stage": 1}, "gradient_accumulation_steps": 1,
                                           "train_micro_batch_size_per_gpu": 4})
    assert torch.distributed.get_backend() == "nccl"
    assert losses and all(p.dtype == torch.bfloat16 for p in all_parameters(strategy))
