"""Ahead-of-time compile of every Triton kernel config kdkernels can launch.

    python -m kdkernels.triton.aot [--arch 80 90] [--jobs N] [--dtypes fp32 fp16 bf16 fp64]

No GPU is needed: each kernel is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and the
resulting cubin is read with the ``cuobjdump`` that ships in the triton wheel
(``--dump-resource-usage``). A table per kernel and arch lists registers per
thread, spill (local memory) bytes and shared memory. The exit status is
non-zero if any config spills or exceeds a hardware limit (255 registers a
thread, 64K registers a block, the shared memory of a block).

What "every config" means: each launch wrapper has one tile config per kernel
or a heuristic with a finite set of choices (``nd.configs()``, ``sp.configs()``,
``lsh.proj_config`` / ``lsh.grad_config`` / ``lsh.FUSED_CONFIG``, per arch family), and all of them are
compiled, for each input dtype, with the gradient flags that use the most code
(all gradients on) plus the loss-only forward; OFD's tile shape follows the
layout, and its three common shapes are compiled (every shape is 1024 elements,
8 a thread). The flag subsets compile to a subset of that code.

Per config the table shows warps, pipeline stages, registers, spills, shared
memory, occupancy (resident warps / 64, from registers, shared memory and the
block limits) and the tensor-core instructions in the PTX (``wgmma`` on sm_90
for tiles of >= 64 rows, ``mma.sync`` otherwise, with the operand type). A
16-bit input whose operands reach the tensor cores widened (tf32) fails.
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
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Dict, List, Optional  # noqa: E402

ARCHS = (80, 90)
DTYPES = ("fp32", "fp16", "bf16", "fp64")
# per-block shared memory (opt-in maximum) and register file
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MAX_REGS_THREAD = 255
MAX_REGS_BLOCK = 64 * 1024


@dataclass
class Job:
    module: str                    # kdkernels.triton.<module>
    kernel: str                    # kernel name in that module
    variant: str                   # human-readable config
    dtype: str                     # input dtype (triton type string)
    ptr_types: Dict[str, str]      # pointer arg -> element type ('in' = the input dtype, 'c' = compute dtype)
    constexprs: Dict[str, object]  # constexpr values (CDTYPE/DOT_PREC filled in from dtype)
    num_warps: int
    num_stages: int = 3
    i64: tuple = ()                # integer args that get int64
    arch: int = 80


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


def _jobs(dtypes, arch: int) -> List[Job]:

    from . import lsh, nd, ofd, sp

    jobs: List[Job] = []
    for dt in dtypes:
        tdt = TORCH_DTYPES[dt]
        # ---------------------------------------------------------------- OFD
        ofd_ptrs = dict(s_ptr="in", t_ptr="in", m_ptr="c", gs_ptr="in", gt_ptr="in", gd_ptr="in")
        for n, (bo, bc, bi) in enumerate(ofd.tiles()):
            tile = dict(BLOCK_O=bo, BLOCK_C=bc, BLOCK_I=bi)
            shape = f"{bo}x{bc}x{bi}"
            jobs.append(Job("ofd", "ofd_fwd_kernel", f"loss+grads {shape}", dt, dict(ofd_ptrs, out_ptr="c"),
                            dict(STORE_D=False, NEED_GS=True, NEED_GT=True, **tile), ofd.NUM_WARPS,
                            i64=("outer", "scale_bits")))
            if n:  # the other kernels with the first tile shape only (same code, same 8 elements a thread)
                continue
            jobs.append(Job("ofd", "ofd_fwd_kernel", f"none (d) {shape}", dt, dict(ofd_ptrs, out_ptr="in"),
                            dict(STORE_D=True, NEED_GS=False, NEED_GT=False, **tile), ofd.NUM_WARPS,
                            i64=("outer", "scale_bits")))
            jobs.append(Job("ofd", "ofd_bwd_kernel", f"grads {shape}", dt, ofd_ptrs,
                            dict(NEED_GS=True, NEED_GT=True, **tile), ofd.NUM_WARPS, i64=("outer",)))
        # ---------------------------------------------------------------- ND
        nd_ptrs = dict(s_ptr="in", t_ptr="in", c_ptr="in", lab_ptr="i64", rw_ptr="c", rows_ptr="c",
                       gs_ptr="in", gt_ptr="in")
        for rows, block_d, single, warps in nd.configs():
            for grads in (False, True):
                jobs.append(Job("nd", "nd_fwd_kernel",
                                f"{'loss+grads' if grads else 'loss'} ROWS={rows} BLOCK_D={block_d}"
                                f"{'' if single else ' two-pass'} w={warps}", dt, nd_ptrs,
                                dict(NEED_GS=grads, NEED_GT=grads, ROWS=rows, BLOCK_D=block_d, SINGLE=single),
                                warps, i64=("eps_bits",)))
        # ---------------------------------------------------------------- LSH
        lsh_ptrs = dict(fs_ptr="in", ft_ptr="in", w_ptr="in", b_ptr="in", codes_ptr="u8", rw_ptr="c", g_ptr="in",
                        part_ptr="c", sse_ptr="c", rows_ptr="c", gs_ptr="in", gt_ptr="in")
        kind = lsh.dtype_class(tdt)
        for codes in (False, True):
            for grads in (False, True):
                bm, bn, bk, warps, stages = lsh.proj_config(kind, codes, arch, grads)
                jobs.append(Job("lsh", "lsh_proj_kernel",
                                f"{'codes' if codes else 'f_t'} {'loss+G' if grads else 'loss'} {bm}x{bn}x{bk}",
                                dt, lsh_ptrs, dict(HAS_BIAS=True, USE_CODES=codes, HAS_MSE=True, NEED_GS=grads,
                                                   BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), warps, stages))
        bm, bd, bk, warps, stages = lsh.grad_config(kind, arch)
        jobs.append(Job("lsh", "lsh_grad_kernel", f"G@W+mse+grads {bm}x{bd}x{bk}", dt, lsh_ptrs,
                        dict(HAS_MSE=True, NEED_GS=True, NEED_GT=True, FUSED=False, BLOCK_M=bm, BLOCK_D=bd,
                             BLOCK_K=bk), warps, stages, i64=("mse_bits",)))
        bm, bn, warps, stages, max_d = lsh.FUSED_CONFIG.get((arch, kind), (0, 0, 0, 0, 0))
        block_ds = [bd for bd in (16, 32, 64, 128, 256, 512) if bd <= max_d]
        for bd in block_ds:  # the fused path runs with teacher features and G W only (lsh.use_fused)
            jobs.append(Job("lsh", "lsh_fused_kernel", f"f_t loss+GW {bm}x{bn} BLOCK_D={bd}", dt,
                            dict(lsh_ptrs, pd_ptr="c"), dict(HAS_BIAS=True, HAS_MSE=True, BLOCK_M=bm, BLOCK_N=bn,
                                                             BLOCK_D=bd),
                            warps, stages))
        if block_ds:
            bm, bd, bk, warps, stages = lsh.REDUCE_CONFIG
            jobs.append(Job("lsh", "lsh_grad_kernel", f"sum of splits+mse+grads {bm}x{bd}", dt,
                            dict(lsh_ptrs, g_ptr="c"), dict(HAS_MSE=True, NEED_GS=True, NEED_GT=True, FUSED=True,
                                                            BLOCK_M=bm, BLOCK_D=bd, BLOCK_K=bk), warps, stages,
                            i64=("mse_bits",)))
        # ---------------------------------------------------------------- SP
        sp_ptrs = dict(q_ptr="in", a_ptr="c", as_ptr="c", at_ptr="c", rw_ptr="c", rows_ptr="c", das_ptr="c",
                       dat_ptr="c", da_ptr="c", dq_ptr="in")
        _, bk, stages = sp.gemm_config(tdt, arch)
        cfg = sp.configs(tdt, arch)
        for bm, single in cfg["gram"]:
            jobs.append(Job("sp", "sp_gram_fwd_kernel", f"BLOCK_M={bm} BLOCK_K={bk}{' one tile' if single else ''}",
                            dt, sp_ptrs, dict(BLOCK_M=bm, BLOCK_K=bk, SINGLE_TILE=single), sp.num_warps(bm, tdt, arch), stages))
        for p in (1, 2):
            for bc, single in cfg["rows"]:
                jobs.append(Job("sp", "sp_rows_fwd_kernel",
                                f"p={p} dA both ROWS={sp.ROWS_R} BLOCK_C={bc}{' one pass' if single else ''}", dt,
                                sp_ptrs, dict(P=p, NEED_GS=True, NEED_GT=True, ROWS=sp.ROWS_R, BLOCK_C=bc,
                                              SINGLE=single), sp.ROWS_WARPS, i64=("eps_bits",)))
        for bm, bc, single in cfg["bwd"]:
            jobs.append(Job("sp", "sp_bwd_kernel", f"BLOCK_M={bm} BLOCK_K={bk} BLOCK_C={bc}"
                            f"{' dA held' if single else ' dA chunked'}", dt, sp_ptrs,
                            dict(BLOCK_M=bm, BLOCK_K=bk, BLOCK_C=bc, SINGLE_C=single), sp.num_warps(bm, tdt, arch), stages))
    return jobs


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found at {path} (it ships in the triton wheel)")
    return path


_MMA = re.compile(r"\b(wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.\w+\.(\w+)|"
                  r"mma\.sync\.aligned\.(m\d+n\d+k\d+)\.row\.col\.\w+\.(\w+))")
# SM limits for the occupancy column (sm_80 and sm_90 agree except shared memory)
SM_SMEM = {80: 164 * 1024, 90: 228 * 1024}
SM_MAX_WARPS = 64
SM_MAX_BLOCKS = 32


def tensor_core_ops(ptx: str) -> str:
    """The tensor-core instructions in a kernel's PTX, e.g. 'wgmma m64n128k16 bf16', or '-'."""
    found = set()
    for m in _MMA.finditer(ptx):
        if m.group(2):
            found.add(f"wgmma {m.group(2)} {m.group(3)}")
        else:
            found.add(f"mma {m.group(4)} {m.group(5)}")
    return ", ".join(sorted(found)) or "-"


