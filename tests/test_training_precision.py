"""Training small modules beside a low-precision backbone: fp32 master weights for bf16/fp16
parameters, loss scaling for fp16, and fp32 parameters trained exactly as `PlainEngine` does."""

import os

import pytest
import torch
from safetensors.torch import load_file

from earlyexit.errors import ConfigError
from earlyexit.training.engines import TrainingEngine
from earlyexit.training.loop import PlainEngine, TrainConfig, train


class Exit(torch.nn.Module):
    """An exit-like module: a projection with weights of magnitude 0.07-0.12 and a norm gain of 1."""

    def __init__(self, seed=0, width=16):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        magnitude = 0.07 + 0.05 * torch.rand(width, width, generator=generator)
        sign = torch.randint(0, 2, (width, width), generator=generator) * 2 - 1
        # bf16-representable starting values, so an fp32 and a bf16 copy start alike
        self.proj = torch.nn.Parameter((magnitude * sign).bfloat16().float())
        self.gain = torch.nn.Parameter(torch.ones(width))

    def forward(self, x):
        """Computed in fp32 whatever the weights' dtype: the gradients differ from fp32 training
        only by their rounding, so what this measures is the optimiser's precision alone."""
        x = x.float() @ self.proj.float()
        return torch.nn.functional.layer_norm(x, x.shape[-1:]) * self.gain.float()


def batches(step, width=16):
    """The same batch every step: the gradients keep their signs, so each Adam step moves a weight by lr."""
    generator = torch.Generator().manual_seed(1000)
    return {"x": torch.randn(8, width, generator=generator), "y": torch.randn(8, width, generator=generator)}


def mse_step(module):
    def step(batch, engine):
        out = module(batch["x"])
        return {"loss": engine.optimize("exit", ((out - batch["y"]) ** 2).mean())}
    return step


def trained(dtype, engine_class, tmp_path, steps=5, lr=1e-4, **config):
    module = Exit().to(dtype)
    settings = TrainConfig(output_dir=str(tmp_path / f"{engine_class.__name__}-{dtype}"), steps=steps,
                           learning_rate=lr, warmup_steps=0, weight_decay=0.0, progress=False, **config)
    engine = engine_class({"exit": dict(module.named_parameters())}, settings)
    train(module, mse_step(module), batches, settings, engine)
    return module, engine


def test_bf16_exits_move_as_fp32_ones_do_where_plain_bf16_adamw_does_not(tmp_path):
    start = Exit()
    fp32, _ = trained(torch.float32, PlainEngine, tmp_path)
    bf16, engine = trained(torch.bfloat16, TrainingEngine, tmp_path)
    plain, _ = trained(torch.bfloat16, PlainEngine, tmp_path)
    for name in ("proj", "gain"):
        initial, reference = getattr(start, name).detach(), getattr(fp32, name).detach()
        # 5 Adam steps of lr 1e-4 under the cosine decay: 1e-4 x (1 + .905 + .655 + .345 + .095) = 3e-4
        assert (reference - initial).abs().min() > 2.5e-4
        # the fp32 masters follow the fp32 run; the module holds them rounded to bf16
        master = engine.groups["exit"][name].detach()
        assert master.dtype == torch.float32
        torch.testing.assert_close(master, reference, atol=1e-6, rtol=0)
        assert torch.equal(getattr(bf16, name).detach(), master.to(torch.bfloat16))
        torch.testing.assert_close(getattr(bf16, name).detach().float(), reference, atol=0, rtol=2**-8)
        # today's bug: AdamW on bf16 weights rounds every 1e-4 update away
        unchanged = (getattr(plain, name).detach() == initial.to(torch.bfloat16)).float().mean()
        assert unchanged > 0.95
    assert torch.equal(bf16.gain.detach(), torch.ones(16, dtype=torch.bfloat16))  # 3e-4 is below half bf16's step at 1
    moved = (bf16.proj.detach() != start.proj.detach().to(torch.bfloat16)).float().mean()
    assert moved > 0.9


def test_a_weight_set_outside_the_engine_is_kept(tmp_path):
    """DeeBERT's match_statistics sets its channel scales on the first training batch, after the
    engine took its fp32 masters: the step must start from the new values."""
    module = Exit().to(torch.bfloat16)
    settings = TrainConfig(output_dir=str(tmp_path), steps=10, learning_rate=1e-3, warmup_steps=0, progress=False)
    engine = TrainingEngine({"exit": dict(module.named_parameters())}, settings)
    with torch.no_grad():
        module.gain.copy_(torch.full((16,), 2.0))
    batch = batches(0)
    engine.optimize("exit", ((module(batch["x"]) - batch["y"]) ** 2).mean())
    assert (module.gain.detach().float() - 2.0).abs().max() <= 2e-2  # one step of 1e-3 from 2, not from 1
    torch.testing.assert_close(engine.groups["exit"]["gain"].detach(), torch.full((16,), 2.0), atol=1.1e-3, rtol=0)


