"""Ahead-of-time compile of every Triton kernel config kdkernels can launch.

    python -m kdkernels.triton.aot [--target sm_80 sm_90 hip:gfx942 hip:gfx90a] [--jobs N]
                                   [--dtypes fp32 fp16 bf16 fp64] [--kernels NAME ...]

No GPU is needed: each kernel is compiled with ``triton.compile(ASTSource(...),
target=GPUTarget(backend, arch, warp_size))``. NVIDIA (``sm_80``, ``sm_90``,
32-lane warps): the cubin is read with the ``cuobjdump`` that ships in the triton
wheel (``--dump-resource-usage``) and the ptxas log; AMD (``hip:gfx942`` MI300,
``hip:gfx90a`` MI250, 64-lane wavefronts): the ``.amdgpu_metadata`` of the
``amdgcn`` text (``.vgpr_count``, ``.sgpr_count``, ``.vgpr_spill_count``,
``.sgpr_spill_count``, scratch) and the LDS size. A table per kernel and target
lists registers, spills and shared memory / LDS. The exit status is non-zero if
any config fails to compile, spills, exceeds a hardware limit (NVIDIA: 255
registers a thread, 64K registers a block, the shared memory of a block; AMD:
512 VGPRs a wave, 64 KiB of LDS), has a ``tl.dot`` without tensor-core / MFMA
instructions, or feeds 16-bit inputs to them widened.

What "every config" means: each launch wrapper has one tile config per kernel
or a heuristic with a finite set of choices (``nd.configs()``, ``sp.configs()``,
``lsh.proj_config`` / ``lsh.grad_config`` / ``lsh.FUSED_CONFIG``, per arch family, ``_utils.Target.family``),
and all of them are compiled, for each input dtype, with the gradient flags that
use the most code (all gradients on) plus the loss-only forward; OFD's tile
shape follows the layout, and its three common shapes are compiled (every shape
is 1024 elements, 8 a thread). The flag subsets compile to a subset of that
code. Warps are those the launchers pass: the configs count warps of 32 lanes,
``_utils.scale_warps`` gives a 64-lane target as many wavefronts (capped at 1024 lanes).
Dot precisions are those of ``_utils.dot_precision`` for the target: 16-bit and
float64 inputs have one; float32 GEMMs are compiled in each precision a float32
matmul precision can give (NVIDIA: tf32x3 for 'highest', tf32; AMD: ieee for
'highest', tf32 on gfx942, bf16x3 on gfx90a), the variant names the non-default one.

Per config the table shows warps, pipeline stages, registers, spills, shared
memory, occupancy and the tensor-core instructions: NVIDIA from the PTX
(``wgmma`` on sm_90 for tiles of >= 64 rows, ``mma.sync`` otherwise, with the
operand type; occupancy = resident warps / 64), AMD from the amdgcn
(``v_mfma_*``, shown as ``mfma MxNxK type``; occupancy = waves per SIMD / 8 from
VGPRs and LDS).
"""
from __future__ import annotations

import os

# The interpreter replaces @triton.jit functions by Python ones, which cannot be
# compiled; run as a program, this module always compiles for real (it needs no
# GPU). Imported as a library (e.g. by tests), it leaves the environment alone.
if __name__ in ("__main__", "__mp_main__"):
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from typing import Dict, List, Optional  # noqa: E402

TARGETS = ("sm_80", "sm_90", "hip:gfx942", "hip:gfx90a")
DTYPES = ("fp32", "fp16", "bf16", "fp64")
# NVIDIA: per-block shared memory (opt-in maximum) and register file
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MAX_REGS_THREAD = 255
MAX_REGS_BLOCK = 64 * 1024
# AMD CDNA2/3 (gfx90a, gfx942): LDS a workgroup, unified (arch + accumulation) VGPRs a wave
LDS_LIMIT = 64 * 1024
MAX_VGPRS = 512


