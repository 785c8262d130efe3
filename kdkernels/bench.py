"""Microbenchmarks of every loss: ``python -m kdkernels bench [--quick] [--out DIR]
[--device cpu|cuda] [--repeats N] [--losses ofd nd sp lsh]``.

Forward + backward (``loss.backward()``), fp32, for four implementations of each
case, measured in the same process:

  kdkernels  the fused backend ('cpu': the C++ kernels; 'triton' on CUDA)
  eager      the eager PyTorch reference (``kdkernels.reference``)
  compile    ``torch.compile`` of the reference (compile time reported apart)
  floor      the irreducible work: OFD/ND a ``clone()`` of one input; SP the
             GEMMs Qs Qs^T, Qt Qt^T and one [b,b]x[b,K]; LSH f_s W^T, f_t W^T
             and one [B,N]x[N,D] (``torch.mm``)
  engine_floor  SP and LSH on CPU only: the same GEMMs through the kernels' own
             GEMM engine (``kdkernels._C.gemm``: per call shape oneDNN or ATen,
             whichever was faster here), so kdk/engine_floor is the fused kernel's overhead
             over its GEMMs

The floor of the SP and LSH targets (and of kdk/floor) on CPU is the faster of
the two GEMM floors measured in the run: the fastest engine's three GEMMs.

CPU times are medians of ``--repeats`` timed calls after warm-up, with the
implementations interleaved (one call of each in turn) so drift hits them all
alike; CUDA times come from ``triton.testing.do_bench`` (median). Peak extra
memory on CPU is ``ru_maxrss`` of a fresh forked worker running one fwd+bwd
minus its resident size right after it allocated the inputs; on CUDA it is
``torch.cuda.max_memory_allocated`` minus the memory allocated before the call.

A backend whose kernel is not written yet (NotImplementedError) is recorded as
"not implemented", never a crash. The issue-3 targets (fp32, 2 threads, CPU)
are printed next to the ratios and marked met/missed in the table and in
bench.json. Writes bench.json and bench.png under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

LOSSES = ("ofd", "nd", "sp", "lsh")
IMPLS = ("kdkernels", "eager", "compile", "floor", "engine_floor")
LOSS_IMPLS = ("kdkernels", "eager", "compile")  # the ones that compute the loss (their results are compared)
MEMORY_IMPLS = ("kdkernels", "eager", "compile", "floor")
NOT_APPLICABLE = "n/a"
NOT_IMPLEMENTED = "not implemented"


# --------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One benchmark case. ``sizes``: OFD shape [B,C,H,W]; ND (B,D,K); SP (b,K); LSH (B,D,N).
    ``timed``: measure time (else memory only); ``memory``: measure peak extra memory."""

    loss: str
    sizes: Tuple[int, ...]
    timed: bool = True
    memory: bool = True

    @property
    def name(self) -> str:
        sep = "x" if self.loss == "ofd" else ","
        return f"{self.loss}[{sep.join(map(str, self.sizes))}]"


CPU_CASES = (
    Case("ofd", (64, 256, 28, 28)),
    Case("nd", (512, 2048, 1000)),
    Case("sp", (64, 16384)),
    Case("lsh", (256, 512, 2048)),
    Case("lsh", (64, 256, 8192)),
    Case("lsh", (1024, 512, 8192), timed=False),
)
QUICK_CPU_CASES = (
    Case("ofd", (16, 64, 28, 28)),
    Case("nd", (128, 512, 100)),
    Case("sp", (32, 4096)),
    Case("lsh", (64, 256, 1024)),
    Case("lsh", (256, 256, 2048), timed=False),
)
CUDA_CASES = (
    Case("ofd", (256, 256, 56, 56)),
    Case("nd", (512, 2048, 1000)),
    Case("sp", (256, 25088)),
    Case("lsh", (1024, 1024, 4096)),
    Case("lsh", (256, 512, 2048)),
    Case("lsh", (1024, 512, 8192)),
)
QUICK_CUDA_CASES = (
    Case("ofd", (64, 256, 28, 28)),
    Case("nd", (512, 2048, 1000)),
    Case("sp", (64, 16384)),
    Case("lsh", (256, 512, 2048)),
)


def default_cases(device: str, quick: bool) -> Tuple[Case, ...]:
    if device == "cuda":
        return QUICK_CUDA_CASES if quick else CUDA_CASES
    return QUICK_CPU_CASES if quick else CPU_CASES


