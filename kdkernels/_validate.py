"""Argument checks shared by every loss and backend.

Each check raises ``ValueError`` (``TypeError`` for a wrong dtype) whose message
names the argument, what was expected and what came. Checks here read only
metadata, except ``check_label_values``/``check_mask_values``, which read
values and run inside the custom ops' Python bodies (opaque to torch.compile).
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
BACKENDS = ("auto", "reference", "cpu", "triton")
ROW_REDUCTIONS = ("mean", "sum", "none")  # LSH, ND
OFD_REDUCTIONS = ("batchmean", "sum", "mean", "none")
SP_REDUCTIONS = ("batchmean", "sum", "none")


def _desc(x: torch.Tensor) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"


def check_tensor(name: str, x, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None,
                 dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    """x must be a tensor of one of ``dtypes`` with ``ndim`` (or at least ``min_ndim``) dims."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got {_desc(x)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dims, got {_desc(x)}")


def check_nonempty(name: str, x: torch.Tensor) -> None:
    if x.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got {_desc(x)}")


def check_same_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name}: expected the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")


def check_same_dtype(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: expected the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")


def check_same_device(named: Iterable) -> None:
    """named: (name, tensor-or-None) pairs; all tensors must be on the first one's device."""
    named = [(n, x) for n, x in named if x is not None]
    first_name, first = named[0]
    for name, x in named[1:]:
        if x.device != first.device:
            raise ValueError(f"{name}: expected device {first.device} (the device of {first_name}), got {x.device}")


def on_one_device(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether the tensors (None skipped) share one device; CPU tensors are told by
    ``is_cpu``, cheaper than building and comparing ``torch.device`` objects."""
    for x in tensors:  # a plain loop: generator frames cost more right after a large GEMM
        if x is not None and not x.is_cpu:
            break
    else:
        return True
    devices = {x.device for x in tensors if x is not None}
    return len(devices) == 1


def check_frozen(name: str, x: Optional[torch.Tensor], why: str) -> None:
    """Frozen operands get no gradient; one that requires grad is a mistake worth naming."""
    if x is not None and x.requires_grad:
        raise ValueError(f"{name}: must not require grad ({why}); pass {name}.detach() or freeze it")


def check_reduction(reduction, allowed: Sequence[str]) -> None:
    if reduction not in allowed:
        raise ValueError(f"reduction: expected one of {list(allowed)}, got {reduction!r}")


def check_labels_tensor(name: str, labels, batch: int) -> None:
    check_tensor(name, labels, ndim=1, dtypes=INT_DTYPES)
    if labels.shape[0] != batch:
        raise ValueError(f"{name}: expected {batch} labels (one per row), got shape {tuple(labels.shape)}")


def check_label_values(name: str, labels: torch.Tensor, num_classes: int) -> None:
    """Reads values: labels must lie in [0, num_classes)."""
    if labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name}: expected values in [0, {num_classes}) (rows of centers), got {bad}")


def check_mask(name: str, mask, batch: int) -> None:
    if mask is None:
        return
    check_tensor(name, mask, ndim=1, dtypes=FLOAT_DTYPES + (torch.bool,))
    if mask.shape[0] != batch:
        raise ValueError(f"{name}: expected shape ({batch},) (one entry per row), got {tuple(mask.shape)}")
    if mask.requires_grad:
        raise ValueError(f"{name}: must not require grad (it weights rows, it is not differentiated)")


def check_scalar(name: str, value, *, positive: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}") from None
    if positive and not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value}")
    return value


# --------------------------------------------------------------------------- backends
def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# os.environ.get("KDKERNELS_BACKEND") without its Python-level Mapping frames (the same
# lookup: os.environ keeps the encoded variables in _data); read on every call, so a
# change at run time takes effect.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("KDKERNELS_BACKEND") if hasattr(os.environ, "encodekey") else None


def _env_backend() -> str:
    if _ENV_DATA is not None and _ENV_KEY is not None:
        value = _ENV_DATA.get(_ENV_KEY)
        value = os.environ.decodevalue(value) if value is not None else None
    else:  # pragma: no cover - another os.environ implementation
        value = os.environ.get("KDKERNELS_BACKEND")
    return value or "auto"


def resolve_backend(backend, where) -> str:
    """'auto' (or KDKERNELS_BACKEND) -> the backend that serves ``where`` (a tensor, or a
    torch.device); a backend that cannot serve it is an error, never a silent fallback.
    A tensor's ``is_cpu``/``is_cuda`` are read rather than ``device.type``, which costs
    ~30 us right after a large GEMM has flushed the caches."""
    if backend is None or backend == "auto":
        backend = _env_backend()
        if backend not in BACKENDS:
            raise ValueError(f"KDKERNELS_BACKEND: expected one of {list(BACKENDS)}, got {backend!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    if isinstance(where, torch.Tensor):
        on_cpu, on_cuda = where.is_cpu, where.is_cuda  # NVIDIA CUDA and AMD ROCm (torch calls HIP devices "cuda" too)
    else:
        on_cpu, on_cuda = where.type == "cpu", where.type == "cuda"
    if backend == "auto":
        return "cpu" if on_cpu else "triton" if on_cuda else "reference"
    if backend == "cpu" and not on_cpu:
        device = where.device if isinstance(where, torch.Tensor) else where
        raise ValueError(f"backend: 'cpu' runs the C++ kernels on CPU tensors, got tensors on {device}; "
                         "use backend='triton' (or 'auto') for CUDA / ROCm tensors")
    if backend == "triton" and not on_cuda and not (on_cpu and triton_interpreting()):
        device = where.device if isinstance(where, torch.Tensor) else where
        raise ValueError(f"backend: 'triton' needs CUDA tensors, got tensors on {device}; "
                         "on CPU it runs only under the Triton interpreter (set TRITON_INTERPRET=1 before importing triton)")
    return backend
