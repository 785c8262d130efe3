"""OFD (partial L2 with margin ReLU) on Triton: kernels and launch wrappers.

Math (shared/spec/losses.md, section 3), per element with c its channel:
    t' = t if (t > m_c or t is NaN) else m_c
    d  = (s - t')^2 * 1[(s > t') or (t' > 0)]
    dd/ds = 2 (s - t') mask,   dd/dt = -dd/ds where t' = t (else 0)

Layout: s, t (and every output) are walked linearly over their storage when
they are dense (contiguous, channels_last, any permutation): with the same
strides for all of them, element ``o`` of the storage has channel
``(o // stride_c) % C``. Other strided inputs are made contiguous on the host.
The kernels are purely memory-bound: one read of s and t, one write.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import compute_tl_dtype, scalars

# One config (memory-bound elementwise): 1024 elements x 4 warps = 8 per thread.
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _ofd_elem(s_ptr, t_ptr, m_ptr, offs, base, mask, C, stride_c, BLOCK: tl.constexpr, CDTYPE: tl.constexpr):
    """Loads one tile and returns (s - t', mask as float, keep_t = t' is t)."""
    # channel of each element: the int64 division happens once per program, the
    # per-element one in int32 (local < stride_c + BLOCK).
    q0 = base // stride_c
    r0 = (base - q0 * stride_c).to(tl.int32)
    local = r0 + tl.arange(0, BLOCK)
    ch = ((q0 % C).to(tl.int32) + local // stride_c) % C
    s = tl.load(s_ptr + offs, mask=mask, other=0).to(CDTYPE)
    t = tl.load(t_ptr + offs, mask=mask, other=0).to(CDTYPE)
    m = tl.load(m_ptr + ch, mask=mask, other=0).to(CDTYPE)
    keep_t = (t > m) | (t != t)
    tc = tl.where(keep_t, t, m)
    sel = ((s > tc) | (tc > 0)).to(CDTYPE)
    return s - tc, sel, keep_t


@triton.jit
def ofd_fwd_kernel(s_ptr, t_ptr, m_ptr, scale_ptr, out_ptr, gs_ptr, gt_ptr, numel, C, stride_c,
                   STORE_D: tl.constexpr, NEED_GS: tl.constexpr, NEED_GT: tl.constexpr,
                   CDTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """OFD forward: loss (per-program partial sums, or d elementwise) and scaled gradients.

    s_ptr, t_ptr:   [numel] storage of s, t [B, C, *] (same dense strides)
    m_ptr:          [C] margin, compute dtype
    scale_ptr:      [1] grad_scale, compute dtype
    out_ptr:        STORE_D: [numel] d (input dtype, same strides as s);
                    else [num_programs] partial sums of d (compute dtype)
    gs_ptr, gt_ptr: [numel] grad_scale * dd/ds, dd/dt (input dtype; unused unless NEED_GS/NEED_GT)
    """
    pid = tl.program_id(0).to(tl.int64)
    base = pid * BLOCK
    offs = base + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    diff, sel, keep_t = _ofd_elem(s_ptr, t_ptr, m_ptr, offs, base, mask, C, stride_c, BLOCK, CDTYPE)
    d = diff * diff * sel  # a product keeps NaN where the mask is 0
    if STORE_D:
        tl.store(out_ptr + offs, d.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + pid, tl.sum(tl.where(mask, d, 0), axis=0))
    if NEED_GS or NEED_GT:
        g = 2 * diff * sel * tl.load(scale_ptr)
        if NEED_GS:
            tl.store(gs_ptr + offs, g.to(gs_ptr.dtype.element_ty), mask=mask)
        if NEED_GT:
            tl.store(gt_ptr + offs, tl.where(keep_t, -g, 0).to(gt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def ofd_bwd_kernel(gd_ptr, s_ptr, t_ptr, m_ptr, gs_ptr, gt_ptr, numel, C, stride_c,
                   NEED_GS: tl.constexpr, NEED_GT: tl.constexpr, CDTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """OFD backward for reduction='none': gradients for an elementwise upstream gradient.

    gd_ptr:         [numel] upstream gradient of d (same strides as s)
    s_ptr, t_ptr:   [numel] storage of s, t [B, C, *]
    m_ptr:          [C] margin, compute dtype
    gs_ptr, gt_ptr: [numel] grad_d * dd/ds, grad_d * dd/dt (input dtype)
    """
    pid = tl.program_id(0).to(tl.int64)
    base = pid * BLOCK
    offs = base + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    diff, sel, keep_t = _ofd_elem(s_ptr, t_ptr, m_ptr, offs, base, mask, C, stride_c, BLOCK, CDTYPE)
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


def _prepare(s: torch.Tensor, t: torch.Tensor):
    """(s, t) in one dense layout, plus the channel count and stride for the index math."""
    if not _is_dense(s):
        s = s.contiguous()
    t = _as_layout(t, s)
    C = s.shape[1] if s.dim() > 1 else 1
    stride_c = s.stride(1) if C > 1 else 1
    return s, t, C, stride_c


def _back_to(g: torch.Tensor, orig: torch.Tensor) -> torch.Tensor:
    """A gradient computed in the working layout, returned in orig's layout."""
    if g.numel() == 0 or (_is_dense(orig) and _same_layout(g, orig)):
        return g
    return torch.empty_like(orig).copy_(g)


def _launch_fwd(s, t, margin, scale, store_d, need_gs, need_gt):
    s_orig, t_orig = s, t
    s, t, C, stride_c = _prepare(s, t)
    numel = s.numel()
    grid = (triton.cdiv(numel, BLOCK),)
    if store_d:
        out = _like(s, s.dtype)
    else:
        out = torch.empty(grid[0], dtype=margin.dtype, device=s.device)
    gs = _like(s, s.dtype) if need_gs else s.new_empty(0)
    gt = _like(t, t.dtype) if need_gt else t.new_empty(0)
    if numel:
        ofd_fwd_kernel[grid](
            s, t, margin, scalars([scale], s.dtype, s.device), out,
            gs if need_gs else out, gt if need_gt else out, numel, C, stride_c,
            STORE_D=store_d, NEED_GS=need_gs, NEED_GT=need_gt, CDTYPE=compute_tl_dtype(s.dtype),
            BLOCK=BLOCK, num_warps=NUM_WARPS)
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
    s, t, C, stride_c = _prepare(s, t)
    gd = _as_layout(grad_d.expand(s.shape), s)
    numel = s.numel()
    gs = _like(s, s.dtype) if need_gs else s.new_empty(0)
    gt = _like(t, t.dtype) if need_gt else t.new_empty(0)
    if numel and (need_gs or need_gt):
        ofd_bwd_kernel[(triton.cdiv(numel, BLOCK),)](
            gd, s, t, margin, gs if need_gs else gd, gt if need_gt else gd, numel, C, stride_c,
            NEED_GS=need_gs, NEED_GT=need_gt, CDTYPE=compute_tl_dtype(s.dtype), BLOCK=BLOCK,
            num_warps=NUM_WARPS)
    return _back_to(gs, s_orig), _back_to(gt, t_orig)