def fused_backend(device: str) -> str:
    return "triton" if device == "cuda" else "cpu"


# --------------------------------------------------------------------------- inputs and implementations
def make_inputs(case: Case, device: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Inputs of a case; the student side requires grad, the teacher side and constants do not."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, grad=False):  # no temporaries (they would blur RSS measurements)
        x = torch.randn(*shape, generator=g, dtype=dtype)
        if scale != 1.0:
            x.mul_(scale)
        return x.to(device=device).requires_grad_(grad)

    if case.loss == "ofd":
        b, c, h, w = case.sizes
        from .stats import ofd_margin

        gamma = torch.rand(c, generator=g) + 0.5
        beta = torch.randn(c, generator=g) * 0.5
        return {"s": randn(b, c, h, w, grad=True), "t": randn(b, c, h, w),
                "margin": ofd_margin(gamma, beta).to(device=device, dtype=dtype)}
    if case.loss == "nd":
        b, d, k = case.sizes
        labels = torch.randint(0, k, (b,), generator=g).to(device)
        return {"s": randn(b, d, grad=True), "t": randn(b, d, scale=1.1), "centers": randn(k, d), "labels": labels}
    if case.loss == "sp":
        b, k = case.sizes
        return {"f_s": randn(b, k, grad=True), "f_t": randn(b, k)}
    if case.loss == "lsh":
        b, d, n = case.sizes
        return {"f_s": randn(b, d, grad=True), "f_t": randn(b, d), "weight": randn(n, d, scale=d ** -0.5),
                "bias": randn(n, scale=0.1)}
    raise ValueError(f"loss: expected one of {list(LOSSES)}, got {case.loss!r}")


def tiny_case(case: Case) -> Case:
    """The same loss at toy sizes (warms up libraries before a memory measurement)."""
    sizes = {"ofd": (2, 4, 3, 3), "nd": (4, 8, 3), "sp": (4, 16), "lsh": (4, 8, 16)}[case.loss]
    return Case(case.loss, sizes, case.timed, case.memory)


def grad_inputs(inputs: dict) -> List[torch.Tensor]:
    return [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]


def loss_fn(loss: str, backend: Optional[str]) -> Callable[[dict], torch.Tensor]:
    """inputs -> scalar loss, through kdkernels (``backend``) or the reference (``backend=None``)."""
    from . import functional as F
    from . import reference as R

    if loss == "ofd":
        if backend is None:
            return lambda x: R.ofd_loss(x["s"], x["t"], x["margin"])
        return lambda x: F.ofd_loss(x["s"], x["t"], x["margin"], backend=backend)
    if loss == "nd":
        if backend is None:
            return lambda x: R.nd_loss(x["s"], x["t"], x["centers"], x["labels"])
        return lambda x: F.nd_loss(x["s"], x["t"], x["centers"], x["labels"], backend=backend)
    if loss == "sp":
        if backend is None:
            return lambda x: R.sp_loss(x["f_s"], x["f_t"])
        return lambda x: F.sp_loss(x["f_s"], x["f_t"], backend=backend)
    if loss == "lsh":
        if backend is None:
            return lambda x: R.lsh_loss(x["f_s"], x["f_t"], x["weight"], x["bias"])
        return lambda x: F.lsh_loss(x["f_s"], x["f_t"], x["weight"], x["bias"], backend=backend)
    raise ValueError(f"loss: expected one of {list(LOSSES)}, got {loss!r}")


def floor_fn(loss: str, mm: Callable = torch.mm) -> Callable[[dict], None]:
    """The hardware floor of one fwd+bwd, in the same process (see the module docstring);
    ``mm`` computes the GEMMs of SP and LSH."""
    if loss == "ofd":
        return lambda x: x["s"].detach().clone()
    if loss == "nd":
        return lambda x: x["s"].detach().clone()
    if loss == "sp":
        def sp_floor(x):
            q_s, q_t = x["f_s"].detach(), x["f_t"].detach()
            a_s = mm(q_s, q_s.T)  # [b, b]
            mm(q_t, q_t.T)
            return mm(a_s, q_s)  # [b, b] x [b, K]
        return sp_floor
    if loss == "lsh":
        def lsh_floor(x):
            w = x["weight"]
            h_s = mm(x["f_s"].detach(), w.T)  # [B, N]
            mm(x["f_t"], w.T)
            return mm(h_s, w)  # [B, N] x [N, D]
        return lsh_floor
    raise ValueError(f"loss: expected one of {list(LOSSES)}, got {loss!r}")


def applies(impl: str, case: Case, device: str) -> bool:
    """engine_floor exists for the GEMM-bound losses on CPU only."""
    return impl != "engine_floor" or (device == "cpu" and case.loss in ("sp", "lsh"))


def make_step(impl: str, case: Case, device: str, compiled: Optional[Callable] = None) -> Callable[[dict], None]:
    """One timed call of an implementation: fwd + ``loss.backward()`` (floors: their ops)."""
    if impl == "floor":
        return floor_fn(case.loss)
    if impl == "engine_floor":
        from . import _cpu

        return floor_fn(case.loss, _cpu._extension().gemm)
    if impl == "kdkernels":
        fn = loss_fn(case.loss, fused_backend(device))
    elif impl == "eager":
        fn = loss_fn(case.loss, None)
    elif impl == "compile":
        fn = compiled if compiled is not None else torch.compile(loss_fn(case.loss, None))
    else:
        raise ValueError(f"impl: expected one of {list(IMPLS)}, got {impl!r}")

    def step(x):
        loss = fn(x)
        loss.backward()
        return loss.detach()

    return step


def _fingerprint(grad: torch.Tensor) -> torch.Tensor:
    """A few float64 sums of a gradient (sum |g|, sum g^2, sum of every 97th element):
    enough to tell a wrong gradient from a right one without keeping a copy (a
    kept copy of OFD's 51 MB gradient changed the floor's allocation pattern)."""
    g = grad.detach().double().flatten()
    return torch.stack([g.abs().sum(), g.pow(2).sum(), g[::97].sum()])


def _mismatch(got: Optional[tuple], want: Optional[tuple]) -> Optional[str]:
    """Why a first call's (loss, gradient fingerprints) differ from eager's (None: they
    match or one is missing)."""
    if got is None or want is None:
        return None
    for what, a, b in [("loss", got[0], want[0])] + [("gradient", a, b) for a, b in zip(got[1], want[1])]:
        if not torch.allclose(a.double(), b.double(), rtol=1e-3, atol=1e-5 * max(1.0, float(b.abs().max())),
                              equal_nan=True):
            return f"its {what} differs from eager's (max abs diff {float((a.double() - b.double()).abs().max()):.3g})"
    return None


def zero_grads(inputs: dict) -> None:
    for x in grad_inputs(inputs):
        x.grad = None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, NotImplementedError):
        return NOT_IMPLEMENTED
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"error: {type(exc).__name__}: {first[:200]}"


