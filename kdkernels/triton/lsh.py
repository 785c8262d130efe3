"""LSH feature mimicking (LSHFM) on Triton: kernels and launch wrappers.

Math (shared/spec/losses.md, section 1), per row i:
    h_s = f_s W^T + b,  h_t = f_t W^T + b,  y = 1[h_t > 0] (NaN where h_t is NaN)
    l_i = mse_weight/D * sum_d (f_s - f_t)^2 + 1/N * sum_j BCE(h_s, y)
    dl/df_s = 2 mse_weight (f_s - f_t)/D + ((sigmoid(h_s) - y)/N) W,   dl/df_t = -2 mse_weight (f_s - f_t)/D

No [B, N] tensor ever reaches global memory. ``lsh_fwd_kernel`` runs on a grid
(row blocks) x (splits of the N hash functions); each program streams its N
tiles: both projections with tl.dot on the same W tiles, the target bit (or the
packed teacher code), the stable BCE and dL/dh_s in registers, then
dL/dh_s @ W accumulated into its own [BLOCK_B, D] slice of a per-split scratch
(split accumulation: [splits, B, D], read-modify-written only by its owner, so
the order is fixed). ``lsh_bwd_kernel`` finishes the rows: a fixed-order sum of
the splits (loss and gradient), the MSE term and its gradients for f_s and f_t.
Both steps are deterministic; there are no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import cdiv, compute_tl_dtype, dot_precision, empty_grad, row_major, scalars, target_programs

# Tile configs of lsh_fwd_kernel (tl.dot needs every dim >= 16): (BLOCK_B, BLOCK_N, BLOCK_D, num_warps, num_stages).
# Half inputs run single-pass TF32 MMAs; float32 (3xTF32) and float64 (FMA) need
# more registers per tile element, so they get smaller tiles (zero spills, see aot.py).
FWD_CONFIG_HALF = (32, 64, 32, 8, 2)
FWD_CONFIG_WIDE = (16, 32, 32, 4, 1)
# lsh_bwd_kernel: rows x D chunk per program.
RED_ROWS = 4
RED_BLOCK_D = 256
RED_WARPS = 4
MAX_SCRATCH_BYTES = 256 << 20  # cap on the [splits, B, D] scratch


@triton.jit
def _log1p(x):
    """log(1 + x) accurate for small x (no libdevice): log(u) * x / (u - 1), u = 1 + x."""
    u = 1 + x
    return tl.where(u == 1, x, tl.log(u) * (x / (u - 1)))


@triton.jit
def lsh_fwd_kernel(fs_ptr, ft_ptr, w_ptr, b_ptr, codes_ptr, rw_ptr, part_loss_ptr, part_grad_ptr,
                   B, D, N, stride_fs, stride_ft, stride_w, stride_codes, tiles_per_split,
                   HAS_BIAS: tl.constexpr, USE_CODES: tl.constexpr, NEED_GS: tl.constexpr,
                   CDTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Hash tiles: BCE row sums and dL/dh_s @ W per split of the hash functions.

    fs_ptr, ft_ptr: [B, D] student / teacher features (unit column stride; ft unused with USE_CODES)
    w_ptr:          [N, D] projection (unit column stride)
    b_ptr:          [N] bias (if HAS_BIAS)
    codes_ptr:      [B, ceil(N/8)] uint8 teacher bits, hash j = bit j%8 of byte j//8 (if USE_CODES)
    rw_ptr:         [B] row weights, compute dtype
    part_loss_ptr:  [splits, B] sum_j BCE_ij over the split's hash functions, compute dtype
    part_grad_ptr:  [splits, B, D] sum_j rw_i (sigmoid(h_s) - y)_ij / N * W_j over the split (if NEED_GS)
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    r_ok = rows < B
    rw = tl.load(rw_ptr + rows, mask=r_ok, other=0).to(CDTYPE)
    g_scale = rw / N
    loss_acc = tl.zeros([BLOCK_B], CDTYPE)
    grad_rows = part_grad_ptr + (pid_s * B + rows)[:, None] * D
    for it in range(0, tiles_per_split):
        cols = (pid_s * tiles_per_split + it) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        c_ok = cols < N
        h_s = tl.zeros([BLOCK_B, BLOCK_N], CDTYPE)
        h_t = tl.zeros([BLOCK_B, BLOCK_N], CDTYPE)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            w = tl.load(w_ptr + cols[:, None] * stride_w + dd[None, :], mask=c_ok[:, None] & d_ok[None, :],
                        other=0).to(CDTYPE)  # [BLOCK_N, BLOCK_D]
            wt = tl.trans(w)
            fs = tl.load(fs_ptr + rows[:, None] * stride_fs + dd[None, :], mask=r_ok[:, None] & d_ok[None, :],
                         other=0).to(CDTYPE)  # [BLOCK_B, BLOCK_D]
            h_s = tl.dot(fs, wt, h_s, input_precision=DOT_PREC, out_dtype=CDTYPE)
            if not USE_CODES:
                ft = tl.load(ft_ptr + rows[:, None] * stride_ft + dd[None, :], mask=r_ok[:, None] & d_ok[None, :],
                             other=0).to(CDTYPE)
                h_t = tl.dot(ft, wt, h_t, input_precision=DOT_PREC, out_dtype=CDTYPE)
        if HAS_BIAS:
            bias = tl.load(b_ptr + cols, mask=c_ok, other=0).to(CDTYPE)
            h_s += bias[None, :]
            h_t += bias[None, :]
        valid = r_ok[:, None] & c_ok[None, :]
        if USE_CODES:
            byte = tl.load(codes_ptr + rows[:, None] * stride_codes + (cols // 8)[None, :], mask=valid, other=0)
            y = ((byte.to(tl.int32) >> (cols % 8).to(tl.int32)[None, :]) & 1).to(CDTYPE)
        else:
            y = tl.where(h_t != h_t, h_t, (h_t > 0).to(CDTYPE))  # a NaN teacher stays NaN
        e = tl.exp(-tl.abs(h_s))
        # torch's form of the stable BCE, (1 - y) h + max(-h, 0) + log1p(exp(-|h|)): same values,
        # and the same inf/NaN outcome as the reference for infinite logits
        bce = (1 - y) * h_s + tl.where(h_s < 0, -h_s, 0) + _log1p(e)
        loss_acc += tl.sum(tl.where(valid, bce, 0), 1)
        if NEED_GS:
            sig = tl.where(h_s >= 0, 1 / (1 + e), e / (1 + e))
            g = tl.where(valid, (sig - y) * g_scale[:, None], 0)  # [BLOCK_B, BLOCK_N] = dL/dh_s
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                d_ok = dd < D
                w = tl.load(w_ptr + cols[:, None] * stride_w + dd[None, :], mask=c_ok[:, None] & d_ok[None, :],
                            other=0).to(CDTYPE)
                m = r_ok[:, None] & d_ok[None, :]
                acc = tl.load(grad_rows + dd[None, :], mask=m & (it > 0), other=0)  # first tile starts at 0
                acc = tl.dot(g, w, acc, input_precision=DOT_PREC, out_dtype=CDTYPE)
                tl.store(grad_rows + dd[None, :], acc, mask=m)
    tl.store(part_loss_ptr + pid_s * B + rows, loss_acc, mask=r_ok)


@triton.jit
def lsh_bwd_kernel(fs_ptr, ft_ptr, rw_ptr, part_loss_ptr, part_grad_ptr, mse_ptr, rows_ptr, gs_ptr, gt_ptr,
                   B, D, N, splits, stride_fs, stride_ft, stride_gs, stride_gt,
                   HAS_MSE: tl.constexpr, NEED_GS: tl.constexpr, NEED_GT: tl.constexpr,
                   CDTYPE: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Finishes the rows: fixed-order sum over splits, MSE term, final gradients.

    fs_ptr, ft_ptr: [B, D] features (unit column stride; ft read only if HAS_MSE)
    rw_ptr:         [B] row weights, compute dtype
    part_loss_ptr:  [splits, B] BCE row sums per split
    part_grad_ptr:  [splits, B, D] dL/dh_s @ W per split (read if NEED_GS)
    mse_ptr:        [1] mse_weight, compute dtype
    rows_ptr:       [B] per-row loss l_i, compute dtype
    gs_ptr, gt_ptr: [B, D] row_weight_i * dl_i/df_s, dl_i/df_t (input dtype)
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    r_ok = rows < B
    bce = tl.zeros([ROWS], CDTYPE)
    for sp in range(0, splits):
        bce += tl.load(part_loss_ptr + sp * B + rows, mask=r_ok, other=0)
    loss = bce / N
    if HAS_MSE or NEED_GS or NEED_GT:
        mse_w = tl.load(mse_ptr)
        rw = tl.load(rw_ptr + rows, mask=r_ok, other=0)
        coef = 2 * mse_w / D * rw  # d/d f_s of rw * mse_w/D * (f_s - f_t)^2, per unit (f_s - f_t)
        sse = tl.zeros([ROWS], CDTYPE)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            m = r_ok[:, None] & (dd < D)[None, :]
            if HAS_MSE:
                fs = tl.load(fs_ptr + rows[:, None] * stride_fs + dd[None, :], mask=m, other=0).to(CDTYPE)
                ft = tl.load(ft_ptr + rows[:, None] * stride_ft + dd[None, :], mask=m, other=0).to(CDTYPE)
                diff = fs - ft
                sse += tl.sum(diff * diff, 1)
                gmse = coef[:, None] * diff
            else:
                gmse = tl.zeros([ROWS, BLOCK_D], CDTYPE)
            if NEED_GS:
                gs = tl.zeros([ROWS, BLOCK_D], CDTYPE)
                for sp in range(0, splits):
                    gs += tl.load(part_grad_ptr + (sp * B + rows)[:, None] * D + dd[None, :], mask=m, other=0)
                gs += gmse
                tl.store(gs_ptr + rows[:, None] * stride_gs + dd[None, :], gs.to(gs_ptr.dtype.element_ty), mask=m)
            if NEED_GT:
                tl.store(gt_ptr + rows[:, None] * stride_gt + dd[None, :], (-gmse).to(gt_ptr.dtype.element_ty), mask=m)
        if HAS_MSE:
            loss += mse_w * (sse / D)
    tl.store(rows_ptr + rows, loss, mask=r_ok)


def fwd_config(dtype: torch.dtype):
    """(BLOCK_B, BLOCK_N, BLOCK_D, num_warps, num_stages) of lsh_fwd_kernel for an input dtype."""
    return FWD_CONFIG_HALF if dtype in (torch.float16, torch.bfloat16) else FWD_CONFIG_WIDE


def lsh_forward(f_s, f_t, weight, bias, teacher_codes, mse_weight, row_weight, need_grad_s, need_grad_t):
    need_gs = bool(need_grad_s)
    need_gt = bool(need_grad_t) and f_t is not None
    use_codes = teacher_codes is not None
    has_mse = float(mse_weight) != 0.0 and f_t is not None
    fs = row_major(f_s)
    ft = row_major(f_t) if f_t is not None else fs
    w = row_major(weight)
    B, D = f_s.shape
    N = weight.shape[0]
    dev = f_s.device
    cdtype = row_weight.dtype
    rw = row_weight.contiguous()
    codes = teacher_codes.contiguous() if use_codes else fs
    b = bias.contiguous() if bias is not None else rw

    BLOCK_B, BLOCK_N, BLOCK_D, fwd_warps, fwd_stages = fwd_config(f_s.dtype)
    row_blocks = cdiv(B, BLOCK_B)
    n_tiles = cdiv(N, BLOCK_N)
    splits = max(1, min(n_tiles, target_programs(dev) // row_blocks))
    if need_gs:  # bound the scratch
        per_split = B * D * (8 if cdtype == torch.float64 else 4)
        splits = max(1, min(splits, MAX_SCRATCH_BYTES // max(per_split, 1)))
    tiles_per_split = cdiv(n_tiles, splits)
    splits = cdiv(n_tiles, tiles_per_split)

    part_loss = torch.empty((splits, B), dtype=cdtype, device=dev)
    part_grad = torch.empty((splits, B, D) if need_gs else (0,), dtype=cdtype, device=dev)
    rows = torch.empty(B, dtype=cdtype, device=dev)
    gs = empty_grad(f_s, need_gs)
    gt = empty_grad(f_t, need_gt) if f_t is not None else f_s.new_empty(0)
    if B == 0:
        return rows, gs, gt
    cd = compute_tl_dtype(f_s.dtype)
    lsh_fwd_kernel[(row_blocks, splits)](
        fs, ft, w, b, codes, rw, part_loss, part_grad if need_gs else part_loss,
        B, D, N, fs.stride(0), ft.stride(0), w.stride(0), codes.stride(0) if use_codes else 0, tiles_per_split,
        HAS_BIAS=bias is not None, USE_CODES=use_codes, NEED_GS=need_gs, CDTYPE=cd,
        DOT_PREC=dot_precision(f_s.dtype), BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        num_warps=fwd_warps, num_stages=fwd_stages)
    lsh_bwd_kernel[(cdiv(B, RED_ROWS),)](
        fs, ft, rw, part_loss, part_grad if need_gs else part_loss, scalars([mse_weight], f_s.dtype, dev), rows,
        gs if need_gs else rows, gt if need_gt else rows,
        B, D, N, splits, fs.stride(0), ft.stride(0), gs.stride(0) if need_gs else 0, gt.stride(0) if need_gt else 0,
        HAS_MSE=has_mse, NEED_GS=need_gs, NEED_GT=need_gt, CDTYPE=cd, ROWS=RED_ROWS, BLOCK_D=RED_BLOCK_D,
        num_warps=RED_WARPS)
    return rows, gs, gt
