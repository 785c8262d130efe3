"""OFD (partial L2 with margin ReLU) on Triton: kernels and launch wrappers.

Math (shared/spec/losses.md, section 3), per element with c its channel:
    t' = t if (t > m_c or t is NaN) else m_c
    d  = (s - t')^2 * 1[(s > t') or (t' > 0)]
    dd/ds = 2 (s - t') mask,   dd/dt = -dd/ds where t' = t (else 0)

Layout: s, t (and every output) are walked over their storage when they are
dense (contiguous, channels_last, any permutation): with the same strides for
all of them the storage is a [outer, C, inner] array (inner = the channel
stride). Each program owns a [BLOCK_O, BLOCK_C, BLOCK_I] tile of it, so it
loads the BLOCK_C margins it needs once (never one per element) and needs no
per-element index division. Other strided inputs are made contiguous on the
host. The kernels are memory-bound: one read of s and t, one write.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import compute_tl_dtype, device_warps, next_pow2, scalar_arg, scalar_bits

# 1024 elements a program, 4 warps = 8 per thread (4 a lane with AMD's 64-lane wavefronts: device_warps), in every
# tile shape.
TILE = 1024
NUM_WARPS = 4


@triton.jit
def _ofd_elem(pid, s_ptr, t_ptr, m_ptr, outer, C, inner, CDTYPE: tl.constexpr,
              BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """Loads program pid's tile; returns (offsets, mask, s - t', mask as float, keep_t = t' is t)."""
    n_i = tl.cdiv(inner, BLOCK_I)
    n_c = tl.cdiv(C, BLOCK_C)
    p_i = pid % n_i
    p_c = (pid // n_i) % n_c
    p_o = pid // (n_i * n_c)
    o = p_o * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
    c = p_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    i = p_i * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    offs = o[:, None, None] * (C * inner) + c[None, :, None] * inner + i[None, None, :]
    c_ok = c < C
    mask = (o < outer)[:, None, None] & c_ok[None, :, None] & (i < inner)[None, None, :]
    m = tl.load(m_ptr + c, mask=c_ok, other=0).to(CDTYPE)[None, :, None]  # once per program
    s = tl.load(s_ptr + offs, mask=mask, other=0).to(CDTYPE)
    t = tl.load(t_ptr + offs, mask=mask, other=0).to(CDTYPE)
    keep_t = (t > m) | (t != t)
    tc = tl.where(keep_t, t, m)
    sel = ((s > tc) | (tc > 0)).to(CDTYPE)
    return offs, mask, s - tc, sel, keep_t


@triton.jit
def ofd_fwd_kernel(s_ptr, t_ptr, m_ptr, out_ptr, gs_ptr, gt_ptr, outer, C, inner, scale_bits,
                   STORE_D: tl.constexpr, NEED_GS: tl.constexpr, NEED_GT: tl.constexpr, CDTYPE: tl.constexpr,
                   BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """OFD forward: loss (per-program partial sums, or d elementwise) and scaled gradients.

    s_ptr, t_ptr:   [outer, C, inner] storage of s, t [B, C, *] (same dense strides)
    m_ptr:          [C] margin, compute dtype
    out_ptr:        STORE_D: d (input dtype, s's storage); else [num_programs] partial sums of d (compute dtype)
    gs_ptr, gt_ptr: grad_scale * dd/ds, dd/dt (input dtype, s's storage; unused unless NEED_GS/NEED_GT)
    scale_bits:     grad_scale as ``scalar_bits``
    """
    pid = tl.program_id(0).to(tl.int64)
    offs, mask, diff, sel, keep_t = _ofd_elem(pid, s_ptr, t_ptr, m_ptr, outer, C, inner, CDTYPE,
                                              BLOCK_O, BLOCK_C, BLOCK_I)
    d = diff * diff * sel  # a product keeps NaN where the mask is 0
    if STORE_D:
        tl.store(out_ptr + offs, d.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + pid, tl.sum(tl.where(mask, d, 0)))
    if NEED_GS or NEED_GT:
        g = 2 * diff * sel * scalar_arg(scale_bits, CDTYPE)
        if NEED_GS:
            tl.store(gs_ptr + offs, g.to(gs_ptr.dtype.element_ty), mask=mask)
        if NEED_GT:
            tl.store(gt_ptr + offs, tl.where(keep_t, -g, 0).to(gt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def ofd_bwd_kernel(gd_ptr, s_ptr, t_ptr, m_ptr, gs_ptr, gt_ptr, outer, C, inner,
                   NEED_GS: tl.constexpr, NEED_GT: tl.constexpr, CDTYPE: tl.constexpr,
                   BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """OFD backward for reduction='none': gradients for an elementwise upstream gradient.

    gd_ptr:         upstream gradient of d (s's storage)
    s_ptr, t_ptr:   [outer, C, inner] storage of s, t [B, C, *]
    m_ptr:          [C] margin, compute dtype
    gs_ptr, gt_ptr: grad_d * dd/ds, grad_d * dd/dt (input dtype)
    """
    offs, mask, diff, sel, keep_t = _ofd_elem(tl.program_id(0).to(tl.int64), s_ptr, t_ptr, m_ptr, outer, C,
                                              inner, CDTYPE, BLOCK_O, BLOCK_C, BLOCK_I)
    gd = tl.load(gd_ptr + offs, mask=mask, other=0).to(CDTYPE)
    g = gd * sel * 2 * diff
    if NEED_GS:
        tl.store(gs_ptr + offs, g.to(gs_ptr.dtype.element_ty), mask=mask)
    if NEED_GT:
        tl.store(gt_ptr + offs, tl.where(keep_t, -g, 0).to(gt_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- host side
def _is_dense(x: torch.Tensor) -> bool:
    """Non-overlapping and dense: some permutation of the dims is contiguous."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(sa == sb for sa, sb, sz in zip(a.stride(), b.stride(), a.shape) if sz != 1)


def _like(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised tensor with exactly ref's shape and strides."""
    return torch.empty_strided(ref.shape, ref.stride(), dtype=dtype, device=ref.device)


def _as_layout(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """x in ref's (dense) layout; no copy when it already is."""
    if _same_layout(x, ref):
        return x
    return _like(ref, x.dtype).copy_(x)


def tile(C: int, inner: int):
    """(BLOCK_O, BLOCK_C, BLOCK_I) of the TILE-element tile for a [outer, C, inner] storage."""
    block_i = min(next_pow2(inner), TILE)
    block_c = min(next_pow2(C), TILE // block_i)
    return TILE // (block_i * block_c), block_c, block_i


def tiles():
    """Tile shapes of the common layouts (NCHW with a large plane, channels_last, a
    7x7 NCHW plane) for the AOT check; every shape has TILE elements, 8 a thread."""
    return [tile(64, 1024), tile(64, 1), tile(2048, 49)]


def _prepare(s: torch.Tensor, t: torch.Tensor):
    """(s, t) in one dense layout and its [outer, C, inner] shape."""
    if not _is_dense(s):
        s = s.contiguous()
    t = _as_layout(t, s)
    C = s.shape[1] if s.dim() > 1 else 1
    inner = s.stride(1) if C > 1 else s.numel()
    outer = s.numel() // max(1, C * inner)
    return s, t, (outer, C, inner)


def _grid(shape, blocks):
    outer, C, inner = shape
    return (triton.cdiv(outer, blocks[0]) * triton.cdiv(C, blocks[1]) * triton.cdiv(inner, blocks[2]),)


def _back_to(g: torch.Tensor, orig: torch.Tensor) -> torch.Tensor:
    """A gradient computed in the working layout, returned in orig's layout."""
    if g.numel() == 0 or (_is_dense(orig) and _same_layout(g, orig)):
        return g
    return torch.empty_like(orig).copy_(g)


def _launch_fwd(s, t, margin, scale, store_d, need_gs, need_gt):
    s_orig, t_orig = s, t
    s, t, shape = _prepare(s, t)
    blocks = tile(shape[1], shape[2])
    grid = _grid(shape, blocks)
    if store_d:
        out = _like(s, s.dtype)
    else:
        out = torch.empty(grid[0], dtype=margin.dtype, device=s.device)
    gs = _like(s, s.dtype) if need_gs else s.new_empty(0)
    gt = _like(t, t.dtype) if need_gt else t.new_empty(0)
    if s.numel():
        ofd_fwd_kernel[grid](
            s, t, margin, out, gs if need_gs else out, gt if need_gt else out, *shape, scalar_bits(scale),
            STORE_D=store_d, NEED_GS=need_gs, NEED_GT=need_gt, CDTYPE=compute_tl_dtype(s.dtype),
            BLOCK_O=blocks[0], BLOCK_C=blocks[1], BLOCK_I=blocks[2],
            num_warps=device_warps(NUM_WARPS, s.device))
    return out, _back_to(gs, s_orig), _back_to(gt, t_orig)


def ofd_forward(s, t, margin, grad_scale, need_grad_s, need_grad_t):
    partials, gs, gt = _launch_fwd(s, t, margin, grad_scale, False, bool(need_grad_s), bool(need_grad_t))
    # second stage of the reduction: a fixed-order sum of the per-program partials
    return partials.sum(), gs, gt


def ofd_none(s, t, margin):
    d, _, _ = _launch_fwd(s, t, margin, 1.0, True, False, False)
    return _back_to(d, s)


def ofd_backward(grad_d, s, t, margin, need_grad_s, need_grad_t):
    need_gs, need_gt = bool(need_grad_s), bool(need_grad_t)
    s_orig, t_orig = s, t
    s, t, shape = _prepare(s, t)
    gd = _as_layout(grad_d.expand(s.shape), s)
    gs = _like(s, s.dtype) if need_gs else s.new_empty(0)
    gt = _like(t, t.dtype) if need_gt else t.new_empty(0)
    if s.numel() and (need_gs or need_gt):
        blocks = tile(shape[1], shape[2])
        ofd_bwd_kernel[_grid(shape, blocks)](
            gd, s, t, margin, gs if need_gs else gd, gt if need_gt else gd, *shape,
            NEED_GS=need_gs, NEED_GT=need_gt, CDTYPE=compute_tl_dtype(s.dtype),
            BLOCK_O=blocks[0], BLOCK_C=blocks[1], BLOCK_I=blocks[2],
            num_warps=device_warps(NUM_WARPS, s.device))
    return _back_to(gs, s_orig), _back_to(gt, t_orig)
