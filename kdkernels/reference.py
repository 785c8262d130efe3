"""Eager PyTorch references of the four losses, with the published semantics.

These are the ground truth the fused kernels are tested against (see
``shared/spec/losses.md``). They use plain autograd, never the compiled
extension or Triton. float16/bfloat16 inputs are computed in float32 and the
loss is returned in the input dtype, as the kernels do.

Differences from the published code are only where the spec asks kdkernels to
be safer (NaN propagation, eps clamps, the empty LSH mask); each is noted where
it happens.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .stats import class_means, ofd_margin, ofd_margin_from_bn  # noqa: F401  (re-exported)

__all__ = [
    "lsh_loss", "lsh_codes", "unpack_lsh_codes", "nd_loss", "ofd_loss", "sp_loss",
    "ofd_margin", "ofd_margin_from_bn", "class_means",
]

_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


def _upcast(x: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if x is None else x.to(dtype)


def _reduce_rows(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    """rows: [B] per-row losses -> reduced loss ('mean', 'sum', 'none')."""
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


# --------------------------------------------------------------------------- LSH
def unpack_lsh_codes(codes: torch.Tensor, num_hashes: int, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [B, ceil(N/8)] -> {0,1} [B, N]; hash j is bit (j % 8) of byte j // 8."""
    shifts = torch.arange(8, device=codes.device, dtype=torch.uint8)
    bits = (codes.unsqueeze(-1) >> shifts) & 1  # [B, ceil(N/8), 8]
    return bits.reshape(codes.shape[0], -1)[:, :num_hashes].to(dtype)


def _teacher_bits(h_t: torch.Tensor) -> torch.Tensor:
    """y = 1[h_t > 0] as float, but NaN where h_t is NaN (a NaN teacher is never a silent 0).
    Detached: y is piecewise constant in f_t, no gradient flows through it (not even where NaN)."""
    bits = (h_t > 0).to(h_t.dtype)
    return torch.where(torch.isnan(h_t), h_t.detach(), bits)


