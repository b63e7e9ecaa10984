"""Host syncs in the decode loop: what makes a GPU wait for Python.

`SyncCounter` patches every tensor method that hands a tensor's value to the host (`item`,
`tolist`, `cpu`, `numpy`, `bool`/`int`/`float`/`index` conversions, `nonzero`, `torch.equal`,
reading or writing through a boolean mask, one-argument `torch.where`, `unique`,
`masked_select`, `repeat_interleave` with tensor repeats): on a GPU each of them waits for every
kernel launched before it. On this CPU-only machine they cost nothing, but the same Python code
runs, so counting the calls counts the syncs a GPU run makes (a sync hidden inside one C++ op is
not seen; none of the engine's ops has one). `count_decode_syncs` counts per decode forward (the
engine's), in the rest of transformers' loop, and after it (the trace); the prompt pass is not
counted.

What remains, and why it is needed (`launch_decisions`):
- transformers' loop: one per token (`unfinished_sequences.max() == 0`, its stopping check),
  and beam search's two when it crops its outputs at the end;
- the engine, per forward with exits on and several rows: one read of which rows are still
  going (finished rows run nothing) and, under `catchup`, how wide each layer's block is (the
  positions it must catch up): the shapes of the first layers' launches. None for a lone row:
  transformers stops when it ends, and the host follows its cache itself;
- per exit visited: one read of which rows leave (the deeper layers then run on the others
  only, never on a row that left); none where the rule decides on the host (`fixed`) or where
  nobody can leave (`Strategy.can_leave`: PABEE's and LeeBERT's first exits, whose counters
  cannot reach the patience); under the gate's `filter` mode one read of how many candidates it
  has (the batch of the exit's module and read-out), then, only if it has some, one of how many
  of them leave.
Nothing else: no trace copies, logging or bookkeeping reads while decoding; the trace is copied
to the host once, after transformers' loop.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import gc
import pickle
import traceback
import weakref

import pytest
import torch
import transformers
from helpers import make_backend, make_images, no_eos

from earlyexit.core import kernels
from earlyexit.core.engine import EarlyExitForCausalLM
from earlyexit.core.gates import CosineGate, LearnedGate

METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
           "unique", "masked_select", "__format__")
FUNCTIONS = ("equal", "nonzero", "unique", "masked_select", "argwhere", "allclose")


class SyncCounter:
    """Counts device-to-host reads by phase; `phase` is set by the caller. `stacks` keeps where
    each read came from (for the report when a bound is broken)."""

    def __init__(self):
        self.phase = None
        self.counts = collections.Counter()
        self.stacks = collections.defaultdict(list)
        self.active = True

    def note(self, what):
        if self.phase is None or not self.active:
            return
        self.active = False  # a counted call that calls another counts once
        try:
            self.counts[self.phase] += 1
            self.stacks[self.phase].append((what, "".join(traceback.format_stack(limit=8)[:-2])))
        finally:
            self.active = True

    def wrap(self, what, original, check=None):
        counter = self

        def counted(*args, **kwargs):
            if counter.active and (check is None or check(*args, **kwargs)):
                counter.note(what)
                counter.active = False
                try:
                    return original(*args, **kwargs)
                finally:
                    counter.active = True
            return original(*args, **kwargs)

        return counted

    @contextlib.contextmanager
    def patched(self):
        saved = []
        try:
            for name in METHODS:
                saved.append((torch.Tensor, name, getattr(torch.Tensor, name)))
                setattr(torch.Tensor, name, self.wrap(name, getattr(torch.Tensor, name)))
            for name in FUNCTIONS:
                saved.append((torch, name, getattr(torch, name)))
                setattr(torch, name, self.wrap(f"torch.{name}", getattr(torch, name)))
            saved.append((torch.Tensor, "__getitem__", torch.Tensor.__getitem__))
            torch.Tensor.__getitem__ = self.wrap("mask indexing", torch.Tensor.__getitem__, _bool_index)
            saved.append((torch.Tensor, "__setitem__", torch.Tensor.__setitem__))
            torch.Tensor.__setitem__ = self.wrap("mask assignment", torch.Tensor.__setitem__,
                                                 lambda tensor, index, value: _bool_index(tensor, index))
            saved.append((torch, "where", torch.where))
            torch.where = self.wrap("torch.where(condition)", torch.where, lambda *args, **kwargs: len(args) == 1)
            saved.append((torch.Tensor, "repeat_interleave", torch.Tensor.repeat_interleave))
            torch.Tensor.repeat_interleave = self.wrap("repeat_interleave", torch.Tensor.repeat_interleave,
                                                       lambda self, repeats, *a, **k: torch.is_tensor(repeats))
            yield self
        finally:
            for owner, name, original in reversed(saved):
                setattr(owner, name, original)


def _bool_index(tensor, index):
    parts = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(p) and p.dtype is torch.bool for p in parts)


def test_the_counter_sees_each_kind_of_read_once_and_nothing_else():
    t = torch.arange(4)

    def assign_through_a_mask():
        u = t.clone()
        u[t > 1] = 0
    reads = [lambda: t[0].item(), lambda: t.tolist(), lambda: t.cpu(), lambda: t.numpy(), lambda: bool(t[0]),
             lambda: int(t[1]), lambda: float(t[1]), lambda: range(t[1]), lambda: t.nonzero(), lambda: t[t > 1],
             assign_through_a_mask, lambda: torch.where(t > 1), lambda: torch.equal(t, t),
             lambda: t.unique(), lambda: t.masked_select(t > 1), lambda: t.repeat_interleave(t)]
    device_only = [lambda: t + 1, lambda: t[1:], lambda: t[torch.tensor([0, 1])], lambda: torch.where(t > 1, t, 0),
                   lambda: t.clone().index_fill_(0, torch.tensor([1]), 7), lambda: (t > 1).sum(), lambda: t.repeat_interleave(2)]
    counter = SyncCounter()
    with counter.patched():
        for i, read in enumerate(reads + device_only):
            counter.phase = i
            read()
    assert [counter.counts[i] for i in range(len(reads))] == [1] * len(reads)
    assert sum(counter.counts[len(reads) + i] for i in range(len(device_only))) == 0


def count_decode_syncs(model, inputs, counter=None, **settings):
    """Count the host reads of one `generate`: `forwards`, one count per decode forward (the
    engine's own); `loop`, the rest of transformers' decode loop (its token choice and stopping
    check, every token); `after`, between the end of transformers' loop and the return of
    `generate` (the trace). The prompt pass is not counted (it runs once)."""
    counter = counter or SyncCounter()
    forwards = []
    forward, loop = EarlyExitForCausalLM.forward, transformers.GenerationMixin.generate

    def counted_forward(self, *args, **kwargs):
        prefill = counter.phase is None
        counter.phase = None if prefill else "forward"
        try:
            return forward(self, *args, **kwargs)
        finally:
            if not prefill:
                forwards.append(counter.counts.pop("forward", 0))
            counter.phase = "loop"

    def counted_loop(self, *args, **kwargs):
        try:
            return loop(self, *args, **kwargs)
        finally:
            counter.phase = "after"

    with counter.patched(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(EarlyExitForCausalLM, "forward", counted_forward)
        patch.setattr(transformers.GenerationMixin, "generate", counted_loop)
        model.generate(**inputs, **settings)
    counter.phase = None
    return forwards, counter


class GateLog:
    """Whether a gate had candidates, per call (read with the counter paused: the test's own reads)."""

    def __init__(self, gate, counter):
        self.calls = []
        decide = gate.decide

        def logged(exit_index, view):
            passed = decide(exit_index, view)
            counter.active = False
            self.calls.append(bool(passed) if isinstance(passed, bool) else bool(passed.any()))
            counter.active = True
            return passed

        gate.decide = logged


# -- the cases: every built-in strategy, with and without gates, every kv policy ------------------
EXITS = (1, 2, 3, 4, 5)
STRATEGIES = {  # untrained, on `backend` below: knob values at which rows leave at several depths
    "confidence": {"threshold": 0.2},
    "deebert": {"entropy": 3.0},
    "fixed": {"every": 2},
    "free": {"threshold": 0.2},
    "leebert": {"patience": 1},
    "mue": {"gamma": 0.7},
    "pabee": {"patience": 1},
}
GATES = {
    "none": lambda: None,
    "cosine-replace": lambda: CosineGate(threshold=0.7, mode="replace"),
    "cosine-filter": lambda: CosineGate(threshold=0.7, mode="filter"),
    "learned-replace": lambda: _learned("replace"),
    "learned-filter": lambda: _learned("filter"),
}
HOST_RULES = ("fixed",)  # decide on the host: nothing to read back


def _learned(mode):
    torch.manual_seed(0)
    return LearnedGate(32, len(EXITS), threshold=0.5, mode=mode)


def accepts_gate(name):
    return name not in ("pabee", "leebert", "mue")  # their rules must see every exit (`accepts_gate`)


POLICIES = ("catchup", "propagate", "skip")
# every strategy under every policy, greedy and beam search; every gate greedy under catchup, and a
# filter gate (the most reads) under every policy with beams too
CASES = ([(name, "none", policy, beams) for name in STRATEGIES for policy in POLICIES for beams in (1, 3)]
         + [(name, gate, "catchup", 1) for name in STRATEGIES for gate in GATES if gate != "none" and accepts_gate(name)]
         + [(name, "cosine-filter", policy, 3) for name in STRATEGIES for policy in POLICIES if accepts_gate(name)]
         + [("full", "none", policy, beams) for policy in POLICIES for beams in (1, 3)])
LONE = [(name, "none", policy, 0) for name in ("confidence", "pabee") for policy in POLICIES]  # one row


@pytest.fixture(scope="module")
def backend():
    return make_backend(seed=11, num_layers=6, init_std=0.3)


def build(registry, backend, name, gate, policy):
    """`gate`: a name in GATES, or a gate."""
    if name == "full":
        return EarlyExitForCausalLM(backend, kv_policy=policy)
    cls = registry.strategy(name)
    exits = [2] if name == "fixed" else list(EXITS)
    strategy = cls(backend, exits, cls.Config(**STRATEGIES[name]))
    return EarlyExitForCausalLM(backend, strategy, kv_policy=policy,
                                gate=GATES[gate]() if isinstance(gate, str) else gate)


def launch_decisions(model, name, records, candidates, rows):
    """The reads each decode forward needs (see the module's doc): one at its start when exits are
    on; per exit visited, one for the rows that leave unless the rule decides on the host, and
    under a filter gate one for its candidates, then the rule's verdict only if it had some."""
    gate, offered = model.gate, iter(candidates)
    needed = []
    for record in records:
        count = 0 if model.strategy is None or rows == 1 else 1
        for visit in record.exits:
            if gate is None:
                count += 0 if name in HOST_RULES or not model.strategy.can_leave(visit.index) else 1
            elif gate.mode == "replace":
                count += 1
            else:
                count += 1 + next(offered)
        needed.append(count)
    return needed


@pytest.mark.parametrize("name,gate,policy,beams", CASES + LONE)
def test_decode_loop_reads_back_only_launch_decisions(registry, backend, monkeypatch, name, gate, policy, beams):
    from earlyexit.core import engine

    monkeypatch.setattr(engine, "STACKED_KV_BYTES", 0 if beams > 1 else engine.STACKED_KV_BYTES)  # both propagate paths
    model = build(registry, backend, name, gate, policy)
    counter = SyncCounter()
    log = GateLog(model.gate, counter) if model.gate is not None else None
    rows = 1 if beams == 0 else 2  # beams 0: one row, greedy
    beams = max(beams, 1)
    inputs = backend.prepare_inputs(make_images(rows), ["a red circle", "two"][:rows])
    tokens = 6
    forwards, counter = count_decode_syncs(model, inputs, counter, max_new_tokens=tokens, do_sample=False,
                                           num_beams=beams, **no_eos(backend))
    records = model.last_cache.steps[1:]
    assert len(forwards) == len(records) == tokens - 1
    if name != "full":
        assert sum(len(r.exits) for r in records) >= tokens - 1  # exits were visited and decided
    needed = launch_decisions(model, name, records, log.calls if log else [], rows * beams)
    where = "\n".join(f"{what}\n{stack}" for what, stack in counter.stacks["forward"][:8])
    assert all(f <= n for f, n in zip(forwards, needed)), f"reads per forward {forwards}, needed {needed}:\n{where}"
    # transformers' loop: its stopping check once per token (beam search crops its outputs once at the end)
    assert counter.counts["loop"] <= tokens + (2 if beams > 1 else 0), counter.stacks["loop"]
    assert counter.counts["after"] <= 1, counter.stacks["after"]  # the trace: one copy
    cache = model.last_cache
    if rows * beams == 1 and policy == "catchup":  # what the host followed is what the device holds
        assert cache.held_host == cache.held[0].tolist()


def test_exits_off_read_nothing_back(registry, backend):
    model = build(registry, backend, "full", "none", "catchup")
    inputs = backend.prepare_inputs(make_images(2), ["a red circle", "two"])
    forwards, _ = count_decode_syncs(model, inputs, max_new_tokens=4, do_sample=False)
    assert forwards == [0, 0, 0]


def test_a_gate_that_never_fires_costs_a_filter_one_read_per_exit(registry, backend):
    """A filter gate without candidates: one read (the candidates), none for the rule."""
    gate = LearnedGate(32, len(EXITS), threshold=0.5, mode="filter")
    with torch.no_grad():
        for scorer in gate.scorers:
            scorer[-1].bias.fill_(-100.0)  # every score far below the threshold
    model = build(registry, backend, "confidence", gate, "catchup")
    inputs = backend.prepare_inputs(make_images(2), ["a red circle", "two"])
    forwards, _ = count_decode_syncs(model, inputs, max_new_tokens=4, do_sample=False, **no_eos(backend))
    assert forwards == [1 + len(EXITS)] * 3
    assert (model.last_trace.exit_layers == 6).all()


# -- timing: the clock is read when the device has finished ------------------------------------------
def test_synchronize_waits_on_cuda_only(monkeypatch):
    from earlyexit.core import generation

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    generation.synchronize("cpu")
    generation.synchronize(torch.device("cpu"))
    assert waited == []
    generation.synchronize("cuda:0")
    assert waited == [torch.device("cuda:0")]


def test_timed_warms_up_and_reads_the_clock_after_a_sync(monkeypatch):
    """The events `timed` sees, in order: warm-up calls (untimed, no stamp), a sync before the
    first clock read, a sync before the prompt/decode stamp, a sync before the last clock read."""
    from earlyexit.core import generation

    events, clock = [], iter(range(100))
    monkeypatch.setattr(generation, "synchronize", lambda device: events.append(("sync", torch.device(device).type)))
    monkeypatch.setattr(generation.time, "perf_counter", lambda: events.append("clock") or float(next(clock)))

    def generate(input_ids, max_new_tokens, logits_processor=None):
        events.append("generate" if logits_processor is None else "timed generate")
        if logits_processor is not None:
            scores = torch.zeros(1, 4)
            for _ in range(max_new_tokens):  # the prompt pass's token, then the decode steps'
                events.append("token")
                logits_processor[0](input_ids, scores)
        return input_ids

    inputs = {"input_ids": torch.ones(1, 3, dtype=torch.long)}
    sequences, seconds, prompt = generation.timed(generate, inputs, {"max_new_tokens": 3}, warmup=2)
    assert torch.equal(sequences, inputs["input_ids"])
    assert events == ["generate", "generate", ("sync", "cpu"), "clock", "timed generate",
                      "token", ("sync", "cpu"), "clock", "token", "token", ("sync", "cpu"), "clock"]
    assert (seconds, prompt) == (2.0, 1.0)  # the clock read 0 at the start, 1 at the stamp, 2 at the end


def test_timed_on_the_engine_gives_the_untimed_tokens(registry, backend):
    from earlyexit.core.generation import timed

    model = build(registry, backend, "confidence", "none", "catchup")
    inputs = backend.prepare_inputs(make_images(2), ["a red circle", "two"])
    settings = dict(max_new_tokens=4, do_sample=False, **no_eos(backend))
    expected = model.generate(**inputs, **settings)
    sequences, seconds, prompt = timed(model.generate, inputs, settings, warmup=1)
    assert torch.equal(sequences, expected)
    assert 0 < prompt < seconds


# -- buffers freed by reference counting --------------------------------------------------------------
@contextlib.contextmanager
def no_cyclic_collector():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_cache_buffers_are_freed_when_the_last_reference_goes(registry, backend):
    model = build(registry, backend, "free", "none", "catchup")  # FREE: exit slots besides the layers'
    inputs = backend.prepare_inputs(make_images(2), ["a red circle", "two"])
    with no_cyclic_collector():
        model.generate(**inputs, max_new_tokens=4, do_sample=False, num_beams=2, **no_eos(backend))
        cache = model.last_cache
        buffers = [weakref.ref(t) for t in (cache.keys, cache.values, cache.pending, cache.positions)]
        slot = weakref.ref(cache.layers[0])
        assert all(b() is not None for b in buffers)
        model.last_cache = None
        del cache
        assert slot() is None
        assert all(b() is None for b in buffers), "the cache's buffers outlived it: a reference cycle"


def test_routed_linear_layers_are_freed_when_the_last_reference_goes():
    with no_cyclic_collector():
        layer = torch.nn.Linear(512, 512)
        assert kernels.install(layer) == 1
        weight = weakref.ref(layer.weight)
        x = torch.randn(2, 512)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        del layer
        assert weight() is None, "the routed layer outlived its last reference: a reference cycle"


def test_copies_of_a_cache_and_of_a_routed_layer_use_their_own_tensors():
    cache = filled_cache(rows=3)
    twin = copy.deepcopy(cache)
    twin.keys.add_(1)
    assert torch.equal(twin.layers[2].keys, twin.keys[2]) and not torch.equal(cache.layers[2].keys, twin.keys[2])
    layer = torch.nn.Linear(512, 512)
    kernels.install(layer)
    restored = pickle.loads(pickle.dumps(layer))
    with torch.no_grad():
        restored.weight.mul_(2)
        x = torch.randn(2, 512)
        torch.testing.assert_close(restored(x), torch.nn.functional.linear(x, restored.weight, restored.bias))


# -- beam reordering: one gather ------------------------------------------------------------------------
def filled_cache(rows: int):
    from earlyexit.core.cache import EarlyExitCache

    torch.manual_seed(0)
    cache = EarlyExitCache(4, num_layers=3)
    cache.reserve(rows, 5, torch.device("cpu"), 8, torch.float32)
    cache.layers[0].lazy_initialization(torch.empty(rows, 2, 5, 4), torch.empty(rows, 2, 5, 4))
    for name in ("keys", "values", "pending"):
        getattr(cache, name).normal_()
    cache.held.random_(0, 6)
    cache.positions.random_(0, 6)
    cache.strategy_state["counter"] = torch.arange(rows)
    return cache


def test_beam_reordering_gathers_once_and_equals_the_old_double_copy():
    cache, beams = filled_cache(rows=4), torch.tensor([2, 2, 0, 3])
    keys, values, pending = cache.keys.clone(), cache.values.clone(), cache.pending.clone()
    cache.reorder_cache(beams)
    # the old way: rows to the front, select, back, and a second copy to make it contiguous
    assert torch.equal(cache.keys, keys.transpose(0, 1).index_select(0, beams).transpose(0, 1).contiguous())
    assert torch.equal(cache.values, values.transpose(0, 1).index_select(0, beams).transpose(0, 1).contiguous())
    assert cache.keys.is_contiguous() and cache.values.is_contiguous()
    assert torch.equal(cache.pending, pending[beams])
    assert cache.strategy_state["counter"].tolist() == [2, 2, 0, 3]
    assert torch.equal(cache.layers[1].keys, cache.keys[1])  # the slots view the new buffer
    cache.batch_repeat_interleave(2)
    assert cache.rows == 8 and torch.equal(cache.keys[:, 0], cache.keys[:, 1])
    cache.batch_select_indices(torch.tensor([0, 7]))
    assert cache.rows == 2 and torch.equal(cache.keys[:, 1], keys[:, 3])
