"""The Strategy contract: one exit method (when a token may leave, and what it emits).

Strategy classes are plain Python (no torch at import time) so `earlyexit list` stays instant;
their methods import torch where they need it. The engine (`earlyexit.core.engine`) calls a strategy
directly at every exit point; nothing goes through pluggy in that hot path.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import TYPE_CHECKING, Any, ClassVar

from earlyexit.core.validation import check_config_fields
from earlyexit.data.tasks import task_of
from earlyexit.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from earlyexit.core.backend import Backend

# The plugin contract's version. 1: `should_exit(exit_index, logits, hidden, context)`, the exit's
# logits always computed first. 2: `should_exit(exit_index, view, context)`, the view computes
# logits only when asked (docs/contract-versions.md says what changed).
CONTRACT_VERSION = 2

# What `should_exit` takes after `self` under each contract version.
CONTRACT_SIGNATURES = {1: ("exit_index", "logits", "hidden", "context"), 2: ("exit_index", "view", "context")}


def should_exit_signature(cls: type) -> inspect.Signature | None:
    """`cls.should_exit`'s parameters as the engine calls it on an instance (without `self`), or
    None where they cannot be read."""
    raw = inspect.getattr_static(cls, "should_exit", None)
    method = raw.__get__(cls, cls) if hasattr(type(raw), "__get__") else raw  # bound as on an instance
    try:
        return inspect.signature(method)
    except (TypeError, ValueError):
        return None


def signature_contract(cls: type) -> int:
    """The contract version `cls.should_exit` is written for, read from its parameters: 1 where
    they begin with contract 1's names, else the current one."""
    signature = should_exit_signature(cls)
    positional = [p.name for p in (signature.parameters.values() if signature else ())
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    old = CONTRACT_SIGNATURES[1]
    return 1 if tuple(positional[:len(old)]) == old else CONTRACT_VERSION


@dataclasses.dataclass
class StrategyConfig:
    """Base of every strategy's config. Subclasses add fields with `help` metadata and
    validate them in `__post_init__` (raise `ConfigError` with a fix-it message)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __post_init__(self):
        check_config_fields(self)

    def __init_subclass__(cls, **kwargs):
        """Every config checks its fields' types, finiteness and signs too, even one whose own
        `__post_init__` forgets to call ours: values such as epochs = inf fail here, before training."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "_checks_fields", False):
            @functools.wraps(own)
            def post_init(self):
                try:
                    own(self)  # its own messages first: they know the field's meaning best
                except TypeError:  # its check compared a wrong type: say which field, in one line
                    check_config_fields(self)
                    raise
                check_config_fields(self)
            post_init._checks_fields = True
            cls.__post_init__ = post_init


def config_field(default: Any, help: str, *, low: float = 0, **kwargs) -> Any:
    """A dataclass field that carries its help text (shown by the CLI) and, for numbers, the lowest
    value it accepts (0 unless the number means something below zero, like a cosine)."""
    return dataclasses.field(default=default, metadata={"help": help, "low": low}, **kwargs)


@dataclasses.dataclass
class TrainableConfig(StrategyConfig):
    """Config of a strategy that trains: the schedule every trainable strategy shares."""

    epochs: float | None = config_field(3.0, "passes over the training captions")
    batch_size: int = config_field(16, "training batch size (the paper's: 16)")
    learning_rate: float = config_field(1e-4, "Adam learning rate")

    def __post_init__(self):
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"epochs must be positive (got {self.epochs})")
        if self.batch_size < 1 or not self.learning_rate > 0:  # NaN fails too
            raise ConfigError("batch size and learning rate must be positive")


