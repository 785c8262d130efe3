"""Helpers shared by the Triton launch wrappers (imported only when triton is installed)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_HALF = (torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True under the Triton interpreter (TRITON_INTERPRET=1): one config per kernel, CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def compute_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs compute in float64, everything else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_tl_dtype(dtype: torch.dtype):
    """The constexpr compute dtype the kernels upcast to right after tl.load."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision of tl.dot on operands upcast to the compute dtype.

    float16/bfloat16 inputs: "tf32" -- their upcast values are exact in TF32, so
    products of inputs are exact (only computed operands, gradients, get rounded).
    float32 inputs: "tf32x3" -- three TF32 tensor-core products give about
    float32 accuracy (torch's default fp32 matmul uses no TF32); the FMA path
    ("ieee") would need far more registers for the same tiles.
    float64 inputs: "ieee" (the interpreter's gradchecks; exact float64 FMAs).
    """
    if dtype in _HALF:
        return "tf32"
    return "tf32x3" if dtype == torch.float32 else "ieee"


def scalars(values, dtype: torch.dtype, device) -> torch.Tensor:
    """Float scalars passed through memory in the compute dtype (a Python float
    argument would be specialised as float32, which breaks float64 accuracy)."""
    return torch.tensor(list(values), dtype=compute_torch_dtype(dtype), device=device)


def target_programs(device: torch.device) -> int:
    """How many programs a split reduction aims for: ~2 waves of SMs on a GPU; a
    handful under the interpreter (enough to exercise the split path)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def row_major(x: torch.Tensor) -> torch.Tensor:
    """A 2-D view whose last dim is unit-stride (copies only if it is not)."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def empty_grad(x: torch.Tensor, wanted: bool) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device) if wanted else x.new_empty(0)


@triton.jit
def sqrt_rn(x):
    """Correctly rounded square root for float32 (tl.sqrt may be approximate) and float64."""
    if x.dtype == tl.float64:
        y = tl.sqrt(x)
    else:
        y = tl.sqrt_rn(x)
    return y