def test_fp32_parameters_train_bit_for_bit_as_plain_engine(tmp_path):
    results = []
    for engine_class in (PlainEngine, TrainingEngine):
        module = Exit(seed=3)
        other = torch.nn.Linear(16, 16)
        torch.manual_seed(0)
        other.reset_parameters()
        settings = TrainConfig(output_dir=str(tmp_path / engine_class.__name__), steps=6, learning_rate=3e-2,
                               warmup_steps=2, weight_decay=0.1, grad_clip=0.5, progress=False)
        groups = {"exit": dict(module.named_parameters()), "other": dict(other.named_parameters())}
        engine = engine_class(groups, settings, lr_multipliers={"gain": 3.0})

        def step(batch, engine):
            out = module(batch["x"])
            return {"a": engine.optimize("exit", ((out - batch["y"]) ** 2).mean()),
                    "b": engine.optimize("other", ((other(batch["x"]) - out.detach()) ** 2).mean())}

        losses = train(module, step, batches, settings, engine)
        results.append((losses, [p.detach().clone() for p in [*module.parameters(), *other.parameters()]],
                        engine.optimizers["exit"].state_dict()["state"]))
    (plain_losses, plain_weights, plain_state), (losses, weights, state) = results
    assert losses == plain_losses
    assert all(torch.equal(a, b) for a, b in zip(weights, plain_weights, strict=True))
    assert all(torch.equal(plain_state[k]["exp_avg_sq"], state[k]["exp_avg_sq"]) for k in plain_state)


class Interrupted(Exception):
    pass


def test_a_resumed_bf16_training_continues_exactly_from_the_fp32_masters(tmp_path):
    straight, straight_engine = trained(torch.bfloat16, TrainingEngine, tmp_path / "a", steps=6, lr=1e-3,
                                        checkpoint_every=3)
    module = Exit().to(torch.bfloat16)
    settings = TrainConfig(output_dir=str(tmp_path / "b"), steps=6, learning_rate=1e-3, warmup_steps=0,
                           weight_decay=0.0, checkpoint_every=3, progress=False)
    step = mse_step(module)

    def stops_after_three(batch, engine, calls=[]):
        calls.append(1)
        if len(calls) > 3:
            raise Interrupted
        return step(batch, engine)

    with pytest.raises(Interrupted):
        train(module, stops_after_three, batches, settings, TrainingEngine({"exit": dict(module.named_parameters())},
                                                                           settings))
    saved = load_file(str(tmp_path / "b" / "checkpoint-3" / "trainable.safetensors"))
    assert all(t.dtype == torch.float32 for t in saved.values())  # the masters, not their bf16 rounding
    module = Exit().to(torch.bfloat16)  # a fresh process: nothing carried over but the checkpoint
    engine = TrainingEngine({"exit": dict(module.named_parameters())}, settings)
    train(module, mse_step(module), batches, settings, engine)
    for name, parameter in module.named_parameters():
        assert torch.equal(parameter, getattr(straight, name))
        assert torch.equal(engine.groups["exit"][name], straight_engine.groups["exit"][name])


# -- fp16: loss scaling -----------------------------------------------------------------------------
def fp16_engine(tmp_path, parameter):
    settings = TrainConfig(output_dir=str(tmp_path), steps=100, learning_rate=1e-3, warmup_steps=0,
                           weight_decay=0.0, grad_clip=0.0, progress=False)
    return TrainingEngine({"exit": {"w": parameter}}, settings)


