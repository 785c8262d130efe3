"""SP (similarity preserving) on Triton: kernels and launch wrappers.

Math (shared/spec/losses.md, section 4), one layer pair, Q [b, K]:
    A = Q Q^T;  G[r] = A[r] / max(||A[r]||_p, eps)   (p = 1 or 2)
    l_r = sum_j (G_t - G_s)[r, j]^2
    Dg_s = -2 rw_r (G_t - G_s)[r],  Dg_t = -Dg_s
    dA[r] = Dg/den - 1[n >= eps] <Dg, A[r]>/den^2 * dn/dA   (dn/dA = A/n for p=2, sign(A) for p=1)
    dQ = (dA + dA^T) Q

Three kernels, no host synchronisation (tile coordinates come from the program
ids), every grid dimension bounded by the SM count (not by K):
- ``sp_gram_fwd_kernel``: BLOCK_M x BLOCK_M tiles of A (up to 128 rows, 16-bit
  operands straight into tl.dot); the grid covers every tile pair and the
  programs below the diagonal exit, the others store their tile twice (itself
  and mirrored) so A is exactly symmetric. With a single tile (b <= BLOCK_M) Q
  is read once per K step. K is split (split-K, >= MIN_K_PER_SPLIT columns a
  split) so the small [b, b] output still fills the GPU: [splits, b, b] partials.
- ``sp_rows_fwd_kernel``: the whole [b, b] step in one launch: a fixed-order sum
  of the splits, row norms, G_t - G_s, the row losses and dA for both sides; a
  row that fits one tile (b <= ROWS_BLOCK_C) is loaded once.
- ``sp_bwd_kernel``: dQ = (dA + dA^T) Q. A program owns a row block and a range
  of >= MIN_K_PER_SPLIT columns; with b <= MAX_SINGLE_C it loads its rows of
  dA + dA^T once and keeps them for all its K tiles (wider b re-reads them per
  K tile). The symmetrisation is fused into that load and dQ is written in the
  input dtype; the GEMM is bound by reading Q and writing dQ once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import arch, cdiv, compute_tl_dtype, device_warps, dot_precision, empty_grad, interpreting, mma, next_pow2, \
    row_major, pipeline_stages, scalar_arg, scalar_bits, sqrt_rn, target_programs

SP_EPS = 1e-12
MIN_K_PER_SPLIT = 512  # columns a Gram split / a dQ program covers at least
MAX_SINGLE_C = 128     # widest [b, b] row kept in registers in one piece (dQ kernel; 64 for sm_80 float32)
# sp_rows_fwd_kernel
ROWS_R = 4
ROWS_BLOCK_C = 256
ROWS_WARPS = 4
# sp_gram_fwd_kernel and sp_bwd_kernel: (BLOCK_M cap, BLOCK_K, num_stages) per input dtype class and
# arch family (sm_80's mma.sync keeps operands in registers: smaller float32 tiles)
GEMM_CONFIG = {(90, "half"): (64, 64, 3), (90, "fp32"): (64, 32, 3), (80, "half"): (64, 64, 3),
               (80, "fp32"): (32, 32, 3), "fp64": (32, 32, 1)}


@triton.jit
def sp_gram_fwd_kernel(q_ptr, a_ptr, b, K, stride_q, k_per_split,
                       CDTYPE: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr, SINGLE_TILE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Upper-triangle Gram tiles, mirrored: a split-K partial of A = Q Q^T.

    q_ptr:  [b, K] activations (unit column stride), input dtype
    a_ptr:  [splits, b, b] partial Gram matrices, compute dtype
    grid:   (nt * nt, splits), nt = cdiv(b, BLOCK_M); SINGLE_TILE when nt == 1
    """
    pid = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    nt = tl.cdiv(b, BLOCK_M)
    ti = pid // nt
    tj = pid % nt
    if ti <= tj:
        lm = tl.arange(0, BLOCK_M)
        ri = ti * BLOCK_M + lm.to(tl.int64)
        rj = tj * BLOCK_M + lm.to(tl.int64)
        ri_ok = ri < b
        rj_ok = rj < b
        k_lo = pid_k * k_per_split
        # 64-bit tile origins, 32-bit offsets inside the tiles
        qi_ptr = q_ptr + ti * BLOCK_M * stride_q + k_lo
        qj_ptr = q_ptr + tj * BLOCK_M * stride_q + k_lo
        k_end = K - k_lo
        acc = tl.zeros([BLOCK_M, BLOCK_M], CDTYPE)
        for k0 in range(0, k_per_split, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < k_end  # k_per_split is a multiple of BLOCK_K: splits never overlap
            qi = tl.load(qi_ptr + lm[:, None] * stride_q + kk[None, :], mask=ri_ok[:, None] & k_ok[None, :], other=0)
            if SINGLE_TILE:
                qj = qi
            else:
                qj = tl.load(qj_ptr + lm[:, None] * stride_q + kk[None, :], mask=rj_ok[:, None] & k_ok[None, :],
                             other=0)
            acc = mma(qi, tl.trans(qj), acc, DOT_PREC, INTERP)
        a = a_ptr + pid_k * b * b
        ok = ri_ok[:, None] & rj_ok[None, :]
        ri32 = ri.to(tl.int32)  # b * b < 2**31: 32-bit offsets inside the [b, b] matrix
        rj32 = rj.to(tl.int32)
        # the tile itself (on a diagonal tile: its upper triangle and diagonal) ...
        tl.store(a + ri32[:, None] * b + rj32[None, :], acc, mask=ok & (ri32[:, None] <= rj32[None, :]))
        # ... and its mirror below the diagonal
        tl.store(a + rj32[None, :] * b + ri32[:, None], acc, mask=ok & (ri32[:, None] < rj32[None, :]))


@triton.jit
def _sp_load_a(a_ptr, offs, mask, b, splits, CDTYPE: tl.constexpr):
    """Fixed-order sum of the split-K partials of A at offs."""
    a = tl.load(a_ptr + offs, mask=mask, other=0).to(CDTYPE)
    for sp in range(1, splits):
        a += tl.load(a_ptr + sp * b * b + offs, mask=mask, other=0).to(CDTYPE)
    return a


@triton.jit
def _sp_rows_tile(as_ptr, at_ptr, r, r_ok, c, b, splits_s, splits_t, CDTYPE: tl.constexpr, SINGLE: tl.constexpr,
                  m1, offs1, a_s1, a_t1):
    """(mask, offsets, A_s, A_t) of the row block's columns c: the rows loaded once if SINGLE, else this chunk."""
    if SINGLE:
        m, offs, a_s, a_t = m1, offs1, a_s1, a_t1
    else:
        m = r_ok[:, None] & (c < b)[None, :]
        offs = r[:, None] * b + c[None, :]
        a_s = _sp_load_a(as_ptr, offs, m, b, splits_s, CDTYPE)
        a_t = _sp_load_a(at_ptr, offs, m, b, splits_t, CDTYPE)
    return m, offs, a_s, a_t


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
def sp_rows_fwd_kernel(as_ptr, at_ptr, rw_ptr, rows_ptr, das_ptr, dat_ptr, b, splits_s, splits_t, eps_bits,
                       P: tl.constexpr, NEED_GS: tl.constexpr, NEED_GT: tl.constexpr, CDTYPE: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE: tl.constexpr):
    """Fused [b, b] step: row norms, G_t - G_s, row losses and dA (both sides).

    as_ptr, at_ptr:   [splits_s, b, b], [splits_t, b, b] split-K partials of A_s, A_t
    rw_ptr:           [b] row weights, compute dtype
    rows_ptr:         [b] l_r = sum_j (G_t - G_s)[r, j]^2, compute dtype
    das_ptr, dat_ptr: [b, b] dA_s, dA_t for the row-weighted loss (if NEED_GS / NEED_GT)
    eps_bits:         eps of the norm clamp as ``scalar_bits``
    SINGLE:           b <= BLOCK_C: each row is loaded once and kept for the three passes
    """
    pid = tl.program_id(0).to(tl.int64)
    r = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    r_ok = r < b
    eps = scalar_arg(eps_bits, CDTYPE)
    if SINGLE:  # the whole rows, loaded once
        c = tl.arange(0, BLOCK_C)
        m1 = r_ok[:, None] & (c < b)[None, :]
        offs1 = r[:, None] * b + c[None, :]
        a_s1 = _sp_load_a(as_ptr, offs1, m1, b, splits_s, CDTYPE)
        a_t1 = _sp_load_a(at_ptr, offs1, m1, b, splits_t, CDTYPE)
    else:
        m1, offs1, a_s1, a_t1 = 0, 0, 0, 0
    # pass 1: row norms of A_s and A_t
    n_s = tl.zeros([ROWS], CDTYPE)
    n_t = tl.zeros([ROWS], CDTYPE)
    for c0 in range(0, b, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m, offs, a_s, a_t = _sp_rows_tile(as_ptr, at_ptr, r, r_ok, c, b, splits_s, splits_t, CDTYPE, SINGLE,
                                          m1, offs1, a_s1, a_t1)
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
        m, offs, a_s, a_t = _sp_rows_tile(as_ptr, at_ptr, r, r_ok, c, b, splits_s, splits_t, CDTYPE, SINGLE,
                                          m1, offs1, a_s1, a_t1)
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
            m, offs, a_s, a_t = _sp_rows_tile(as_ptr, at_ptr, r, r_ok, c, b, splits_s, splits_t, CDTYPE, SINGLE,
                                              m1, offs1, a_s1, a_t1)
            dg_s, _ = _sp_dgram(a_s, a_t, den_s, den_t, w)
            if NEED_GS:
                tl.store(das_ptr + offs, _sp_da(dg_s, a_s, den_s, n_s, k_s, P), mask=m)
            if NEED_GT:
                tl.store(dat_ptr + offs, _sp_da(-dg_s, a_t, den_t, n_t, k_t, P), mask=m)


@triton.jit
def _sp_sym(da_ptr, r, r_ok, c, b, CDTYPE: tl.constexpr):
    """(dA + dA^T)[r, c], [BLOCK_M, BLOCK_C]."""
    c_ok = c < b
    m = r_ok[:, None] & c_ok[None, :]
    return tl.load(da_ptr + r[:, None] * b + c[None, :], mask=m, other=0).to(CDTYPE) \
        + tl.load(da_ptr + c[None, :] * b + r[:, None], mask=m, other=0).to(CDTYPE)


@triton.jit
def _sp_operand(sym, DT: tl.constexpr):
    """sym as a DT tl.dot operand, and the [BLOCK_M] factors that undo its row scaling.

    float16's range would flush small dA entries (they scale like 1/b^2) to zero, so
    each row of a 16-bit operand is scaled by a power of two (exact) that brings its
    largest entry to [1, 2); wider dtypes are not scaled."""
    if DT == tl.float16 or DT == tl.bfloat16:
        amax = tl.max(tl.abs(sym), 1)
        ok = (amax > 0) & (amax < float("inf"))
        scale = tl.where(ok, tl.exp2(-tl.floor(tl.log2(tl.where(ok, amax, 1)))), 1)
        return (sym * scale[:, None]).to(DT), 1 / scale
    return sym.to(DT), tl.full([sym.shape[0]], 1, sym.dtype)


@triton.jit
def sp_bwd_kernel(da_ptr, q_ptr, dq_ptr, b, K, stride_q, stride_dq, k_per_prog,
                  CDTYPE: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr, SINGLE_C: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """dQ = (dA + dA^T) Q over this program's rows and k_per_prog columns.

    da_ptr: [b, b] dA, compute dtype (contiguous)
    q_ptr:  [b, K] activations (unit column stride), input dtype
    dq_ptr: [b, K] gradient, input dtype
    grid:   (cdiv(b, BLOCK_M), cdiv(K, k_per_prog)); SINGLE_C when b <= BLOCK_C (rows of dA + dA^T loaded once)
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    lm = tl.arange(0, BLOCK_M)
    r = pid_m * BLOCK_M + lm.to(tl.int64)
    r_ok = r < b
    # 64-bit tile origins, 32-bit offsets inside the tiles
    k_lo = pid_k * k_per_prog
    q_ptr += k_lo
    dq_ptr += pid_m * BLOCK_M * stride_dq + k_lo
    k_end = K - k_lo
    r32 = r.to(tl.int32)  # b * b < 2**31: 32-bit offsets inside dA
    if SINGLE_C:
        c1 = tl.arange(0, BLOCK_C)
        sym1, inv1 = _sp_operand(_sp_sym(da_ptr, r32, r_ok, c1, b, CDTYPE), q_ptr.dtype.element_ty)
    for k0 in range(0, k_per_prog, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < k_end
        acc = tl.zeros([BLOCK_M, BLOCK_K], CDTYPE)
        if SINGLE_C:
            lc = tl.arange(0, BLOCK_C)
            q = tl.load(q_ptr + lc[:, None] * stride_q + kk[None, :], mask=(lc < b)[:, None] & k_ok[None, :], other=0)
            acc = mma(sym1, q, acc, DOT_PREC, INTERP) * inv1[:, None]
        else:
            for c0 in range(0, b, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
                sym, inv = _sp_operand(_sp_sym(da_ptr, r32, r_ok, c.to(tl.int32), b, CDTYPE), q_ptr.dtype.element_ty)
                q = tl.load(q_ptr + c[:, None] * stride_q + kk[None, :], mask=(c < b)[:, None] & k_ok[None, :],
                            other=0)
                acc += mma(sym, q, tl.zeros([BLOCK_M, BLOCK_K], CDTYPE), DOT_PREC, INTERP) * inv[:, None]
        tl.store(dq_ptr + lm[:, None] * stride_dq + kk[None, :], acc.to(dq_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & k_ok[None, :])


# --------------------------------------------------------------------------- host side
def dtype_class(dtype: torch.dtype) -> str:
    return "half" if dtype in (torch.float16, torch.bfloat16) else ("fp64" if dtype == torch.float64 else "fp32")


def gemm_config(dtype: torch.dtype, arch: int):
    kind = dtype_class(dtype)
    return GEMM_CONFIG[kind] if kind == "fp64" else GEMM_CONFIG[(arch, kind)]


def block_m(b: int, dtype: torch.dtype, arch: int) -> int:
    """Tile height of the Gram and dQ GEMMs (tl.dot needs >= 16), capped per dtype and
    arch for zero spills. On sm_90 16-bit and float32 tiles are always the cap, 64 rows:
    wgmma's tile height (a smaller b is masked; below 64 rows the dots fall back to mma.sync)."""
    cap = gemm_config(dtype, arch)[0]
    if arch == 90 and dtype != torch.float64:
        return cap
    return min(cap, max(16, next_pow2(b)))


def max_single_c(dtype: torch.dtype, arch: int) -> int:
    return 64 if arch == 80 and dtype == torch.float32 else MAX_SINGLE_C


def bwd_block_c(b: int, dtype: torch.dtype, arch: int) -> int:
    """Inner (b) width of sp_bwd_kernel: all of b when b <= max_single_c, else chunks of
    32 (16 for float64)."""
    if b <= max_single_c(dtype, arch):
        return max(16, next_pow2(b))
    return 16 if dtype == torch.float64 else 32


def rows_block_c(b: int) -> int:
    return max(16, next_pow2(b)) if b <= ROWS_BLOCK_C else ROWS_BLOCK_C


def num_warps(bm: int, dtype: torch.dtype, arch: int) -> int:
    """8 warps of 32 lanes from 64 rows, and from 32 for float32 (sm_80's 3xTF32 operands live in
    registers; on sm_90 ptxas spills 8 bytes of the 32-row single-pass TF32 Gram tile at 4 warps);
    ``device_warps`` turns them into a device's warps. ``arch`` is kept for the callers' symmetry."""
    return 8 if bm >= 64 or (dtype == torch.float32 and bm >= 32) else 4


def configs(dtype: torch.dtype, arch: int):
    """Every kernel config the launchers can pick for dtype (for the AOT check): each
    depends on b only through powers of two up to MAX_SINGLE_C, so these b cover all."""
    bs = [1 << i for i in range(0, 10)]
    return dict(
        gram=sorted({(block_m(b, dtype, arch), b <= block_m(b, dtype, arch)) for b in bs}),
        rows=sorted({(rows_block_c(b), b <= ROWS_BLOCK_C) for b in bs}),
        bwd=sorted({(block_m(b, dtype, arch), bwd_block_c(b, dtype, arch), b <= max_single_c(dtype, arch))
                    for b in bs}))


def _k_split(K: int, programs_other: int, device, block_k: int) -> int:
    """Columns a split covers: enough splits to fill ~2 waves of SMs, >= MIN_K_PER_SPLIT each."""
    splits = max(1, min(cdiv(K, MIN_K_PER_SPLIT), target_programs(device) // max(1, programs_other)))
    return max(1, cdiv(cdiv(K, splits), block_k)) * block_k


def _gram(q: torch.Tensor, cdtype: torch.dtype):
    """[splits, b, b] split-K partials of q q^T (upper tiles computed, mirrored)."""
    b, K = q.shape
    bm = block_m(b, q.dtype, arch(q.device))
    _, bk, stages = gemm_config(q.dtype, arch(q.device))
    stages = pipeline_stages(stages, q.device)
    nt = cdiv(b, bm)
    k_per_split = _k_split(K, nt * (nt + 1) // 2, q.device, bk)
    splits = max(1, cdiv(K, k_per_split))
    a = torch.empty((splits, b, b), dtype=cdtype, device=q.device)
    sp_gram_fwd_kernel[(nt * nt, splits)](
        q, a, b, K, q.stride(0), k_per_split,
        CDTYPE=compute_tl_dtype(q.dtype), DOT_PREC=dot_precision(q.dtype, q.device), INTERP=interpreting(),
        SINGLE_TILE=nt == 1, BLOCK_M=bm, BLOCK_K=bk,
        num_warps=device_warps(num_warps(bm, q.dtype, arch(q.device)), q.device),
        num_stages=stages)
    return a, splits


def _dq(da: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> None:
    b, K = q.shape
    bm = block_m(b, q.dtype, arch(q.device))
    _, bk, stages = gemm_config(q.dtype, arch(q.device))
    stages = pipeline_stages(stages, q.device)
    k_per_prog = _k_split(K, cdiv(b, bm), q.device, bk)
    sp_bwd_kernel[(cdiv(b, bm), cdiv(K, k_per_prog))](
        da, q, out, b, K, q.stride(0), out.stride(0), k_per_prog,
        CDTYPE=compute_tl_dtype(q.dtype), DOT_PREC=dot_precision(q.dtype, q.device), INTERP=interpreting(),
        SINGLE_C=b <= max_single_c(q.dtype, arch(q.device)), BLOCK_M=bm, BLOCK_K=bk,
        BLOCK_C=bwd_block_c(b, q.dtype, arch(q.device)),
        num_warps=device_warps(num_warps(bm, q.dtype, arch(q.device)), q.device),
        num_stages=stages)


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
        a_s, a_t, row_weight.contiguous(), rows, da_s if need_gs else rows, da_t if need_gt else rows,
        b, splits_s, splits_t, scalar_bits(SP_EPS),
        P=int(p), NEED_GS=need_gs, NEED_GT=need_gt, CDTYPE=compute_tl_dtype(q_s.dtype),
        ROWS=ROWS_R, BLOCK_C=rows_block_c(b), SINGLE=b <= ROWS_BLOCK_C,
        num_warps=device_warps(ROWS_WARPS, dev))
    if need_gs and q_s.shape[1]:
        _dq(da_s, qs, gs)
    if need_gt and q_t.shape[1]:
        _dq(da_t, qt, gt)
    return rows, gs, gt
