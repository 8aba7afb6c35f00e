"""Block math of the sharded soft-target cross-entropy (``sharded_soft_ce``): class blocks of the
logits [M, width] in one reused buffer, their exp and rescaling in >= fp32, and the compute dtype.

Shape legend: M = rows of the global batch, width = classes of one block, n_local = classes of
this rank, C = logit chunk rows.
"""

from __future__ import annotations

from typing import Optional

import torch

_LIFT_ELEMS = 1 << 20  # low-precision logits: at least this many elements lifted to fp32 at a time


def in_block(ids: torch.Tensor, hit: torch.Tensor, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which rows' target (local class id ``ids``, on this rank where ``hit``) lies in the class
    block [c0, c1), and its column in the block (clamped into it for the other rows, whose
    contribution is masked to 0). Masks instead of index lists: no host sync on a GPU."""
    return hit & (ids >= c0) & (ids < c1), (ids - c0).clamp(0, c1 - c0 - 1)


def block_width(chunk: int, m_rows: int, n_local: int) -> int:
    """Classes per block so that a block [M, width] holds at most ``chunk`` x n_local elements."""
    if chunk >= m_rows or n_local == 0:
        return max(n_local, 1)
    return max(1, chunk * n_local // m_rows)


def block_logits(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], flat: torch.Tensor) -> torch.Tensor:
    """Logits [M, width] of a class block in x's (the compute) dtype, written into the contiguous
    buffer ``flat`` (no allocation per block; wider master weights are cast block by block)."""
    out = flat.view(x.shape[0], w.shape[0])
    torch.mm(x, w.to(x.dtype).t(), out=out)
    return out if b is None else out.add_(b.to(x.dtype))


def fast_right_operand(wc: torch.Tensor) -> torch.Tensor:
    """``wc`` laid out for ``gz @ wc`` (a reduction over all of the block's classes). CPU bf16
    GEMMs with a row-major right operand and a long reduction fall off oneDNN's fast path
    (measured 40x slower than a column-major copy at 64 x 100k x 192); GPUs take either layout."""
    if wc.device.type == "cpu" and wc.dtype == torch.bfloat16:
        return wc.t().contiguous().t()
    return wc


def exp_rows_(z: torch.Tensor, shift: torch.Tensor, minus: float = 0.0, want_sum: bool = False):
    """In place ``z <- exp(z - shift[:, None]) - minus``; with ``want_sum`` returns the row sums
    of exp(z - shift) [M] in shift's dtype (>= fp32).

    z in shift's dtype: plain in-place ops. Lower-precision z (bf16 logits): row slices are
    lifted to shift's dtype (``_lift_rows``), so the only rounding is the final store (relative
    2^-9). Rounding z - shift to bf16 before the exp would put up to 2^-9 * |z - shift|
    (|z - lse| ~ log N = 14 at N = 1.28M) into the exponent: ~3 % error on p.
    """
    if z.dtype == shift.dtype:
        z.sub_(shift[:, None]).exp_()
        sums = z.sum(1) if want_sum else None
        if minus:
            z.sub_(minus)
        return sums
    sums = shift.new_empty(z.shape[0]) if want_sum else None
    for rs in _lift_rows(z):
        part = z[rs].to(shift.dtype).sub_(shift[rs, None]).exp_()
        if want_sum:
            sums[rs] = part.sum(1)
        if minus:
            part.sub_(minus)
        z[rs] = part
    return sums


def scale_rows_(e: torch.Tensor, factor: torch.Tensor, minus: float = 0.0) -> torch.Tensor:
    """In place ``e <- e * factor[:, None] - minus`` (p - eps/N from the kept exp(z - max)), computed
    in factor's dtype and rounded once for lower-precision e."""
    if e.dtype == factor.dtype:
        e.mul_(factor[:, None])
        return e.sub_(minus) if minus else e
    for rs in _lift_rows(e):
        e[rs] = e[rs].to(factor.dtype).mul_(factor[rs, None]).sub_(minus)
    return e


def _lift_rows(z: torch.Tensor) -> list[slice]:
    """Row slices of a low-precision block lifted to fp32 one at a time: 1/8 of the rows or
    2^20 elements, whichever is more (the fp32 temporary is at most a quarter of the bf16 block
    beyond 4 MB; 8 slices keep the kernel launches per block few on a GPU)."""
    m, width = z.shape
    rows = max(1, m // 8, _LIFT_ELEMS // max(width, 1))
    return [slice(r0, r0 + rows) for r0 in range(0, m, rows)]


def resolve_compute_dtype(requested: Optional[torch.dtype], weight: torch.Tensor, device: torch.device) -> torch.dtype:
    """The dtype of features, matmuls and logits (statistics are always >= fp32).

    None follows a bf16 autocast (``parallel.mixed_precision: bf16``) for fp32 weights, as
    autocast would for an nn.Linear; fp16 is never chosen (p ~ 1/N falls into fp16's subnormals
    at large N), and a fp16 autocast leaves the loss in the weight's dtype."""
    if requested is None:
        bf16_autocast = torch.is_autocast_enabled(device.type) and \
            torch.get_autocast_dtype(device.type) == torch.bfloat16
        requested = torch.bfloat16 if bf16_autocast and weight.dtype == torch.float32 else weight.dtype
    if requested not in (torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be bfloat16, float32 or float64, got {requested}")
    return requested