# --------------------------------------------------------------------------- timing
def time_case(case: Case, device: str, repeats: int, warmup: int, impls: Sequence[str], progress=None) -> dict:
    """Times of each implementation (ms, median), compile time apart. Returns
    {impl: {"ms": float|None, "status": "ok"|"not implemented"|"error: ...", "compile_s": ...}}."""
    inputs = make_inputs(case, device)
    out: Dict[str, dict] = {}
    steps: Dict[str, Callable] = {}
    first_values: Dict[str, tuple] = {}  # impl -> (loss, gradient fingerprints) of its first call
    for impl in impls:
        entry = {"ms": None, "status": "ok"}
        if not applies(impl, case, device):
            out[impl] = {"ms": None, "status": NOT_APPLICABLE}
            continue
        try:
            step = make_step(impl, case, device)
            zero_grads(inputs)
            _sync(device)
            t0 = time.perf_counter()
            value = step(inputs)  # first call: JIT / compile / lazy init
            _sync(device)
            first = time.perf_counter() - t0
            if impl == "compile":
                entry["compile_s"] = first
            if impl in LOSS_IMPLS:
                first_values[impl] = (value, [_fingerprint(x.grad) for x in grad_inputs(inputs)])
            steps[impl] = step
        except Exception as exc:  # noqa: BLE001 - record, never crash the run
            entry.update(status=_error_text(exc))
            if not isinstance(exc, NotImplementedError) and os.environ.get("KDKERNELS_BENCH_DEBUG"):
                traceback.print_exc()
        out[impl] = entry
    for impl in ("kdkernels", "compile"):  # a time only for a result that matches eager's
        why = _mismatch(first_values.get(impl), first_values.get("eager"))
        if why is not None:
            out[impl]["status"] = f"error: {why}"
            steps.pop(impl, None)
    if device == "cuda":
        import triton.testing

        for impl, step in steps.items():
            def call(step=step):
                zero_grads(inputs)
                step(inputs)

            out[impl]["ms"] = float(triton.testing.do_bench(call, warmup=25 * max(1, warmup), rep=max(20, 10 * repeats),
                                                            return_mode="median"))
            if progress is not None:
                progress.update(1)
        return out
    for _ in range(warmup):
        for step in steps.values():
            zero_grads(inputs)
            step(inputs)
    samples: Dict[str, List[float]] = {impl: [] for impl in steps}
    for _ in range(repeats):  # interleaved: one call of each implementation in turn
        for impl, step in steps.items():
            zero_grads(inputs)
            t0 = time.perf_counter()
            step(inputs)
            samples[impl].append(time.perf_counter() - t0)
    for impl, xs in samples.items():
        out[impl]["ms"] = 1e3 * statistics.median(xs)
        out[impl]["ms_min"] = 1e3 * min(xs)
        if "compile_s" in out[impl]:
            out[impl]["compile_s"] = max(0.0, out[impl]["compile_s"] - statistics.median(xs))
    if progress is not None:
        progress.update(len(impls))
    return out


