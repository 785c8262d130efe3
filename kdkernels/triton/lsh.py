"""LSH feature mimicking (LSHFM) on Triton: kernels and launch wrappers.

Math (shared/spec/losses.md, section 1), per row i:
    h_s = f_s W^T + b,  h_t = f_t W^T + b,  y = 1[h_t > 0] (NaN where h_t is NaN)
    l_i = mse_weight/D * sum_d (f_s - f_t)^2 + 1/N * sum_j BCE(h_s, y)
    dl/df_s = 2 mse_weight (f_s - f_t)/D + rw/N G W,  G = sigmoid(h_s) - y,   dl/df_t = -2 mse_weight (f_s - f_t)/D

The fused-linear-loss pattern, chunk by chunk of rows (a chunk's scratch fits
in L2; [B, N] is never allocated for a large batch), on one of two paths.

Fused (teacher features, student gradient wanted, D within FUSED_CONFIG's or
FUSED_SPLIT_CONFIG's bound):
- ``lsh_fused_kernel``: a row block's f_s and f_t stay on chip while W streams by
  in [BLOCK_N, D] tiles over the program's span of hashes; each tile feeds both
  projections, the epilogue and G W, so G is never stored and W is read once per
  row block. The hash axis is split over programs (``fused_splits``).
- ``lsh_fused_split_kernel``: the same for float32 under matmul precision 'highest'
  where tf32x3's copies of the row block would not fit on chip (64 < D <= 256 on
  sm_90): operands split into TF32 and bfloat16 parts by hand (see its docstring).
- ``lsh_grad_kernel`` (FUSED): sums the splits' partial G W in a fixed order, then
  the same epilogue as below.

Two GEMMs (otherwise):
- ``lsh_proj_kernel``: one [BLOCK_M, BLOCK_N] tile of both projections per
  program (f_s and f_t against the same W tile, K-steps of BLOCK_K, pipelined),
  and in the epilogue the bias, the target bit (or the packed teacher code), the
  stable BCE (per-tile row sums) and G = sigmoid(h_s) - y in [-1, 1], stored in
  the GEMM dtype (the input dtype: 16-bit for 16-bit inputs; the row factor rw/N,
  which float16 could not hold, is applied after the second GEMM). The programs of the first N tile also sum (f_s - f_t)^2.
- ``lsh_grad_kernel``: dL/df_s = rw/N G W as a second tiled GEMM ([chunk, N] x [N, D]),
  whose epilogue adds the MSE gradient and writes both feature gradients once in
  their dtype; the programs of the first D tile finish the row losses (fixed-order
  sum of the per-tile BCE sums). A Triton GEMM rather than torch.mm: its epilogue
  saves materialising the MSE term and a cast pass, and the sum order is fixed.
Everything is deterministic (no atomics) and nothing synchronises with the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils
from ._utils import cdiv, compute_tl_dtype, dot_precision, empty_grad, interpreting, mma, next_pow2, row_major, \
    scalar_arg, scalar_bits

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of lsh_proj_kernel and
# (BLOCK_M, BLOCK_D, BLOCK_K, num_warps, num_stages) of lsh_grad_kernel, per input
# dtype class and arch family (80: mma.sync keeps operands in registers, so smaller
# tiles); sized for zero spills (see aot.py). With packed codes only one projection
# is computed, which leaves room for K-steps of 64 on sm_90; "loss": no G output.
PROJ_CONFIG = {(90, "half"): (64, 128, 32, 8, 3), (90, "half codes"): (64, 128, 64, 8, 3),
               (90, "fp32"): (64, 128, 16, 8, 3), (90, "fp32 codes"): (64, 64, 32, 8, 3),
               (90, "fp32 loss"): (64, 64, 32, 8, 3),
               (80, "half"): (64, 128, 32, 8, 3), (80, "half codes"): (64, 64, 32, 8, 3),
               (80, "fp32"): (32, 64, 32, 8, 3), (80, "fp32 codes"): (32, 32, 32, 4, 3),
               "fp64": (32, 32, 16, 4, 2)}
GRAD_CONFIG = {(90, "half"): (64, 128, 64, 8, 3), (90, "fp32"): (128, 64, 16, 8, 3), (80, "half"): (64, 64, 64, 8, 3),
               (80, "fp32"): (64, 64, 32, 8, 3), "fp64": (32, 32, 32, 4, 2)}
# lsh_fused_kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages, largest BLOCK_D) per arch family
# and dtype class; used when fused_block_d(D) <= that largest BLOCK_D (a row block's f_s and
# f_t and its [BLOCK_M, BLOCK_D] G W accumulator stay on chip: the bound is where ptxas stops
# fitting it in 255 registers without spills, see aot.py); lsh_grad_kernel then only sums
# the splits, with REDUCE_CONFIG (BLOCK_M, BLOCK_D, BLOCK_K (unused), num_warps, num_stages).
# float64 always takes the two-kernel path. "fp32 tf32": float32 with single-pass TF32 dots
# (matmul precision 'high' / 'medium'), which hold each operand once where tf32x3 ('highest')
# holds it three times (fp32 and two TF32 parts), so a row block's f_s, f_t of up to 256
# columns fit in shared memory; other precisions use the "fp32" entry.
FUSED_CONFIG = {(90, "half"): (64, 32, 8, 3, 256), (80, "half"): (64, 32, 8, 2, 128),
                (90, "fp32"): (64, 32, 8, 2, 64), (90, "fp32 tf32"): (64, 32, 8, 2, 256),
                (80, "fp32"): (32, 32, 4, 2, 32)}
# lsh_fused_split_kernel (float32 under 'highest' beyond FUSED_CONFIG's bound, sm_90 only): per
# (arch family, BLOCK_D), (BLOCK_M, BLOCK_N, num_warps, num_stages); 0 spills (see aot.py).
FUSED_SPLIT_CONFIG = {(90, 128): (64, 32, 8, 2), (90, 256): (64, 8, 8, 2)}
REDUCE_CONFIG = (64, 32, 16, 4, 1)
MAX_SPLITS = 8  # hash-axis splits of lsh_fused_kernel (bounds the partial-sum buffer)
L2_CHUNK_BYTES = 16 << 20  # budget for a chunk's [chunk, N] G (H100: 50 MB of L2, A100: 40 MB)


def proj_config(kind: str, use_codes: bool, arch: int, need_gs: bool = True):
    if kind == "fp64":
        return PROJ_CONFIG[kind]
    variant = f"{kind} codes" if use_codes else (kind if need_gs else f"{kind} loss")
    return PROJ_CONFIG.get((arch, variant), PROJ_CONFIG[(arch, kind)])


def grad_config(kind: str, arch: int):
    return GRAD_CONFIG[kind] if kind == "fp64" else GRAD_CONFIG[(arch, kind)]


def fused_block_d(D: int) -> int:
    return max(16, next_pow2(D))


def fused_key(kind: str, arch: int, prec: str):
    """FUSED_CONFIG's key for a dtype class, arch family and dot precision."""
    key = (arch, f"{kind} {prec}")
    return key if key in FUSED_CONFIG else (arch, kind)


