"""How decode matmuls run on this CPU: weight layout and small-row padding, measured at start-up.

A decode step multiplies a few rows (one per sequence, plus pending deferred-fill tokens) by every
weight matrix; it should cost about one read of the weights whatever the row count. CPU BLAS does
not always get there, and where it falls short differs by CPU and BLAS. On an AMD EPYC with torch
2.13's MKL, reading 30 layers of SmolLM2 weights through `F.linear`:
- one row ran at a third of the memory bandwidth a plain sum reaches; with the same weights stored
  column-major (so BLAS reads them as a non-transposed operand) the LM head took half the time
  at 1-3 rows (9.9 -> 5.1 ms at one row) and the decoder layers 14-20% less, but more at 8 rows;
- 2 or 3 rows cost 2-3 reads (a full-depth step at batch 3 was slower than at batch 8), while 5 to
  8 rows ran near one read: padding such a matmul with zero rows up to a fast count gives the same
  results for the real rows, and a weight-read-bound step does not notice the padded arithmetic.
So the engine measures both layouts over the model's own weights (`plan`), and pads only the row
counts where that measurement says a larger count is faster (`choose_padding`).

oneDNN has a third layout: the weight reordered once into its blocked form (`pack`), which
`F.linear` cannot keep (for bf16 it redoes the reorder on every call). On an AMD EPYC with AVX2
only (no AVX-512) SmolLM2's 30 layers of fp32 weights took 23 ms at one row, 24 at two and 34 at eight
(column-major through MKL: 27, 39 and 52; the plain sum of the same bytes ran at about the same
rate as the packed one-row pass), and the same within 8% at 64-512 rows (prefill). With bf16 on a
2-core Xeon with AMX, 30 layers took 21.9 ms at one row unpacked, slower than fp32's 17.2, and 15.8
at one row and 15.0 at eight packed. `plan` measures that layout too wherever it exists, and
`choose` weighs the three alike.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 8  # row counts probed and padded to; beyond it every BLAS we met is on its fast path


@dataclass(slots=True)
class MatmulPlan:
    col_major: bool = False  # weights stored transposed: BLAS reads them as a non-transposed operand
    pad_to: dict[int, int] = field(default_factory=dict)  # row count -> row count to run it as
    packed: bool = False  # weights reordered once into oneDNN's blocked layout (CPU), no padding
    int8_rows: int = 0  # row counts up to this run on the matrix's int8 copy (the LM head under int8_weights)

    def to_dict(self) -> dict:
        return {"col_major": self.col_major, "packed": self.packed, "int8_rows": self.int8_rows,
                "pad_to": {str(k): v for k, v in sorted(self.pad_to.items())}}


def col_major(w: torch.Tensor) -> torch.Tensor:
    """The same [out, in] matrix, stored column-major."""
    return w.t().contiguous().t()


def packable(w: torch.Tensor) -> bool:
    """An fp32 weight on a CPU with oneDNN, or a bf16 one where oneDNN has bf16 matmul kernels."""
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack(w: torch.Tensor) -> torch.Tensor:
    """[out, in] weight -> the same matrix in oneDNN's blocked layout (an opaque tensor), laid out
    for up to MAX_ROWS rows; any row count multiplies through it exactly as through `F.linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), MAX_ROWS)


def packed_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def choose_padding(times: dict[int, float], margin: float = 0.85) -> dict[int, int]:
    """Row count -> row count to run it as: the fastest count at or above it, taken only when it
    costs under `margin` of the count itself (measurements are noisy; a near tie is not worth it)."""
    plan = {}
    for m, t in times.items():
        best = min((n for n in times if n >= m), key=lambda n: (times[n], n))
        if times[best] < margin * t:
            plan[m] = best
    return plan


def padded_times(times: dict[int, float], margin: float = 0.85) -> dict[int, float]:
    """What each row count costs once padded as `choose_padding` says."""
    pad = choose_padding(times, margin)
    return {m: times[pad.get(m, m)] for m in times}


def choose(row_major: dict[int, float], col: dict[int, float], packed: dict[int, float] | None = None,
           margin: float = 0.8) -> MatmulPlan:
    """The layout whose worst row count, once padded (a packed weight is not), is least slower than
    the best layout at that count: neither batch 1 nor a full batch may lose much. Another layout
    than row-major (the weights as loaded) only when its worst case is under `margin` of row-major's."""
    padded = {"row": padded_times(row_major), "col": padded_times(col)}
    if packed is not None:
        padded["packed"] = packed
    best = {m: min(p[m] for p in padded.values()) for m in row_major}
    worst = {k: max(p[m] / best[m] for m in p) for k, p in padded.items()}
    alt = min((k for k in padded if k != "row"), key=worst.get)
    if worst[alt] >= margin * worst["row"]:
        return MatmulPlan(False, choose_padding(row_major))
    return MatmulPlan(packed=True) if alt == "packed" else MatmulPlan(True, choose_padding(col))


@torch.inference_mode()
def measure(weights: list[torch.Tensor], max_rows: int = MAX_ROWS, rounds: int = 3, mm=F.linear,
            dtype: torch.dtype | None = None) -> dict[int, float]:
    """Seconds per pass of `mm(x, w)` over every weight in `weights`, for 1..max_rows rows of `dtype`
    (default: the weights'): the fastest of `rounds`. Pass more weight than the caches hold: the slow
    paths show only when the weights come from memory, as in a decode step."""
    best = {m: float("inf") for m in range(1, max_rows + 1)}
    for _ in range(rounds):
        for m in best:
            xs = {k: torch.randn(m, k, dtype=dtype or weights[0].dtype, device=weights[0].device)
                  for k in {w.shape[1] for w in weights}}
            t0 = time.perf_counter()
            for w in weights:
                mm(xs[w.shape[1]], w)
            best[m] = min(best[m], time.perf_counter() - t0)
    return best


def plan(weights: list[torch.Tensor], may_pack: bool = True) -> MatmulPlan:
    """Measure these (row-major) weights in each layout and `choose`: row- and column-major, and
    packed where they can be (`packable`, and `may_pack`)."""
    row, col = measure(weights), measure([col_major(w) for w in weights])
    packed = None
    if may_pack and packable(weights[0]):
        packed = measure([pack(w) for w in weights], mm=packed_linear)
    return choose(row, col, packed)


def choose_int8_rows(int8: dict[int, float], dense: dict[int, float], margin: float = 0.9) -> int:
    """The largest row count up to which the int8 copy beats the dense plan (padded) at every count:
    torch's int8-weight kernel reads half of bf16's bytes, but on the CPUs we measured its time grows
    with the rows from about 4 on, where oneDNN's bf16 stays near one weight read."""
    rows = 0
    for m in sorted(int8):
        if int8[m] >= margin * dense[m]:
            break
        rows = m
    return rows


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pad_to: dict[int, int]) -> torch.Tensor:
    """F.linear, with x's rows (all dims but the last) padded with zeros to `pad_to[rows]` when present."""
    rows = x.numel() // x.shape[-1]
    to = pad_to.get(rows)
    if to is None:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    flat = torch.cat([flat, flat.new_zeros(to - rows, flat.shape[1])])
    return F.linear(flat, weight, bias)[:rows].reshape(*x.shape[:-1], weight.shape[0])


class PlannedLinear(nn.Module):
    """An nn.Linear's own weight and bias, multiplied through `linear` under its plan's padding, or
    through oneDNN when its weight is packed."""

    def __init__(self, base: nn.Linear, pad_to: dict[int, int]):
        super().__init__()
        self.weight, self.bias, self.pad_to = base.weight, base.bias, pad_to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.is_mkldnn:
            return packed_linear(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias, self.pad_to)


class Int8Linear(nn.Module):
    """Weight-only int8: each output channel's weights as int8 with one scale (its max |w| / 127);
    the input keeps its dtype (bf16) and torch's int8-weight kernel scales as it reads, so a decode
    step reads half the bytes of bf16 weights. Plans leave it alone: it has its own kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-12) / 127
        self.weight = nn.Parameter(torch.round(w / scale[:, None]).to(torch.int8), requires_grad=False)
        self.scale = nn.Parameter(scale.to(weight.dtype), requires_grad=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scale)
        y = y.reshape(*x.shape[:-1], self.weight.shape[0])
        return y if self.bias is None else y + self.bias


def plan_int8_rows(q: Int8Linear, dense: torch.Tensor, dense_plan: MatmulPlan) -> int:
    """`choose_int8_rows` for `q`, an int8 copy of a weight whose first rows are `dense`, measured on
    those rows in both forms (the dense one in `dense_plan`'s layout and padding)."""
    n = dense.shape[0]
    int8 = measure([q.weight[:n]], dtype=dense.dtype,
                   mm=lambda x, w: torch.ops.aten._weight_int8pack_mm(x, w, q.scale[:n]))
    if dense_plan.packed:
        return choose_int8_rows(int8, measure([pack(dense)], mm=packed_linear))
    times = measure([col_major(dense) if dense_plan.col_major else dense])
    return choose_int8_rows(int8, {m: times[dense_plan.pad_to.get(m, m)] for m in times})


def quantize_int8(module: nn.Module) -> None:
    """Every linear layer inside `module` becomes an Int8Linear."""
    for name, child in module.named_children():
        if type(child) is nn.Linear or isinstance(child, PlannedLinear):
            setattr(module, name, Int8Linear(child.weight, child.bias))
        else:
            quantize_int8(child)


def apply(module: nn.Module, plan: MatmulPlan) -> None:
    """Put every linear layer inside `module` under `plan`: an nn.Linear becomes a PlannedLinear over
    the same parameters; each takes the plan's padding and stores its weight in the plan's layout."""
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            child = PlannedLinear(child, plan.pad_to)
            setattr(module, name, child)
        if isinstance(child, PlannedLinear):
            child.pad_to = plan.pad_to
            if plan.packed:  # an opaque tensor: a new parameter, not new data for the old one
                if not child.weight.is_mkldnn:
                    child.weight = nn.Parameter(pack(child.weight.data), requires_grad=False)
            else:
                if child.weight.is_mkldnn:
                    child.weight = nn.Parameter(child.weight.to_dense(), requires_grad=False)
                child.weight.data = col_major(child.weight.data) if plan.col_major else child.weight.data.contiguous()
        else:
            apply(child, plan)