# --------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _memory_child(case: Case, impl: str, device: str) -> dict:
    """Runs in a fresh worker: allocate the inputs, then one fwd+bwd; extra peak = maxrss - rss before."""
    try:
        step = make_step(impl, case, device)
        # a first call on tiny inputs loads libraries and starts thread pools (not the kernel's memory)
        tiny = make_inputs(tiny_case(case), device)
        step(tiny)
        del tiny
        inputs = make_inputs(case, device)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(inputs)
            torch.cuda.synchronize()
            return {"bytes": torch.cuda.max_memory_allocated() - base, "status": "ok"}
        _malloc_trim()  # hand freed heap pages back, so that later allocations show up in RSS
        base = _rss_bytes()
        step(inputs)
        return {"bytes": max(0, _maxrss_bytes() - base), "status": "ok"}
    except Exception as exc:  # noqa: BLE001
        return {"bytes": None, "status": _error_text(exc)}


def _memory_child_main(conn, case: Case, impl: str, device: str) -> None:
    conn.send(_memory_child(case, impl, device))
    conn.close()


_MP_CONTEXT = None


def _mp_context():
    """A forkserver that has imported torch and kdkernels once: each worker then starts in
    milliseconds, with a fresh peak-RSS counter and no inherited OpenMP pool."""
    global _MP_CONTEXT
    if _MP_CONTEXT is None:
        import multiprocessing as mp

        _MP_CONTEXT = mp.get_context("forkserver")
        _MP_CONTEXT.set_forkserver_preload(["torch", "kdkernels"])
    return _MP_CONTEXT


def memory_case(case: Case, device: str, impls: Sequence[str], progress=None) -> dict:
    """{impl: {"bytes": int|None, "status": ...}}: peak extra memory of one fwd+bwd.

    CPU: a fresh forked worker per implementation ('compile' is not measured on CPU:
    it would recompile in every worker). CUDA: in this process."""
    out: Dict[str, dict] = {}
    for impl in (i for i in impls if i in MEMORY_IMPLS):
        if device == "cuda":
            if impl == "compile":
                out[impl] = _memory_compiled_cuda(case)
            else:
                out[impl] = _memory_child(case, impl, device)
        elif impl == "compile":
            out[impl] = {"bytes": None, "status": "not measured on CPU"}
        else:
            ctx = _mp_context()
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_memory_child_main, args=(child, case, impl, device))
            proc.start()
            child.close()
            try:
                out[impl] = parent.recv() if parent.poll(600) else {"bytes": None, "status": "error: timeout"}
            except EOFError:
                out[impl] = {"bytes": None, "status": f"error: worker died (exit {proc.exitcode})"}
            proc.join(30)
        if progress is not None:
            progress.update(1)
    return out


