"""Helpers shared by the Triton launch wrappers (imported only when triton is installed)."""
from __future__ import annotations

import os
import struct

import torch
import triton
import triton.language as tl

_HALF = (torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True under the Triton interpreter (TRITON_INTERPRET=1): one config per kernel, CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def compute_tl_dtype(dtype: torch.dtype):
    """The constexpr compute dtype the kernels upcast to right after tl.load."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision of tl.dot for operands of an input dtype, as torch's matmuls do.

    float16/bfloat16: the operands go to tl.dot unconverted (native 16-bit tensor
    cores, float32 accumulation); input_precision does not apply to them.
    float32: ``torch.get_float32_matmul_precision()`` -- 'highest' (torch's default)
    keeps float32 accuracy with "tf32x3" (three TF32 products), 'high' / 'medium'
    allow single-pass "tf32". Read on the host at launch (no device work).
    float64: "ieee" (exact float64 FMAs).
    """
    if dtype == torch.float64:
        return "ieee"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


def scalar_bits(value: float) -> int:
    """A float scalar as the int64 bit pattern of its float64 value: a kernel argument
    (no host-to-device copy, nothing to synchronise, CUDA-graph safe) that
    ``scalar_arg`` turns back into the exact float64 in the kernel."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


# SM count that launch heuristics assume off a GPU (under the interpreter); None:
# a handful of programs (enough to exercise split paths). The traffic report sets
# it to an H100's 132 so that its counts are those of the GPU's launch configs.
MODEL_SMS = None
_SMS = {}


def target_programs(device: torch.device) -> int:
    """How many programs a split reduction aims for: ~2 waves of SMs (the SM count
    is cached per device: no driver query per call)."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _SMS:
            _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        return 2 * _SMS[idx]
    return 2 * MODEL_SMS if MODEL_SMS else 4


_ARCH = {}


def arch(device: torch.device) -> int:
    """Config family of a device: 90 (Hopper and newer: wgmma, operands from shared
    memory) or 80 (Ampere: mma.sync, operands in registers, so smaller tiles). Off a
    GPU (the interpreter) 90, the GPU the traffic report models. Cached per device."""
    if device.type != "cuda":
        return 90
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _ARCH:
        _ARCH[idx] = 90 if torch.cuda.get_device_capability(idx)[0] >= 9 else 80
    return _ARCH[idx]


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


@triton.jit
def scalar_arg(bits, CDTYPE: tl.constexpr):
    """The float scalar passed as ``scalar_bits(value)``, in the compute dtype."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(CDTYPE)


@triton.jit
def mma(a, b, acc, DOT_PREC: tl.constexpr, INTERP: tl.constexpr):
    """acc + a @ b on the tensor cores: 16-bit operands go in unconverted (native
    16-bit MMA, float32 accumulation), float32 ones with DOT_PREC. INTERP (the
    Triton interpreter, whose dot cannot multiply bfloat16) widens bfloat16
    operands to float32 first, which is exact."""
    if INTERP:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC, out_dtype=acc.dtype)