def parse_target(name: str):
    """'sm_90' / '90' -> Target('cuda', 90, 32); 'hip:gfx942' / 'gfx942' -> Target('hip', 'gfx942', 64)."""
    from ._utils import Target

    name = str(name).strip().lower()
    if name.startswith("hip:"):
        name = name[4:]
    if name.startswith("gfx"):
        if not name[3:-2].isdigit():
            raise ValueError(f"target: cannot parse {name!r} (e.g. hip:gfx942)")
        # wave64 before RDNA (gfx10), as triton's HIP backend decides
        return Target("hip", name, 32 if int(name[3:-2]) >= 10 else 64)
    digits = name[3:] if name.startswith("sm_") else name
    if not digits.isdigit():
        raise ValueError(f"target: expected sm_NN, NN or hip:gfxNNN, got {name!r}")
    return Target("cuda", int(digits), 32)


def target_name(tgt) -> str:
    return f"hip:{tgt.arch}" if tgt.backend == "hip" else f"sm_{tgt.arch}"


@dataclass
class Job:
    module: str                    # kdkernels.triton.<module>
    kernel: str                    # kernel name in that module
    variant: str                   # human-readable config
    dtype: str                     # input dtype (triton type string)
    ptr_types: Dict[str, str]      # pointer arg -> element type ('in' = the input dtype, 'c' = compute dtype)
    constexprs: Dict[str, object]  # constexpr values (CDTYPE/DOT_PREC filled in from dtype)
    num_warps: int
    num_stages: Optional[int] = None  # None: the backend's default, as the launchers leave it
    i64: tuple = ()                # integer args that get int64
    target: object = None          # _utils.Target
    prec: Optional[str] = None     # DOT_PREC; None: dot_precision under the current float32 matmul precision


class _TorchDtypes(dict):
    """'fp32' -> torch.float32 etc., resolved lazily (torch is imported on use)."""

    def __missing__(self, key):
        import torch

        value = dict(fp32=torch.float32, fp16=torch.float16, bf16=torch.bfloat16, fp64=torch.float64)[key]
        self[key] = value
        return value


TORCH_DTYPES = _TorchDtypes()


def _cdtype(dtype: str) -> str:
    return "fp64" if dtype == "fp64" else "fp32"