def occupancy(regs: int, num_warps: int, smem: int, arch: int) -> float:
    """Fraction of the SM's warp slots filled: blocks a SM limited by registers (256-register
    allocation units per warp), shared memory (1 KB reserved a block), warps and blocks."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = 65536 // max(1, per_warp * num_warps)
    by_smem = SM_SMEM[arch] // (smem + 1024)
    blocks = min(by_regs, by_smem, SM_MAX_WARPS // num_warps, SM_MAX_BLOCKS)
    return blocks * num_warps / SM_MAX_WARPS


_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


_CACHE_DIR = None


def _cache_dir() -> str:
    """A private triton cache per process (removed at exit), so every config really runs ptxas."""
    global _CACHE_DIR
    if _CACHE_DIR is None:
        import atexit
        import shutil

        _CACHE_DIR = tempfile.mkdtemp(prefix="kdkernels-aot-")
        atexit.register(shutil.rmtree, _CACHE_DIR, True)
    return _CACHE_DIR


def compile_job(job: Job) -> dict:
    """Compile one job; returns its resource usage (or the error)."""
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
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
        constexprs["DOT_PREC"] = dot_precision(TORCH_DTYPES[job.dtype])  # fp32: the 'highest' default, tf32x3
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
    row = dict(kernel=job.kernel, variant=job.variant, dtype=job.dtype, arch=job.arch, num_warps=job.num_warps)
    t0 = time.time()
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        # the ptxas log (-v) has the spill counts; triton prints it when asked to
        log = io.StringIO()
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.cache.dir = _cache_dir()  # a fresh cache: the log is printed only when ptxas runs
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32),
                                      options=dict(num_warps=job.num_warps, num_stages=job.num_stages))
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
        row.update(regs=regs, spill=spill, stack=stack, local=local, smem=smem, error=None,
                   mma=tensor_core_ops(compiled.asm["ptx"]), stages=job.num_stages,
                   occupancy=occupancy(regs, job.num_warps, smem, job.arch))
    except Exception as exc:  # reported in the table, and fails the run
        row.update(regs=None, spill=None, smem=None, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
    row["seconds"] = time.time() - t0
    return row


def problems(row: dict) -> List[str]:
    if row["error"]:
        return [row["error"]]
    out = []
    if row["spill"]:
        out.append(f"spills {row['spill']} bytes")
    if row["regs"] > MAX_REGS_THREAD:
        out.append(f"{row['regs']} registers a thread > {MAX_REGS_THREAD}")
    if row["regs"] * 32 * row["num_warps"] > MAX_REGS_BLOCK:
        out.append(f"{row['regs']} x {32 * row['num_warps']} threads > {MAX_REGS_BLOCK} registers a block")
    if row["smem"] > SMEM_LIMIT[row["arch"]]:
        out.append(f"shared {row['smem']} > {SMEM_LIMIT[row['arch']]}")
    if row.get("dtype") in ("fp16", "bf16") and row.get("mma", "-") != "-":
        ptx_type = {"fp16": "f16", "bf16": "bf16"}[row["dtype"]]
        widened = [op for op in row["mma"].split(", ") if not op.endswith(" " + ptx_type)]
        if widened:
            out.append(f"16-bit inputs reach the tensor cores as {widened} (not native {row['dtype']})")
    return out


def format_table(rows: List[dict]) -> str:
    lines = []
    key = lambda r: (r["kernel"], r["arch"])  # noqa: E731
    for kernel, arch in sorted({key(r) for r in rows}):
        group = [r for r in rows if key(r) == (kernel, arch)]
        lines.append(f"\n{kernel}  sm_{arch}")
        lines.append(f"  {'variant':44} {'dtype':5} {'warps':>5} {'stg':>3} {'regs':>5} {'spill':>6} {'smem':>7} "
                     f"{'occ':>4}  {'tensor cores':26} status")
        for r in group:
            bad = problems(r)
            status = "OK" if not bad else "FAIL: " + "; ".join(bad)
            num = lambda v: "-" if v is None else str(v)  # noqa: E731
            occ = "-" if r.get("occupancy") is None else f"{100 * r['occupancy']:.0f}%"
            lines.append(f"  {r['variant']:44} {r['dtype']:5} {r['num_warps']:>5} {num(r.get('stages')):>3} "
                         f"{num(r['regs']):>5} {num(r['spill']):>6} {num(r['smem']):>7} {occ:>4}  "
                         f"{r.get('mma', '-'):26} {status}")
    return "\n".join(lines)


def run(archs=ARCHS, dtypes=DTYPES, jobs: Optional[int] = None, kernels=None) -> List[dict]:
    todo = []
    for arch in archs:
        for job in _jobs(dtypes, arch):
            if kernels and job.kernel not in kernels:
                continue
            job.arch = arch
            todo.append(job)
    workers = jobs or os.cpu_count() or 1
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(compile_job, todo, chunksize=4))
    return [compile_job(j) for j in todo]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdkernels.triton.aot", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="SM versions (default: 80 90)")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES, help="input dtypes")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: all cores)")
    ap.add_argument("--kernels", nargs="+", default=None, help="only these kernels (default: all)")
    args = ap.parse_args(argv)
    t0 = time.time()
    rows = run(args.arch, args.dtypes, args.jobs, args.kernels)
    print(format_table(rows))
    bad = [r for r in rows if problems(r)]
    print(f"\n{len(rows)} configs compiled in {time.time() - t0:.1f} s; "
          f"max registers {max((r['regs'] or 0) for r in rows)}, "
          f"{sum(1 for r in rows if r['spill'])} spilling, {len(bad)} failing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
