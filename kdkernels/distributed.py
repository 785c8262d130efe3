"""torch.distributed pieces: rank reductions for statistics and the global-batch SP loss.

Everything here is a no-op wrapper outside torch.distributed (or with a group
of one rank), so the same code runs single-process and under ``torchrun``.
Collectives are called in the same order on every rank; a function that raises
on one rank only (bad input there) leaves the other ranks waiting, as any
torch.distributed code does, so validate before the first collective.

Global-batch SP and DDP
-----------------------
``sp_loss(..., global_batch=True)`` builds the Gram matrices over the batch of
every rank of ``group``. Every rank computes the *same* loss ``L`` (the loss of
the single-process run on the concatenated batch), and each rank's backward
gives its local rows exactly their slice of ``dL/dQ`` (the gather's backward
keeps the local slice and does no communication: the other ranks compute the
same full gradient for their own rows themselves).

The gradient a parameter ``theta`` of rank r receives is therefore the part of
``dL/dtheta`` that flows through rank r's rows, ``g_r``, and ``sum_r g_r =
dL/dtheta``. DDP *averages* gradients over ranks, so after DDP each parameter
holds ``(1/W) dL/dtheta`` (W = world size). To get the single-process gradient
multiply the SP term by W::

    loss = ce + sp_weight * dist.get_world_size() * kdk.sp_loss(f_s, f_t, global_batch=True)

(a per-rank mean loss such as the CE is already right under DDP's average when
ranks hold equal batches). Without the factor the SP term is effectively scaled
by 1/W, which one can also fold into ``sp_weight``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_active", "all_reduce_sum", "all_gather_rows", "gather_rows_with_grad", "sp_loss_global",
           "column_lower_median"]


def is_active(group=None) -> bool:
    """True under an initialised torch.distributed with more than one rank in ``group``."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_sum(x: Tensor, group=None) -> Tensor:
    """In-place sum over the ranks of ``group`` (a no-op outside torch.distributed)."""
    if is_active(group):
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def _row_counts(n: int, device: torch.device, group=None) -> List[int]:
    """The number of rows every rank of ``group`` holds (rank order)."""
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=device), group=group)
    return [int(s) for s in sizes]


def _gather_padded(x: Tensor, sizes: Sequence[int], group=None) -> Tensor:
    """all_gather of ``x`` [n_r, ...] with rows padded to the longest rank, then trimmed."""
    longest = max(sizes)
    x = x.contiguous()
    if x.shape[0] == longest:
        padded = x
    else:
        padded = x.new_zeros((longest,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)])


def all_gather_rows(x: Tensor, group=None) -> Tensor:
    """Concatenate ``x`` [n_r, ...] of every rank along dim 0 (ranks may hold different n_r).
    Not differentiable (see :func:`gather_rows_with_grad`)."""
    if not is_active(group):
        return x
    return _gather_padded(x, _row_counts(x.shape[0], x.device, group), group)


class _GatherRows(torch.autograd.Function):
    """Forward: rows of every rank concatenated. Backward: the local rows' slice of
    the incoming gradient, no communication (every rank holds the full gradient of
    the same loss)."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: Tuple[int, ...], rank: int, group) -> Tensor:
        ctx.start = sum(sizes[:rank])
        ctx.n = sizes[rank]
        return _gather_padded(x.detach(), sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad[ctx.start: ctx.start + ctx.n], None, None, None


def gather_rows_with_grad(x: Tensor, group=None, sizes: Optional[Sequence[int]] = None) -> Tensor:
    """:func:`all_gather_rows` whose backward gives ``x`` its own slice of the gradient.

    Right when every rank evaluates the same function of the gathered tensor (as
    global-batch SP does); it is *not* the sum-over-ranks backward of a generic
    differentiable all_gather.
    """
    if not is_active(group):
        return x
    if sizes is None:
        sizes = _row_counts(x.shape[0], x.device, group)
    return _GatherRows.apply(x, tuple(sizes), dist.get_rank(group), group)


# --------------------------------------------------------------------------- SP
_DTYPE_CODES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _all_gather_ints(values: List[int], device: torch.device, group=None) -> List[List[int]]:
    """A short list of ints from every rank (all ranks must give the same length)."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    return [t.tolist() for t in every]