def fused_plan(kind: str, D: int, arch: int, prec: str):
    """(fused kernel, (BLOCK_M, BLOCK_N, num_warps, num_stages)) for these, or None where the
    fused path does not fit (then the two GEMMs)."""
    key, bd = fused_key(kind, arch, prec), fused_block_d(D)
    if key in FUSED_CONFIG and bd <= FUSED_CONFIG[key][4]:
        return lsh_fused_kernel, FUSED_CONFIG[key][:4]
    if kind == "fp32" and prec == "tf32x3" and (arch, bd) in FUSED_SPLIT_CONFIG:
        return lsh_fused_split_kernel, FUSED_SPLIT_CONFIG[(arch, bd)]
    return None


def fused_splits(M: int, N: int, block_m: int, block_n: int, elem: int, csize: int, device) -> int:
    """Hash-axis splits of lsh_fused_kernel for M rows: enough programs for ~2 waves of SMs,
    at most MAX_SPLITS, and the splits' extra traffic (per split and row block: f_s, f_t
    re-read and the [BLOCK_M, D] partial written and read) at most that of streaming W
    once per row block: splits * block_m * (2 elem + 2 csize) <= N elem."""
    want = cdiv(_utils.target_programs(device), cdiv(M, block_m))
    cap = N * elem // (block_m * (2 * elem + 2 * csize))
    return max(1, min(MAX_SPLITS, cdiv(N, block_n), want, cap))


def dtype_class(dtype: torch.dtype) -> str:
    return "half" if dtype in (torch.float16, torch.bfloat16) else ("fp64" if dtype == torch.float64 else "fp32")


@triton.jit
def _log1p(x):
    """log(1 + x) accurate for small x (no libdevice): log(u) * x / (u - 1), u = 1 + x."""
    u = 1 + x
    return tl.where(u == 1, x, tl.log(u) * (x / (u - 1)))