def _memory_compiled_cuda(case: Case) -> dict:
    try:
        inputs = make_inputs(case, "cuda")
        step = make_step("compile", case, "cuda")
        step(inputs)  # compile first, outside the measurement
        zero_grads(inputs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(inputs)
        torch.cuda.synchronize()
        return {"bytes": torch.cuda.max_memory_allocated() - base, "status": "ok"}
    except Exception as exc:  # noqa: BLE001
        return {"bytes": None, "status": _error_text(exc)}


# --------------------------------------------------------------------------- targets (issue #3)
@dataclass(frozen=True)
class Target:
    """kind: 'floor_ratio' (kdk/floor <= value), 'speedup' (other/kdk >= value),
    'time_ratio' (kdk/other <= value), 'memory_ratio' (kdk extra / eager extra <= value)."""

    kind: str
    value: float
    vs: str = "floor"
    sizes: Optional[Tuple[int, ...]] = None  # only this case of the loss

    @property
    def label(self) -> str:
        if self.kind == "floor_ratio":
            return f"<= {self.value:g}x floor"
        if self.kind == "speedup":
            return f">= {self.value:g}x faster than {self.vs}"
        if self.kind == "time_ratio":
            return f"<= {self.value:g}x {self.vs} time"
        return f"extra peak <= {self.value:g}x eager's"


TARGETS: Dict[str, Tuple[Target, ...]] = {
    "ofd": (Target("floor_ratio", 1.6), Target("speedup", 6.0, "eager"), Target("speedup", 2.5, "compile"),
            Target("memory_ratio", 0.3)),
    "nd": (Target("speedup", 2.5, "eager"), Target("speedup", 1.2, "compile")),
    "sp": (Target("floor_ratio", 1.1), Target("time_ratio", 0.75, "eager"), Target("time_ratio", 0.8, "compile")),
    "lsh": (Target("floor_ratio", 1.15), Target("speedup", 1.2, "eager"), Target("speedup", 1.2, "compile"),
            Target("memory_ratio", 0.3, sizes=(1024, 512, 8192))),
}


def best_floor(ms: Dict[str, Optional[float]]) -> Optional[float]:
    """The floor the ratios use: the faster of the torch.mm and the engine GEMM floors
    where both were timed (SP, LSH on CPU), else the floor."""
    floors = [v for v in (ms.get("floor"), ms.get("engine_floor")) if v]
    return min(floors) if floors else None


def evaluate_targets(case: Case, res: dict) -> List[dict]:
    """[{target, value, status: met|missed|n/a}] for the targets that apply to this case."""
    ms = {impl: e.get("ms") for impl, e in res.get("time", {}).items()}
    ms["floor"] = best_floor(ms)
    mem = {impl: e.get("bytes") for impl, e in res.get("memory", {}).items()}
    out = []
    for tg in TARGETS.get(case.loss, ()):
        value = None
        if tg.kind == "memory_ratio":
            if tg.sizes is not None and tuple(tg.sizes) != tuple(case.sizes) and case.loss == "lsh":
                continue
            if not case.memory:
                continue
            k, e = mem.get("kdkernels"), mem.get("eager")
            if k is not None and e:
                value = k / e
            ok = value is not None and value <= tg.value
        else:
            if not case.timed:
                continue
            k = ms.get("kdkernels")
            other = ms.get(tg.vs)
            if k and other:
                value = k / other if tg.kind in ("floor_ratio", "time_ratio") else other / k
            if value is None:
                ok = False
            elif tg.kind == "speedup":
                ok = value >= tg.value
            else:
                ok = value <= tg.value
        out.append({"target": tg.label, "kind": tg.kind, "vs": tg.vs, "threshold": tg.value, "value": value,
                    "status": "n/a" if value is None else ("met" if ok else "missed")})
    return out


# --------------------------------------------------------------------------- machine
# Environment variables that cap the instruction set of torch's kernels, oneDNN's and
# MKL's GEMMs: all three at AVX2 make an AVX-512 machine run the code an AVX2 one would.
ISA_LIMIT_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_description(cpuinfo: str) -> str:
    """The first processor of a /proc/cpuinfo text as 'model name (family F, model M, AVX-512|AVX2|no AVX2)'."""
    fields = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor only
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", "")
    flags = set(fields.get("flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
    if "cpu family" not in fields:
        return name
    return f"{name} (family {fields['cpu family']}, model {fields.get('model', '?')}, {isa})"


def machine_info(device: str) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = cpu_description(f.read()) or cpu
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "device": device, "dtype": "float32"}
    try:
        info["loadavg_1m_at_start"] = os.getloadavg()[0]  # > cpu_count: other work shares the cores
    except OSError:  # pragma: no cover
        pass
    try:
        from . import __version__

        info["kdkernels"] = __version__
    except ImportError:  # pragma: no cover
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    if device == "cpu":
        from . import _cpu

        info["gemm_engine"] = _cpu._C.gemm_engine() if _cpu.available() else None
        info["gemm_engine_reason"] = _cpu._C.gemm_engine_reason() if _cpu.available() else None
        info["cpu_isa"] = _cpu.CAPABILITY  # the kernel module in use (torch's capability)
        info["isa_limits"] = {v: os.environ[v] for v in ISA_LIMIT_VARS if os.environ.get(v)}
    return info


# --------------------------------------------------------------------------- report
def _fmt_ms(e: Optional[dict]) -> str:
    if not e:
        return "-"
    if e.get("ms") is not None:
        return f"{e['ms']:.3f}"
    if e.get("status") == NOT_IMPLEMENTED:
        return "n/i"
    return "err" if str(e.get("status", "")).startswith("error") else "-"


def _fmt_mb(e: Optional[dict]) -> str:
    if not e:
        return "-"
    if e.get("bytes") is not None:
        return f"{e['bytes'] / 2 ** 20:.1f}"
    return "n/i" if e.get("status") == NOT_IMPLEMENTED else "-"


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def format_table(results: List[dict]) -> str:
    head = (f"{'case':<22}{'kdk ms':>10}{'eager ms':>10}{'compile ms':>11}{'floor ms':>10}"
            f"{'kdk/floor':>10}{'eag/floor':>10}{'cmp/floor':>10}{'kdk/eng':>8}{'x eager':>9}{'x compile':>10}"
            f"{'compile s':>10}"
            f"  {'peak extra MiB kdk/eager/compile/floor':<40}")
    lines = [head, "-" * len(head)]
    for r in results:
        t = r.get("time", {})
        m = r.get("memory", {})
        ms = {k: (v.get("ms") if v else None) for k, v in t.items()}
        fl = best_floor(ms)
        comp = t.get("compile", {}) or {}
        cs = f"{comp['compile_s']:.1f}" if comp.get("compile_s") is not None else "-"

        def rf(x):
            return "-" if x is None else f"{x:.2f}"

        mem = "/".join(_fmt_mb(m.get(i)) for i in MEMORY_IMPLS) if m else "-"
        if r["timed"]:
            lines.append(f"{r['case']:<22}{_fmt_ms(t.get('kdkernels')):>10}{_fmt_ms(t.get('eager')):>10}"
                         f"{_fmt_ms(t.get('compile')):>11}{(f'{fl:.3f}' if fl else '-'):>10}"
                         f"{rf(_ratio(ms.get('kdkernels'), fl)):>10}{rf(_ratio(ms.get('eager'), fl)):>10}"
                         f"{rf(_ratio(ms.get('compile'), fl)):>10}{rf(_ratio(ms.get('kdkernels'), ms.get('engine_floor'))):>8}"
                         f"{rf(_ratio(ms.get('eager'), ms.get('kdkernels'))):>9}"
                         f"{rf(_ratio(ms.get('compile'), ms.get('kdkernels'))):>10}{cs:>10}  {mem:<40}")
        else:
            lines.append(f"{r['case']:<22}{'(memory only)':>60}{'':>28}  {mem:<40}")
        for tg in r.get("targets", []):
            v = "-" if tg["value"] is None else f"{tg['value']:.2f}"
            lines.append(f"{'':<4}target {tg['target']:<34} measured {v:>7}  {tg['status'].upper()}")
        bad = {i: e["status"] for i, e in list(t.items()) + list(m.items())
               if e and e.get("status") not in ("ok", NOT_IMPLEMENTED, NOT_APPLICABLE, "not measured on CPU")}
        for impl, status in bad.items():
            lines.append(f"{'':<4}{impl}: {status}")
    lines.append("floor ms, kdk/floor etc.: vs the floor (SP, LSH: the faster of torch.mm's and the kernels' GEMM engine's "
                 "three GEMMs); kdk/eng: vs the same GEMMs through the kernels' engine; x eager / x compile: speed-up "
                 "of kdkernels; n/i: not implemented; "
                 "peak extra: one fwd+bwd beyond the inputs")
    return "\n".join(lines)


def plot(results: List[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    timed = [r for r in results if r["timed"]]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    ax = axes[0]
    xs = np.arange(len(timed))
    width = 0.27
    for j, impl in enumerate(("kdkernels", "eager", "compile")):
        vals = []
        for r in timed:
            t = r["time"]
            fl = best_floor({k: (v or {}).get("ms") for k, v in t.items()})
            vals.append(_ratio((t.get(impl) or {}).get("ms"), fl) or 0.0)
        bars = ax.bar(xs + (j - 1) * width, vals, width, label=impl)
        for b, v in zip(bars, vals):
            if v == 0.0:
                ax.annotate("n/i", (b.get_x() + b.get_width() / 2, 1.0), ha="center", va="bottom", fontsize=7)
    for i, r in enumerate(timed):  # floor-ratio targets as short lines over the kdkernels bar
        for tg in TARGETS.get(r["loss"], ()):
            if tg.kind == "floor_ratio":
                ax.hlines(tg.value, i - 1.5 * width, i - 0.5 * width, colors="k", linestyles="--", lw=1)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(xs, [r["case"] for r in timed], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("time / floor (fwd+bwd)")
    ax.set_title("time vs the floor (dashed: target)")
    ax.legend(fontsize=8)

    ax = axes[1]
    mem = [r for r in results if r.get("memory")]
    xs = np.arange(len(mem))
    for j, impl in enumerate(("kdkernels", "floor")):
        vals = []
        for r in mem:
            k = (r["memory"].get(impl) or {}).get("bytes")
            e = (r["memory"].get("eager") or {}).get("bytes")
            vals.append(k / e if k is not None and e else 0.0)
        ax.bar(xs + (j - 0.5) * 0.4, vals, 0.4, label=impl)
    ax.axhline(1.0, color="gray", lw=0.8, label="eager")
    ax.axhline(0.3, color="k", ls="--", lw=1, label="target 0.3 (OFD, LSH)")
    ax.set_xticks(xs, [r["case"] for r in mem], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("peak extra memory / eager's")
    ax.set_title("peak extra memory of one fwd+bwd")
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- driver
def run(cases: Sequence[Case], device: str, repeats: int, warmup: int, impls: Sequence[str] = IMPLS,
        memory: bool = True, show_progress: bool = True) -> List[dict]:
    n_mem = sum(i in MEMORY_IMPLS for i in impls)
    total = sum((len(impls) if c.timed else 0) + (n_mem if (c.memory and memory) else 0) for c in cases)
    bar = _progress(total, show_progress)
    results = []
    try:
        for case in cases:
            r = {"case": case.name, "loss": case.loss, "sizes": list(case.sizes), "timed": case.timed}
            if case.timed:
                bar.set_description(f"time {case.name}")
                r["time"] = time_case(case, device, repeats, warmup, impls, progress=bar)
            if case.memory and memory:
                bar.set_description(f"memory {case.name}")
                r["memory"] = memory_case(case, device, impls, progress=bar)
            r["targets"] = evaluate_targets(case, r)
            results.append(r)
            if device == "cuda":
                torch.cuda.empty_cache()
    finally:
        bar.close()
    return results


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, disable=not enabled, leave=False, dynamic_ncols=True, file=sys.stderr)
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, *_):
                pass

            def set_description(self, *_):
                pass

            def close(self):
                pass

        return _Null()


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m kdkernels bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a much smaller set of cases (< 2 min on 2 cores)")
    ap.add_argument("--out", default="out/bench", help="folder for bench.json and bench.png (default out/bench)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per implementation (default 15, quick 5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2, quick 1)")
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS),
                    help="implementations to measure (default all)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads before measuring (default: leave as is)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    ap.add_argument("--check-targets", action="store_true", help="exit 1 if any issue-3 target is missed")
    argv = list(argv) if argv is not None else sys.argv[1:]
    if argv and argv[0] == "bench":
        argv = argv[1:]
    return ap.parse_args(argv)


def pin_inductor_vector_width() -> None:
    """Under ``ATEN_CPU_CAPABILITY=avx2``, make torch.compile's CPU code 256 bits wide.

    torch 2.13's inductor, on an AVX-512 + AMX CPU (Intel Xeon model 207) with that
    setting, emits 512-bit loops over at::vec's 256-bit vectors: half of each step is
    never written, and every loss's compiled reference came out wrong (the bench's
    result check caught it; a compiled training step returned NaN). The tests
    (tests/conftest.py) and the bench both pin the width; a real AVX2 machine is not
    affected."""
    if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2":
        import torch._inductor.config

        torch._inductor.config.cpp.simdlen = 256


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m kdkernels bench ...`` (``argv``: the arguments after ``bench``)."""
    args = parse_args(argv)
    pin_inductor_vector_width()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("kdkernels bench: --device cuda asked but CUDA is not available on this machine; skipped "
              "(run on a GPU machine, or use --device cpu)", file=sys.stderr)
        return 0
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if repeats < 1 or warmup < 0:
        print(f"kdkernels bench: --repeats must be >= 1 and --warmup >= 0, got {repeats}, {warmup}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    cases = [c for c in default_cases(args.device, args.quick) if c.loss in args.losses]
    impls = [i for i in IMPLS if i in args.impls]
    info = machine_info(args.device)
    start = time.perf_counter()
    results = run(cases, args.device, repeats, warmup, impls, memory=not args.no_memory,
                  show_progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    if args.device == "cpu":  # the engine's per-shape choices, made during the run
        info.update({k: v for k, v in machine_info(args.device).items() if k.startswith("gemm_engine")})

    title = (f"kdkernels bench ({args.device}, fp32, {'quick, ' if args.quick else ''}{info['threads']} threads, "
             f"torch {info['torch']}, {info['cpu'] if args.device == 'cpu' else info.get('gpu', '')})")
    print(title)
    if args.device == "cpu":
        print(f"C++ kernels: ISA level {info.get('cpu_isa')} (torch: {torch.backends.cpu.get_cpu_capability()}), "
              f"float32 GEMM engine {info.get('gemm_engine')} ({info.get('gemm_engine_reason')})")
        if info.get("isa_limits"):
            print("ISA limits set: " + ", ".join(f"{k}={v}" for k, v in info["isa_limits"].items()))
    print(f"fwd+bwd, median of {repeats} runs after {warmup} warm-up; fused backend {fused_backend(args.device)!r}")
    load = info.get("loadavg_1m_at_start")
    if args.device == "cpu" and load is not None and load > (os.cpu_count() or 1):
        print(f"note: load average {load:.1f} on {os.cpu_count()} cores at start: other processes share the "
              "cores and multi-threaded timings are noisy; compare ratios from one run only")
    print(format_table(results))
    missed = [(r["case"], t["target"]) for r in results for t in r["targets"] if t["status"] != "met"]
    met = sum(t["status"] == "met" for r in results for t in r["targets"])
    print(f"targets (issue #3, defined for fp32, 2 threads, CPU): {met} met, "
          f"{sum(t['status'] == 'missed' for r in results for t in r['targets'])} missed, "
          f"{sum(t['status'] == 'n/a' for r in results for t in r['targets'])} n/a; {elapsed:.1f}s")
    if args.quick or args.device != "cpu" or info["threads"] != 2:
        print("note: the targets are defined for the full CPU sizes at 2 threads; this run's marks are indicative only")

    os.makedirs(args.out, exist_ok=True)
    payload = {
        "machine": info,
        "config": {"quick": args.quick, "device": args.device, "repeats": repeats, "warmup": warmup,
                   "losses": list(args.losses), "impls": impls, "fused_backend": fused_backend(args.device),
                   "memory": not args.no_memory,
                   "timing": "triton.testing.do_bench median" if args.device == "cuda"
                   else "perf_counter, median of interleaved runs",
                   "memory_method": "torch.cuda.max_memory_allocated minus allocated before" if args.device == "cuda"
                   else "ru_maxrss of a fresh forked worker minus its RSS after allocating the inputs"},
        "cases": results,
        "targets_summary": {"met": met, "not_met": [f"{c}: {t}" for c, t in missed]},
        "seconds": elapsed,
    }
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(payload, f, indent=2)
    plot(results, os.path.join(args.out, "bench.png"), title)
    print(f"wrote {os.path.join(args.out, 'bench.json')} and bench.png")
    if args.check_targets and missed:
        return 1
    return 0


if __name__ == "__main__":
    # run the imported module's main so that functions sent to worker processes
    # pickle as kdkernels.bench.*, not __main__.*
    from kdkernels.bench import main as _main

    sys.exit(_main(sys.argv[1:]))
