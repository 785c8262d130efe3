"""Determinism and concurrency.

- Repeated calls with the same inputs give bitwise-identical losses and
  gradients on each backend, at a fixed intra-op thread count, at sizes that use
  several threads/blocks (the reductions are two-stage partial sums, no atomics).
- Four Python threads calling the losses at once get bitwise the results of
  serial calls (no shared scratch buffers, no thread-count-dependent split that
  changes when the pool is busy).
"""
from __future__ import annotations

import threading
from typing import Callable, Dict, List, Sequence, Tuple

import pytest
import torch

import kdkernels as kdk
from kdkernels._validate import triton_interpreting
from conftest import FUSED_BACKENDS
from helpers import randn

ALL_BACKENDS = ["reference"] + FUSED_BACKENDS
LOSSES = ["ofd", "nd", "lsh", "sp"]


@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request):
    return request.param


@pytest.fixture
def threads(request):
    """Fix the intra-op thread count for the test, restore it after."""
    old = torch.get_num_threads()
    yield lambda n: torch.set_num_threads(n)
    torch.set_num_threads(old)


def _sizes(loss: str, backend: str, big: bool):
    """Sizes that span several threads (C++ parallel_for grains) or several Triton
    programs; the interpreter gets smaller ones that still launch several programs."""
    triton = backend == "triton"
    if loss == "ofd":  # Triton: BLOCK 1024 elements a program
        if triton:
            return (2, 16, 16, 16) if big else (1, 4, 16, 16)
        return (8, 64, 32, 32) if big else (4, 16, 16, 16)
    if loss == "nd":  # (B, D, K); Triton: 2048 / BLOCK_D rows a program
        return ((256, 512, 100) if big else (64, 128, 10)) if not triton else ((96, 64, 5) if big else (40, 64, 5))
    if loss == "lsh":  # (B, D, N)
        return ((64, 256, 2048) if big else (16, 64, 512)) if not triton else ((16, 32, 512) if big else (8, 16, 256))
    if loss == "sp":  # (b, K_s, K_t)
        return ((64, 4096, 2048) if big else (32, 512, 256)) if not triton else ((16, 256, 128) if big else (8, 64, 32))
    raise AssertionError(loss)