def sp_loss_global(pairs_s: List[Tensor], pairs_t: List[Tensor], *, p: float, reduction: str, group: Optional[object],
                   backend: str) -> Tensor:
    """SP loss with the Gram matrices over the batch of every rank of ``group``.

    pairs_s, pairs_t: validated layer pairs, [b_r, ...] on this rank (b_r may
    differ between ranks; the flattened width of each tensor must not). Returns
    on every rank the loss of the single-process run on the batches concatenated
    in rank order: 'batchmean' divides by (sum_r b_r)^2, 'none' gives the
    [sum_r b_r] row sums of the whole batch. Each rank's inputs get exactly their
    rows' slice of the single-process gradient (for 'none', of the upstream
    gradient given on that rank). See the module docstring for DDP's averaging
    (multiply by the world size to get the single-process gradient).

    One exchange of sizes and widths plus one all_gather per dtype (all layers
    concatenated along the feature dim; trainable and frozen tensors apart),
    then the local SP op on ``backend``.
    """
    from .functional import _sp_local

    if not is_active(group):
        return _sp_local(pairs_s, pairs_t, p, reduction, backend)

    flat = [x.reshape(x.shape[0], -1) for x in list(pairs_s) + list(pairs_t)]
    names = ["f_s", "f_t"] if len(pairs_s) == 1 else \
        [f"f_s[{i}]" for i in range(len(pairs_s))] + [f"f_t[{i}]" for i in range(len(pairs_t))]
    device, widths = flat[0].device, [q.shape[1] for q in flat]
    # what every rank holds, so that a mismatch is a ValueError on every rank rather
    # than a hang: first [b_r, number of tensors], then (width, dtype, requires_grad) per tensor
    head = _all_gather_ints([flat[0].shape[0], len(flat)], device, group)
    if len({h[1] for h in head}) != 1:
        raise ValueError(f"f_s: global_batch=True needs the same number of layer pairs on every rank, "
                         f"got {[h[1] // 2 for h in head]} (rank order)")
    sizes = [h[0] for h in head]
    mine = [[widths[i], _DTYPE_CODES.index(q.dtype), int(q.requires_grad)] for i, q in enumerate(flat)]
    every = _all_gather_ints([v for m in mine for v in m], device, group)
    for r, theirs in enumerate(every):
        for i, name in enumerate(names):
            width, code, grad = theirs[3 * i: 3 * i + 3]
            if width != mine[i][0]:
                raise ValueError(f"{name}: global_batch=True needs the same flattened width on every rank; "
                                 f"this rank has {mine[i][0]}, rank {r} has {width}")
            if code != mine[i][1] or grad != mine[i][2]:
                raise ValueError(f"{name}: global_batch=True needs the same dtype and requires_grad on every rank; "
                                 f"this rank has {flat[i].dtype}, requires_grad={bool(mine[i][2])}, rank {r} has "
                                 f"{_DTYPE_CODES[code]}, requires_grad={bool(grad)}")

    # one gather per (dtype, requires_grad): concatenate those layers along dim 1,
    # gather, split back (kept apart by requires_grad so a frozen teacher stays
    # frozen and the kernel computes no gradient for it)
    groups: Dict[Tuple[torch.dtype, bool], List[int]] = {}
    for i, q in enumerate(flat):
        groups.setdefault((q.dtype, q.requires_grad), []).append(i)
    gathered: List[Optional[Tensor]] = [None] * len(flat)
    for idx in groups.values():
        block = torch.cat([flat[i] for i in idx], dim=1) if len(idx) > 1 else flat[idx[0]]
        full = gather_rows_with_grad(block, group, sizes)
        offset = 0
        for i in idx:
            gathered[i] = full[:, offset: offset + widths[i]]
            offset += widths[i]
    n_pairs = len(pairs_s)
    return _sp_local(gathered[:n_pairs], gathered[n_pairs:], p, reduction, backend)


