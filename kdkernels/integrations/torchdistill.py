"""kdkernels' fused losses as torchdistill middle-level losses.

Importing this module registers, in torchdistill's registry (torchdistill >= 1.0):

============  ======================================================================
key           config kwargs (besides the paths, ``student_io`` / ``teacher_io``)
============  ======================================================================
KDKLSHLoss    weight, bias=None | num_hashes, dim, std, seed=0; mse_weight=1.0,
              reduction='mean', teacher_logits_path=None, backend='auto'
KDKNDLoss     centers, eps=1e-12, reduction='mean', backend='auto' (labels: targets)
KDKOFDLoss    margin, reduction='batchmean', backend='auto'
KDKSPLoss     reduction='batchmean' (anything else sums, as SPKDLoss), p=2.0,
              global_batch=False, backend='auto'
============  ======================================================================

Each takes ``student_output_path`` and ``teacher_output_path`` and reads
``io_dict[path][io]`` with ``io`` = ``student_io`` / ``teacher_io`` ('output' by default,
'input' as torchdistill's other losses allow). Tensor arguments (``weight``, ``bias``,
``centers``, ``margin``) are tensors, lists of numbers, or paths of files written with
``torch.save(tensor, path)``. ``KDKSPLoss`` with ``p=1`` is torchdistill's ``SPKDLoss``, value
and gradient. ``teacher_logits_path`` masks the LSH rows the teacher gets wrong (the published
``lshl2_s``): the mask is ``argmax(io_dict[path]['output'], 1) == targets``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor, nn
from torchdistill.losses.registry import register_mid_level_loss

from .. import nn as knn

__all__ = ["KDKLSHLoss", "KDKNDLoss", "KDKOFDLoss", "KDKSPLoss"]


def _tensor(name: str, value) -> Tensor:
    """A config value as a tensor: a tensor, a list of numbers, or the path of a torch.save'd tensor."""
    if isinstance(value, (str, os.PathLike)):
        value = torch.load(value, map_location="cpu", weights_only=True)
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}: the file must hold one tensor (torch.save(tensor, path)), "
                            f"got {type(value).__name__}")
        return value
    if isinstance(value, (list, tuple)):
        return torch.tensor(value, dtype=torch.float32)
    if isinstance(value, Tensor):
        return value
    raise TypeError(f"{name}: expected a tensor, a list of numbers or a file path, got {type(value).__name__}")


class _PairLoss(nn.Module):
    """Reads the student and teacher tensors from torchdistill's io_dicts."""

    def __init__(self, student_output_path: str, teacher_output_path: str, student_io: str = "output",
                 teacher_io: str = "output"):
        super().__init__()
        self.student_output_path, self.teacher_output_path = student_output_path, teacher_output_path
        self.student_io, self.teacher_io = student_io, teacher_io

    def pair(self, student_io_dict, teacher_io_dict):
        return (student_io_dict[self.student_output_path][self.student_io],
                teacher_io_dict[self.teacher_output_path][self.teacher_io])


@register_mid_level_loss(key="KDKLSHLoss")
class KDKLSHLoss(_PairLoss):
    def __init__(self, student_output_path, teacher_output_path, weight=None, bias=None, *, num_hashes=None,
                 dim=None, std=None, seed=0, mse_weight=1.0, reduction="mean",
                 teacher_logits_path: Optional[str] = None, backend="auto", student_io="output",
                 teacher_io="output"):
        super().__init__(student_output_path, teacher_output_path, student_io, teacher_io)
        if weight is None:
            if None in (num_hashes, dim, std):
                raise ValueError("weight: give the projection (weight, bias) or num_hashes, dim and std for a "
                                 f"random one, got num_hashes={num_hashes}, dim={dim}, std={std}")
            self.lsh = knn.LSHLoss.random(int(num_hashes), int(dim), float(std), mse_weight=mse_weight,
                                          reduction=reduction, backend=backend,
                                          generator=torch.Generator().manual_seed(int(seed)))
        else:
            self.lsh = knn.LSHLoss(_tensor("weight", weight), None if bias is None else _tensor("bias", bias),
                                   mse_weight=mse_weight, reduction=reduction, backend=backend)
        self.teacher_logits_path = teacher_logits_path

    def forward(self, student_io_dict, teacher_io_dict, targets=None, *args, **kwargs):
        f_s, f_t = self.pair(student_io_dict, teacher_io_dict)
        mask = None
        if self.teacher_logits_path is not None:
            if targets is None:
                raise ValueError("targets: teacher_logits_path masks rows by the labels, but no targets were given")
            mask = teacher_io_dict[self.teacher_logits_path]["output"].argmax(1) == targets
        return self.lsh(f_s, f_t, sample_mask=mask)


@register_mid_level_loss(key="KDKNDLoss")
class KDKNDLoss(_PairLoss):
    def __init__(self, student_output_path, teacher_output_path, centers, *, eps=1e-12, reduction="mean",
                 backend="auto", student_io="output", teacher_io="output"):
        super().__init__(student_output_path, teacher_output_path, student_io, teacher_io)
        self.nd = knn.NDLoss(_tensor("centers", centers), eps=eps, reduction=reduction, backend=backend)

    def forward(self, student_io_dict, teacher_io_dict, targets=None, *args, **kwargs):
        if targets is None:
            raise ValueError("targets: KDKNDLoss needs the labels (torchdistill passes them as targets)")
        return self.nd(*self.pair(student_io_dict, teacher_io_dict), targets)


@register_mid_level_loss(key="KDKOFDLoss")
class KDKOFDLoss(_PairLoss):
    def __init__(self, student_output_path, teacher_output_path, margin, *, reduction="batchmean", backend="auto",
                 student_io="output", teacher_io="output"):
        super().__init__(student_output_path, teacher_output_path, student_io, teacher_io)
        self.ofd = knn.OFDLoss(_tensor("margin", margin), reduction=reduction, backend=backend)

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs):
        return self.ofd(*self.pair(student_io_dict, teacher_io_dict))


@register_mid_level_loss(key="KDKSPLoss")
class KDKSPLoss(_PairLoss):
    def __init__(self, student_output_path, teacher_output_path, reduction="batchmean", *, p=2.0,
                 global_batch=False, backend="auto", student_io="output", teacher_io="output"):
        super().__init__(student_output_path, teacher_output_path, student_io, teacher_io)
        self.sp = knn.SPLoss(p=p, reduction="batchmean" if reduction == "batchmean" else "sum",
                             global_batch=global_batch, backend=backend)

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs):
        return self.sp(*self.pair(student_io_dict, teacher_io_dict))