def make_call(loss: str, backend: str, dtype=torch.float32, reduction=None, seed=0, big=True) -> Callable:
    """A closure running one forward+backward: returns [loss, grad_s, grad_t]."""
    size = _sizes(loss, backend, big)
    if loss == "ofd":
        s, t = randn(*size, seed=seed, dtype=dtype), randn(*size, seed=seed + 1, dtype=dtype)
        frozen = (-torch.rand(size[1], generator=torch.Generator().manual_seed(seed)),)
        fn, kw = kdk.ofd_loss, dict(reduction=reduction or "batchmean")
    elif loss == "nd":
        b, d, k = size
        s, t = randn(b, d, seed=seed, dtype=dtype), randn(b, d, seed=seed + 1, dtype=dtype, scale=1.2)
        frozen = (randn(k, d, seed=seed + 2, dtype=torch.float32) + 0.3,
                  torch.randint(0, k, (b,), generator=torch.Generator().manual_seed(seed)))
        fn, kw = kdk.nd_loss, dict(reduction=reduction or "mean")
    elif loss == "lsh":
        b, d, n = size
        s, t = randn(b, d, seed=seed, dtype=dtype), randn(b, d, seed=seed + 1, dtype=dtype)
        frozen = (randn(n, d, seed=seed + 2, dtype=torch.float32, scale=0.1),
                  randn(n, seed=seed + 3, dtype=torch.float32, scale=0.1))
        fn, kw = kdk.lsh_loss, dict(reduction=reduction or "mean")
    else:
        b, ks, kt = size
        s = randn(b, ks // 16, 4, 4, seed=seed, dtype=dtype)
        t = randn(b, kt, seed=seed + 1, dtype=dtype)
        frozen = ()
        fn, kw = kdk.sp_loss, dict(reduction=reduction or "batchmean")

    def call() -> List[torch.Tensor]:
        a, b_ = s.clone().requires_grad_(), t.clone().requires_grad_()
        out = fn(a, b_, *frozen, backend=backend, **kw)
        up = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
        ga, gb = torch.autograd.grad(out, (a, b_), up, allow_unused=True)
        return [out.detach(), ga, gb]

    return call


def assert_bitwise(got: Sequence, expected: Sequence, what: str):
    for name, g, e in zip(("loss", "grad of the student", "grad of the teacher"), got, expected):
        if e is None or g is None:
            assert (e is None) == (g is None), f"{what}: {name} present on one call only"
            continue
        assert g.dtype == e.dtype and g.shape == e.shape, f"{what}: {name} dtype/shape changed"
        if not torch.equal(g, e):
            diff = (g.double() - e.double()).abs().max().item()
            raise AssertionError(f"{what}: {name} differs bitwise between calls (max abs diff {diff:.3g})")


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("num_threads", [1, 2, 4])
@pytest.mark.parametrize("reduction", ["default", "none"])
@pytest.mark.parametrize("loss", LOSSES)
def test_repeated_calls_are_bitwise_identical(any_backend, threads, loss, reduction, num_threads):
    if any_backend == "triton" and num_threads != 2:
        pytest.skip("the Triton kernels do not use the intra-op thread pool: one thread count is enough")
    threads(num_threads)
    call = make_call(loss, any_backend, reduction=None if reduction == "default" else reduction)
    first = call()
    for i in range(2):
        assert_bitwise(call(), first, f"{loss}/{any_backend}/{num_threads} threads, call {i + 2}")


@pytest.mark.parametrize("loss", LOSSES)
def test_repeated_calls_half_precision(any_backend, threads, loss):
    """float16 accumulates in float32 in a fixed order too."""
    threads(2)
    call = make_call(loss, any_backend, dtype=torch.float16, big=False)
    first = call()
    assert_bitwise(call(), first, f"{loss}/{any_backend}/float16")


# --------------------------------------------------------------------------- concurrency
NUM_THREADS = 4


def _skip_interpreter(backend):
    if backend == "triton" and triton_interpreting():
        pytest.skip("the Triton interpreter is not thread-safe (it patches triton.language and keeps the launch "
                    "grid in module globals: concurrent launches fail inside triton); runs on CUDA")


def _run_concurrently(calls: List[Callable], repeats: int) -> Tuple[Dict[int, List], List[BaseException]]:
    results: Dict[int, List] = {i: [] for i in range(len(calls))}
    errors: List[BaseException] = []
    barrier = threading.Barrier(len(calls))

    def worker(i):
        try:
            barrier.wait(timeout=60)
            for _ in range(repeats):
                results[i].append(calls[i]())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
            barrier.abort()

    workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(calls))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=600)
    assert not any(w.is_alive() for w in workers), "a worker thread hangs"
    return results, errors


@pytest.mark.parametrize("loss", LOSSES)
def test_four_threads_match_serial(any_backend, threads, loss):
    """Four Python threads, each with its own inputs (and one pair sharing the same
    inputs), call the loss at once; every result is bitwise the serial one."""
    _skip_interpreter(any_backend)
    threads(2)
    seeds = [0, 10, 20, 0]  # threads 0 and 3 run the same inputs at the same time
    reductions = [None, "none", None, None]
    calls = [make_call(loss, any_backend, reduction=r, seed=s, big=False) for s, r in zip(seeds, reductions)]
    serial = [c() for c in calls]
    repeats = 2 if any_backend == "triton" else 5
    results, errors = _run_concurrently(calls, repeats)
    if errors:
        raise errors[0]
    for i in range(NUM_THREADS):
        assert len(results[i]) == repeats
        for k, got in enumerate(results[i]):
            assert_bitwise(got, serial[i], f"{loss}/{any_backend}: thread {i}, call {k + 1} vs serial")


def test_four_threads_all_losses_at_once(any_backend, threads):
    """The four losses at once, one a thread (different kernels sharing the process)."""
    _skip_interpreter(any_backend)
    threads(2)
    calls = [make_call(loss, any_backend, big=False, seed=3) for loss in LOSSES]
    serial = [c() for c in calls]
    results, errors = _run_concurrently(calls, 1 if any_backend == "triton" else 4)
    if errors:
        raise errors[0]
    for i, loss in enumerate(LOSSES):
        for got in results[i]:
            assert_bitwise(got, serial[i], f"{loss}/{any_backend}: concurrent with the other losses")
