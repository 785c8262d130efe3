"""Memory traffic, launches and host synchronisations of the Triton backend, counted without a GPU.

    python -m kdkernels.triton.traffic [--dtypes fp32 tf32 bf16] [--losses ofd nd lsh sp]

Each loss runs forward + backward (student gradient, upstream gradient 2.0) at a
fixed size under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors),
with the launch heuristics set to an H100's 132 SMs (``_utils.MODEL_SMS``), so the
grids are those a GPU would get. Counted per call (the second of two; the first
warms the caches):

- kernel bytes: every ``tl.load`` / ``tl.store`` a program issues, active (unmasked)
  lanes times the element size, i.e. bytes *requested* by the kernels (L1/L2 hits
  included, so it is an upper bound on DRAM traffic);
- torch-op bytes: every other aten op of the call, its tensor inputs as read and its
  outputs as written (views and allocations are free);
- launches: kernel launches plus torch ops that touch memory (each is a kernel on a GPU);
- host syncs: ``aten._local_scalar_dense`` (``.item()``, ``int(t)``, ``bool(t)``), ops
  whose output leaves the input's device, ``aten.lift_fresh`` (a tensor made from
  host data, a host-to-device copy on a GPU) and ``aten.nonzero`` family ops.

The minimum is every input read once and the student gradient written once; the
ratio is (kernel + torch-op bytes) / minimum. It is a model of what the code asks
for, not a GPU measurement.

The bound column is a lower bound on the ratio of any design that, as autograd
requires, runs a forward (which must return the loss) and a separate backward
(which alone knows the upstream gradient):
- the forward reads every input (the loss depends on all of them): the minimum
  minus the gradient;
- the backward writes the gradient (|g|) and needs per-element state for it: either
  a saved unit-upstream gradient (or any state of its size: it has as many free
  values), written by the forward and read by the backward (2 |g|), or the inputs
  the gradient depends on, read again (R: OFD s and t; ND s and the class means,
  with the per-row scalars saved; LSH and SP every input);
- so bound = (minimum + min(2 |g|, R)) / minimum.
With |g| = |s| = |t| that is 5/3 for OFD and (4 |s| + 2 |centers|) / (3 |s| + |centers|)
for ND (1.41 at its size, reading each class mean once a pass): the issue's 1.25x
and 1.3x targets are below it, so no forward/backward design meets them with an
upstream gradient other than 1 (only a single fused pass that knew the upstream
gradient in advance could). The bound is not reached by every design: ND here reads
one class-mean row per sample (B rows, not K), twice if it recomputed.
"""
from __future__ import annotations

import os

if __name__ in ("__main__", "__mp_main__"):  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable, Dict, List  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}
# float32 matmul precision of a row: "fp32" torch's default 'highest' (tf32x3 dots), "tf32"
# float32 inputs with single-pass TF32 dots allowed ('high'), as most GPU training runs
MATMUL_PRECISION = {"fp32": "highest", "tf32": "high"}
GEMM_LOSSES = ("lsh", "sp")  # the losses with dots, whose tf32 row differs from their fp32 one
# ratio targets of issue 12 (measured bytes / minimum bytes)
TARGETS = {"ofd": 1.25, "nd": 1.3, "lsh": 4.0, "sp": 2.5}
SIZES = {"ofd": "[8, 64, 32, 32]", "nd": "B=256 D=512 K=100", "lsh": "B=128 D=256 N=2048",
         "sp": "b=64 K=4096 vs 8192"}
H100_SMS = 132

_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "set_", "lift_fresh_copy"}
_SYNC = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "unique", "_unique2", "item",
         "is_nonzero", "equal"}


