"""Shared checks: a fused backend against the reference, forward and every gradient."""
from __future__ import annotations

from dataclasses import dataclass, field
import os
from typing import Callable, Dict, Optional, Sequence

import torch

TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-11),
    torch.float32: dict(rtol=2e-4, atol=2e-5),
    torch.float16: dict(rtol=2e-2, atol=2e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


@dataclass
class Case:
    """A call of one loss: ``fn(*args, backend=..., **kwargs)``; ``diff`` are the
    indexes of args that require grad."""

    fn: Callable
    args: Sequence
    kwargs: Dict = field(default_factory=dict)
    diff: Sequence[int] = (0, 1)

    def fresh_args(self, dtype: Optional[torch.dtype] = None):
        out = []
        for i, a in enumerate(self.args):
            if isinstance(a, torch.Tensor):
                a = a.detach()
                if dtype is not None and a.is_floating_point() and i in self.diff:
                    a = a.to(dtype)
                a = a.clone() if a.is_contiguous() else a  # keep the layout of strided inputs
                if i in self.diff:
                    a.requires_grad_(True)
            out.append(a)
        return out

    def run(self, backend: str, upstream: str = "one", dtype=None, args=None):
        """loss and the gradients of the ``diff`` args for an upstream gradient:
        'one', 'two' (2.0) or 'random' (a tensor shaped like the loss)."""
        args = self.fresh_args(dtype) if args is None else args
        loss = self.fn(*args, backend=backend, **self.kwargs)
        if upstream == "one":
            grad = torch.ones_like(loss)
        elif upstream == "two":
            grad = torch.full_like(loss, 2.0)
        else:
            gen = torch.Generator().manual_seed(1234)
            grad = torch.randn(loss.shape, generator=gen, dtype=torch.float64).to(loss.dtype)
        wanted = [args[i] for i in self.diff]
        grads = torch.autograd.grad(loss, wanted, grad, allow_unused=True)
        return loss.detach(), grads


def assert_close(actual, expected, dtype, what):
    if expected is None:
        assert actual is None or torch.count_nonzero(actual) == 0, f"{what}: expected no gradient"
        return
    assert actual is not None, f"{what}: missing gradient"
    tol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), **tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def check_parity(case: Case, backend: str, dtype=torch.float64, upstream="one"):
    """The fused backend's loss and gradients equal the reference's on the same inputs."""
    loss, grads = case.run(backend, upstream, dtype)
    ref_loss, ref_grads = case.run("reference", upstream, dtype)
    assert loss.dtype == ref_loss.dtype, f"loss dtype {loss.dtype} != reference {ref_loss.dtype}"
    assert loss.shape == ref_loss.shape
    assert not torch.isnan(loss).any() or torch.isnan(ref_loss).any(), "NaN loss where the reference has none"
    assert_close(loss, ref_loss, dtype, "loss")
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        if g is not None:
            assert g.dtype == case.args[case.diff[i]].to(dtype).dtype, "gradient dtype differs from its input's"
            assert g.shape == case.args[case.diff[i]].shape
        assert_close(g, rg, dtype, f"grad of arg {case.diff[i]}")


def check_gradcheck(case: Case, backend: str):
    """torch.autograd.gradcheck in float64 over the differentiable args."""
    args = case.fresh_args(torch.float64)

    def f(*diff_args):
        full = list(args)
        for i, a in zip(case.diff, diff_args):
            full[i] = a
        return case.fn(*full, backend=backend, **case.kwargs)

    assert torch.autograd.gradcheck(f, [args[i] for i in case.diff], eps=1e-6, atol=1e-5, rtol=1e-4)


def randn(*shape, seed=0, dtype=torch.float64, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype) * scale


def triton_sp_ready() -> bool:
    """Whether the Triton SP kernel can run here (CUDA, or CPU under the interpreter)."""
    import kdkernels as kdk

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
        return False
    try:
        kdk.sp_loss(torch.randn(2, 3), torch.randn(2, 3), backend="triton")
        return True
    except Exception:  # triton missing
        return False


def cpu_sp_ready() -> bool:
    """Whether the C++ SP kernel is built (the extension can be missing)."""
    import kdkernels as kdk

    try:
        kdk.sp_loss(torch.randn(2, 3), torch.randn(2, 3), backend="cpu")
        return True
    except (NotImplementedError, RuntimeError):
        return False


def once_per_session(tmp_path_factory, name: str, compute: Callable):
    """``compute()`` run once per test session and shared by its pytest-xdist workers
    (the first worker computes under a lock file, the others read its pickle). The
    directory is the session's own: under xdist the workers' common parent, else the
    session's base temp dir."""
    import fcntl
    import pickle

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / f"kdkernels-{name}.pickle"
    with open(shared / f"kdkernels-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            out.write_bytes(pickle.dumps(compute()))
    return pickle.loads(out.read_bytes())
