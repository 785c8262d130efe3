"""ND (feature norm and direction) on Triton: kernel and launch wrapper.

Math (shared/spec/losses.md, section 2), per row i with class y_i:
    e    = c_y / max(||c_y||, eps)
    den  = ||t|| if (||t|| > ||s|| or ||t|| is NaN) else ||s||;   clamped at eps
    l_i  = 1 - <s, e> / den
Gradients (exactly what autograd of the reference gives, clamp gates included):
    a      = <s,e> / den^2 * 1[den_raw >= eps]
    teacher wins: dl/ds = -e/den,                 dl/dt = a t / ||t||
    else:         dl/ds = -e/den + a s / ||s||,   dl/dt = 0

A label outside [0, K) is caught on the device, without a host synchronisation:
that row's loss and gradients are NaN and no class-mean row is read for it
(the CPU backend raises ValueError instead, before any kernel runs).

One program owns ROWS rows. When a row fits one tile (D <= MAX_SINGLE_D) s, t
and the gathered class-mean row are read once and the loss and both gradients
come out of the same registers; wider rows take two passes over D (norms and
dots, then gradients).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import compute_tl_dtype, device_warps, empty_grad, next_pow2, row_major, scalar_arg, scalar_bits, sqrt_rn

MAX_SINGLE_D = 4096  # widest row kept in registers in one piece
CHUNK_D = 1024       # tile width of the two-pass path
TILE_ELEMS = 2048    # ROWS * BLOCK_D per program (8..16 elements a thread)
MIN_BLOCK_D = 32


@triton.jit
def _nd_row_terms(ss, tt, cc, sc, eps, lab_ok):
    """Per-row scalars from the sums of s*s, t*t, c*c and s*c (all NaN where the label is out of range)."""
    ns = sqrt_rn(ss)
    nt = sqrt_rn(tt)
    nc_raw = sqrt_rn(cc)
    nc = tl.where(nc_raw < eps, eps, nc_raw)   # clamp that keeps NaN
    dot = sc / nc                              # <s, e>
    teacher = (nt > ns) | (nt != nt)
    den_raw = tl.where(teacher, nt, ns)
    den = tl.where(den_raw < eps, eps, den_raw)
    loss = 1 - dot / den
    a = tl.where(den_raw >= eps, dot / (den * den), 0)  # d loss / d den_raw
    cs = tl.where(teacher | (ns == 0), 0, a / ns)     # coefficient of s in dl/ds
    ct = tl.where(teacher & (nt != 0), a / nt, 0)     # coefficient of t in dl/dt
    ce = -1 / (den * nc)                              # coefficient of c in dl/ds
    nan = float("nan")
    return (tl.where(lab_ok, loss, nan), tl.where(lab_ok, ce, nan), tl.where(lab_ok, cs, nan),
            tl.where(lab_ok, ct, nan))


@triton.jit
def nd_fwd_kernel(s_ptr, t_ptr, c_ptr, lab_ptr, rw_ptr, rows_ptr, gs_ptr, gt_ptr,
                  B, D, K, stride_s, stride_t, stride_c, stride_gs, stride_gt, eps_bits,
                  NEED_GS: tl.constexpr, NEED_GT: tl.constexpr, CDTYPE: tl.constexpr,
                  ROWS: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE: tl.constexpr):
    """ND per-row loss and row-weighted gradients in one launch.

    s_ptr, t_ptr:   [B, D] student/teacher rows (unit column stride)
    c_ptr:          [K, D] class means, unnormalised (unit column stride)
    lab_ptr:        [B] integer labels (any int dtype); one outside [0, K) makes its row NaN
    rw_ptr:         [B] row weights, compute dtype
    rows_ptr:       [B] per-row loss l_i, compute dtype
    gs_ptr, gt_ptr: [B, D] row_weight_i * dl_i/ds_i, dl_i/dt_i (input dtype)
    eps_bits:       eps as ``scalar_bits``
    """
    pid = tl.program_id(0).to(tl.int64)
    r = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    r_ok = r < B
    lab = tl.load(lab_ptr + r, mask=r_ok, other=0).to(tl.int64)
    lab_ok = (lab >= 0) & (lab < K)
    eps = scalar_arg(eps_bits, CDTYPE)
    s_row = s_ptr + r[:, None] * stride_s
    t_row = t_ptr + r[:, None] * stride_t
    c_row = c_ptr + tl.where(lab_ok, lab, 0)[:, None] * stride_c
    c_ok = (r_ok & lab_ok)[:, None]
    if SINGLE:
        d = tl.arange(0, BLOCK_D)
        m = r_ok[:, None] & (d < D)[None, :]
        s = tl.load(s_row + d[None, :], mask=m, other=0).to(CDTYPE)
        t = tl.load(t_row + d[None, :], mask=m, other=0).to(CDTYPE)
        c = tl.load(c_row + d[None, :], mask=m & c_ok, other=0).to(CDTYPE)
        loss, ce, cs, ct = _nd_row_terms(tl.sum(s * s, 1), tl.sum(t * t, 1), tl.sum(c * c, 1), tl.sum(s * c, 1), eps,
                                         lab_ok)
        tl.store(rows_ptr + r, loss, mask=r_ok)
        if NEED_GS or NEED_GT:
            w = tl.load(rw_ptr + r, mask=r_ok, other=0)
            if NEED_GS:
                gs = (ce * w)[:, None] * c + (cs * w)[:, None] * s
                tl.store(gs_ptr + r[:, None] * stride_gs + d[None, :], gs.to(gs_ptr.dtype.element_ty), mask=m)
            if NEED_GT:
                gt = (ct * w)[:, None] * t
                tl.store(gt_ptr + r[:, None] * stride_gt + d[None, :], gt.to(gt_ptr.dtype.element_ty), mask=m)
    else:
        ss = tl.zeros([ROWS], CDTYPE)
        tt = tl.zeros([ROWS], CDTYPE)
        cc = tl.zeros([ROWS], CDTYPE)
        sc = tl.zeros([ROWS], CDTYPE)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            m = r_ok[:, None] & (d < D)[None, :]
            s = tl.load(s_row + d[None, :], mask=m, other=0).to(CDTYPE)
            t = tl.load(t_row + d[None, :], mask=m, other=0).to(CDTYPE)
            c = tl.load(c_row + d[None, :], mask=m & c_ok, other=0).to(CDTYPE)
            ss += tl.sum(s * s, 1)
            tt += tl.sum(t * t, 1)
            cc += tl.sum(c * c, 1)
            sc += tl.sum(s * c, 1)
        loss, ce, cs, ct = _nd_row_terms(ss, tt, cc, sc, eps, lab_ok)
        tl.store(rows_ptr + r, loss, mask=r_ok)
        if NEED_GS or NEED_GT:
            w = tl.load(rw_ptr + r, mask=r_ok, other=0)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                m = r_ok[:, None] & (d < D)[None, :]
                if NEED_GS:
                    s = tl.load(s_row + d[None, :], mask=m, other=0).to(CDTYPE)
                    c = tl.load(c_row + d[None, :], mask=m & c_ok, other=0).to(CDTYPE)
                    gs = (ce * w)[:, None] * c + (cs * w)[:, None] * s
                    tl.store(gs_ptr + r[:, None] * stride_gs + d[None, :], gs.to(gs_ptr.dtype.element_ty), mask=m)
                if NEED_GT:
                    t = tl.load(t_row + d[None, :], mask=m, other=0).to(CDTYPE)
                    gt = (ct * w)[:, None] * t
                    tl.store(gt_ptr + r[:, None] * stride_gt + d[None, :], gt.to(gt_ptr.dtype.element_ty), mask=m)


def config(D: int):
    """Heuristic launch config for row width D -> (ROWS, BLOCK_D, SINGLE, num_warps), the
    warps sized as 32 lanes (``device_warps`` turns them into a device's warps)."""
    if D <= MAX_SINGLE_D:
        block_d = max(MIN_BLOCK_D, next_pow2(D))
        single = True
    else:
        block_d, single = CHUNK_D, False
    rows = max(1, TILE_ELEMS // block_d)
    num_warps = 8 if rows * block_d >= TILE_ELEMS else 4  # 8 elements a thread (float64 needs the room)
    return rows, block_d, single, num_warps


def configs():
    """Every config ``config`` can return (for the AOT check)."""
    out, d = [], 1
    while d <= MAX_SINGLE_D:
        out.append(config(d))
        d *= 2
    out.append(config(MAX_SINGLE_D + 1))
    return sorted(set(out), key=lambda c: (c[2], c[1]))


def nd_forward(s, t, centers, labels, row_weight, eps, need_grad_s, need_grad_t):
    need_gs, need_gt = bool(need_grad_s), bool(need_grad_t)
    s_, t_, c_ = row_major(s), row_major(t), row_major(centers)
    labels = labels.contiguous()
    B, D = s.shape
    rows = torch.empty(B, dtype=row_weight.dtype, device=s.device)
    gs, gt = empty_grad(s, need_gs), empty_grad(t, need_gt)
    if B:
        n_rows, block_d, single, num_warps = config(D)
        nd_fwd_kernel[(triton.cdiv(B, n_rows),)](
            s_, t_, c_, labels, row_weight.contiguous(), rows,
            gs if need_gs else rows, gt if need_gt else rows,
            B, D, centers.shape[0], s_.stride(0), t_.stride(0), c_.stride(0),
            gs.stride(0) if need_gs else 0, gt.stride(0) if need_gt else 0, scalar_bits(eps),
            NEED_GS=need_gs, NEED_GT=need_gt, CDTYPE=compute_tl_dtype(s.dtype),
            ROWS=n_rows, BLOCK_D=block_d, SINGLE=single, num_warps=device_warps(num_warps, s.device))
    return rows, gs, gt
