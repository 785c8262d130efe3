"""SP (similarity preserving) on Triton: kernels and launch wrappers.

Math (shared/spec/losses.md, section 4), one layer pair, Q [b, K]:
    A = Q Q^T;  G[r] = A[r] / max(||A[r]||_p, eps)   (p = 1 or 2)
    l_r = sum_j (G_t - G_s)[r, j]^2
    Dg_s = -2 rw_r (G_t - G_s)[r],  Dg_t = -Dg_s
    dA[r] = Dg/den - 1[n >= eps] <Dg, A[r]>/den^2 * dn/dA   (dn/dA = A/n for p=2, sign(A) for p=1)
    dQ = (dA + dA^T) Q

Three kernels:
- ``sp_gram_fwd_kernel``: tiles of A with tl.dot; only tiles on or above the
  diagonal are computed, each stored twice (itself and mirrored), so A comes
  out exactly symmetric. K is split across programs (split-K) so that the
  small [b, b] output still fills the GPU; the splits land in [splits, b, b].
- ``sp_rows_fwd_kernel``: the fused [b, b] step: a fixed-order sum of the
  splits, row norms, G_t - G_s, the row losses and dA for both sides.
- ``sp_bwd_kernel``: dQ = (dA + dA^T) Q with tl.dot. A Triton kernel rather
  than torch.mm: it reads dA and dA^T straight from the one [b, b] buffer (no
  symmetrised copy), writes dQ directly in the input dtype (no extra cast
  pass over [b, K]), and for half inputs keeps float32 accumulation; the GEMM
  is [b, b] x [b, K] with small b, so it is bound by reading Q and writing dQ
  once, which the tiling over K does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import cdiv, compute_tl_dtype, dot_precision, empty_grad, next_pow2, row_major, scalars, sqrt_rn, \
    target_programs

SP_EPS = 1e-12
# sp_gram_fwd_kernel: BLOCK_M x BLOCK_M tiles of A, K in chunks of GRAM_BLOCK_K.
GRAM_BLOCK_K = 32
GRAM_STAGES = 2
MIN_K_PER_SPLIT = 512
# sp_rows_fwd_kernel
ROWS_R = 4
ROWS_BLOCK_C = 256
ROWS_WARPS = 4
# sp_bwd_kernel
BWD_BLOCK_K = 32
BWD_BLOCK_C = 32
BWD_STAGES = 2


@triton.jit
def sp_gram_fwd_kernel(q_ptr, pairs_ptr, a_ptr, b, K, stride_q, k_per_split,
                       CDTYPE: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Upper-triangle Gram tiles, mirrored: a split-K partial of A = Q Q^T.

    q_ptr:     [b, K] activations (unit column stride)
    pairs_ptr: [n_pairs, 2] int32 tile coordinates (i, j), i <= j
    a_ptr:     [splits, b, b] partial Gram matrices, compute dtype
    """
    pid = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    ti = tl.load(pairs_ptr + 2 * pid).to(tl.int64)
    tj = tl.load(pairs_ptr + 2 * pid + 1).to(tl.int64)
    ri = ti * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rj = tj * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    ri_ok = ri < b
    rj_ok = rj < b
    k_lo = pid_k * k_per_split
    acc = tl.zeros([BLOCK_M, BLOCK_M], CDTYPE)
    for k0 in range(0, k_per_split, BLOCK_K):
        kk = k_lo + k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K  # k_per_split is a multiple of BLOCK_K: splits never overlap
        qi = tl.load(q_ptr + ri[:, None] * stride_q + kk[None, :], mask=ri_ok[:, None] & k_ok[None, :],
                     other=0).to(CDTYPE)
        qj = tl.load(q_ptr + rj[:, None] * stride_q + kk[None, :], mask=rj_ok[:, None] & k_ok[None, :],
                     other=0).to(CDTYPE)
        acc = tl.dot(qi, tl.trans(qj), acc, input_precision=DOT_PREC, out_dtype=CDTYPE)
    a = a_ptr + pid_k * b * b
    ok = ri_ok[:, None] & rj_ok[None, :]
    # the tile itself (on a diagonal tile: its upper triangle and diagonal) ...
    tl.store(a + ri[:, None] * b + rj[None, :], acc, mask=ok & (ri[:, None] <= rj[None, :]))
    # ... and its mirror below the diagonal
    tl.store(a + rj[None, :] * b + ri[:, None], acc, mask=ok & (ri[:, None] < rj[None, :]))