def test_fp16_gradients_below_fp16_range_still_train_with_loss_scaling(tmp_path):
    # d loss / d w = 1e-8 per weight: zero in fp16 (smallest subnormal 6e-8), 6.6e-4 once scaled by 2^16
    tiny = torch.full((4,), 1e-8)
    weights = {}
    for engine_class in (PlainEngine, TrainingEngine):
        w = torch.nn.Parameter(torch.full((4,), 0.5, dtype=torch.float16))
        settings = TrainConfig(output_dir=str(tmp_path / engine_class.__name__), steps=3, learning_rate=1e-2,
                               warmup_steps=0, weight_decay=0.0, grad_clip=0.0, progress=False)
        engine = engine_class({"exit": {"w": w}}, settings)
        engine.optimize("exit", (w.float() * tiny).sum())
        weights[engine_class] = w.detach().clone()
    # plain fp16 AdamW: the gradient underflows to 0, and so does AdamW's eps of 1e-8: 0 / 0
    assert torch.isnan(weights[PlainEngine]).all()
    # scaled, the gradient survives: AdamW's first step is lr * g / (|g| + eps) = 1e-2 * 1e-8 / 2e-8
    master = engine.groups["exit"]["w"].detach()
    torch.testing.assert_close(master, torch.full((4,), 0.495), atol=1e-5, rtol=0)
    assert torch.equal(weights[TrainingEngine], master.half())


def test_an_overflowing_fp16_step_is_skipped_and_the_scale_falls(tmp_path):
    w = torch.nn.Parameter(torch.full((4,), 0.5, dtype=torch.float16))
    engine = fp16_engine(tmp_path, w)
    scaler = engine.scalers["exit"]
    assert scaler.get_scale() == 2.0 ** 16
    # d loss / d w = 1000: finite, but times 2^16 it overflows fp16 (max 65504) on the way into w
    loss = engine.optimize("exit", (w.float() * 1000.0).sum())
    assert loss == pytest.approx(2000.0)
    assert torch.equal(w.detach(), torch.full((4,), 0.5, dtype=torch.float16))  # step skipped
    assert torch.equal(engine.groups["exit"]["w"].detach(), torch.full((4,), 0.5))
    assert scaler.get_scale() == 2.0 ** 15
    assert engine.optimizers["exit"].state_dict()["state"] == {}  # AdamW never stepped
    for _ in range(11):  # the scale halves until 1000 x scale fits fp16 (2^6), then the weights move
        engine.optimize("exit", (w.float() * 1000.0).sum())
    assert scaler.get_scale() == 64.0
    assert (w.detach() < 0.5).all()


def test_a_non_finite_loss_is_still_a_config_error(tmp_path):
    w = torch.nn.Parameter(torch.full((4,), 0.5, dtype=torch.float16))
    engine = fp16_engine(tmp_path, w)
    with pytest.raises(ConfigError, match="lower the learning rate"):
        engine.optimize("exit", (w.float() * float("inf")).sum())


def test_the_loss_scale_is_saved_and_restored(tmp_path):
    w = torch.nn.Parameter(torch.full((4,), 0.5, dtype=torch.float16))
    engine = fp16_engine(tmp_path, w)
    engine.optimize("exit", (w.float() * 1000.0).sum())  # overflow: the scale falls to 2^15
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    engine.save(str(folder))
    fresh = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    restored = fp16_engine(tmp_path, fresh)
    restored.load(str(folder))
    assert restored.scalers["exit"].get_scale() == 2.0 ** 15
    assert torch.equal(fresh.detach(), w.detach())


def test_exit_training_on_a_bf16_backbone_keeps_fp32_masters(tmp_path):
    """`train_exits` without DeepSpeed trains through `TrainingEngine`: the exits stay bf16 beside
    the backbone, and its checkpoint holds their fp32 masters."""
    from helpers import make_backend

    from earlyexit.data.scenes import SceneConfig, load_scenes
    from earlyexit.strategies.deebert import DeeBertConfig, DeeBertStrategy
    from earlyexit.training.exits import train_exits
    from earlyexit.training.loop import latest_checkpoint

    backend = make_backend(seed=21, num_layers=4, image_size=64, patch_size=16, init_std=0.1).to(dtype="bfloat16")
    scenes = load_scenes("exit_train", config=SceneConfig(train=8, val=10, test=4), cache_dir=tmp_path / "scenes")
    strategy = DeeBertStrategy(backend, [1, 2], DeeBertConfig(epochs=1, batch_size=4, learning_rate=1e-3))
    train_exits(strategy, backend, scenes, str(tmp_path / "run"), progress=False)
    saved = load_file(os.path.join(latest_checkpoint(str(tmp_path / "run")), "trainable.safetensors"))
    weights = dict(strategy.classifiers.named_parameters())
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    for name, master in saved.items():
        weight = weights[name.removeprefix("classifiers/")]
        assert weight.dtype == torch.bfloat16 and torch.equal(weight.detach(), master.to(torch.bfloat16))
    assert any(not torch.equal(t, t.to(torch.bfloat16).float()) for t in saved.values())  # finer than bf16
