"""Few-row linear layers on the CPU: `y = x Wᵀ` as `(W xᵀ)ᵀ` where MKL runs that far faster.

Decoding feeds a language model's linear layers one row per sequence and position. On the CPU
(fp32, MKL through torch), `F.linear` with 2-4 rows takes a path that is slower than with one
row, and one row itself reads the weight at a fraction of the memory bandwidth a two-column
`W @ xᵀ` reaches. Early exits meet exactly those shapes (a batch shrinking as rows leave, a
verification block of a few drafted positions, a few catch-up positions), and so does plain
decoding of one sequence. `benchmarks/small_rows.py` measures both on the machine at hand
(`benchmarks/results/small-rows.json`): for SmolLM2-135M's shapes `W @ xᵀ` takes 0.28-0.86 of
the time at 1-4 rows, and at 5-8 rows only the LM head (49,152 x 576) still gains.

`install(module)` routes every `nn.Linear` inside `module` through `small_row_linear`. It is
installed on a backend's whole model when the backend is made and on every exit module the
engine runs, so the full model the speed-ups are measured against runs the same kernels. It changes
nothing when gradients are on (training), off the CPU, outside fp32, for weights under
`MIN_WEIGHT` elements (where call overhead dominates) or for more rows than the rule takes
(`chooses_transposed`); the result equals `F.linear`'s up to float rounding. EARLYEXIT_SMALL_ROW_MATMUL=0 turns it off.
"""

from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F

from earlyexit.errors import ConfigError

ENV = "EARLYEXIT_SMALL_ROW_MATMUL"
MIN_WEIGHT = 1 << 17  # elements; 576 x 576 qualifies, the embedded tiny model's 128-wide layers do not
MIN_WEIGHT_ONE_ROW = 1 << 18  # one row pays for pairing it with itself only on larger weights
MAX_SINGLE_ROW_INPUT = 2048  # one row: measured slower with 3,072 input features (OPT-125m's fc2)
MAX_ROWS = 4
MAX_ROWS_HEAD = 8  # for read-outs of at least HEAD_WEIGHT elements (a vocabulary-sized head)
HEAD_WEIGHT = 1 << 24


def enabled() -> bool:
    setting = os.environ.get(ENV, "1").strip().lower()
    if setting not in ("0", "1", "false", "true", "off", "on"):
        raise ConfigError(f"{ENV}={setting!r}: use 1 (the default) or 0 to turn the few-row CPU matmul off")
    return setting in ("1", "true", "on")


def chooses_transposed(weight: torch.Tensor, rows: int) -> bool:
    """Whether a linear with `weight` on `rows` rows runs as `W @ xᵀ` (see the module's doc)."""
    size = weight.numel()
    if size < MIN_WEIGHT or weight.device.type != "cpu" or weight.dtype is not torch.float32:
        return False
    if rows == 1:
        return size >= MIN_WEIGHT_ONE_ROW and weight.shape[1] <= MAX_SINGLE_ROW_INPUT
    return 1 < rows <= (MAX_ROWS_HEAD if size >= HEAD_WEIGHT else MAX_ROWS)


def small_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, computed as `(weight @ xᵀ)ᵀ` when `chooses_transposed` says so.
    The cheap checks come first: this runs for every linear layer of every step."""
    if weight.numel() >= MIN_WEIGHT and not torch.is_grad_enabled() and x.dtype is weight.dtype:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if rows <= MAX_ROWS_HEAD and chooses_transposed(weight, rows):
            # row-major rows in, row-major rows out: MKL's fast case is `W @ (row-major x)ᵀ`, and a
            # transposed result would hand the next layer column-major rows (measured 3x slower)
            flat = x.reshape(rows, x.shape[-1]).contiguous()
            if rows == 1:  # one column would take the slow matrix-vector path again: pair it with itself
                out = torch.mm(weight, torch.cat([flat, flat]).t())[:, :1].t().contiguous()
            else:
                out = torch.mm(weight, flat.t()).t().contiguous()
            if bias is not None:
                out = out + bias
            return out.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` for a weight that is no `nn.Linear` (a gathered slice of the head), following
    EARLYEXIT_SMALL_ROW_MATMUL like `install`."""
    return small_row_linear(x, weight, bias) if enabled() else F.linear(x, weight, bias)


class _Route:
    """A routed layer's `forward`: `small_row_linear` on the layer's own weights. It holds the layer
    weakly: a bound method stored on the layer would tie the layer to itself in a cycle, which
    frees the weights only at the next pass of the cyclic collector."""

    def __init__(self, layer: torch.nn.Linear):
        self.layer = weakref.ref(layer)

    def __call__(self, x):
        layer = self.layer()
        return small_row_linear(x, layer.weight, layer.bias)

    def __deepcopy__(self, memo):  # a copied model's route reads the copy's weights
        layer = self.layer()
        return _Route(memo.get(id(layer), layer))

    def __reduce__(self):  # pickled with its layer (pickle's memo resolves the loop)
        return _Route, (self.layer(),)


def install(module: torch.nn.Module) -> int:
    """Route every `nn.Linear` of at least MIN_WEIGHT elements in `module` through
    `small_row_linear` (idempotent); returns how many it routed. A no-op when
    EARLYEXIT_SMALL_ROW_MATMUL=0."""
    if module is None or not enabled():
        return 0
    routed = 0
    for layer in module.modules():
        # layers too small to ever gain keep their own forward: no extra call on their hot path
        if type(layer) is torch.nn.Linear and "forward" not in vars(layer) and layer.weight.numel() >= MIN_WEIGHT:
            layer.forward = _Route(layer)
            routed += 1
    return routed


def uninstall(module: torch.nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear) and isinstance(vars(layer).get("forward"), _Route):
            del layer.forward
