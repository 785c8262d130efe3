"""``python -m kdkernels``: which backends are available, a correctness self-check
of every loss on every available backend against the reference, and a small
timing table. ``python -m kdkernels bench ...``: the microbenchmarks."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

import kdkernels as kdk
from kdkernels import _cpu


def available_backends() -> Dict[str, str]:
    """backend -> 'yes' or why not."""
    out = {"reference": "yes"}
    out["cpu"] = f"yes ({_cpu.describe()})" if _cpu.available() else f"no: {_cpu._IMPORT_ERROR}"
    try:
        import triton

        if torch.cuda.is_available():
            out["triton"] = f"yes (triton {triton.__version__}, {torch.cuda.get_device_name()})"
        elif os.environ.get("TRITON_INTERPRET") == "1":
            out["triton"] = f"yes (triton {triton.__version__}, interpreter on CPU)"
        else:
            out["triton"] = f"no CUDA device (triton {triton.__version__}; TRITON_INTERPRET=1 runs it on CPU tensors)"
    except ImportError:
        out["triton"] = "no: triton is not installed"
    return out


def _cases(device: str, small: bool) -> Dict[str, Tuple[Callable, list, dict]]:
    """loss name -> (function, args, kwargs) on random data."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    if small:
        b, d, n, k, c, hw = 5, 24, 40, 4, 6, 5
    else:
        b, d, n, k, c, hw = 256, 512, 2048, 100, 64, 32
    labels = torch.randint(0, k, (b,), generator=g).to(device)
    return {
        "lsh": (kdk.lsh_loss, [r(b, d), r(b, d), r(n, d) * 0.1, r(n) * 0.1], {}),
        "nd": (kdk.nd_loss, [r(b, d), r(b, d), r(k, d), labels], {}),
        "ofd": (kdk.ofd_loss, [r(b // 4 + 1, c, hw, hw), r(b // 4 + 1, c, hw, hw), -r(c).abs()], {}),
        "sp": (kdk.sp_loss, [r(b // 4 + 1, c, hw, hw), r(b // 4 + 1, 2 * c, hw // 2 + 1, hw // 2 + 1)], {}),
    }


def _run(fn, args, kwargs, backend, dtype, teacher_grad=True):
    """loss and gradients of student (and teacher) inputs, the first two args."""
    n_grad = 2 if teacher_grad else 1
    args = [a.to(dtype).requires_grad_(i < n_grad) if a.is_floating_point() else a for i, a in enumerate(args)]
    loss = fn(*args, backend=backend, **kwargs)
    grads = torch.autograd.grad(loss, args[:n_grad])
    return loss.detach(), grads


def self_check(backends: List[str], device: str) -> Tuple[List[List[str]], bool]:
    rows, ok = [], True
    for name, (fn, args, kwargs) in _cases(device, small=True).items():
        for backend in backends:
            for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 2e-4)):
                try:
                    loss, grads = _run(fn, args, kwargs, backend, dtype)
                    ref_loss, ref_grads = _run(fn, args, kwargs, "reference", dtype)
                    err = max(_rel_err(a, b) for a, b in zip((loss, *grads), (ref_loss, *ref_grads)))
                    verdict = "ok" if err <= tol else "MISMATCH"
                    ok &= err <= tol
                    rows.append([name, backend, str(dtype).replace("torch.", ""), f"{err:.1e}", verdict])
                except NotImplementedError as exc:
                    rows.append([name, backend, str(dtype).replace("torch.", ""), "-", f"not implemented: {exc}"])
    return rows, ok


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def timing(backends: List[str], device: str, repeats: int = 5) -> List[List[str]]:
    rows = []
    for name, (fn, args, kwargs) in _cases(device, small=False).items():
        times: Dict[str, Optional[float]] = {}
        for backend in backends:
            try:
                # timed as in training: gradient for the student only (teacher detached)
                _run(fn, args, kwargs, backend, torch.float32, teacher_grad=False)  # warm-up
                samples = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    _run(fn, args, kwargs, backend, torch.float32, teacher_grad=False)
                    samples.append(time.perf_counter() - start)
                times[backend] = sorted(samples)[len(samples) // 2]
            except NotImplementedError:
                times[backend] = None
        ref = times["reference"]
        for backend in backends:
            t = times[backend]
            rows.append([name, backend, "-" if t is None else f"{t * 1e3:.2f}",
                         "-" if t is None else f"{ref / t:.2f}x"])
    return rows


def print_table(header: List[str], rows: List[List[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from kdkernels.bench import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m kdkernels", description=__doc__)
    parser.add_argument("--no-timing", action="store_true", help="only the backend list and the self-check")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules:
        # no GPU: the Triton kernels are still checked, on CPU tensors, by Triton's interpreter
        # (read when triton is first imported, which kdkernels does lazily)
        os.environ["TRITON_INTERPRET"] = "1"
    print(f"kdkernels {kdk.__version__}, torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    backends = available_backends()
    print("\nBackends:")
    print_table(["backend", "available"], [[k, v] for k, v in backends.items()])
    usable = [b for b, v in backends.items() if v.startswith("yes")]
    print("\nSelf-check against the reference (max relative error of loss and gradients):")
    rows, ok = self_check(usable, device)
    print_table(["loss", "backend", "dtype", "rel err", "result"], rows)
    if not args.no_timing:
        timed = [b for b in usable if not (b == "triton" and device == "cpu")]  # the interpreter is not timed
        print("\nForward+backward, float32, median of 5 (ms); speed-up vs the eager reference:")
        print_table(["loss", "backend", "ms", "vs reference"], timing(timed, device))
        print("\nFull benchmark: python -m kdkernels bench (see README)")
    print("\nself-check: " + ("all backends agree with the reference" if ok else "MISMATCH, see above"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
