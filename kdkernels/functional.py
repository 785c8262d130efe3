"""The four losses as functions: validate, pick the backend, run the op.

``backend``: 'auto' (the ``KDKERNELS_BACKEND`` environment variable if set,
else Triton for CUDA tensors and the C++ kernels for CPU tensors), 'triton',
'cpu' or 'reference'. A backend that cannot serve the tensors raises
``ValueError``; nothing falls back silently.
"""
from __future__ import annotations

import functools
import weakref
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from . import _ops
from . import _validate as V
from . import reference

__all__ = ["lsh_loss", "lsh_codes", "nd_loss", "ofd_loss", "sp_loss"]


def _any_autocast_enabled() -> bool:
    """Whether autocast is on for any device (one C call where torch has it)."""
    if _IS_ANY_AUTOCAST_ENABLED is not None:
        return _IS_ANY_AUTOCAST_ENABLED()
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")  # pragma: no cover


_IS_ANY_AUTOCAST_ENABLED = getattr(torch._C, "_is_any_autocast_enabled", None)


def _float32_under_autocast(loss_fn=None, *, gemm: bool = False):
    """Under autocast the loss runs in float32 (as torch's own losses do): floating
    inputs are cast to float32 (their gradients flow back in their own dtype) and
    the loss comes back in float32. ``gemm`` (LSH, SP) on the Triton backend: the
    inputs are cast to the autocast dtype instead, so the projection / Gram GEMMs
    run in it as ``F.linear`` / ``mm`` would; the kernels' loss math is float32
    anyway and the loss comes back in float32."""
    if loss_fn is None:
        return functools.partial(_float32_under_autocast, gemm=gemm)

    @functools.wraps(loss_fn)
    def wrapper(*args, **kwargs):
        if not _any_autocast_enabled():
            return loss_fn(*args, **kwargs)  # the usual case, without flattening the arguments
        tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, Tensor)]
        device_type = tensors[0].device.type if tensors else "cpu"
        if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
            return loss_fn(*args, **kwargs)
        dtype = torch.float32
        if gemm and V.resolve_backend(kwargs.get("backend", "auto"), tensors[0]) == "triton":
            dtype = torch.get_autocast_dtype(device_type)
        def cast(x):  # constants (no grad) through the cast cache: a float32 projection is cast once
            if not (isinstance(x, Tensor) and x.is_floating_point()):
                return x
            return x.to(dtype) if x.requires_grad else _frozen_in_dtype(x, dtype)

        args, kwargs = tree_map(cast, (args, kwargs))
        with torch.autocast(device_type, enabled=False):
            return loss_fn(*args, **kwargs).float()

    return wrapper


def _wants_grad(x: Optional[Tensor]) -> bool:
    return x is not None and x.requires_grad and torch.is_grad_enabled()


# --------------------------------------------------------------------------- LSH
def _is_plain_lsh_call(f_s, f_t, weight, bias, mse_weight, sample_mask, teacher_codes, reduction) -> bool:
    """The common call (f_t, no mask or codes, plain tensors on one device), which every
    check of ``_check_lsh`` accepts, tested in one expression: right after the loss's
    large GEMMs have flushed the caches each Python call costs 5-10 us, and LSH at
    small batches is within a few percent of its GEMMs. False: the detailed checks."""
    plain = _ops.PLAIN_TENSOR_TYPES
    if (sample_mask is not None or teacher_codes is not None or type(mse_weight) is not float
            or type(f_s) not in plain or type(f_t) not in plain or type(weight) not in plain
            or not (bias is None or type(bias) in plain) or reduction not in V.ROW_REDUCTIONS):
        return False
    dtype = f_s.dtype
    return (dtype in V.FLOAT_DTYPES and f_t.dtype is dtype and weight.dtype in V.FLOAT_DTYPES
            and f_s.dim() == 2 and weight.dim() == 2 and f_s.numel() > 0 and weight.numel() > 0
            and f_t.shape == f_s.shape and weight.shape[1] == f_s.shape[1] and not weight.requires_grad
            and (bias is None or (bias.dtype in V.FLOAT_DTYPES and bias.dim() == 1 and bias.shape[0] == weight.shape[0]
                                  and not bias.requires_grad))
            and V.on_one_device(f_s, f_t, weight, bias))