# --------------------------------------------------------------------------- exact medians
def _order_keys(x: Tensor) -> Tuple[Tensor, int]:
    """Float tensor -> int64 keys whose signed order is the float order (-0.0 < +0.0,
    NaNs at the ends), and the number of key bits (32 or 64)."""
    if x.dtype == torch.float64:
        bits, width = x.view(torch.int64), 64
        flip = torch.iinfo(torch.int64).max
    else:
        bits, width = x.to(torch.float32).view(torch.int32).to(torch.int64), 32
        flip = 0x7FFFFFFF
    return torch.where(bits >= 0, bits, bits ^ flip), width


def _keys_to_float(keys: Tensor, width: int) -> Tensor:
    if width == 64:
        bits = torch.where(keys >= 0, keys, keys ^ torch.iinfo(torch.int64).max)
        return bits.view(torch.float64)
    bits = torch.where(keys >= 0, keys, keys ^ 0x7FFFFFFF).to(torch.int32)
    return bits.view(torch.float32)


@torch.no_grad()
def column_lower_median(x: Tensor, group=None, *, total: Optional[int] = None) -> Tensor:
    """Exact per-column median of the rows of every rank: x [n_r, M] -> [M].

    ``torch.median(dim=0)`` semantics on the concatenation of all ranks' rows:
    the lower middle value for an even count, NaN for a column holding a NaN.
    Single-process it is ``x.median(0).values``. Under torch.distributed it is a
    radix select on the float bit patterns (8 bits a round: 4 rounds for float32,
    8 for float64), each round all-reducing one [M, 256] histogram, so a rank
    never holds more than its own rows (no gather). ``n_r`` may differ between
    ranks and be 0 on some; ``total`` (sum of n_r) saves one collective when known.
    float16/bfloat16 are selected as float32 (exact: the conversion is monotone).
    """
    if not is_active(group):
        return x.median(dim=0).values
    device, num_cols = x.device, x.shape[1]
    if total is None:
        total = int(all_reduce_sum(torch.tensor([x.shape[0]], dtype=torch.int64, device=device), group))
    if total == 0:
        raise ValueError("x: no rows on any rank; the median of nothing is undefined")
    out_dtype = x.dtype
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)
    keys, width = _order_keys(x)  # [n_r, M]
    nan_count = all_reduce_sum(torch.isnan(x).sum(0), group)  # [M] int64

    cols = torch.arange(num_cols, device=device, dtype=torch.int64)
    alive = torch.ones_like(keys, dtype=torch.bool)  # rows still matching the chosen prefix, per column
    k_rem = torch.full((num_cols,), (total - 1) // 2, dtype=torch.int64, device=device)  # 0-based rank
    chosen = torch.zeros(num_cols, dtype=torch.int64, device=device)
    dump = num_cols * 256
    for shift in range(width - 8, -8, -8):
        digit = (keys >> shift) & 0xFF
        if shift == width - 8:  # top byte carries the sign: shift it to [0, 256)
            digit = (keys >> shift) + 128
        idx = torch.where(alive, digit + cols * 256, torch.full_like(digit, dump))
        hist = torch.bincount(idx.flatten(), minlength=dump + 1)[:dump].view(num_cols, 256)
        all_reduce_sum(hist, group)
        cum = hist.cumsum(1)  # [M, 256]
        value = (cum <= k_rem[:, None]).sum(1)  # first bin whose cumulative count passes k_rem
        before = torch.where(value > 0, cum.gather(1, (value - 1).clamp_min(0)[:, None])[:, 0], torch.zeros_like(value))
        k_rem = k_rem - before
        alive &= digit == value[None, :]
        top = value - 128 if shift == width - 8 else value
        chosen = chosen | (top << shift)
    med = _keys_to_float(chosen, width)
    med = torch.where(nan_count > 0, torch.full_like(med, float("nan")), med)
    return med.to(out_dtype)