def _jobs(dtypes, tgt) -> List[Job]:
    """Every config for target tgt (a ``_utils.Target``), num_warps as the launchers scale them."""
    from . import lsh, nd, ofd, sp
    from ._utils import pipeline_stages, scale_warps

    arch = tgt.family
    jobs: List[Job] = []

    def warps(n: int) -> int:
        return scale_warps(n, tgt.warp_size)

    def stages(n: int) -> int:
        return pipeline_stages(n, tgt)

    for dt in dtypes:
        tdt = TORCH_DTYPES[dt]
        # ---------------------------------------------------------------- OFD
        ofd_ptrs = dict(s_ptr="in", t_ptr="in", m_ptr="c", gs_ptr="in", gt_ptr="in", gd_ptr="in")
        for n, (bo, bc, bi) in enumerate(ofd.tiles()):
            tile = dict(BLOCK_O=bo, BLOCK_C=bc, BLOCK_I=bi)
            shape = f"{bo}x{bc}x{bi}"
            jobs.append(Job("ofd", "ofd_fwd_kernel", f"loss+grads {shape}", dt, dict(ofd_ptrs, out_ptr="c"),
                            dict(STORE_D=False, NEED_GS=True, NEED_GT=True, **tile), warps(ofd.NUM_WARPS),
                            i64=("outer", "scale_bits")))
            if n:  # the other kernels with the first tile shape only (same code, same 8 elements a thread)
                continue
            jobs.append(Job("ofd", "ofd_fwd_kernel", f"none (d) {shape}", dt, dict(ofd_ptrs, out_ptr="in"),
                            dict(STORE_D=True, NEED_GS=False, NEED_GT=False, **tile), warps(ofd.NUM_WARPS),
                            i64=("outer", "scale_bits")))
            jobs.append(Job("ofd", "ofd_bwd_kernel", f"grads {shape}", dt, ofd_ptrs,
                            dict(NEED_GS=True, NEED_GT=True, **tile), warps(ofd.NUM_WARPS), i64=("outer",)))
        # ---------------------------------------------------------------- ND
        nd_ptrs = dict(s_ptr="in", t_ptr="in", c_ptr="in", lab_ptr="i64", rw_ptr="c", rows_ptr="c",
                       gs_ptr="in", gt_ptr="in")
        for rows, block_d, single, n_warps in nd.configs():
            for grads in (False, True):
                jobs.append(Job("nd", "nd_fwd_kernel",
                                f"{'loss+grads' if grads else 'loss'} ROWS={rows} BLOCK_D={block_d}"
                                f"{'' if single else ' two-pass'} w={warps(n_warps)}", dt, nd_ptrs,
                                dict(NEED_GS=grads, NEED_GT=grads, ROWS=rows, BLOCK_D=block_d, SINGLE=single),
                                warps(n_warps), i64=("eps_bits",)))
        # ---------------------------------------------------------------- LSH
        lsh_ptrs = dict(fs_ptr="in", ft_ptr="in", w_ptr="in", b_ptr="in", codes_ptr="u8", rw_ptr="c", g_ptr="in",
                        part_ptr="c", sse_ptr="c", rows_ptr="c", gs_ptr="in", gt_ptr="in")
        kind = lsh.dtype_class(tdt)
        for codes in (False, True):
            for grads in (False, True):
                bm, bn, bk, n_warps, n_stages = lsh.proj_config(kind, codes, arch, grads)
                jobs.append(Job("lsh", "lsh_proj_kernel",
                                f"{'codes' if codes else 'f_t'} {'loss+G' if grads else 'loss'} {bm}x{bn}x{bk}",
                                dt, lsh_ptrs, dict(HAS_BIAS=True, USE_CODES=codes, HAS_MSE=True, NEED_GS=grads,
                                                   BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), warps(n_warps),
                                stages(n_stages)))
        bm, bd, bk, n_warps, n_stages = lsh.grad_config(kind, arch)
        jobs.append(Job("lsh", "lsh_grad_kernel", f"G@W+mse+grads {bm}x{bd}x{bk}", dt, lsh_ptrs,
                        dict(HAS_MSE=True, NEED_GS=True, NEED_GT=True, FUSED=False, BLOCK_M=bm, BLOCK_D=bd,
                             BLOCK_K=bk), warps(n_warps), stages(n_stages), i64=("mse_bits",)))
        bm, bn, n_warps, n_stages, max_d = lsh.FUSED_CONFIG.get((arch, kind), (0, 0, 0, 0, 0))
        block_ds = [bd for bd in (16, 32, 64, 128, 256, 512) if bd <= max_d]
        for bd in block_ds:  # the fused path runs with teacher features and G W only (lsh.use_fused)
            jobs.append(Job("lsh", "lsh_fused_kernel", f"f_t loss+GW {bm}x{bn} BLOCK_D={bd}", dt,
                            dict(lsh_ptrs, pd_ptr="c"), dict(HAS_BIAS=True, HAS_MSE=True, BLOCK_M=bm, BLOCK_N=bn,
                                                             BLOCK_D=bd),
                            warps(n_warps), stages(n_stages)))
        # the wider BLOCK_Ds that float32 reaches with single-pass TF32 dots only
        tf32 = lsh.FUSED_CONFIG.get((arch, f"{kind} tf32")) if tgt.backend == "cuda" else None
        if tf32 is not None:
            tm, tn, t_warps, t_stages, t_max = tf32
            for bd in (16, 32, 64, 128, 256, 512):
                if max_d < bd <= t_max:
                    jobs.append(Job("lsh", "lsh_fused_kernel", f"f_t loss+GW {tm}x{tn} BLOCK_D={bd} tf32", dt,
                                    dict(lsh_ptrs, pd_ptr="c"),
                                    dict(HAS_BIAS=True, HAS_MSE=True, BLOCK_M=tm, BLOCK_N=tn, BLOCK_D=bd),
                                    warps(t_warps), stages(t_stages), prec="tf32"))
        # float32 under 'highest' beyond max_d: the hand-split kernel (its dots are TF32 and bf16)
        if dt == "fp32" and tgt.backend == "cuda":
            for (split_arch, bd), (sm, sn, s_warps, s_stages) in sorted(lsh.FUSED_SPLIT_CONFIG.items()):
                if split_arch == arch:
                    jobs.append(Job("lsh", "lsh_fused_split_kernel", f"f_t loss+GW {sm}x{sn} BLOCK_D={bd} split", dt,
                                    dict(lsh_ptrs, pd_ptr="c"), dict(HAS_BIAS=True, HAS_MSE=True, BLOCK_M=sm,
                                                                     BLOCK_N=sn, BLOCK_D=bd),
                                    warps(s_warps), stages(s_stages)))
        if block_ds:
            bm, bd, bk, n_warps, n_stages = lsh.REDUCE_CONFIG
            jobs.append(Job("lsh", "lsh_grad_kernel", f"sum of splits+mse+grads {bm}x{bd}", dt,
                            dict(lsh_ptrs, g_ptr="c"), dict(HAS_MSE=True, NEED_GS=True, NEED_GT=True, FUSED=True,
                                                            BLOCK_M=bm, BLOCK_D=bd, BLOCK_K=bk), warps(n_warps),
                            stages(n_stages), i64=("mse_bits",)))
        # ---------------------------------------------------------------- SP
        sp_ptrs = dict(q_ptr="in", a_ptr="c", as_ptr="c", at_ptr="c", rw_ptr="c", rows_ptr="c", das_ptr="c",
                       dat_ptr="c", da_ptr="c", dq_ptr="in")
        _, bk, n_stages = sp.gemm_config(tdt, arch)
        cfg = sp.configs(tdt, arch)
        for bm, single in cfg["gram"]:
            jobs.append(Job("sp", "sp_gram_fwd_kernel", f"BLOCK_M={bm} BLOCK_K={bk}{' one tile' if single else ''}",
                            dt, sp_ptrs, dict(BLOCK_M=bm, BLOCK_K=bk, SINGLE_TILE=single),
                            warps(sp.num_warps(bm, tdt, arch)), stages(n_stages)))
        for p in (1, 2):
            for bc, single in cfg["rows"]:
                jobs.append(Job("sp", "sp_rows_fwd_kernel",
                                f"p={p} dA both ROWS={sp.ROWS_R} BLOCK_C={bc}{' one pass' if single else ''}", dt,
                                sp_ptrs, dict(P=p, NEED_GS=True, NEED_GT=True, ROWS=sp.ROWS_R, BLOCK_C=bc,
                                              SINGLE=single), warps(sp.ROWS_WARPS), i64=("eps_bits",)))
        for bm, bc, single in cfg["bwd"]:
            jobs.append(Job("sp", "sp_bwd_kernel", f"BLOCK_M={bm} BLOCK_K={bk} BLOCK_C={bc}"
                            f"{' dA held' if single else ' dA chunked'}", dt, sp_ptrs,
                            dict(BLOCK_M=bm, BLOCK_K=bk, BLOCK_C=bc, SINGLE_C=single),
                            warps(sp.num_warps(bm, tdt, arch)), stages(n_stages)))
    return jobs


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found at {path} (it ships in the triton wheel)")
    return path


