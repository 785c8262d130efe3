"""No leaks, and errors leave no damage.

- 2,000 forward+backward calls of each loss (half with a scalar reduction, half
  with 'none', whose backward re-runs the kernel) leave the process's resident
  memory flat after a warm-up, and leave no Python objects behind. Each call
  allocates tensors of >= 16 KB, so leaking even one of them per call grows the
  process by >= 32 MB, twice the bound.
- After any rejected call (bad shape, bad labels, bad dtype, a frozen operand
  that requires grad, a bad reduction...) the next valid call works and gives
  bitwise the answer it gave before, equal to the reference; an autograd graph
  built before the rejected call still back-propagates correctly.
"""
from __future__ import annotations

import gc
import os
from typing import Callable, List, Tuple

import pytest
import torch

import kdkernels as kdk
from conftest import FUSED_BACKENDS
from helpers import TOL, randn

ALL_BACKENDS = ["reference"] + FUSED_BACKENDS
LOSSES = ["ofd", "nd", "lsh", "sp"]
CALLS = 2000
WARMUP = 200
RSS_BOUND_MB = 16.0
OBJECT_BOUND = 500


def rss_mb() -> float:
    """Resident set size of this process, from /proc/self/statm (pages)."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def inputs(loss: str, seed: int = 0, dtype=torch.float32):
    """(fn, tensors needing grad, frozen args, default reduction): 16 KB tensors (float32), small enough
    that 2,000 calls take seconds."""
    if loss == "ofd":
        s, t = randn(4, 16, 8, 8, seed=seed, dtype=dtype), randn(4, 16, 8, 8, seed=seed + 1, dtype=dtype)
        return kdk.ofd_loss, (s, t), (-torch.rand(16, generator=torch.Generator().manual_seed(seed)),), "batchmean"
    if loss == "nd":
        s, t = randn(16, 256, seed=seed, dtype=dtype), randn(16, 256, seed=seed + 1, dtype=dtype, scale=1.1)
        centers = randn(10, 256, seed=seed + 2, dtype=torch.float32) + 0.2
        labels = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(seed))
        return kdk.nd_loss, (s, t), (centers, labels), "mean"
    if loss == "lsh":
        f_s, f_t = randn(16, 256, seed=seed, dtype=dtype), randn(16, 256, seed=seed + 1, dtype=dtype)
        weight = randn(64, 256, seed=seed + 2, dtype=torch.float32, scale=0.1)
        bias = randn(64, seed=seed + 3, dtype=torch.float32, scale=0.1)
        return kdk.lsh_loss, (f_s, f_t), (weight, bias), "mean"
    if loss == "sp":
        f_s, f_t = randn(16, 16, 4, 4, seed=seed, dtype=dtype), randn(16, 256, seed=seed + 1, dtype=dtype)
        return kdk.sp_loss, (f_s, f_t), (), "batchmean"
    raise AssertionError(loss)


def forward_backward(loss: str, backend: str, reduction=None, seed=0) -> List[torch.Tensor]:
    fn, diff, frozen, default = inputs(loss, seed)
    a, b = (x.clone().requires_grad_() for x in diff)
    out = fn(a, b, *frozen, backend=backend, reduction=reduction or default)
    up = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    ga, gb = torch.autograd.grad(out, (a, b), up)
    return [out.detach(), ga, gb]


# --------------------------------------------------------------------------- leaks
def _leak_loop(loss: str, backend: str, calls: int, keep: list = None):
    """``calls`` forward+backward calls, alternating the default reduction and 'none'.
    ``keep``: a list that holds every result (only for the self-test of the bound)."""
    fn, diff, frozen, default = inputs(loss)
    up = {}
    for i in range(calls):
        reduction = default if i % 2 == 0 else "none"
        a, b = (x.detach().requires_grad_() for x in diff)
        out = fn(a, b, *frozen, backend=backend, reduction=reduction)
        if reduction not in up:
            up[reduction] = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
        grads = torch.autograd.grad(out, (a, b), up[reduction])
        if keep is not None:
            keep.append(grads)


def measure_growth(loss: str, backend: str, calls: int = CALLS, keep: list = None) -> Tuple[float, int]:
    _leak_loop(loss, backend, WARMUP)
    gc.collect()
    rss0, objects0 = rss_mb(), len(gc.get_objects())
    _leak_loop(loss, backend, calls, keep)
    gc.collect()
    return rss_mb() - rss0, len(gc.get_objects()) - objects0


LEAK_BACKENDS = ["reference", "cpu"]


@pytest.mark.parametrize("backend", LEAK_BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_no_leak(loss, backend):
    grown_mb, grown_objects = measure_growth(loss, backend)
    assert grown_mb < RSS_BOUND_MB, (
        f"{loss}/{backend}: resident memory grew by {grown_mb:.1f} MB over {CALLS} forward+backward calls")
    assert grown_objects < OBJECT_BOUND, (
        f"{loss}/{backend}: {grown_objects} Python objects more after {CALLS} forward+backward calls")


def test_leak_bound_can_fail():
    """Self-test of the measure: keeping the gradients of every call (what a leak of
    one buffer per call would do) exceeds the bound."""
    keep = []
    grown_mb, grown_objects = measure_growth("ofd", "reference", calls=CALLS, keep=keep)
    assert grown_mb > RSS_BOUND_MB and grown_objects > OBJECT_BOUND, (grown_mb, grown_objects)


# --------------------------------------------------------------------------- errors leave no damage
@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request):
    return request.param


def _bad_calls(loss: str, backend: str) -> List[Tuple[str, Callable, type]]:
    """(what, a call that must be rejected, the exception type)."""
    fn, (a, b), frozen, _ = inputs(loss)
    a, b = a.clone().requires_grad_(), b.clone()
    calls = [
        ("bad reduction", lambda: fn(a, b, *frozen, backend=backend, reduction="avg"), ValueError),
        ("bad dtype", lambda: fn(a, b.double(), *frozen, backend=backend), TypeError),
        ("integer input", lambda: fn(a.detach().int(), b.int(), *frozen, backend=backend), TypeError),
        ("bad backend", lambda: fn(a, b, *frozen, backend="tpu"), ValueError),
    ]
    if loss == "ofd":
        (margin,) = frozen
        calls += [
            ("bad shape", lambda: fn(a, b[:, :, :-1], margin, backend=backend), ValueError),
            ("bad margin shape", lambda: fn(a, b, margin[:-1], backend=backend), ValueError),
            ("frozen margin requires grad", lambda: fn(a, b, margin.clone().requires_grad_(), backend=backend),
             ValueError),
            ("empty batch", lambda: fn(a[:0], b[:0], margin, backend=backend), ValueError),
        ]
    elif loss == "nd":
        centers, labels = frozen
        k = centers.shape[0]
        if backend != "triton":  # Triton checks label values on the device (NaN rows, test_triton_labels.py)
            calls += [
                ("label too large", lambda: fn(a, b, centers, torch.full_like(labels, k), backend=backend),
                 ValueError),
                ("negative label", lambda: fn(a, b, centers, labels - labels.max() - 1, backend=backend), ValueError),
            ]
        calls += [
            ("float labels", lambda: fn(a, b, centers, labels.float(), backend=backend), TypeError),
            ("bad label count", lambda: fn(a, b, centers, labels[:-1], backend=backend), ValueError),
            ("bad shape", lambda: fn(a, b[:, :-1], centers, labels, backend=backend), ValueError),
            ("frozen centers require grad",
             lambda: fn(a, b, centers.clone().requires_grad_(), labels, backend=backend), ValueError),
            ("bad eps", lambda: fn(a, b, centers, labels, eps=-1.0, backend=backend), ValueError),
        ]
    elif loss == "lsh":
        weight, bias = frozen
        calls += [
            ("bad weight shape", lambda: fn(a, b, weight[:, :-1], bias, backend=backend), ValueError),
            ("frozen weight requires grad", lambda: fn(a, b, weight.clone().requires_grad_(), bias, backend=backend),
             ValueError),
            ("frozen bias requires grad", lambda: fn(a, b, weight, bias.clone().requires_grad_(), backend=backend),
             ValueError),
            ("bad mask", lambda: fn(a, b, weight, bias, sample_mask=torch.ones(3), backend=backend), ValueError),
            ("bad codes", lambda: fn(a, None, weight, bias, mse_weight=0.0,
                                     teacher_codes=torch.zeros(16, 1, dtype=torch.uint8), backend=backend), ValueError),
            ("bad shape", lambda: fn(a, b[:-1], weight, bias, backend=backend), ValueError),
        ]
    else:
        calls += [
            ("bad batch", lambda: fn(a, b[:-1], backend=backend), ValueError),
            ("bad p", lambda: fn(a, b, p=3, backend=backend), ValueError),
            ("mixed kinds", lambda: fn(a, [b], backend=backend), TypeError),
        ]
    return calls


@pytest.mark.parametrize("loss", LOSSES)
def test_errors_leave_no_damage(any_backend, loss):
    before = forward_backward(loss, any_backend)
    before_none = forward_backward(loss, any_backend, reduction="none")
    # a graph built before the rejected calls, back-propagated after them
    fn, diff, frozen, default = inputs(loss, seed=5)
    pending_args = [x.clone().requires_grad_() for x in diff]
    pending = fn(*pending_args, *frozen, backend=any_backend, reduction="none")
    for what, bad, exc in _bad_calls(loss, any_backend):
        with pytest.raises(exc):
            bad()
        after = forward_backward(loss, any_backend)
        for name, x, y in zip(("loss", "grad_s", "grad_t"), after, before):
            assert torch.equal(x, y), f"{loss}/{any_backend}: {name} changed after a rejected call ({what})"
    after_none = forward_backward(loss, any_backend, reduction="none")
    for x, y in zip(after_none, before_none):
        assert torch.equal(x, y), f"{loss}/{any_backend}: reduction='none' changed after the rejected calls"
    # the pending graph
    up = torch.linspace(0.5, 1.5, pending.numel(), dtype=pending.dtype).reshape(pending.shape)
    grads = torch.autograd.grad(pending, pending_args, up)
    ref_args = [x.clone().requires_grad_() for x in diff]
    ref = getattr(kdk.reference, fn.__name__)(*ref_args, *frozen, reduction="none")
    ref_grads = torch.autograd.grad(ref, ref_args, up)
    torch.testing.assert_close(pending.detach(), ref.detach(), **TOL[torch.float32])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **TOL[torch.float32])
    # and the answers equal the reference's
    ref_before = forward_backward(loss, "reference")
    for x, y in zip(before, ref_before):
        torch.testing.assert_close(x, y, **TOL[torch.float32])