def lsh_codes(f_t: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Teacher hash bits packed 8 per byte: f_t [B, D], weight [N, D] -> uint8 [B, ceil(N/8)]."""
    dtype = _compute_dtype(f_t.dtype)
    h_t = F.linear(f_t.to(dtype), weight.to(dtype), _upcast(bias, dtype))
    bits = (h_t > 0).to(torch.uint8)  # [B, N]
    n = bits.shape[1]
    pad = (-n) % 8
    if pad:
        bits = F.pad(bits, (0, pad))
    bits = bits.reshape(bits.shape[0], -1, 8)
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return (bits << shifts).sum(-1, dtype=torch.uint8)


def lsh_loss(
    f_s: torch.Tensor,
    f_t: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    mse_weight: float = 1.0,
    sample_mask: Optional[torch.Tensor] = None,
    teacher_codes: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """LSH feature mimicking. f_s, f_t [B, D]; weight [N, D]; bias [N]; sample_mask [B].

    l_i = mse_weight * mean_d (f_s - f_t)^2 + mean_j BCE(h_s, 1[h_t > 0]).
    With 'mean' and a mask that selects nothing the loss is 0 (the published
    code gives NaN).
    """
    dtype = _compute_dtype(f_s.dtype)
    fs = f_s.to(dtype)
    w = weight.to(dtype)
    b = _upcast(bias, dtype)
    h_s = F.linear(fs, w, b)  # [B, N]
    if teacher_codes is not None:
        y = unpack_lsh_codes(teacher_codes, w.shape[0], dtype)
    else:
        y = _teacher_bits(F.linear(f_t.to(dtype), w, b))
    rows = F.binary_cross_entropy_with_logits(h_s, y, reduction="none").mean(1)  # [B]
    if mse_weight != 0.0:
        rows = rows + mse_weight * (fs - f_t.to(dtype)).pow(2).mean(1)
    if sample_mask is not None:
        m = sample_mask.to(dtype)
        rows = rows * m
        if reduction == "mean":
            total = m.sum()
            # an empty selection gives 0 (and zero gradients) instead of 0/0
            return (rows.sum() / torch.where(total != 0, total, torch.ones_like(total))).to(f_s.dtype)
    return _reduce_rows(rows, reduction).to(f_s.dtype)


# --------------------------------------------------------------------------- ND
def nd_loss(
    s: torch.Tensor,
    t: torch.Tensor,
    centers: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float = 1e-12,
    reduction: str = "mean",
) -> torch.Tensor:
    """Feature norm and direction. s, t [B, D]; centers [K, D]; labels [B] int.

    l_i = 1 - <s_i, e_{y_i}> / max(||t_i||, ||s_i||), ties picking the student
    norm, e_k = centers_k / ||centers_k||; NaN in the teacher norm propagates.
    """
    dtype = _compute_dtype(s.dtype)
    s_, t_, c_ = s.to(dtype), t.to(dtype), centers.to(dtype)
    e = c_ / torch.linalg.vector_norm(c_, dim=1, keepdim=True).clamp_min(eps)  # [K, D]
    # contiguous(): the norm of a strided row is summed in another order, which broke exact
    # ties (t a copy of s) towards the teacher depending on the layout
    ns = torch.linalg.vector_norm(s_.contiguous(), dim=1)
    nt = torch.linalg.vector_norm(t_.contiguous(), dim=1)
    teacher_wins = (nt > ns) | torch.isnan(nt)
    den = torch.where(teacher_wins, nt, ns).clamp_min(eps)
    rows = 1.0 - (s_ * e[labels.long()]).sum(1) / den  # long(): uint8 would index as a mask, int8/16 fail
    return _reduce_rows(rows, reduction).to(s.dtype)


# --------------------------------------------------------------------------- OFD
def ofd_loss(s: torch.Tensor, t: torch.Tensor, margin: torch.Tensor, *, reduction: str = "batchmean") -> torch.Tensor:
    """Partial L2 with margin ReLU. s, t [B, C, *]; margin [C].

    t' = max(t, margin_c); d = (s - t')^2 * 1[(s > t') or (t' > 0)].
    dd/dt flows only where t > margin (strict), and NaN anywhere gives NaN.
    """
    dtype = _compute_dtype(s.dtype)
    s_, t_ = s.to(dtype), t.to(dtype)
    m = margin.to(dtype).reshape((1, -1) + (1,) * (s.dim() - 2))
    # where(), not maximum(): maximum splits the gradient at ties; NaN t kept.
    t_clip = torch.where((t_ > m) | torch.isnan(t_), t_, m)
    mask = ((s_ > t_clip) | (t_clip > 0)).to(dtype)
    d = (s_ - t_clip).pow(2) * mask  # a product keeps NaN where mask is 0
    if reduction == "none":
        return d.to(s.dtype)
    total = d.sum()
    if reduction == "batchmean":
        total = total / s.shape[0]
    elif reduction == "mean":
        total = total / s.numel()
    return total.to(s.dtype)


# --------------------------------------------------------------------------- SP
SP_EPS = 1e-12


def _sp_pair_rows(f_s: torch.Tensor, f_t: torch.Tensor, p: float) -> torch.Tensor:
    """One layer pair -> [b] per-row sums of (G_t - G_s)^2."""
    dtype = _compute_dtype(f_s.dtype)
    b = f_s.shape[0]
    q_s = f_s.to(dtype).reshape(b, -1)
    q_t = f_t.to(dtype).reshape(b, -1)
    g_s = F.normalize(q_s @ q_s.T, p=p, dim=1, eps=SP_EPS)
    g_t = F.normalize(q_t @ q_t.T, p=p, dim=1, eps=SP_EPS)
    return (g_t - g_s).pow(2).sum(1)


def sp_loss(
    f_s: Union[torch.Tensor, Sequence[torch.Tensor]],
    f_t: Union[torch.Tensor, Sequence[torch.Tensor]],
    *,
    p: float = 2.0,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Similarity preserving. f_s [b, ...], f_t [b, ...] (or sequences of pairs, summed).

    G = row-normalised (order p) Q Q^T with Q = flatten(f, 1);
    'batchmean' = ||G_t - G_s||_F^2 / b^2, 'sum', 'none' = [b] row sums.
    """
    pairs_s = [f_s] if isinstance(f_s, torch.Tensor) else list(f_s)
    pairs_t = [f_t] if isinstance(f_t, torch.Tensor) else list(f_t)
    rows = sum(_sp_pair_rows(a, b, p) for a, b in zip(pairs_s, pairs_t))
    b = pairs_s[0].shape[0]
    if reduction == "none":
        out = rows
    elif reduction == "sum":
        out = rows.sum()
    else:
        out = rows.sum() / (b * b)
    return out.to(pairs_s[0].dtype)
