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
or a heuristic with a finite set of choices (``nd.configs()``,
``sp.block_m_choices``, ``lsh.fwd_config``), and all of them are compiled, for each input dtype,
with the gradient flags that use the most code (all gradients on) plus the
loss-only forward. The flag subsets compile to a subset of that code.
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


def _jobs(dtypes) -> List[Job]:

    from . import lsh, nd, ofd, sp

    jobs: List[Job] = []
    for dt in dtypes:
        tdt = TORCH_DTYPES[dt]
        # ---------------------------------------------------------------- OFD
        ofd_ptrs = dict(s_ptr="in", t_ptr="in", m_ptr="c", scale_ptr="c", gs_ptr="in", gt_ptr="in", gd_ptr="in")
        jobs.append(Job("ofd", "ofd_fwd_kernel", f"loss+grads BLOCK={ofd.BLOCK}", dt,
                        dict(ofd_ptrs, out_ptr="c"),
                        dict(STORE_D=False, NEED_GS=True, NEED_GT=True, BLOCK=ofd.BLOCK), ofd.NUM_WARPS,
                        i64=("numel",)))
        jobs.append(Job("ofd", "ofd_fwd_kernel", f"none (d) BLOCK={ofd.BLOCK}", dt, dict(ofd_ptrs, out_ptr="in"),
                        dict(STORE_D=True, NEED_GS=False, NEED_GT=False, BLOCK=ofd.BLOCK), ofd.NUM_WARPS,
                        i64=("numel",)))
        jobs.append(Job("ofd", "ofd_bwd_kernel", f"grads BLOCK={ofd.BLOCK}", dt, ofd_ptrs,
                        dict(NEED_GS=True, NEED_GT=True, BLOCK=ofd.BLOCK), ofd.NUM_WARPS, i64=("numel",)))
        # ---------------------------------------------------------------- ND
        nd_ptrs = dict(s_ptr="in", t_ptr="in", c_ptr="in", lab_ptr="i64", rw_ptr="c", eps_ptr="c", rows_ptr="c",
                       gs_ptr="in", gt_ptr="in")
        for rows, block_d, single, warps in nd.configs():
            for grads in (False, True):
                jobs.append(Job("nd", "nd_fwd_kernel",
                                f"{'loss+grads' if grads else 'loss'} ROWS={rows} BLOCK_D={block_d}"
                                f"{'' if single else ' two-pass'} w={warps}", dt, nd_ptrs,
                                dict(NEED_GS=grads, NEED_GT=grads, ROWS=rows, BLOCK_D=block_d, SINGLE=single),
                                warps))
        # ---------------------------------------------------------------- LSH
        lsh_ptrs = dict(fs_ptr="in", ft_ptr="in", w_ptr="in", b_ptr="in", codes_ptr="u8", rw_ptr="c",
                        part_loss_ptr="c", part_grad_ptr="c", mse_ptr="c", rows_ptr="c", gs_ptr="in", gt_ptr="in")
        bb, bn, bd, warps, stages = lsh.fwd_config(tdt)
        for codes in (False, True):
            for grads in (False, True):
                jobs.append(Job("lsh", "lsh_fwd_kernel",
                                f"{'codes' if codes else 'f_t'} {'loss+dh@W' if grads else 'loss'} "
                                f"{bb}x{bn}x{bd}", dt, lsh_ptrs,
                                dict(HAS_BIAS=True, USE_CODES=codes, NEED_GS=grads, BLOCK_B=bb,
                                     BLOCK_N=bn, BLOCK_D=bd), warps, stages))
        jobs.append(Job("lsh", "lsh_bwd_kernel", f"mse+grads ROWS={lsh.RED_ROWS} BLOCK_D={lsh.RED_BLOCK_D}", dt,
                        lsh_ptrs, dict(HAS_MSE=True, NEED_GS=True, NEED_GT=True, ROWS=lsh.RED_ROWS,
                                       BLOCK_D=lsh.RED_BLOCK_D), lsh.RED_WARPS))
        # ---------------------------------------------------------------- SP
        sp_ptrs = dict(q_ptr="in", pairs_ptr="i32", a_ptr="c", as_ptr="c", at_ptr="c", rw_ptr="c", eps_ptr="c",
                       rows_ptr="c", das_ptr="c", dat_ptr="c", da_ptr="c", dq_ptr="in")
        for bm in sp.block_m_choices(tdt):
            jobs.append(Job("sp", "sp_gram_fwd_kernel", f"BLOCK_M={bm} BLOCK_K={sp.GRAM_BLOCK_K}", dt, sp_ptrs,
                            dict(BLOCK_M=bm, BLOCK_K=sp.GRAM_BLOCK_K), sp.num_warps(bm), sp.GRAM_STAGES))
        for p in (1, 2):
            jobs.append(Job("sp", "sp_rows_fwd_kernel", f"p={p} dA both ROWS={sp.ROWS_R} BLOCK_C={sp.ROWS_BLOCK_C}",
                            dt, sp_ptrs, dict(P=p, NEED_GS=True, NEED_GT=True, ROWS=sp.ROWS_R,
                                              BLOCK_C=sp.ROWS_BLOCK_C), sp.ROWS_WARPS))
        for bm in sp.block_m_choices(tdt):
            bc = sp.bwd_block_c(bm)
            jobs.append(Job("sp", "sp_bwd_kernel", f"BLOCK_M={bm} BLOCK_K={sp.BWD_BLOCK_K} BLOCK_C={bc}",
                            dt, sp_ptrs, dict(BLOCK_M=bm, BLOCK_K=sp.BWD_BLOCK_K, BLOCK_C=bc),
                            sp.num_warps(bm), sp.BWD_STAGES))
    return jobs


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found at {path} (it ships in the triton wheel)")
    return path


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
        constexprs["DOT_PREC"] = dot_precision(TORCH_DTYPES[job.dtype])
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
        row.update(regs=regs, spill=spill, stack=stack, local=local,
                   smem=max(shared, int(compiled.metadata.shared)), error=None)
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
    return out


def format_table(rows: List[dict]) -> str:
    lines = []
    key = lambda r: (r["kernel"], r["arch"])  # noqa: E731
    for kernel, arch in sorted({key(r) for r in rows}):
        group = [r for r in rows if key(r) == (kernel, arch)]
        lines.append(f"\n{kernel}  sm_{arch}")
        lines.append(f"  {'variant':44} {'dtype':5} {'warps':>5} {'regs':>5} {'spill':>6} {'stack':>6} {'smem':>7}"
                     "  status")
        for r in group:
            bad = problems(r)
            status = "OK" if not bad else "FAIL: " + "; ".join(bad)
            num = lambda v: "-" if v is None else str(v)  # noqa: E731
            lines.append(f"  {r['variant']:44} {r['dtype']:5} {r['num_warps']:>5} {num(r['regs']):>5} "
                         f"{num(r['spill']):>6} {num(r.get('stack')):>6} {num(r['smem']):>7}  {status}")
    return "\n".join(lines)


def run(archs=ARCHS, dtypes=DTYPES, jobs: Optional[int] = None) -> List[dict]:
    todo = []
    for arch in archs:
        for job in _jobs(dtypes):
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
    args = ap.parse_args(argv)
    t0 = time.time()
    rows = run(args.arch, args.dtypes, args.jobs)
    print(format_table(rows))
    bad = [r for r in rows if problems(r)]
    print(f"\n{len(rows)} configs compiled in {time.time() - t0:.1f} s; "
          f"max registers {max((r['regs'] or 0) for r in rows)}, "
          f"{sum(1 for r in rows if r['spill'])} spilling, {len(bad)} failing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