def _check_lsh(f_s, f_t, weight, bias, mse_weight, sample_mask, teacher_codes, reduction, backend) -> Tuple[str, float]:
    if _is_plain_lsh_call(f_s, f_t, weight, bias, mse_weight, sample_mask, teacher_codes, reduction):
        return V.resolve_backend(backend, f_s), mse_weight
    V.check_tensor("f_s", f_s, ndim=2)
    V.check_nonempty("f_s", f_s)
    V.check_tensor("weight", weight, ndim=2)
    V.check_nonempty("weight", weight)
    batch, dim = f_s.shape
    if weight.shape[1] != dim:
        raise ValueError(f"weight: expected shape (N, {dim}) (the width of f_s), got {tuple(weight.shape)}")
    num_hashes = weight.shape[0]
    mse_weight = V.check_scalar("mse_weight", mse_weight)
    if f_t is None:
        if teacher_codes is None:
            raise ValueError("f_t: expected the teacher features (or teacher_codes), got None")
        if mse_weight != 0.0:
            raise ValueError(f"f_t: the MSE term (mse_weight={mse_weight}) needs the teacher features; "
                             "pass f_t or mse_weight=0.0")
    else:
        V.check_tensor("f_t", f_t, ndim=2)
        V.check_same_shape("f_t", f_t, "f_s", f_s)
        V.check_same_dtype("f_t", f_t, "f_s", f_s)
    if bias is not None:
        V.check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != num_hashes:
            raise ValueError(f"bias: expected shape ({num_hashes},) (one per row of weight), got {tuple(bias.shape)}")
    if teacher_codes is not None:
        V.check_tensor("teacher_codes", teacher_codes, ndim=2, dtypes=(torch.uint8,))
        expected = (batch, (num_hashes + 7) // 8)
        if tuple(teacher_codes.shape) != expected:
            raise ValueError(f"teacher_codes: expected shape {expected} (rows of f_s, ceil(N/8) bytes), "
                             f"got {tuple(teacher_codes.shape)}")
    V.check_mask("sample_mask", sample_mask, batch)
    V.check_frozen("weight", weight, "the LSH projection is a frozen random matrix")
    V.check_frozen("bias", bias, "the LSH bias is frozen")
    V.check_reduction(reduction, V.ROW_REDUCTIONS)
    V.check_same_device([("f_s", f_s), ("f_t", f_t), ("weight", weight), ("bias", bias),
                         ("sample_mask", sample_mask), ("teacher_codes", teacher_codes)])
    return V.resolve_backend(backend, f_s), mse_weight


_CAST_CACHE: dict = {}  # (id(x), dtype) -> (weakref to x, x._version, x.data_ptr(), x.to(dtype))
_CAST_CACHE_SIZE = 16


def _frozen_in_dtype(x: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """The kernels read one dtype: frozen operands follow the student's. A cast copy
    is cached per (tensor, dtype) while the tensor is alive and unmodified (its
    version counter and storage), so a float32 buffer used with bfloat16 features is
    not re-cast every call; plain tensors in eager mode only."""
    if x is None or x.dtype == dtype:
        return x
    if type(x) not in (Tensor, torch.nn.Parameter) or torch.compiler.is_compiling():
        return x.to(dtype)
    key = (id(x), dtype)
    hit = _CAST_CACHE.get(key)
    if hit is not None and hit[0]() is x and hit[1] == x._version and hit[2] == x.data_ptr():
        return hit[3]
    cast = x.to(dtype)
    if len(_CAST_CACHE) >= _CAST_CACHE_SIZE:
        _CAST_CACHE.pop(next(iter(_CAST_CACHE)))
    _CAST_CACHE[key] = (weakref.ref(x, lambda _, k=key: _CAST_CACHE.pop(k, None)), x._version, x.data_ptr(), cast)
    return cast


@_float32_under_autocast(gemm=True)
def lsh_loss(f_s: Tensor, f_t: Optional[Tensor], weight: Tensor, bias: Optional[Tensor] = None, *,
             mse_weight: float = 1.0, sample_mask: Optional[Tensor] = None, teacher_codes: Optional[Tensor] = None,
             reduction: str = "mean", backend: str = "auto") -> Tensor:
    """LSH feature mimicking (LSHFM). f_s, f_t [B, D]; weight [N, D]; bias [N]; sample_mask [B].

    l_i = mse_weight * mean_d (f_s - f_t)^2 + mean_j BCE-with-logits(f_s W^T + b, 1[f_t W^T + b > 0]).
    'mean' divides by the number (or weight sum) of selected rows, 0 if none is
    selected; 'sum'; 'none' -> [B]. ``teacher_codes`` (from :func:`lsh_codes`)
    replace the teacher's bits; f_t may then be None with ``mse_weight=0``.
    """
    backend, mse_weight = _check_lsh(f_s, f_t, weight, bias, mse_weight, sample_mask, teacher_codes, reduction, backend)
    if backend == "reference":
        return reference.lsh_loss(f_s, f_t, weight, bias, mse_weight=mse_weight, sample_mask=sample_mask,
                                  teacher_codes=teacher_codes, reduction=reduction)
    weight, bias = _frozen_in_dtype(weight, f_s.dtype), _frozen_in_dtype(bias, f_s.dtype)
    return _ops.run(_ops.lsh_fwd, f_s, f_t, weight, bias, sample_mask, teacher_codes, mse_weight, reduction, backend,
                        _wants_grad(f_s), _wants_grad(f_t))[0]


def lsh_codes(f_t: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Packed teacher hash bits: f_t [B, D], weight [N, D], bias [N] -> uint8 [B, ceil(N/8)]
    (hash j is bit j % 8 of byte j // 8)."""
    V.check_tensor("f_t", f_t, ndim=2)
    V.check_tensor("weight", weight, ndim=2)
    if weight.shape[1] != f_t.shape[1]:
        raise ValueError(f"weight: expected shape (N, {f_t.shape[1]}) (the width of f_t), got {tuple(weight.shape)}")
    if bias is not None:
        V.check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    V.check_same_device([("f_t", f_t), ("weight", weight), ("bias", bias)])
    with torch.no_grad():
        return reference.lsh_codes(f_t, weight, bias)


# --------------------------------------------------------------------------- ND
def _check_nd(s, t, centers, labels, eps, reduction, backend) -> Tuple[str, float]:
    V.check_tensor("s", s, ndim=2)
    V.check_nonempty("s", s)
    V.check_tensor("t", t, ndim=2)
    V.check_same_shape("t", t, "s", s)
    V.check_same_dtype("t", t, "s", s)
    V.check_tensor("centers", centers, ndim=2)
    V.check_nonempty("centers", centers)
    if centers.shape[1] != s.shape[1]:
        raise ValueError(f"centers: expected shape (K, {s.shape[1]}) (the width of s), got {tuple(centers.shape)}")
    V.check_labels_tensor("labels", labels, s.shape[0])
    V.check_frozen("centers", centers, "the teacher class means are constants")
    eps = V.check_scalar("eps", eps, positive=True)
    V.check_reduction(reduction, V.ROW_REDUCTIONS)
    V.check_same_device([("s", s), ("t", t), ("centers", centers), ("labels", labels)])
    return V.resolve_backend(backend, s), eps


@_float32_under_autocast
def nd_loss(s: Tensor, t: Tensor, centers: Tensor, labels: Tensor, *, eps: float = 1e-12,
            reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Feature norm and direction loss. s, t [B, D]; centers [K, D] (teacher class means); labels [B].

    l_i = 1 - <s_i, centers_{y_i} / ||centers_{y_i}||> / max(||t_i||, ||s_i||);
    'mean', 'sum', 'none' -> [B].
    """
    backend, eps = _check_nd(s, t, centers, labels, eps, reduction, backend)
    if backend == "reference":
        if not torch.compiler.is_compiling():
            V.check_label_values("labels", labels, centers.shape[0])
        return reference.nd_loss(s, t, centers, labels, eps=eps, reduction=reduction)
    return _ops.run(_ops.nd_fwd, s, t, _frozen_in_dtype(centers, s.dtype), labels, eps, reduction, backend, _wants_grad(s), _wants_grad(t))[0]


# --------------------------------------------------------------------------- OFD
def _check_ofd(s, t, margin, reduction, backend) -> str:
    V.check_tensor("s", s, min_ndim=2)
    V.check_nonempty("s", s)
    V.check_tensor("t", t, min_ndim=2)
    V.check_same_shape("t", t, "s", s)
    V.check_same_dtype("t", t, "s", s)
    V.check_tensor("margin", margin, ndim=1)
    if margin.shape[0] != s.shape[1]:
        raise ValueError(f"margin: expected shape ({s.shape[1]},) (channel dim 1 of s), got {tuple(margin.shape)}")
    V.check_frozen("margin", margin, "the margin is a constant computed from the teacher's BN")
    V.check_reduction(reduction, V.OFD_REDUCTIONS)
    V.check_same_device([("s", s), ("t", t), ("margin", margin)])
    return V.resolve_backend(backend, s)


@_float32_under_autocast
def ofd_loss(s: Tensor, t: Tensor, margin: Tensor, *, reduction: str = "batchmean", backend: str = "auto") -> Tensor:
    """Partial L2 with margin ReLU (OFD). s (student connector output), t (teacher
    pre-ReLU feature) [B, C, *]; margin [C].

    d = (s - t')^2 * 1[s > t' or t' > 0] with t' = max(t, margin_c);
    'batchmean' sum/B (published), 'sum', 'mean' sum/numel, 'none' -> d.
    """
    backend = _check_ofd(s, t, margin, reduction, backend)
    if backend == "reference":
        return reference.ofd_loss(s, t, margin, reduction=reduction)
    return _ops.run(_ops.ofd_fwd, s, t, margin, reduction, backend, _wants_grad(s), _wants_grad(t))[0]


# --------------------------------------------------------------------------- SP
def _as_pairs(f_s, f_t) -> Tuple[List[Tensor], List[Tensor]]:
    if isinstance(f_s, Tensor) != isinstance(f_t, Tensor):
        raise TypeError("f_t: expected the same kind as f_s (both tensors or both sequences of tensors), "
                        f"got {type(f_s).__name__} and {type(f_t).__name__}")
    if isinstance(f_s, Tensor):
        return [f_s], [f_t]
    pairs_s, pairs_t = list(f_s), list(f_t)
    if len(pairs_s) != len(pairs_t) or not pairs_s:
        raise ValueError(f"f_t: expected as many layers as f_s (at least one), got {len(pairs_s)} and {len(pairs_t)}")
    return pairs_s, pairs_t


def _check_sp(pairs_s, pairs_t, p, reduction, global_batch, backend) -> str:
    batch = None
    for i, (a, b) in enumerate(zip(pairs_s, pairs_t)):
        name_s, name_t = ("f_s", "f_t") if len(pairs_s) == 1 else (f"f_s[{i}]", f"f_t[{i}]")
        V.check_tensor(name_s, a, min_ndim=1)
        V.check_tensor(name_t, b, min_ndim=1)
        V.check_nonempty(name_s, a)
        V.check_nonempty(name_t, b)
        batch = a.shape[0] if batch is None else batch
        for name, x in ((name_s, a), (name_t, b)):
            if x.shape[0] != batch:
                raise ValueError(f"{name}: expected batch size {batch} (dim 0 of f_s), got shape {tuple(x.shape)}")
        V.check_same_dtype(name_t, b, name_s, a)
        V.check_same_device([(name_s, a), (name_t, b), ("f_s", pairs_s[0])])
    if p not in (1, 2, 1.0, 2.0):
        raise ValueError(f"p: expected 1 (L1 rows, torchdistill) or 2 (L2 rows, the paper), got {p!r}")
    V.check_reduction(reduction, V.SP_REDUCTIONS)
    return V.resolve_backend(backend, pairs_s[0])


@_float32_under_autocast(gemm=True)
def sp_loss(f_s: Union[Tensor, Sequence[Tensor]], f_t: Union[Tensor, Sequence[Tensor]], *, p: float = 2.0,
            reduction: str = "batchmean", global_batch: bool = False, group=None, backend: str = "auto") -> Tensor:
    """Similarity-preserving loss. f_s [b, ...], f_t [b, ...] (widths may differ), or
    equal-length sequences of such layer pairs, summed.

    G = rows of Q Q^T normalised to unit p-norm (Q = f flattened to [b, K]);
    'batchmean' ||G_t - G_s||_F^2 / b^2 (published), 'sum', 'none' -> [b] row sums.
    ``global_batch=True`` builds the Gram matrices over the batch of every rank of
    ``group`` (see :mod:`kdkernels.distributed`).
    """
    pairs_s, pairs_t = _as_pairs(f_s, f_t)
    backend = _check_sp(pairs_s, pairs_t, p, reduction, global_batch, backend)
    p = float(p)
    if global_batch:
        from .distributed import sp_loss_global

        return sp_loss_global(pairs_s, pairs_t, p=p, reduction=reduction, group=group, backend=backend)
    return _sp_local(pairs_s, pairs_t, p, reduction, backend)


def _as_rows(x: Tensor) -> Tensor:
    """[b, ...] -> [b, K] (a 2-D input as it is: no view, no view node in the graph)."""
    return x if x.dim() == 2 else x.reshape(x.shape[0], -1)


def _sp_local(pairs_s: List[Tensor], pairs_t: List[Tensor], p: float, reduction: str, backend: str) -> Tensor:
    if backend == "reference":
        return reference.sp_loss(pairs_s, pairs_t, p=p, reduction=reduction)
    total = None
    for a, b in zip(pairs_s, pairs_t):
        q_s, q_t = _as_rows(a), _as_rows(b)
        loss = _ops.run(_ops.sp_fwd, q_s, q_t, p, reduction, backend, _wants_grad(a), _wants_grad(b))[0]
        total = loss if total is None else total + loss
    return total