@triton.jit
def _sp_load_a(a_ptr, offs, mask, b, splits, CDTYPE: tl.constexpr):
    """Fixed-order sum of the split-K partials of A at offs."""
    a = tl.load(a_ptr + offs, mask=mask, other=0).to(CDTYPE)
    for sp in range(1, splits):
        a += tl.load(a_ptr + sp * b * b + offs, mask=mask, other=0).to(CDTYPE)
    return a


@triton.jit
def _sp_dgram(a_s, a_t, den_s, den_t, w):
    """Dg_s = -2 w (G_t - G_s) (Dg_t = -Dg_s) and the row-loss terms (G_t - G_s)^2."""
    diff = a_t / den_t[:, None] - a_s / den_s[:, None]
    return -2 * w[:, None] * diff, diff * diff


@triton.jit
def _sp_da(dg, a, den, n, k, P: tl.constexpr):
    """dA = Dg/den - k * dn/dA, k = 1[n >= eps] <Dg, A> / den^2."""
    if P == 1:
        dn = tl.where(a > 0, 1.0, tl.where(a < 0, -1.0, 0.0)).to(a.dtype)
    else:
        dn = a / tl.where(n == 0, 1, n)[:, None]
    return dg / den[:, None] - k[:, None] * dn


@triton.jit
def sp_rows_fwd_kernel(as_ptr, at_ptr, rw_ptr, eps_ptr, rows_ptr, das_ptr, dat_ptr, b, splits_s, splits_t,
                       P: tl.constexpr, NEED_GS: tl.constexpr, NEED_GT: tl.constexpr, CDTYPE: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Fused [b, b] step: row norms, G_t - G_s, row losses and dA (both sides).

    as_ptr, at_ptr:   [splits_s, b, b], [splits_t, b, b] split-K partials of A_s, A_t
    rw_ptr:           [b] row weights, compute dtype
    eps_ptr:          [1] eps of the norm clamp, compute dtype
    rows_ptr:         [b] l_r = sum_j (G_t - G_s)[r, j]^2, compute dtype
    das_ptr, dat_ptr: [b, b] dA_s, dA_t for the row-weighted loss (if NEED_GS / NEED_GT)
    """
    pid = tl.program_id(0).to(tl.int64)
    r = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    r_ok = r < b
    eps = tl.load(eps_ptr)
    # pass 1: row norms of A_s and A_t
    n_s = tl.zeros([ROWS], CDTYPE)
    n_t = tl.zeros([ROWS], CDTYPE)
    for c0 in range(0, b, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = r_ok[:, None] & (c < b)[None, :]
        offs = r[:, None] * b + c[None, :]
        a_s = _sp_load_a(as_ptr, offs, m, b, splits_s, CDTYPE)
        a_t = _sp_load_a(at_ptr, offs, m, b, splits_t, CDTYPE)
        if P == 1:
            n_s += tl.sum(tl.abs(a_s), 1)
            n_t += tl.sum(tl.abs(a_t), 1)
        else:
            n_s += tl.sum(a_s * a_s, 1)
            n_t += tl.sum(a_t * a_t, 1)
    if P != 1:
        n_s = sqrt_rn(n_s)
        n_t = sqrt_rn(n_t)
    den_s = tl.where(n_s < eps, eps, n_s)  # clamp that keeps NaN
    den_t = tl.where(n_t < eps, eps, n_t)
    w = tl.load(rw_ptr + r, mask=r_ok, other=0)
    # pass 2: loss and <Dg, A> per row
    loss = tl.zeros([ROWS], CDTYPE)
    dot_s = tl.zeros([ROWS], CDTYPE)
    dot_t = tl.zeros([ROWS], CDTYPE)
    for c0 in range(0, b, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = r_ok[:, None] & (c < b)[None, :]
        offs = r[:, None] * b + c[None, :]
        a_s = _sp_load_a(as_ptr, offs, m, b, splits_s, CDTYPE)
        a_t = _sp_load_a(at_ptr, offs, m, b, splits_t, CDTYPE)
        dg_s, sq = _sp_dgram(a_s, a_t, den_s, den_t, w)
        loss += tl.sum(tl.where(m, sq, 0), 1)
        dot_s += tl.sum(tl.where(m, dg_s * a_s, 0), 1)
        dot_t -= tl.sum(tl.where(m, dg_s * a_t, 0), 1)
    tl.store(rows_ptr + r, loss, mask=r_ok)
    # pass 3: dA
    if NEED_GS or NEED_GT:
        k_s = tl.where(n_s >= eps, dot_s / (den_s * den_s), 0)
        k_t = tl.where(n_t >= eps, dot_t / (den_t * den_t), 0)
        for c0 in range(0, b, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m = r_ok[:, None] & (c < b)[None, :]
            offs = r[:, None] * b + c[None, :]
            a_s = _sp_load_a(as_ptr, offs, m, b, splits_s, CDTYPE)
            a_t = _sp_load_a(at_ptr, offs, m, b, splits_t, CDTYPE)
            dg_s, _ = _sp_dgram(a_s, a_t, den_s, den_t, w)
            if NEED_GS:
                tl.store(das_ptr + offs, _sp_da(dg_s, a_s, den_s, n_s, k_s, P), mask=m)
            if NEED_GT:
                tl.store(dat_ptr + offs, _sp_da(-dg_s, a_t, den_t, n_t, k_t, P), mask=m)


@triton.jit
def sp_bwd_kernel(da_ptr, q_ptr, dq_ptr, b, K, stride_q, stride_dq,
                  CDTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """dQ = (dA + dA^T) Q, the symmetrisation fused into the operand load.

    da_ptr: [b, b] dA, compute dtype (contiguous)
    q_ptr:  [b, K] activations (unit column stride)
    dq_ptr: [b, K] gradient, input dtype
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    r_ok = r < b
    k_ok = kk < K
    acc = tl.zeros([BLOCK_M, BLOCK_K], CDTYPE)
    for c0 in range(0, b, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        c_ok = c < b
        m = r_ok[:, None] & c_ok[None, :]
        sym = tl.load(da_ptr + r[:, None] * b + c[None, :], mask=m, other=0).to(CDTYPE) \
            + tl.load(da_ptr + c[None, :] * b + r[:, None], mask=m, other=0).to(CDTYPE)  # [BLOCK_M, BLOCK_C]
        q = tl.load(q_ptr + c[:, None] * stride_q + kk[None, :], mask=c_ok[:, None] & k_ok[None, :],
                    other=0).to(CDTYPE)  # [BLOCK_C, BLOCK_K]
        acc = tl.dot(sym, q, acc, input_precision=DOT_PREC, out_dtype=CDTYPE)
    tl.store(dq_ptr + r[:, None] * stride_dq + kk[None, :], acc.to(dq_ptr.dtype.element_ty),
             mask=r_ok[:, None] & k_ok[None, :])


# --------------------------------------------------------------------------- host side
def block_m(b: int, dtype: torch.dtype) -> int:
    """Tile height for the [b, b] Gram and the dQ GEMM (tl.dot needs >= 16): up to 64
    for half inputs; up to 32 for float32 (3xTF32) and float64 (FMA), whose
    64-row Gram tiles would spill."""
    cap = 64 if dtype in (torch.float16, torch.bfloat16) else 32
    return min(cap, max(16, next_pow2(b)))


def block_m_choices(dtype: torch.dtype):
    """Every value block_m can return for dtype (for the AOT check)."""
    return sorted({block_m(b, dtype) for b in (1, 16, 32, 64, 4096)})


def bwd_block_c(bm: int) -> int:
    """Inner (b) chunk of sp_bwd_kernel: 16 with 16-row tiles (32 makes ptxas spill a few bytes there)."""
    return 16 if bm == 16 else BWD_BLOCK_C


def num_warps(bm: int) -> int:
    return 8 if bm >= 64 else 4


def _gram(q: torch.Tensor, cdtype: torch.dtype):
    """[splits, b, b] split-K partials of q q^T (upper tiles computed, mirrored)."""
    b, K = q.shape
    bm = block_m(b, q.dtype)
    nt = cdiv(b, bm)
    pairs = [(i, j) for i in range(nt) for j in range(i, nt)]
    max_splits = max(1, cdiv(K, MIN_K_PER_SPLIT))
    splits = max(1, min(max_splits, target_programs(q.device) // len(pairs)))
    k_per_split = max(1, cdiv(cdiv(K, splits), GRAM_BLOCK_K)) * GRAM_BLOCK_K
    splits = max(1, cdiv(K, k_per_split))
    a = torch.empty((splits, b, b), dtype=cdtype, device=q.device)
    pairs_t = torch.tensor(pairs, dtype=torch.int32, device=q.device)
    sp_gram_fwd_kernel[(len(pairs), splits)](
        q, pairs_t, a, b, K, q.stride(0), k_per_split,
        CDTYPE=compute_tl_dtype(q.dtype), DOT_PREC=dot_precision(q.dtype), BLOCK_M=bm, BLOCK_K=GRAM_BLOCK_K,
        num_warps=num_warps(bm), num_stages=GRAM_STAGES)
    return a, splits


def _dq(da: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> None:
    b, K = q.shape
    bm = block_m(b, q.dtype)
    sp_bwd_kernel[(cdiv(b, bm), cdiv(K, BWD_BLOCK_K))](
        da, q, out, b, K, q.stride(0), out.stride(0),
        CDTYPE=compute_tl_dtype(q.dtype), DOT_PREC=dot_precision(q.dtype),
        BLOCK_M=bm, BLOCK_K=BWD_BLOCK_K, BLOCK_C=bwd_block_c(bm), num_warps=num_warps(bm), num_stages=BWD_STAGES)


def sp_forward(q_s, q_t, p, row_weight, need_grad_s, need_grad_t):
    need_gs, need_gt = bool(need_grad_s), bool(need_grad_t)
    p = float(p)
    if p not in (1.0, 2.0):
        raise NotImplementedError(f"p: the Triton SP kernels support p=1 and p=2, got {p}; use backend='reference'")
    qs, qt = row_major(q_s), row_major(q_t)
    b = q_s.shape[0]
    dev = q_s.device
    cdtype = row_weight.dtype
    rows = torch.empty(b, dtype=cdtype, device=dev)
    gs, gt = empty_grad(q_s, need_gs), empty_grad(q_t, need_gt)
    if b == 0:
        return rows, gs, gt
    a_s, splits_s = _gram(qs, cdtype)
    a_t, splits_t = _gram(qt, cdtype)
    da_s = torch.empty((b, b) if need_gs else (0,), dtype=cdtype, device=dev)
    da_t = torch.empty((b, b) if need_gt else (0,), dtype=cdtype, device=dev)
    sp_rows_fwd_kernel[(cdiv(b, ROWS_R),)](
        a_s, a_t, row_weight.contiguous(), scalars([SP_EPS], q_s.dtype, dev), rows,
        da_s if need_gs else rows, da_t if need_gt else rows, b, splits_s, splits_t,
        P=int(p), NEED_GS=need_gs, NEED_GT=need_gt, CDTYPE=compute_tl_dtype(q_s.dtype),
        ROWS=ROWS_R, BLOCK_C=ROWS_BLOCK_C, num_warps=ROWS_WARPS)
    if need_gs and q_s.shape[1]:
        _dq(da_s, qs, gs)
    if need_gt and q_t.shape[1]:
        _dq(da_t, qt, gt)
    return rows, gs, gt