@triton.jit
def _bce_epilogue(h_s, h_t, b_ptr, codes_tile, stride_codes, lr, lc, cols, r_ok, c_ok,
                  HAS_BIAS: tl.constexpr, USE_CODES: tl.constexpr, CDTYPE: tl.constexpr):
    """Epilogue of a [BLOCK_M, BLOCK_N] projection tile: the bias, the target bit (teacher
    sign, or bit lc % 8 of byte lc // 8 at codes_tile), the stable BCE summed over the valid
    hashes of each row ([BLOCK_M]) and G = sigmoid(h_s) - y (0 outside the valid entries)."""
    valid = r_ok[:, None] & c_ok[None, :]
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=c_ok, other=0).to(CDTYPE)
        h_s += bias[None, :]
        h_t += bias[None, :]
    if USE_CODES:
        byte = tl.load(codes_tile + lr[:, None] * stride_codes + (lc // 8)[None, :], mask=valid, other=0)
        y = ((byte.to(tl.int32) >> (lc % 8)[None, :]) & 1).to(CDTYPE)
    else:
        y = tl.where(h_t != h_t, h_t, (h_t > 0).to(CDTYPE))  # a NaN teacher stays NaN
    e = tl.exp(-tl.abs(h_s))
    # torch's form of the stable BCE, (1 - y) h + max(-h, 0) + log1p(exp(-|h|)): same values,
    # and the same inf/NaN outcome as the reference for infinite logits
    bce = (1 - y) * h_s + tl.where(h_s < 0, -h_s, 0) + _log1p(e)
    sig = tl.where(h_s >= 0, 1 / (1 + e), e / (1 + e))
    return tl.sum(tl.where(valid, bce, 0), 1), tl.where(valid, sig - y, 0)


@triton.jit
def lsh_proj_kernel(fs_ptr, ft_ptr, w_ptr, b_ptr, codes_ptr, rw_ptr, g_ptr, part_ptr, sse_ptr,
                    M, D, N, stride_fs, stride_ft, stride_w, stride_codes,
                    HAS_BIAS: tl.constexpr, USE_CODES: tl.constexpr, HAS_MSE: tl.constexpr, NEED_GS: tl.constexpr,
                    CDTYPE: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Projection tiles with the BCE epilogue, for the M rows of one chunk.

    fs_ptr, ft_ptr: [M, D] student / teacher features (unit column stride; ft read if not USE_CODES or HAS_MSE)
    w_ptr:          [N, D] projection (unit column stride), input dtype
    b_ptr:          [N] bias (if HAS_BIAS)
    codes_ptr:      [M, ceil(N/8)] uint8 teacher bits, hash j = bit j%8 of byte j//8 (if USE_CODES)
    rw_ptr:         [M] row weights, compute dtype
    g_ptr:          [M, N] G = sigmoid(h_s) - y, GEMM dtype (if NEED_GS)
    part_ptr:       [cdiv(N, BLOCK_N), M] sum_j BCE_ij over each N tile, compute dtype
    sse_ptr:        [M] sum_d (f_s - f_t)^2, compute dtype (if HAS_MSE; written by the first N tile)
    grid:           (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M))
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    # 64-bit tile origins, 32-bit offsets inside a tile (fewer registers in the GEMM loop)
    fs_ptr += pid_m * BLOCK_M * stride_fs
    ft_ptr += pid_m * BLOCK_M * stride_ft
    w_ptr += pid_n * BLOCK_N * stride_w
    lr = tl.arange(0, BLOCK_M)
    lc = tl.arange(0, BLOCK_N)
    rows = pid_m * BLOCK_M + lr.to(tl.int64)
    cols = pid_n * BLOCK_N + lc.to(tl.int64)
    r_ok = rows < M
    c_ok = cols < N
    first = pid_n == 0
    h_s = tl.zeros([BLOCK_M, BLOCK_N], CDTYPE)
    h_t = tl.zeros([BLOCK_M, BLOCK_N], CDTYPE)
    sse = tl.zeros([BLOCK_M], CDTYPE)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < D
        fm = r_ok[:, None] & k_ok[None, :]
        w = tl.load(w_ptr + lc[:, None] * stride_w + kk[None, :], mask=c_ok[:, None] & k_ok[None, :], other=0)
        fs = tl.load(fs_ptr + lr[:, None] * stride_fs + kk[None, :], mask=fm, other=0)
        h_s = mma(fs, tl.trans(w), h_s, DOT_PREC, INTERP)
        if not USE_CODES:
            ft = tl.load(ft_ptr + lr[:, None] * stride_ft + kk[None, :], mask=fm, other=0)
            h_t = mma(ft, tl.trans(w), h_t, DOT_PREC, INTERP)
            if HAS_MSE:
                diff = fs.to(CDTYPE) - ft.to(CDTYPE)
                sse += tl.sum(diff * diff, 1)  # kept by the first N tile only
        elif HAS_MSE:
            if first:
                ft = tl.load(ft_ptr + lr[:, None] * stride_ft + kk[None, :], mask=fm, other=0)
                diff = fs.to(CDTYPE) - ft.to(CDTYPE)
                sse += tl.sum(diff * diff, 1)
    codes_tile = codes_ptr + pid_m * BLOCK_M * stride_codes + pid_n * (BLOCK_N // 8)
    bce, g = _bce_epilogue(h_s, h_t, b_ptr, codes_tile, stride_codes, lr, lc, cols, r_ok, c_ok,
                           HAS_BIAS, USE_CODES, CDTYPE)
    tl.store(part_ptr + pid_n * M + rows, bce, mask=r_ok)
    if HAS_MSE:
        if first:
            tl.store(sse_ptr + rows, sse, mask=r_ok)
    if NEED_GS:
        g_tile = g_ptr + pid_m * BLOCK_M * N + pid_n * BLOCK_N
        tl.store(g_tile + lr[:, None] * N + lc[None, :], g.to(g_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & c_ok[None, :])


@triton.jit
def _stacked_rows(fs_ptr, ft_ptr, pid_m, M, stride_fs, stride_ft, BLOCK_M: tl.constexpr):
    """Row pointers ([2 BLOCK_M]) of row block pid_m's f_s rows over its f_t rows, and which exist."""
    l2 = tl.arange(0, 2 * BLOCK_M)
    is_t = l2 >= BLOCK_M
    r2 = l2 - tl.where(is_t, BLOCK_M, 0)
    fs_rows = fs_ptr + pid_m * BLOCK_M * stride_fs + r2[:, None] * stride_fs  # 64-bit origin, 32-bit offsets
    ft_rows = ft_ptr + pid_m * BLOCK_M * stride_ft + r2[:, None] * stride_ft
    return tl.where(is_t[:, None], ft_rows, fs_rows), pid_m * BLOCK_M + r2 < M


@triton.jit
def _store_sse(fs_ptr, ft_ptr, sse_ptr, pid_m, M, D, stride_fs, stride_ft,
               CDTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """sum_d (f_s - f_t)^2 of row block pid_m (D <= BLOCK_D), from loads of its own (f_s, f_t
    once more) so that nothing of it stays live through the caller's loop."""
    lr = tl.arange(0, BLOCK_M)
    ld = tl.arange(0, BLOCK_D)
    rows = pid_m * BLOCK_M + lr.to(tl.int64)
    fm = (rows < M)[:, None] & (ld < D)[None, :]
    fs_tile = fs_ptr + pid_m * BLOCK_M * stride_fs
    ft_tile = ft_ptr + pid_m * BLOCK_M * stride_ft
    fs = tl.load(fs_tile + lr[:, None] * stride_fs + ld[None, :], mask=fm, other=0).to(CDTYPE)
    ft = tl.load(ft_tile + lr[:, None] * stride_ft + ld[None, :], mask=fm, other=0).to(CDTYPE)
    tl.store(sse_ptr + rows, tl.sum((fs - ft) * (fs - ft), 1), mask=rows < M)


@triton.jit
def lsh_fused_kernel(fs_ptr, ft_ptr, w_ptr, b_ptr, pd_ptr, part_ptr, sse_ptr,
                     M, D, N, span, stride_fs, stride_ft, stride_w,
                     HAS_BIAS: tl.constexpr, HAS_MSE: tl.constexpr,
                     CDTYPE: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Both projections, the BCE epilogue and G W over one span of hashes, for one row block (D <= BLOCK_D).

    The row block's f_s and f_t rows are loaded once and held (in shared memory on a
    GPU); each W tile ([BLOCK_N, BLOCK_D]) is loaded once and feeds both projections
    and G W, so G is never stored and W is streamed once per row block.
    fs_ptr, ft_ptr: [M, D] student / teacher features (unit column stride)
    w_ptr, b_ptr:   as lsh_proj_kernel
    pd_ptr:         [n_split, cdiv(M, BLOCK_M) BLOCK_M, BLOCK_D] sum over this span of G W, compute dtype
                    (whole tiles: the store needs no mask, which would stay live through the loop)
    part_ptr:       [n_split, M] sum_j BCE_ij over this span, compute dtype
    sse_ptr:        [M] sum_d (f_s - f_t)^2 (if HAS_MSE; written by split 0)
    grid:           (n_split, cdiv(M, BLOCK_M)); split p covers hashes [p span, (p + 1) span)
    """
    pid_s = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    lr = tl.arange(0, BLOCK_M)
    lc = tl.arange(0, BLOCK_N)
    ld = tl.arange(0, BLOCK_D)
    rows = pid_m * BLOCK_M + lr.to(tl.int64)
    r_ok = rows < M
    d_ok = ld < D
    # f_s rows over f_t rows, one [2 BLOCK_M, BLOCK_D] operand: on sm_90 each warpgroup then
    # holds the shared-memory descriptors of its own 64 rows only (two operands spill)
    f_ptrs, f_ok = _stacked_rows(fs_ptr, ft_ptr, pid_m, M, stride_fs, stride_ft, BLOCK_M)
    f2 = tl.load(f_ptrs + ld[None, :], mask=f_ok[:, None] & d_ok[None, :], other=0)
    if HAS_MSE:
        if pid_s == 0:
            _store_sse(fs_ptr, ft_ptr, sse_ptr, pid_m, M, D, stride_fs, stride_ft, CDTYPE, BLOCK_M, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], CDTYPE)
    bce_rows = tl.zeros([BLOCK_M], CDTYPE)
    n_lo = (pid_s * span).to(tl.int32)  # < N: a 32-bit loop; the W tile pointer advances a tile a step
    w_tile = w_ptr + pid_s * span * stride_w
    w_offs = lc[:, None] * stride_w + ld[None, :]
    for n0 in range(0, tl.minimum(N - n_lo, span), BLOCK_N):
        cols = n_lo + n0 + lc
        c_ok = cols < N
        w = tl.load(w_tile + w_offs, mask=c_ok[:, None] & d_ok[None, :], other=0)
        w_tile += BLOCK_N * stride_w
        h = mma(f2, tl.trans(w), tl.zeros([2 * BLOCK_M, BLOCK_N], CDTYPE), DOT_PREC, INTERP)
        h_s, h_t = tl.split(tl.permute(tl.reshape(h, [2, BLOCK_M, BLOCK_N]), [1, 2, 0]))
        bce, g = _bce_epilogue(h_s, h_t, b_ptr, b_ptr, 0, lr, lc, cols, r_ok, c_ok, HAS_BIAS, False, CDTYPE)
        bce_rows += bce
        acc = mma(g.to(w.dtype), w, acc, DOT_PREC, INTERP)
    tl.store(part_ptr + pid_s * M + rows, bce_rows, mask=r_ok)
    tl.store(pd_ptr + ((pid_s * tl.num_programs(1) + pid_m) * BLOCK_M + lr[:, None]) * BLOCK_D + ld[None, :], acc)


@triton.jit
def _tf32_split(x):
    """x = hi + lo with hi exact in TF32 (x's 10 leading mantissa bits), lo = 0 where hi == x (inf)."""
    hi = (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return hi, tl.where(hi == x, 0.0, x - hi)


@triton.jit
def _dot_split_a(a_hi, a_lo, b, acc, INTERP: tl.constexpr):
    """acc + (a_hi + a_lo) @ b, a_hi TF32-exact, a_lo bfloat16: a_hi b_hi + a_hi b_lo in TF32 and
    a_lo b in bfloat16 (a_lo is at most 2^-10 of a, so its 8 bits add ~2^-19 relative error)."""
    b_hi, b_lo = _tf32_split(b)
    acc = mma(a_lo, b.to(tl.bfloat16), acc, "tf32", INTERP)
    acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
    return tl.dot(a_hi, b_hi, acc, input_precision="tf32")


@triton.jit
def _dot_x3(a, b, acc):
    """acc + a @ b from three TF32 products (tf32x3 with the operands split here)."""
    a_hi, a_lo = _tf32_split(a)
    b_hi, b_lo = _tf32_split(b)
    acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32")
    acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
    return tl.dot(a_hi, b_hi, acc, input_precision="tf32")


@triton.jit
def _load_chunk(row_ptrs, row_ok, c: tl.constexpr, D, KC: tl.constexpr):
    """Columns [c KC, (c + 1) KC) of the rows at row_ptrs ([R, 1] pointers, row_ok [R, 1]); 0 past D."""
    cols = c * KC + tl.arange(0, KC)
    return tl.load(row_ptrs + cols[None, :], mask=row_ok & (cols < D)[None, :], other=0)


@triton.jit
def lsh_fused_split_kernel(fs_ptr, ft_ptr, w_ptr, b_ptr, pd_ptr, part_ptr, sse_ptr,
                           M, D, N, span, stride_fs, stride_ft, stride_w,
                           HAS_BIAS: tl.constexpr, HAS_MSE: tl.constexpr, CDTYPE: tl.constexpr,
                           INTERP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    """lsh_fused_kernel for float32 under matmul precision 'highest' (same arguments and outputs,
    D <= BLOCK_D, BLOCK_D >= 64), with operands split by hand.

    tf32x3 would hold the row block's f_s, f_t three times over (~350 KiB at D = 256); here
    they are split once, before the loop, into a TF32 part (float32) and a bfloat16 remainder
    (6 bytes an element: 192 KiB at BLOCK_M = 64, D = 256), each W tile is split as it comes,
    and every product is one of a_hi b_hi, a_hi b_lo (TF32) and a_lo b (bfloat16): 3-4x eager
    float32's error against float64 (README, Deviations), where single-pass TF32 is ~1000x.
    G W is plain tf32x3 (G is in registers). The row block is held in four column chunks of
    BLOCK_D / 4: whole, ptxas spills at D = 256.
    """
    KC: tl.constexpr = BLOCK_D // 4
    pid_s = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    lr = tl.arange(0, BLOCK_M)
    lc = tl.arange(0, BLOCK_N)
    lk = tl.arange(0, KC)
    rows = pid_m * BLOCK_M + lr.to(tl.int64)
    r_ok = rows < M
    f_ptrs, f_ok = _stacked_rows(fs_ptr, ft_ptr, pid_m, M, stride_fs, stride_ft, BLOCK_M)
    f_ok = f_ok[:, None]
    f0_hi, f0_lo = _tf32_split(_load_chunk(f_ptrs, f_ok, 0, D, KC))
    f1_hi, f1_lo = _tf32_split(_load_chunk(f_ptrs, f_ok, 1, D, KC))
    f2_hi, f2_lo = _tf32_split(_load_chunk(f_ptrs, f_ok, 2, D, KC))
    f3_hi, f3_lo = _tf32_split(_load_chunk(f_ptrs, f_ok, 3, D, KC))
    f0_lo, f1_lo, f2_lo, f3_lo = f0_lo.to(tl.bfloat16), f1_lo.to(tl.bfloat16), f2_lo.to(tl.bfloat16), \
        f3_lo.to(tl.bfloat16)
    if HAS_MSE:
        if pid_s == 0:
            _store_sse(fs_ptr, ft_ptr, sse_ptr, pid_m, M, D, stride_fs, stride_ft, CDTYPE, BLOCK_M, BLOCK_D)
    acc0 = tl.zeros([BLOCK_M, KC], CDTYPE)
    acc1 = tl.zeros([BLOCK_M, KC], CDTYPE)
    acc2 = tl.zeros([BLOCK_M, KC], CDTYPE)
    acc3 = tl.zeros([BLOCK_M, KC], CDTYPE)
    bce_rows = tl.zeros([BLOCK_M], CDTYPE)
    n_lo = (pid_s * span).to(tl.int32)
    w_tile = w_ptr + pid_s * span * stride_w
    w_rows = lc[:, None] * stride_w
    for n0 in range(0, tl.minimum(N - n_lo, span), BLOCK_N):
        cols = n_lo + n0 + lc
        c_ok = (cols < N)[:, None]
        w0 = _load_chunk(w_tile + w_rows, c_ok, 0, D, KC)
        w1 = _load_chunk(w_tile + w_rows, c_ok, 1, D, KC)
        w2 = _load_chunk(w_tile + w_rows, c_ok, 2, D, KC)
        w3 = _load_chunk(w_tile + w_rows, c_ok, 3, D, KC)
        w_tile += BLOCK_N * stride_w
        h = _dot_split_a(f0_hi, f0_lo, tl.trans(w0), tl.zeros([2 * BLOCK_M, BLOCK_N], CDTYPE), INTERP)
        h = _dot_split_a(f1_hi, f1_lo, tl.trans(w1), h, INTERP)
        h = _dot_split_a(f2_hi, f2_lo, tl.trans(w2), h, INTERP)
        h = _dot_split_a(f3_hi, f3_lo, tl.trans(w3), h, INTERP)
        h_s, h_t = tl.split(tl.permute(tl.reshape(h, [2, BLOCK_M, BLOCK_N]), [1, 2, 0]))
        bce, g = _bce_epilogue(h_s, h_t, b_ptr, b_ptr, 0, lr, lc, cols, r_ok, cols < N, HAS_BIAS, False, CDTYPE)
        bce_rows += bce
        # W's split is redone here rather than shared with the projection's (transposed) one:
        # sharing made the compiler keep both layouts in shared memory (241 KiB at D = 256)
        acc0 = _dot_x3(g, w0, acc0)
        acc1 = _dot_x3(g, w1, acc1)
        acc2 = _dot_x3(g, w2, acc2)
        acc3 = _dot_x3(g, w3, acc3)
    tl.store(part_ptr + pid_s * M + rows, bce_rows, mask=r_ok)
    pd = pd_ptr + ((pid_s * tl.num_programs(1) + pid_m) * BLOCK_M + lr[:, None]) * BLOCK_D + lk[None, :]
    tl.store(pd, acc0)
    tl.store(pd + KC, acc1)
    tl.store(pd + 2 * KC, acc2)
    tl.store(pd + 3 * KC, acc3)


@triton.jit
def lsh_grad_kernel(g_ptr, w_ptr, fs_ptr, ft_ptr, rw_ptr, part_ptr, sse_ptr, rows_ptr, gs_ptr, gt_ptr,
                    M, D, N, n_parts, stride_w, stride_fs, stride_ft, stride_gs, stride_gt, stride_pd, stride_pd_row,
                    mse_bits,
                    HAS_MSE: tl.constexpr, NEED_GS: tl.constexpr, NEED_GT: tl.constexpr, FUSED: tl.constexpr,
                    CDTYPE: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """dL/df_s = rw/N G W + MSE gradient, dL/df_t, and the row losses, for one chunk.

    g_ptr:          [M, N] G from lsh_proj_kernel (read if NEED_GS), or with FUSED the
                    partial G W of lsh_fused_kernel: split p, row i at p * stride_pd + i * stride_pd_row
                    (summed over the splits in a fixed order)
    w_ptr:          [N, D] projection (unit column stride)
    fs_ptr, ft_ptr: [M, D] features (read if HAS_MSE)
    rw_ptr:         [M] row weights, compute dtype
    part_ptr:       [n_parts, M] per-N-tile (per-split) BCE row sums;  sse_ptr: [M] sum_d (f_s - f_t)^2 (if HAS_MSE)
    rows_ptr:       [M] per-row loss l_i, compute dtype (written by the programs of the first D tile)
    gs_ptr, gt_ptr: [M, D] rw_i dl_i/df_s, rw_i dl_i/df_t in the input dtype (if NEED_GS / NEED_GT)
    mse_bits:       mse_weight as ``scalar_bits``
    grid:           (cdiv(D, BLOCK_D) if a gradient is wanted else 1, cdiv(M, BLOCK_M))
    """
    pid_d = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    r_ok = rows < M
    mse_w = scalar_arg(mse_bits, CDTYPE)
    if pid_d == 0:  # finish the rows: fixed-order sum over the N tiles
        bce = tl.zeros([BLOCK_M], CDTYPE)
        for p in range(0, n_parts):
            bce += tl.load(part_ptr + p * M + rows, mask=r_ok, other=0)
        loss = bce / N
        if HAS_MSE:
            loss += mse_w * (tl.load(sse_ptr + rows, mask=r_ok, other=0) / D)
        tl.store(rows_ptr + rows, loss, mask=r_ok)
    if NEED_GS or NEED_GT:
        lr = tl.arange(0, BLOCK_M)  # 64-bit tile origins, 32-bit offsets inside the tiles
        ld = tl.arange(0, BLOCK_D)
        d_ok = pid_d * BLOCK_D + ld < D
        m = r_ok[:, None] & d_ok[None, :]
        row0 = pid_m * BLOCK_M
        col0 = pid_d * BLOCK_D
        acc = tl.zeros([BLOCK_M, BLOCK_D], CDTYPE)
        if FUSED:
            if NEED_GS:
                pd_tile = g_ptr + row0 * stride_pd_row + col0
                for p in range(0, n_parts):
                    acc += tl.load(pd_tile + p * stride_pd + lr[:, None] * stride_pd_row + ld[None, :], mask=m,
                                   other=0)
        elif NEED_GS:
            g_tile = g_ptr + row0 * N
            w_tile = w_ptr + col0
            for n0 in range(0, N, BLOCK_K):
                nn = n0 + tl.arange(0, BLOCK_K)
                n_ok = nn < N
                g = tl.load(g_tile + lr[:, None] * N + nn[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0)
                w = tl.load(w_tile + nn[:, None] * stride_w + ld[None, :], mask=n_ok[:, None] & d_ok[None, :],
                            other=0)
                acc = mma(g, w, acc, DOT_PREC, INTERP)
        rw = tl.load(rw_ptr + rows, mask=r_ok, other=0).to(CDTYPE)
        if HAS_MSE:
            fs = tl.load(fs_ptr + row0 * stride_fs + col0 + lr[:, None] * stride_fs + ld[None, :], mask=m,
                         other=0).to(CDTYPE)
            ft = tl.load(ft_ptr + row0 * stride_ft + col0 + lr[:, None] * stride_ft + ld[None, :], mask=m,
                         other=0).to(CDTYPE)
            gmse = (2 * mse_w / D * rw)[:, None] * (fs - ft)
        else:
            gmse = tl.zeros([BLOCK_M, BLOCK_D], CDTYPE)
        if NEED_GS:
            tl.store(gs_ptr + row0 * stride_gs + col0 + lr[:, None] * stride_gs + ld[None, :],
                     (acc * (rw / N)[:, None] + gmse).to(gs_ptr.dtype.element_ty), mask=m)
        if NEED_GT:
            tl.store(gt_ptr + row0 * stride_gt + col0 + lr[:, None] * stride_gt + ld[None, :],
                     (-gmse).to(gt_ptr.dtype.element_ty), mask=m)


MAX_GRID_YZ = 65535  # CUDA's limit on grid dimensions y and z


def chunk_rows(B: int, N: int, elem_bytes: int, block_m: int, min_block_m: int) -> int:
    """Rows per chunk: the chunk's [chunk, N] G within L2_CHUNK_BYTES, a multiple of block_m,
    and few enough row blocks (grid axis 1) for CUDA's grid limit."""
    fit = max(block_m, (L2_CHUNK_BYTES // max(1, N * elem_bytes)) // block_m * block_m)
    return min(B, fit, MAX_GRID_YZ * min_block_m // block_m * block_m)


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
    rows = torch.empty(B, dtype=cdtype, device=dev)
    gs = empty_grad(f_s, need_gs)
    gt = empty_grad(f_t, need_gt) if f_t is not None else f_s.new_empty(0)
    if B == 0:
        return rows, gs, gt
    kind = dtype_class(f_s.dtype)
    arch = _utils.arch(dev)
    elem, csize = f_s.element_size(), row_weight.element_size()
    prec = dot_precision(f_s.dtype, dev)
    plan = fused_plan(kind, D, arch, prec) if need_gs and not use_codes else None
    fused = plan is not None
    if fused:
        fused_kernel, (pm, pn, p_warps, p_stages) = plan
        gm, gd, gk, g_warps, g_stages = REDUCE_CONFIG
        chunk = chunk_rows(B, MAX_SPLITS * D, csize, max(pm, gm), min(pm, gm))
        n_parts = fused_splits(chunk, N, pm, pn, elem, csize, dev)
        bd = fused_block_d(D)
        g_buf = torch.empty((n_parts, cdiv(chunk, pm) * pm, bd), dtype=cdtype, device=dev)
    else:
        pm, pn, pk, p_warps, p_stages = proj_config(kind, use_codes, arch, need_gs)
        gm, gd, gk, g_warps, g_stages = grad_config(kind, arch)
        # the second GEMM runs in the input dtype, as autograd's would
        chunk = chunk_rows(B, N, elem, max(pm, gm), min(pm, gm))
        n_parts = cdiv(N, pn)
        g_buf = torch.empty((chunk, N) if need_gs else (0,), dtype=f_s.dtype, device=dev)
    # the configs count warps of 32 lanes and NVIDIA's pipeline stages
    p_warps, g_warps = _utils.device_warps(p_warps, dev), _utils.device_warps(g_warps, dev)
    p_stages, g_stages = _utils.pipeline_stages(p_stages, dev), _utils.pipeline_stages(g_stages, dev)
    part = torch.empty((n_parts, chunk), dtype=cdtype, device=dev)
    sse = torch.empty(chunk if has_mse else 0, dtype=cdtype, device=dev)
    common = dict(CDTYPE=compute_tl_dtype(f_s.dtype), DOT_PREC=prec, INTERP=interpreting())
    flags = dict(HAS_BIAS=bias is not None, USE_CODES=use_codes, HAS_MSE=has_mse, NEED_GS=need_gs)
    mse_bits = scalar_bits(mse_weight)
    for r0 in range(0, B, chunk):
        M = min(chunk, B - r0)
        sl = slice(r0, r0 + M)
        fs_c, ft_c, rw_c = fs[sl], ft[sl] if f_t is not None else fs[sl], rw[sl]
        codes_c = codes[sl]
        g_arg = g_buf if need_gs else part
        sse_arg = sse if has_mse else part
        codes_stride = codes.stride(0) if use_codes else 0
        if fused:
            splits = min(n_parts, fused_splits(M, N, pm, pn, elem, csize, dev))
            span = cdiv(cdiv(N, pn), splits) * pn
            splits = cdiv(N, span)
            prec_arg = dict(DOT_PREC=prec) if fused_kernel is lsh_fused_kernel else {}
            fused_kernel[(splits, cdiv(M, pm))](
                fs_c, ft_c, w, b, g_arg, part, sse_arg, M, D, N, span, fs.stride(0), ft.stride(0), w.stride(0),
                HAS_BIAS=bias is not None, HAS_MSE=has_mse, CDTYPE=common["CDTYPE"], INTERP=common["INTERP"],
                BLOCK_M=pm, BLOCK_N=pn, BLOCK_D=bd, num_warps=p_warps, num_stages=p_stages, **prec_arg)
            pd_strides = (cdiv(M, pm) * pm * bd, bd)
        else:
            splits, pd_strides = n_parts, (0, 0)
            lsh_proj_kernel[(n_parts, cdiv(M, pm))](
                fs_c, ft_c, w, b, codes_c, rw_c, g_arg, part, sse_arg,
                M, D, N, fs.stride(0), ft.stride(0), w.stride(0), codes_stride, **flags,
                BLOCK_M=pm, BLOCK_N=pn, BLOCK_K=pk, num_warps=p_warps, num_stages=p_stages, **common)
        grads = need_gs or need_gt
        lsh_grad_kernel[(cdiv(D, gd) if grads else 1, cdiv(M, gm))](
            g_arg, w, fs_c, ft_c, rw_c, part, sse_arg, rows[sl],
            gs[sl] if need_gs else rows, gt[sl] if need_gt else rows,
            M, D, N, splits, w.stride(0), fs.stride(0), ft.stride(0),
            gs.stride(0) if need_gs else 0, gt.stride(0) if need_gt else 0, *pd_strides, mse_bits,
            HAS_MSE=has_mse, NEED_GS=need_gs, NEED_GT=need_gt, FUSED=fused,
            BLOCK_M=gm, BLOCK_D=gd, BLOCK_K=gk, num_warps=g_warps, num_stages=g_stages, **common)
    return rows, gs, gt