@dataclass
class Counts:
    kernel_read: int = 0
    kernel_written: int = 0
    op_read: int = 0
    op_written: int = 0
    launches: int = 0
    op_launches: int = 0
    syncs: int = 0
    sync_ops: List[str] = field(default_factory=list)
    ops: List[str] = field(default_factory=list)
    kernels: List[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.kernel_read + self.kernel_written + self.op_read + self.op_written


def _nbytes(x) -> int:
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


def _tensors(tree):
    from torch.utils._pytree import tree_flatten

    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


class _OpCounter(TorchDispatchMode):
    """Counts aten ops outside kernel launches; runs kdkernels custom ops' bodies
    inside the mode so their own ops are seen (not the custom op as one op)."""

    def __init__(self, counts: Counts, in_kernel: List[bool]):
        super().__init__()
        self.counts, self.in_kernel = counts, in_kernel

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if name.startswith("kdkernels::"):
            from .. import _ops

            body = _ops._BODIES[id(getattr(_ops, name.split("::")[1]))]
            with self:
                return body(*args, **kwargs)
        out = func(*args, **kwargs)
        if self.in_kernel[0]:
            return out
        c = self.counts
        short = name.split("::")[-1].split(".")[0]
        ins = _tensors((args, kwargs))
        if short in _SYNC or any(o.device != i.device for o in _tensors(out) for i in ins[:1]) or short == "lift_fresh":
            c.syncs += 1
            c.sync_ops.append(short)
        if getattr(func, "is_view", False) or short in _FREE or short in ("lift_fresh", "_local_scalar_dense"):
            return out
        c.op_read += sum(_nbytes(x) for x in ins)
        c.op_written += sum(_nbytes(x) for x in _tensors(out))
        c.op_launches += 1
        c.ops.append(short)
        return out


@contextlib.contextmanager
def counting(counts: Counts):
    """Counts kernel loads/stores and launches (patching the interpreter) and torch ops."""
    from triton.runtime import interpreter as ti

    from . import _utils

    builder = ti.InterpreterBuilder
    old_load, old_store, old_call = builder.create_masked_load, builder.create_masked_store, ti.GridExecutor.__call__
    in_kernel = [False]

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        ret = old_load(self, ptrs, mask, other, cache_policy, is_volatile)
        counts.kernel_read += int(mask.data.sum()) * ret.data.dtype.itemsize
        return ret

    def store(self, ptrs, value, mask, cache_policy):
        counts.kernel_written += int(mask.data.sum()) * value.data.dtype.itemsize
        return old_store(self, ptrs, value, mask, cache_policy)

    def call(self, *args, **kwargs):
        counts.launches += 1
        counts.kernels.append(self.fn.__name__)
        in_kernel[0] = True
        try:
            return old_call(self, *args, **kwargs)
        finally:
            in_kernel[0] = False

    old_sms = _utils.MODEL_SMS
    builder.create_masked_load, builder.create_masked_store, ti.GridExecutor.__call__ = load, store, call
    _utils.MODEL_SMS = H100_SMS
    try:
        with _OpCounter(counts, in_kernel):
            yield counts
    finally:
        builder.create_masked_load, builder.create_masked_store, ti.GridExecutor.__call__ = \
            old_load, old_store, old_call
        _utils.MODEL_SMS = old_sms


# --------------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    inputs: Callable[[torch.dtype], tuple]  # -> (student, others...); student requires grad
    run: Callable  # (*inputs) -> loss
    minimum: Callable[[tuple], int]  # bytes: inputs read once, student gradient written once
    recompute: Callable[[tuple], int]  # bytes a backward re-reads to rebuild the gradient (R above)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _ofd_inputs(dtype):
    s = torch.randn(8, 64, 32, 32, generator=_g(0)).to(dtype).requires_grad_()
    t = torch.randn(8, 64, 32, 32, generator=_g(1)).to(dtype)
    return s, t, -torch.rand(64, generator=_g(2))


def _nd_inputs(dtype):
    s = torch.randn(256, 512, generator=_g(0)).to(dtype).requires_grad_()
    t = torch.randn(256, 512, generator=_g(1)).to(dtype)
    centers = torch.randn(100, 512, generator=_g(2)).to(dtype)
    return s, t, centers, torch.randint(0, 100, (256,), generator=_g(3))


def _lsh_inputs(dtype):
    f_s = torch.randn(128, 256, generator=_g(0)).to(dtype).requires_grad_()
    f_t = torch.randn(128, 256, generator=_g(1)).to(dtype)
    w = (torch.randn(2048, 256, generator=_g(2)) * 0.06).to(dtype)
    return f_s, f_t, w, torch.zeros(2048, dtype=dtype)


def _sp_inputs(dtype):
    f_s = torch.randn(64, 4096, generator=_g(0)).to(dtype).requires_grad_()
    return f_s, torch.randn(64, 8192, generator=_g(1)).to(dtype)


def _read_once(x) -> int:
    return sum(_nbytes(t) for t in x) + _nbytes(x[0])  # every input once + the student gradient


def _all_inputs(x) -> int:
    return sum(_nbytes(t) for t in x)


def bound(case: Case, inputs: tuple) -> float:
    """Lower bound on the ratio of a separate forward and backward (module docstring)."""
    minimum = case.minimum(inputs)
    return (minimum + min(2 * _nbytes(inputs[0]), case.recompute(inputs))) / minimum


def cases() -> Dict[str, Case]:
    import kdkernels as kdk

    return {
        "ofd": Case("ofd", _ofd_inputs, lambda s, t, m: kdk.ofd_loss(s, t, m, backend="triton"), _read_once,
                    lambda x: _all_inputs(x[:2])),
        "nd": Case("nd", _nd_inputs, lambda s, t, c, y: kdk.nd_loss(s, t, c, y, backend="triton"), _read_once,
                   lambda x: _nbytes(x[0]) + _nbytes(x[2]) + _nbytes(x[3])),
        "lsh": Case("lsh", _lsh_inputs, lambda f_s, f_t, w, b: kdk.lsh_loss(f_s, f_t, w, b, backend="triton"),
                    _read_once, _all_inputs),
        "sp": Case("sp", _sp_inputs, lambda f_s, f_t: kdk.sp_loss(f_s, f_t, backend="triton"), _read_once,
                   _all_inputs),
    }


def measure(case: Case, dtype: torch.dtype) -> Counts:
    """Counts of one forward + backward (upstream gradient 2) after a warm-up call."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("the traffic report runs under the Triton interpreter: set TRITON_INTERPRET=1 "
                           "before triton is imported (python -m kdkernels.triton.traffic does)")
    inputs = case.inputs(dtype)
    upstream = torch.tensor(2.0)
    for _ in range(2):
        inputs[0].grad = None
        counts = Counts()
        with counting(counts):
            case.run(*inputs).backward(upstream)
    return counts


@contextlib.contextmanager
def matmul_precision(precision):
    """torch.set_float32_matmul_precision(precision) inside (None: unchanged)."""
    old = torch.get_float32_matmul_precision()
    if precision is not None:
        torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def row_keys(losses=tuple(TARGETS), dtypes=tuple(DTYPES)) -> List[tuple]:
    """The report's (loss, dtype) rows: a tf32 row only for the losses with GEMMs."""
    return [(name, dt) for name in losses for dt in dtypes if dt != "tf32" or name in GEMM_LOSSES]


def report(losses=tuple(TARGETS), dtypes=tuple(DTYPES)) -> List[dict]:
    rows = []
    all_cases = cases()
    for name, dt in row_keys(losses, dtypes):
        case = all_cases[name]
        with matmul_precision(MATMUL_PRECISION.get(dt)):
            c = measure(case, DTYPES[dt])
        inputs = case.inputs(DTYPES[dt])
        minimum = case.minimum(inputs)
        rows.append(dict(loss=name, dtype=dt, size=SIZES[name], counts=c, minimum=minimum,
                         ratio=c.total / minimum, target=TARGETS[name], bound=bound(case, inputs)))
    return rows


def format_rows(rows: List[dict]) -> str:
    mib = lambda b: f"{b / 2**20:8.2f}"  # noqa: E731
    lines = [f"{'loss':4} {'size':22} {'dtype':5} {'kernels MiB':>11} {'torch ops MiB':>13} {'min MiB':>8} "
             f"{'ratio':>6} {'bound':>6} {'target':>6} {'launches':>8} {'syncs':>5}  status"]
    for r in rows:
        c = r["counts"]
        ok = r["ratio"] <= r["target"] and c.syncs == 0
        lines.append(f"{r['loss']:4} {r['size']:22} {r['dtype']:5} {mib(c.kernel_read + c.kernel_written):>11} "
                     f"{mib(c.op_read + c.op_written):>13} {mib(r['minimum']):>8} {r['ratio']:6.2f} "
                     f"{r['bound']:6.2f} {r['target']:6.2f} {c.launches:>3}+{c.op_launches:<4} {c.syncs:>5}  "
                     f"{'OK' if ok else 'HOST SYNC ' + ','.join(c.sync_ops) if c.syncs else 'OVER TARGET' + (' (target < bound: unattainable)' if r['target'] < r['bound'] else '')}")
    lines.append("launches: Triton kernels + torch ops; bytes requested (L1/L2 hits included), a model, not a GPU run;")
    lines.append("bound: lower bound of any separate forward/backward (see the module docstring); "
                 "tf32: float32 inputs under torch.set_float32_matmul_precision('high')")
    for r in rows:
        c = r["counts"]
        lines.append(f"  {r['loss']} {r['dtype']}: kernels {c.kernels}; torch ops {c.ops}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdkernels.triton.traffic", description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--losses", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    args = ap.parse_args(argv)
    rows = report(args.losses, args.dtypes)
    print(format_rows(rows))
    return 0 if all(r["counts"].syncs == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