_MMA = re.compile(r"\b(wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.\w+\.(\w+)|"
                  r"mma\.sync\.aligned\.(m\d+n\d+k\d+)\.row\.col\.\w+\.(\w+))")
# v_mfma_f32_32x32x8_bf16 (gfx942), v_mfma_f32_32x32x8bf16_1k (gfx90a), v_mfma_f32_32x32x4_xf32, v_mfma_f64_16x16x4f64
_MFMA = re.compile(r"\bv_mfma_[a-z0-9]+?_(\d+x\d+x\d+)_?([a-z0-9]+)")
# SM limits for the occupancy column (sm_80 and sm_90 agree except shared memory)
SM_SMEM = {80: 164 * 1024, 90: 228 * 1024}
SM_MAX_WARPS = 64
SM_MAX_BLOCKS = 32
# CDNA2/3 compute unit: 4 SIMDs, up to 8 waves each, 512 VGPRs a lane a SIMD (granule 8), 64 KiB LDS
CU_SIMDS = 4
SIMD_MAX_WAVES = 8


def tensor_core_ops(asm: str) -> str:
    """The tensor-core instructions in a kernel's PTX ('wgmma m64n128k16 bf16', 'mma m16n8k16 bf16')
    or amdgcn ('mfma 32x32x8 bf16'), or '-'."""
    found = set()
    for m in _MMA.finditer(asm):
        if m.group(2):
            found.add(f"wgmma {m.group(2)} {m.group(3)}")
        else:
            found.add(f"mma {m.group(4)} {m.group(5)}")
    for m in _MFMA.finditer(asm):
        found.add(f"mfma {m.group(1)} {m.group(2)}")
    return ", ".join(sorted(found)) or "-"


