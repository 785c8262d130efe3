"""Constants the losses need, computed from a teacher: OFD margins, ND class
means, LSH projection initialisation."""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

from . import _validate as V

__all__ = [
    "ofd_margin", "ofd_margin_from_bn", "class_means", "ClassMeans",
    "lsh_weight", "lsh_bias_from_teacher",
]


# --------------------------------------------------------------------------- OFD
def ofd_margin(gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Per-channel margin E[x | x < 0] of N(beta, |gamma|^2): gamma, beta [C] -> float32 [C].

    Computed in float64. Where Phi(-mu/sigma) <= 0.001 the published fallback
    -3 sigma is used. A channel with gamma == 0 (a constant) gets margin 0.
    """
    V.check_tensor("gamma", gamma, ndim=1)
    V.check_tensor("beta", beta, ndim=1)
    V.check_same_shape("beta", beta, "gamma", gamma)
    sigma = gamma.detach().to(torch.float64).abs()
    mu = beta.detach().to(torch.float64)
    safe_sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    z = mu / safe_sigma
    tail = 0.5 * torch.erfc(z / math.sqrt(2.0))  # Phi(-z)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)  # phi(z)
    safe_tail = torch.where(tail > 0.001, tail, torch.ones_like(tail))
    margin = torch.where(tail > 0.001, mu - sigma * pdf / safe_tail, -3.0 * sigma)
    margin = torch.where(sigma > 0, margin, torch.zeros_like(margin))
    return margin.to(torch.float32)


def ofd_margin_from_bn(bn: torch.nn.Module) -> torch.Tensor:
    """Margin from the affine weight/bias of a teacher BatchNorm (before the distilled ReLU)."""
    weight = getattr(bn, "weight", None)
    bias = getattr(bn, "bias", None)
    if weight is None or bias is None:
        raise ValueError(f"bn: expected a BatchNorm with affine=True (weight and bias), got {type(bn).__name__} without them")
    return ofd_margin(weight, bias)


# --------------------------------------------------------------------------- ND
class ClassMeans:
    """Streaming per-class mean of features, accumulated in float64.

    ``update(features [B, D], labels [B])`` any number of times, then
    ``compute(group=None)`` -> float32 [K, D]; under torch.distributed the sums
    and counts are all-reduced over ``group`` first. A class with no sample is
    an error.
    """

    def __init__(self, num_classes: int, dim: int):
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be >= 1, got num_classes={num_classes}, dim={dim}")
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.sums: Optional[torch.Tensor] = None  # [K, D] float64, on the features' device
        self.counts: Optional[torch.Tensor] = None  # [K] float64

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> "ClassMeans":
        V.check_tensor("features", features, ndim=2)
        V.check_labels_tensor("labels", labels, features.shape[0])
        if features.shape[1] != self.dim:
            raise ValueError(f"features: expected width {self.dim}, got shape {tuple(features.shape)}")
        V.check_label_values("labels", labels, self.num_classes)
        if self.sums is None:
            self.sums = torch.zeros(self.num_classes, self.dim, dtype=torch.float64, device=features.device)
            self.counts = torch.zeros(self.num_classes, dtype=torch.float64, device=features.device)
        labels = labels.to(self.sums.device, torch.int64)  # index_add_ takes int32/int64 only (uint8 labels are valid)
        self.sums.index_add_(0, labels, features.detach().to(self.sums.device, torch.float64))
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        return self

    @torch.no_grad()
    def compute(self, group=None) -> torch.Tensor:
        from .distributed import all_reduce_sum, is_active

        if self.sums is None:
            if not is_active(group):
                raise ValueError("ClassMeans.compute: no features were given to update()")
            # a rank that saw no data still joins the all-reduce (with zeros), so no rank hangs
            import torch.distributed as dist

            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
            self.sums = torch.zeros(self.num_classes, self.dim, dtype=torch.float64, device=device)
            self.counts = torch.zeros(self.num_classes, dtype=torch.float64, device=device)
        sums, counts = self.sums.clone(), self.counts.clone()

        all_reduce_sum(sums, group)
        all_reduce_sum(counts, group)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"labels: class(es) {empty[:10]} have no sample; every class needs at least one")
        return (sums / counts[:, None]).to(torch.float32)


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int, group=None) -> torch.Tensor:
    """Per-class mean of teacher features: features [n, D], labels [n] -> float32 [K, D]."""
    V.check_tensor("features", features, ndim=2)
    return ClassMeans(num_classes, features.shape[1]).update(features, labels).compute(group)


# --------------------------------------------------------------------------- LSH
def lsh_weight(num_hashes: int, dim: int, std: float, *, generator: Optional[torch.Generator] = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Frozen random projection weight [N, D] ~ Normal(0, std^2) (std: the teacher classifier's weight std)."""
    if num_hashes < 1 or dim < 1 or not std > 0:
        raise ValueError(f"lsh_weight: need num_hashes >= 1, dim >= 1, std > 0; got {num_hashes}, {dim}, {std}")
    return torch.randn(num_hashes, dim, generator=generator, dtype=dtype) * std


@torch.no_grad()
def lsh_bias_from_teacher(weight: torch.Tensor, features_iterable: Iterable[torch.Tensor], group=None,
                          *, max_block_elements: int = 1 << 22) -> torch.Tensor:
    """bias [N] = minus the median over the data set of ``weight @ f_t`` per hash function.

    ``torch.median`` semantics (the lower middle value for an even count; NaN
    propagates), exact. Projections are computed in float64 for a float64
    ``weight``, else float32, and the bias comes back in ``weight``'s dtype.
    Each rank keeps its own features [n_r, D] (on ``weight``'s device) and
    projects them one block of hash functions at a time (about
    ``max_block_elements`` projections a block), so the [n, N] projection matrix
    is never held. Under torch.distributed the median is over the rows of every
    rank of ``group`` (ranks may hold different numbers of rows, even none),
    found by an exact radix select that exchanges only histograms
    (:func:`kdkernels.distributed.column_lower_median`).
    """
    from .distributed import column_lower_median, is_active

    V.check_tensor("weight", weight, ndim=2)
    V.check_nonempty("weight", weight)
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(compute)
    chunks = []
    for feats in features_iterable:
        V.check_tensor("features", feats, ndim=2)
        if feats.shape[1] != weight.shape[1]:
            raise ValueError(f"features: expected width {weight.shape[1]} (weight's), got shape {tuple(feats.shape)}")
        chunks.append(feats.detach().to(w.device, compute))
    feats = torch.cat(chunks) if chunks else w.new_zeros((0, w.shape[1]))  # [n_r, D]
    counts = torch.tensor([feats.shape[0], feats.shape[0]], dtype=torch.int64, device=w.device)
    if is_active(group):  # [total rows, most rows on a rank]: the same block plan on every rank
        import torch.distributed as dist

        dist.all_reduce(counts[:1], op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(counts[1:], op=dist.ReduceOp.MAX, group=group)
    total, longest = int(counts[0]), int(counts[1])
    if total == 0:
        raise ValueError("features_iterable: gave no features (on any rank)")
    num_hashes = w.shape[0]
    block = max(1, min(num_hashes, int(max_block_elements) // max(longest, 1)))
    bias = torch.empty(num_hashes, dtype=compute, device=w.device)
    for start in range(0, num_hashes, block):
        proj = feats @ w[start: start + block].T  # [n_r, block]
        bias[start: start + block] = -column_lower_median(proj, group, total=total)
    return bias.to(weight.dtype)
