"""``nn.Module`` forms of the losses. Constants (LSH projection, ND class means,
OFD margins) are buffers, so ``.to(device)`` and ``state_dict`` carry them."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import functional as F
from .stats import lsh_weight

__all__ = ["LSHLoss", "NDLoss", "OFDLoss", "SPLoss"]


class LSHLoss(nn.Module):
    """LSH feature mimicking with a frozen projection ``weight`` [N, D] and ``bias`` [N].

    forward(f_s [B, D], f_t [B, D] or None, sample_mask=None, teacher_codes=None) -> loss
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor] = None, *, mse_weight: float = 1.0,
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.mse_weight, self.reduction, self.backend = mse_weight, reduction, backend

    @classmethod
    def random(cls, num_hashes: int, dim: int, std: float, *, generator: Optional[torch.Generator] = None,
               **kwargs) -> "LSHLoss":
        """A fresh Gaussian projection (std: that of the teacher classifier's weight), zero bias."""
        return cls(lsh_weight(num_hashes, dim, std, generator=generator), torch.zeros(num_hashes), **kwargs)

    def forward(self, f_s: Tensor, f_t: Optional[Tensor], sample_mask: Optional[Tensor] = None,
                teacher_codes: Optional[Tensor] = None) -> Tensor:
        return F.lsh_loss(f_s, f_t, self.weight, self.bias, mse_weight=self.mse_weight, sample_mask=sample_mask,
                          teacher_codes=teacher_codes, reduction=self.reduction, backend=self.backend)

    def codes(self, f_t: Tensor) -> Tensor:
        """Packed teacher bits for offline use: f_t [B, D] -> uint8 [B, ceil(N/8)]."""
        return F.lsh_codes(f_t, self.weight, self.bias)

    def extra_repr(self) -> str:
        n, d = self.weight.shape
        return f"num_hashes={n}, dim={d}, mse_weight={self.mse_weight}, reduction={self.reduction!r}, backend={self.backend!r}"


class NDLoss(nn.Module):
    """Feature norm and direction loss with teacher class means ``centers`` [K, D].

    forward(s [B, D], t [B, D], labels [B]) -> loss
    """

    def __init__(self, centers: Tensor, *, eps: float = 1e-12, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.register_buffer("centers", centers.detach().clone())
        self.eps, self.reduction, self.backend = eps, reduction, backend

    def forward(self, s: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        return F.nd_loss(s, t, self.centers, labels, eps=self.eps, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        k, d = self.centers.shape
        return f"num_classes={k}, dim={d}, reduction={self.reduction!r}, backend={self.backend!r}"


class OFDLoss(nn.Module):
    """OFD partial L2 with per-channel ``margin`` [C] (see :func:`kdkernels.ofd_margin_from_bn`).

    forward(s [B, C, *], t [B, C, *]) -> loss
    """

    def __init__(self, margin: Tensor, *, reduction: str = "batchmean", backend: str = "auto"):
        super().__init__()
        self.register_buffer("margin", margin.detach().clone())
        self.reduction, self.backend = reduction, backend

    def forward(self, s: Tensor, t: Tensor) -> Tensor:
        return F.ofd_loss(s, t, self.margin, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"channels={self.margin.shape[0]}, reduction={self.reduction!r}, backend={self.backend!r}"


class SPLoss(nn.Module):
    """Similarity-preserving loss; forward(f_s, f_t) with tensors [b, ...] or sequences of layer pairs."""

    def __init__(self, *, p: float = 2.0, reduction: str = "batchmean", global_batch: bool = False, group=None,
                 backend: str = "auto"):
        super().__init__()
        self.p, self.reduction, self.global_batch, self.group, self.backend = p, reduction, global_batch, group, backend

    def forward(self, f_s: Union[Tensor, Sequence[Tensor]], f_t: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        return F.sp_loss(f_s, f_t, p=self.p, reduction=self.reduction, global_batch=self.global_batch,
                         group=self.group, backend=self.backend)

    def extra_repr(self) -> str:
        return f"p={self.p}, reduction={self.reduction!r}, global_batch={self.global_batch}, backend={self.backend!r}"