def occupancy(regs: int, num_warps: int, smem: int, arch: int) -> float:
    """Fraction of the SM's warp slots filled: blocks a SM limited by registers (256-register
    allocation units per warp), shared memory (1 KB reserved a block), warps and blocks."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = 65536 // max(1, per_warp * num_warps)
    by_smem = SM_SMEM[arch] // (smem + 1024)
    blocks = min(by_regs, by_smem, SM_MAX_WARPS // num_warps, SM_MAX_BLOCKS)
    return blocks * num_warps / SM_MAX_WARPS


def cu_occupancy(vgprs: int, num_warps: int, lds: int) -> float:
    """Fraction of a CDNA compute unit's wave slots filled (waves per SIMD / 8): workgroups a
    CU limited by VGPRs (granule 8, 512 a lane a SIMD; a workgroup's waves spread over the
    4 SIMDs) and by LDS (64 KiB a CU)."""
    waves_per_simd = min(SIMD_MAX_WAVES, MAX_VGPRS // max(8, -(-vgprs // 8) * 8))
    by_regs = waves_per_simd * CU_SIMDS // num_warps
    by_lds = LDS_LIMIT // lds if lds else by_regs
    waves = min(by_regs, by_lds) * num_warps
    return min(waves, SIMD_MAX_WAVES * CU_SIMDS) / (SIMD_MAX_WAVES * CU_SIMDS)


_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_AMDGPU_META = ("vgpr_count", "agpr_count", "sgpr_count", "vgpr_spill_count", "sgpr_spill_count",
                "private_segment_fixed_size", "group_segment_fixed_size")


def amdgpu_metadata(amdgcn: str) -> Dict[str, int]:
    """The kernel's register, spill and segment counts from the amdgcn's .amdgpu_metadata."""
    meta = amdgcn[amdgcn.find(".amdgpu_metadata"):]
    out = {}
    for key in _AMDGPU_META:
        m = re.search(r"\." + key + r":\s+(\d+)", meta)
        if m is None:
            raise RuntimeError(f"no .{key} in the amdgcn metadata")
        out[key] = int(m.group(1))
    return out


_CACHE_DIR = None


def _cache_dir() -> str:
    """A private triton cache per process (removed at exit), so every config really compiles."""
    global _CACHE_DIR
    if _CACHE_DIR is None:
        import atexit
        import shutil

        _CACHE_DIR = tempfile.mkdtemp(prefix="kdkernels-aot-")
        atexit.register(shutil.rmtree, _CACHE_DIR, True)
    return _CACHE_DIR


def _source(job: Job):
    """The ASTSource of a job: pointer types from the dtype, aligned pointers, the constexprs
    the launchers pass (CDTYPE, DOT_PREC for the target, INTERP off)."""
    import importlib

    import triton.language as tl
    from triton.compiler import ASTSource

    from ._utils import dot_precision

    mod = importlib.import_module(f"kdkernels.triton.{job.module}")
    fn = getattr(mod, job.kernel)
    if not hasattr(fn, "arg_names"):
        raise RuntimeError(f"{job.kernel} is not a JITFunction (is TRITON_INTERPRET set?)")
    cd = _cdtype(job.dtype)
    constexprs = dict(job.constexprs)
    names = set(fn.arg_names)
    if "CDTYPE" in names:
        constexprs["CDTYPE"] = tl.float64 if cd == "fp64" else tl.float32
    if "DOT_PREC" in names:
        constexprs["DOT_PREC"] = job.prec or dot_precision(TORCH_DTYPES[job.dtype], job.target)
    if "INTERP" in names:
        constexprs["INTERP"] = False
    signature, attrs = {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            kind = job.ptr_types[name]
            signature[name] = "*" + {"in": job.dtype, "c": cd}.get(kind, kind)
            attrs[(i,)] = [["tt.divisibility", 16]]  # what a launch with aligned tensors specialises on
        else:
            signature[name] = "i64" if name in job.i64 else "i32"
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs), constexprs.get("DOT_PREC")


def _nvidia_usage(job: Job, src) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    # the ptxas log (-v) has the spill counts; triton prints it when asked to
    log = io.StringIO()
    triton.knobs.nvidia.dump_ptxas_log = True
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", job.target.arch, 32),
                                  options=_options(job))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = _USAGE.search(out)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump output:\n{out}")
    regs, stack, shared, local = map(int, m.groups())
    spills = _SPILLS.search(log.getvalue())
    # spill bytes: ptxas's spill stores/loads; local memory if the log is missing
    spill = max(int(spills.group(2)), int(spills.group(3))) if spills else local
    smem = max(shared, int(compiled.metadata.shared))
    return dict(regs=regs, spill=spill, stack=stack, local=local, smem=smem, stages=compiled.metadata.num_stages,
                mma=tensor_core_ops(compiled.asm["ptx"]),
                dots=compiled.asm["ttir"].count("tt.dot "),
                occupancy=occupancy(regs, job.num_warps, smem, job.target.family))


def _amd_usage(job: Job, src) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    compiled = triton.compile(src, target=GPUTarget("hip", job.target.arch, job.target.warp_size),
                              options=_options(job))
    meta = amdgpu_metadata(compiled.asm["amdgcn"])
    lds = max(meta["group_segment_fixed_size"], int(compiled.metadata.shared))
    return dict(regs=meta["vgpr_count"], agprs=meta["agpr_count"], sgprs=meta["sgpr_count"],
                stages=compiled.metadata.num_stages,
                vgpr_spill=meta["vgpr_spill_count"], sgpr_spill=meta["sgpr_spill_count"],
                spill=meta["vgpr_spill_count"] + meta["sgpr_spill_count"],
                scratch=meta["private_segment_fixed_size"], smem=lds, mma=tensor_core_ops(compiled.asm["amdgcn"]),
                dots=compiled.asm["ttir"].count("tt.dot "),
                occupancy=cu_occupancy(meta["vgpr_count"], job.num_warps, lds))


def _options(job: Job) -> dict:
    opts = dict(num_warps=job.num_warps)
    if job.num_stages is not None:
        opts["num_stages"] = job.num_stages
    return opts


def compile_job(job: Job) -> dict:
    """Compile one job; returns its resource usage (or the error)."""
    import triton

    row = dict(kernel=job.kernel, variant=job.variant, dtype=job.dtype, target=target_name(job.target),
               backend=job.target.backend, arch=job.target.family, num_warps=job.num_warps)
    t0 = time.time()
    try:
        src, prec = _source(job)
        row["prec"] = prec
        triton.knobs.cache.dir = _cache_dir()  # a fresh cache: every config is compiled (and ptxas logs)
        row.update(_amd_usage(job, src) if job.target.backend == "hip" else _nvidia_usage(job, src), error=None)
    except Exception as exc:  # reported in the table, and fails the run
        row.update(regs=None, spill=None, smem=None, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
    row["seconds"] = time.time() - t0
    return row


# operand type of a native 16-bit tensor-core instruction: PTX / amdgcn spelling
_NATIVE = {"fp16": ("f16",), "bf16": ("bf16",)}


def problems(row: dict) -> List[str]:
    if row["error"]:
        return [row["error"]]
    out = []
    hip = row.get("backend") == "hip"
    if row["spill"]:
        out.append(f"spills {row['spill']} {'registers' if hip else 'bytes'}")
    if hip:
        if row["regs"] > MAX_VGPRS:
            out.append(f"{row['regs']} VGPRs a wave > {MAX_VGPRS}")
        if row["smem"] > LDS_LIMIT:
            out.append(f"LDS {row['smem']} > {LDS_LIMIT}")
        if row.get("scratch"):
            out.append(f"scratch {row['scratch']} bytes a lane")
    else:
        if row["regs"] > MAX_REGS_THREAD:
            out.append(f"{row['regs']} registers a thread > {MAX_REGS_THREAD}")
        if row["regs"] * 32 * row["num_warps"] > MAX_REGS_BLOCK:
            out.append(f"{row['regs']} x {32 * row['num_warps']} threads > {MAX_REGS_BLOCK} registers a block")
        if row["smem"] > SMEM_LIMIT[row["arch"]]:
            out.append(f"shared {row['smem']} > {SMEM_LIMIT[row['arch']]}")
    mma = row.get("mma", "-")
    if row.get("dots") and mma == "-":
        out.append(f"{row['dots']} tl.dot without {'MFMA' if hip else 'tensor-core'} instructions")
    if row.get("dtype") in _NATIVE and mma != "-":
        widened = [op for op in mma.split(", ") if op.split()[-1] not in _NATIVE[row["dtype"]]]
        if widened:
            out.append(f"16-bit inputs reach the tensor cores as {widened} (not native {row['dtype']})")
    return out


def format_table(rows: List[dict]) -> str:
    lines = []
    key = lambda r: (r["kernel"], r["target"])  # noqa: E731
    num = lambda v: "-" if v is None else str(v)  # noqa: E731
    for kernel, target in sorted({key(r) for r in rows}):
        group = [r for r in rows if key(r) == (kernel, target)]
        hip = target.startswith("hip:")
        lines.append(f"\n{kernel}  {target}")
        regs = f"{'vgpr':>5} {'sgpr':>4} {'spill v/s':>9} {'lds':>7}" if hip else \
            f"{'regs':>5} {'spill':>6} {'smem':>7}"
        lines.append(f"  {'variant':44} {'dtype':5} {'warps':>5} {'stg':>3} {regs} {'occ':>4}  {'tensor cores':26} "
                     "status")
        for r in group:
            bad = problems(r)
            status = "OK" if not bad else "FAIL: " + "; ".join(bad)
            occ = "-" if r.get("occupancy") is None else f"{100 * r['occupancy']:.0f}%"
            if hip:
                spill = "-" if r["spill"] is None else f"{r['vgpr_spill']}/{r['sgpr_spill']}"
                usage = f"{num(r['regs']):>5} {num(r.get('sgprs')):>4} {spill:>9} {num(r['smem']):>7}"
            else:
                usage = f"{num(r['regs']):>5} {num(r['spill']):>6} {num(r['smem']):>7}"
            lines.append(f"  {r['variant']:44} {r['dtype']:5} {r['num_warps']:>5} {num(r.get('stages')):>3} {usage} "
                         f"{occ:>4}  {r.get('mma', '-'):26} {status}")
    return "\n".join(lines)


def summary(rows: List[dict]) -> str:
    """Per target: configs, failures, max registers, spills, max shared memory / LDS, instructions."""
    lines = []
    for target in sorted({r["target"] for r in rows}):
        group = [r for r in rows if r["target"] == target]
        ok = [r for r in group if not r["error"]]
        ops = sorted({op for r in ok for op in r["mma"].split(", ") if op != "-"})
        lines.append(f"{target}: {len(group)} configs, {sum(1 for r in group if problems(r))} failing, "
                     f"{sum(1 for r in group if r['error'])} errors, {sum(1 for r in ok if r['spill'])} spilling, "
                     f"max {'VGPRs' if target.startswith('hip:') else 'registers'} "
                     f"{max((r['regs'] for r in ok), default=0)}, max {'LDS' if target.startswith('hip:') else 'smem'} "
                     f"{max((r['smem'] for r in ok), default=0)}; {', '.join(ops) or '-'}")
    return "\n".join(lines)


def _fp32_variants(job: Job) -> List[Job]:
    """job, and for a float32 GEMM one copy per other dot precision that a float32 matmul
    precision ('highest', 'high', 'medium') gives on its target."""
    import importlib

    from ._utils import dot_precision

    fn = getattr(importlib.import_module(f"kdkernels.triton.{job.module}"), job.kernel)
    if job.dtype != "fp32" or "DOT_PREC" not in fn.arg_names or job.prec is not None:
        return [job]
    precs = [dot_precision(TORCH_DTYPES["fp32"], job.target, mp) for mp in ("highest", "high", "medium")]
    return [replace(job, prec=p, variant=job.variant + ("" if p == precs[0] else f" {p}"))
            for p in sorted(set(precs), key=precs.index)]


def run(targets=TARGETS, dtypes=DTYPES, jobs: Optional[int] = None, kernels=None) -> List[dict]:
    todo = []
    for name in targets:
        tgt = parse_target(name)
        for job in _jobs(dtypes, tgt):
            if kernels and job.kernel not in kernels:
                continue
            job.target = tgt
            todo.extend(_fp32_variants(job))
    workers = jobs or os.cpu_count() or 1
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(compile_job, todo, chunksize=2))
    return [compile_job(j) for j in todo]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdkernels.triton.aot", description=__doc__.splitlines()[0])
    ap.add_argument("--target", "--arch", dest="targets", nargs="+", default=list(TARGETS),
                    help="sm_NN (or NN) and hip:gfxNNN targets (default: " + " ".join(TARGETS) + ")")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES, help="input dtypes")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: all cores)")
    ap.add_argument("--kernels", nargs="+", default=None, help="only these kernels (default: all)")
    ap.add_argument("--json", default=None, help="also write the rows (with their problems) to this JSON file")
    args = ap.parse_args(argv)
    for name in args.targets:
        try:
            parse_target(name)
        except ValueError as exc:
            ap.error(str(exc))
    t0 = time.time()
    rows = run(args.targets, args.dtypes, args.jobs, args.kernels)
    print(format_table(rows))
    bad = [r for r in rows if problems(r)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(r, problems=problems(r)) for r in rows], f, indent=1)
    print("\n" + summary(rows))
    print(f"\n{len(rows)} configs compiled in {time.time() - t0:.1f} s; "
          f"max registers {max((r['regs'] or 0) for r in rows)}, "
          f"{sum(1 for r in rows if r['spill'])} spilling, {len(bad)} failing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
