"""Helpers shared by the Triton launch wrappers (imported only when triton is installed)."""
from __future__ import annotations

import os
import struct
from typing import NamedTuple, Optional

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


def dot_precision(dtype: torch.dtype, where=None, matmul_precision: Optional[str] = None) -> str:
    """input_precision of tl.dot for operands of an input dtype, as torch's matmuls do,
    on ``where`` (a torch.device or a ``Target``; None or a CPU device: the modelled
    NVIDIA GPU, whose precisions the interpreter takes).

    float16/bfloat16: the operands go to tl.dot unconverted (native 16-bit tensor
    cores / MFMA, float32 accumulation); input_precision does not apply to them
    (the backend's always-allowed value is passed).
    float32: ``matmul_precision``, by default ``torch.get_float32_matmul_precision()``
    read on the host at launch.
    NVIDIA: 'highest' (torch's default) keeps float32 accuracy with "tf32x3" (three
    TF32 products), 'high' / 'medium' allow single-pass "tf32". AMD (triton's HIP
    backend takes ieee, bf16x3, bf16x6, and tf32 on gfx942 only): 'highest' is
    "ieee" (CDNA's native float32 MFMA), 'high' / 'medium' "tf32" (xf32 MFMA) on
    gfx942 and "bf16x3" (torch's definition of 'high': each float32 as two
    bfloat16s) elsewhere.
    float64: "ieee" (exact float64 FMAs / MFMA).
    """
    tgt = _as_target(where)
    hip = tgt.backend == "hip"
    if dtype == torch.float64 or (hip and dtype != torch.float32):
        return "ieee"
    if matmul_precision is None:
        matmul_precision = torch.get_float32_matmul_precision()
    if dtype == torch.float32 and matmul_precision == "highest":
        return "ieee" if hip else "tf32x3"
    return "bf16x3" if hip and tgt.arch != "gfx942" else "tf32"


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


class Target(NamedTuple):
    """A compile target: backend "cuda" (arch 80, 86, 90, ...) or "hip" (arch "gfx942", ...)
    and its warp (wavefront) size."""
    backend: str
    arch: object
    warp_size: int

    @property
    def family(self) -> int:
        """Config family of the launch heuristics: 90 (Hopper and newer: wgmma, operands
        from shared memory) or 80 (Ampere: mma.sync, operands in registers, so smaller
        tiles). AMD CDNA's MFMA also takes its operands from registers: family 80."""
        return 90 if self.backend == "cuda" and int(self.arch) >= 90 else 80


# what the heuristics assume off a GPU (the interpreter): the H100 the traffic report models
MODEL_TARGET = Target("cuda", 90, 32)
_TARGETS = {}


def target(device: Optional[torch.device]) -> Target:
    """The compile target of a device, cached per device (no driver query per call).
    ROCm devices are torch device "cuda" too; ``torch.version.hip`` tells them apart."""
    if device is None or device.type != "cuda":
        return MODEL_TARGET
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _TARGETS:
        props = torch.cuda.get_device_properties(idx)
        if torch.version.hip:
            gfx = props.gcnArchName.split(":")[0]
            # triton's rule where torch does not report it: wave64 before RDNA (gfx10)
            ws = getattr(props, "warp_size", None) or (32 if int(gfx[3:-2]) >= 10 else 64)
            _TARGETS[idx] = Target("hip", gfx, int(ws))
        else:
            major, minor = torch.cuda.get_device_capability(idx)
            _TARGETS[idx] = Target("cuda", 10 * major + minor, int(getattr(props, "warp_size", 32) or 32))
    return _TARGETS[idx]


def _as_target(where) -> "Target":
    return where if isinstance(where, Target) else target(where)


def pipeline_stages(stages: int, where) -> int:
    """num_stages of a GEMM's K loop on ``where`` (a torch.device or a ``Target``): the
    config's on NVIDIA, at most 2 on AMD (the HIP backend's stream-pipeliner default; a
    third stage keeps another set of K-step addresses live and spills SGPRs in
    sp_bwd_kernel's float32 32-row tiles)."""
    return min(stages, 2) if _as_target(where).backend == "hip" else stages


def arch(device: torch.device) -> int:
    """Config family (``Target.family``) of a device: 90 or 80."""
    return target(device).family


def warp_size(device: torch.device) -> int:
    """Lanes of a warp / wavefront on device: 32 on NVIDIA, 64 on AMD CDNA (MI250, MI300)."""
    return target(device).warp_size


def scale_warps(warps32: int, ws: int) -> int:
    """num_warps for a program that a config sizes as ``warps32`` warps of 32 lanes, on a
    device with ``ws``-lane warps. NVIDIA (32): unchanged. AMD CDNA (64-lane wavefronts):
    as many wavefronts, i.e. twice the lanes, each with half the elements and registers of
    an NVIDIA thread, capped at 1024 lanes a workgroup. Keeping the lanes instead (half as
    many wavefronts) runs the AMD compiler out of scalar registers (~102 SGPRs a wave) in
    16 configs per arch (SGPR spills in the AOT report); this sizing has none."""
    return max(1, min(warps32, MAX_LANES // ws))


def device_warps(warps32: int, device: torch.device) -> int:
    """``scale_warps`` for the warp size of ``device`` (what every launcher passes as num_warps)."""
    return scale_warps(warps32, warp_size(device))


MAX_LANES = 1024  # threads / lanes of a program on both vendors


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