class Strategy:
    """One exit method.

    Subclasses set `name`, `description`, `Config`, and implement `should_exit` (and
    `exit_logits` when the exit has its own read-out).
    A strategy instance is bound to one backend and one list of exit layers.

    The exit knob: `knob` names the config field calibration sweeps (and `--threshold` sets),
    over `knob_grid` unless the user gives a grid. Strategies that train also implement the
    training half of the contract below (`training_modules`, `training_step`, ...); the
    trainer (`earlyexit.training.exits`) and `run` call only these, never a strategy by name.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    knob: ClassVar[str | None] = "threshold"
    knob_grid: ClassVar[tuple] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # the paper's threshold grid
    knob_is_confidence: ClassVar[bool] = False  # the knob is a max-softmax threshold (comparable to `confidence`)
    knob_safer: ClassVar[str] = "higher"  # which way the knob exits less: "higher" or "lower" values
    accepts_gate: ClassVar[bool] = True  # False when the rule must see every exit of every row (PABEE's counter)
    #: The plugin contract the class is written for. Undeclared, it follows the parameters of the
    #: class's own `should_exit` (`exit_index, logits, hidden, context`: 1); the registry adapts a
    #: version-1 class and refuses one newer than `CONTRACT_VERSION` (docs/contract-versions.md).
    contract_version: ClassVar[int] = CONTRACT_VERSION

    def __init__(self, backend: Backend, exit_layers: list[int], config: StrategyConfig | None = None):
        self.backend = backend
        self.config = config if config is not None else self.Config()
        self.exit_layers = self.validate_exit_layers(exit_layers, backend.num_layers)

    def __init_subclass__(cls, **kwargs):
        """Whatever a subclass's constructor builds (fresh classifiers, loss weights, copies of
        layers) lands on the backbone's device and in its dtype once the outermost constructor
        has finished: no strategy has to place its modules itself."""
        super().__init_subclass__(**kwargs)
        if "should_exit" in cls.__dict__ and "contract_version" not in cls.__dict__:
            cls.contract_version = signature_contract(cls)  # the version goes with the rule's own signature
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def __init__(self, *args, **kw):
            init(self, *args, **kw)
            if type(self).__init__ is __init__:  # the outermost constructor, not a super() call
                self.follow_backbone()

        cls.__init__ = __init__

    def follow_backbone(self) -> None:
        """Move every module the strategy declares (exit modules, its own decoder layers, its
        training groups) to the backbone's device and dtype."""
        modules = [self.exit_modules(), self.backbone_layers(), *self.training_modules().values()]
        device, dtype = self.backend.device, self.backend.dtype
        for module in modules:
            if module is not None:
                module.to(device=device, dtype=dtype)

    # -- the knob ------------------------------------------------------------------------------
    def calibration_grid(self) -> tuple:
        """The knob values calibration tries when the user gives none."""
        return tuple(self.knob_grid)

    @property
    def knob_value(self):
        return getattr(self.config, self.knob) if self.knob else None

    def set_knob(self, value) -> None:
        """Set the knob (validated by the config; whole numbers for integer knobs)."""
        if not self.knob:
            raise ConfigError(f"strategy {self.name!r} has no knob to set")
        self.config = self.config_with_knob(self.config, value)

    @classmethod
    def parse_knob(cls, value):
        """`value` as the knob's type (whole numbers for integer knobs such as a patience)."""
        field = next((f for f in dataclasses.fields(cls.Config) if f.name == cls.knob), None)
        if field is None:
            raise ConfigError(f"strategy {cls.name!r} has no threshold or other knob to set")
        if field.type in ("int", int):
            if not float(value).is_integer():
                raise ConfigError(f"{cls.name}'s {cls.knob} is a whole number (got {value})")
            return int(value)
        return value

    @classmethod
    def config_with_knob(cls, config: StrategyConfig, value) -> StrategyConfig:
        return dataclasses.replace(config, **{cls.knob: cls.parse_knob(value)})

    @classmethod
    def default_exit_layers(cls, num_layers: int) -> list[int]:
        """Exits used when none are given: after each quarter of the depth."""
        return sorted({max(1, round(num_layers * q / 4)) for q in (1, 2, 3)} - {num_layers})

    @staticmethod
    def validate_exit_layers(exit_layers: list[int], num_layers: int) -> list[int]:
        """Exit layer `k` means "after the k-th decoder layer" (1-based); the last layer is not an exit."""
        layers = sorted(set(int(k) for k in exit_layers))
        bad = [k for k in layers if not 1 <= k < num_layers]
        if bad:
            raise ConfigError(
                f"exit layers {bad} are out of range: this model has {num_layers} decoder layers, "
                f"so exits must lie in 1..{num_layers - 1}"
            )
        if not layers:
            raise ConfigError("no exit layers given; pass e.g. --exit-layers 3,6,9")
        return layers

    # -- modules -----------------------------------------------------------------------------
    def exit_modules(self) -> torch.nn.Module | None:
        """The modules this strategy adds at its exits for inference (saved in the adapter), or None."""
        return None

    def exit_attention_layer(self, exit_index: int) -> torch.nn.Module | None:
        """A decoder layer of the backbone's kind run on the hidden states at this exit before
        its read-out (FREE's exit transformer), or None. The engine gives it its own cache slot,
        filled with K/V projections of every position that reaches the exit (exact: a layer's
        K/V at a position depend only on its input there), and runs the whole layer only for
        the rows whose state the rule or the emitted logits need."""
        return None

    def exit_transform(self, exit_index: int) -> torch.nn.Module | None:
        """A position-wise module (no attention) applied to the exit's hidden state before its
        read-out, or None. Charged by its parameter count wherever it runs."""
        return None

    def exit_readout(self, exit_index: int) -> torch.nn.Module | None:
        """The exit's own classifier when it has one (charged by its parameter count); None
        means the backbone's shared final norm + LM head."""
        return None

    def teacher_forced_states(self, features) -> list:
        """Every exit's state (after its module) over whole sequences, from
        `exit_training.backbone_features`: what the exit's read-out sees during training."""
        states = []
        for e, k in enumerate(self.exit_layers):
            hidden = features.hidden[k]
            attention = self.exit_attention_layer(e)
            if attention is not None:
                hidden = self.backend.run_layer(attention, hidden, attention_mask=features.mask,
                                                position_ids=features.positions, cache=None)
            transform = self.exit_transform(e)
            states.append(transform(hidden) if transform is not None else hidden)
        return states

    def backbone_layers(self) -> torch.nn.ModuleList | None:
        """The decoder layers generation runs: None for the backbone's own (frozen) layers; a
        strategy that fine-tunes the backbone with its exits (MuE's layer-wise loss, LeeBERT's
        joint training) returns its own trained copies, so the backbone itself stays intact
        (the `full` reference keeps its quality) and the adapter saves the copies."""
        return None

    def vision_saturation(self) -> float | None:
        """A cosine threshold at which the backend stops each image's vision tower early (MuE's
        encoder side), or None to run it in full."""
        return None

    # -- training ----------------------------------------------------------------------------
    @property
    def needs_training(self) -> bool:
        """Whether `run` trains this strategy before calibrating (it has trainable groups)."""
        return bool(self.training_modules())

    @property
    def trains_backbone(self) -> bool:
        """Whether training changes decoder layers (then `backbone_layers` holds them)."""
        return self.backbone_layers() is not None

    #: `training_step` reads the backbone only through `exit_training.backbone_features(backend,
    #: batch)` (the backbone's own frozen layers): the trainer may then compute each batch's
    #: features once and reuse them in later epochs (`exit_training.FeatureCache`)
    reuses_backbone_features = False

    @property
    def held_out_fraction(self) -> float:
        """Share of the training data the trainer keeps aside and hands to `training_step` as
        `held_out` (for meta-parameters learned on held-out data, e.g. LeeBERT's loss weights)."""
        return 0.0

    def training_modules(self) -> dict[str, torch.nn.Module]:
        """Named groups of trainable modules, one optimiser each (e.g. FREE's generator and
        discriminator). Empty: nothing to train. The trainer makes them require grad."""
        return {}

    def training_groups(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        return {group: dict(module.named_parameters()) for group, module in self.training_modules().items()}

    def training_data(self, dataset, progress: bool = True):
        """The data set this strategy trains on, built from the exit-training split (default:
        every reference caption is one item: `Task.training_items`). FREE's distillation and CapFilt
        modes override it."""
        return task_of(dataset).training_items(dataset)

    def training_step(self, batch: dict, engine, held_out: dict | None = None) -> dict[str, float]:
        """One optimisation step on `batch`: compute losses and call `engine.optimize(group,
        loss)` for each group. Returns the step's losses by name."""
        raise NotImplementedError(f"strategy {self.name!r} has nothing to train")

    def adapter_modules(self) -> dict[str, torch.nn.Module]:
        """What the adapter saves, by file stem: the exit modules (what inference needs) and,
        for strategies that fine-tune the backbone, their decoder layers. Training-only modules
        (FREE's feature classifiers, LeeBERT's loss weights) live in checkpoints only."""
        modules = {"exits": self.exit_modules(), "backbone": self.backbone_layers()}
        return {stem: module for stem, module in modules.items() if module is not None}

    def parameter_counts(self) -> dict[str, int]:
        """`trainable`: parameters training updates (every group); `inference`: parameters
        generation adds to the backbone's (exit modules, own read-outs; copies of backbone
        layers replace the backbone's and add none)."""
        trainable = sum(p.numel() for g in self.training_modules().values() for p in g.parameters())
        exits = self.exit_modules()
        return {"trainable": trainable, "inference": sum(p.numel() for p in exits.parameters()) if exits else 0}

    # -- inference ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Called at the start of every generation. Per-row state belongs in `StepContext.state`
        (it follows beam reordering), not on the strategy object."""

    def exit_logits(self, exit_index: int, state: torch.Tensor) -> torch.Tensor:
        """Logits (rows, vocab) from the newest position's state (rows, width) at this exit,
        after the exit's attention layer / transform if it has them. Default: the exit's own
        read-out (`exit_readout`) if it has one, else the backbone's shared head."""
        readout = self.exit_readout(exit_index)
        return readout(state) if readout is not None else self.backend.logits(state)

    def can_leave(self, exit_index: int) -> bool:
        """False where no row can leave at this exit whatever the rule computes (PABEE's counter
        cannot reach the patience at its first exits): `should_exit` still runs there (its state
        moves on) and the engine reads nothing back. Default: True."""
        return True

    def should_exit(self, exit_index: int, view: ExitView, context: StepContext) -> torch.Tensor:
        """Boolean (rows,): which of the rows present at this exit leave here, or a Python bool for
        all of them when the rule decides on the host (then the engine reads nothing back from
        the device, which on a GPU saves a sync per exit). Decide from what is
        cheap first: `view.hidden` (the state after the exit layer, before any exit module),
        `view.previous` (one layer earlier), `context.token` (what earlier exits of this token
        saw) and `context.state` (per-row state across tokens). `view.logits()` runs the exit's
        module and read-out for every row present and is charged for it; rows that leave without
        it get their read-out computed (and charged) for them alone."""
        raise NotImplementedError


class StepContext:
    """What a strategy may look at when deciding: the index of the token being generated (0 for
    the first), per-row `state` that follows beam reordering across tokens, and `token`: a
    scratch dict for the current token that is emptied at every forward (PABEE's last argmax,
    MuE's previous hidden state). Tensors in both are indexed by the batch row; `view.rows`
    says which rows are present at an exit."""

    def __init__(self, step: int, rows: int, state: dict):
        self.step = step
        self.rows = rows
        self.state = state
        self.token: dict = {}


class ExitView:
    """One exit point for the rows still going. Lazily runs the exit's module and read-out (for
    every row present) and remembers that it did, for the engine's accounting."""

    def __init__(self, run, exit_index: int, layer: int, hidden, previous, rows):
        self._run = run
        self.index = exit_index
        self.layer = layer
        self.hidden = hidden  # (rows present, width): the newest position after `layer` layers
        self.previous = previous  # (rows present, width): the same position one layer earlier
        self.rows = rows  # (rows present,) long: their indices in the batch
        self._state = None
        self._logits = None

    def state(self):
        """The exit module's output for every row present (the hidden state when it has none)."""
        if self._state is None:
            self._state = self._run.exit_state(self.index, self.hidden, self.rows)
        return self._state

    def logits(self):
        """The exit's read-out for every row present (charged: module and read-out per row)."""
        if self._logits is None:
            self._logits = self._run.model.exit_logits(self.index, self.state())
        return self._logits

    @property
    def state_computed(self) -> bool:
        return self._state is not None

    @property
    def logits_computed(self) -> bool:
        return self._logits is not None
