"""The C++ kernels' cache of big output blocks (csrc/output_cache.cpp): a freed
gradient's block is handed to the next output of its size, fully rewritten, and
the limit, ``kdkernels.empty_cache()`` and the environment switch do what they say;
OFD's outputs of >= 32 MiB (written with streaming stores) are right."""
import os
import subprocess
import sys

import pytest
import torch

import kdkernels
import kdkernels.functional as F
from kdkernels import _cpu
from kdkernels import reference as R

pytestmark = pytest.mark.skipif(not _cpu.available(), reason="C++ extension not built")
SHAPE = (2, 64, 96, 96)  # 4.5 MiB in float32: cached (>= 4 MiB)


@pytest.fixture
def ext():
    C = _cpu._extension()
    limit = C.output_cache_limit()
    C.empty_output_cache()
    yield C
    C.set_output_cache_limit(limit)


def _inputs(shape=SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g).requires_grad_()
    t = torch.randn(*shape, generator=g)
    return s, t, -torch.rand(shape[1], generator=g)


def _want(s, t, m, reduction="sum"):
    s_ref = s.detach().double().requires_grad_()
    loss = R.ofd_loss(s_ref, t.double(), m.double(), reduction=reduction)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), s_ref.grad


def _grad(s, t, m, reduction="sum"):
    loss = F.ofd_loss(s, t, m, reduction=reduction, backend="cpu")
    loss.backward(torch.ones_like(loss))
    g, s.grad = s.grad, None
    return loss.detach(), g


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_a_freed_gradient_block_is_reused_and_fully_rewritten(ext, reduction):
    s, t, m = _inputs()
    want_loss, want_grad = _want(s, t, m, reduction)
    loss, g = _grad(s, t, m, reduction)
    freed = {g.data_ptr(), loss.data_ptr()}  # 'none': the loss is a big output too
    g.fill_(float("nan"))  # the next output must overwrite every element
    loss.fill_(float("nan"))
    del g, loss
    assert ext.output_cache_idle_bytes() >= s.numel() * 4
    loss, g2 = _grad(s, t, m, reduction)
    assert g2.data_ptr() in freed
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(g2.double(), want_grad, rtol=1e-5, atol=1e-6)


def test_layout_copies_and_teacher_gradient(ext):
    s, t, m = _inputs()
    s_cl = s.detach().to(memory_format=torch.channels_last).requires_grad_()
    t_g = t.clone().requires_grad_()  # t's layout differs from s's: written through a work block
    for _ in range(2):
        F.ofd_loss(s_cl, t_g, m, backend="cpu").backward()
        s_ref, t_ref = s.detach().double().requires_grad_(), t.double().requires_grad_()
        R.ofd_loss(s_ref, t_ref, m.double()).backward()
        assert s_cl.grad.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(s_cl.grad.double(), s_ref.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(t_g.grad.double(), t_ref.grad, rtol=1e-5, atol=1e-6)
        s_cl.grad = t_g.grad = None


def test_limit_zero_keeps_nothing_and_bad_limit_is_refused(ext):
    s, t, m = _inputs()
    _grad(s, t, m)
    assert ext.output_cache_idle_bytes() > 0
    ext.set_output_cache_limit(0)  # frees the idle blocks, caches no more
    assert ext.output_cache_idle_bytes() == 0
    _, g = _grad(s, t, m)
    torch.testing.assert_close(g.double(), _want(s, t, m)[1], rtol=1e-5, atol=1e-6)
    del g
    assert ext.output_cache_idle_bytes() == 0
    with pytest.raises(RuntimeError, match="limit must be >= 0"):
        ext.set_output_cache_limit(-1)


def test_empty_cache_frees_idle_blocks_only(ext):
    s, t, m = _inputs()
    _, kept = _grad(s, t, m)
    _grad(s, t, m)  # a second block, freed at once
    assert ext.output_cache_idle_bytes() > 0
    kdkernels.empty_cache()
    assert ext.output_cache_idle_bytes() == 0
    torch.testing.assert_close(kept.double(), _want(s, t, m)[1], rtol=1e-5, atol=1e-6)
    del kept
    assert ext.output_cache_idle_bytes() > 0


def test_small_outputs_are_not_cached(ext):
    s, t, m = _inputs((2, 3, 8, 8))
    _grad(s, t, m)
    assert ext.output_cache_idle_bytes() == 0


def _run_with_env(value: str) -> subprocess.CompletedProcess:
    code = ("import torch, kdkernels.functional as F; from kdkernels import _cpu\n"
            "s = torch.randn(2, 64, 96, 96, requires_grad=True)\n"
            "F.ofd_loss(s, torch.randn(2, 64, 96, 96), -torch.rand(64), backend='cpu').backward()\n"
            "s.grad = None\n"
            "print(_cpu._extension().output_cache_idle_bytes())\n")
    env = dict(os.environ, KDKERNELS_OUTPUT_CACHE_MB=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_environment_switch():
    off = _run_with_env("0")
    assert off.returncode == 0, off.stderr
    assert off.stdout.split()[-1] == "0"
    bad = _run_with_env("lots")
    assert bad.returncode != 0
    assert "KDKERNELS_OUTPUT_CACHE_MB" in bad.stderr


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_streamed_outputs_match_the_reference(ext, reduction):
    """[8, 64, 128, 128] float32 is 32 MiB: OFD writes it with non-temporal stores
    (csrc/kernels/common.h, store_stream); teacher gradient too, non-unit upstream."""
    s, t, m = _inputs((8, 64, 128, 128), seed=3)
    t = t.requires_grad_()
    for _ in range(2):  # a fresh block, then a reused one
        loss = F.ofd_loss(s, t, m, reduction=reduction, backend="cpu")
        up = torch.full_like(loss, 0.5)
        gs, gt = torch.autograd.grad(loss, (s, t), up)
        s_ref, t_ref = s.detach().double().requires_grad_(), t.detach().double().requires_grad_()
        want = R.ofd_loss(s_ref, t_ref, m.double(), reduction=reduction)
        ws, wt = torch.autograd.grad(want, (s_ref, t_ref), up.double())
        torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(gs.double(), ws, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gt.double(), wt, rtol=1e-5, atol=1e-6)
        del loss, gs, gt


def test_threads_share_the_cache(ext):
    """Four threads taking and freeing blocks of the same size at once: every result right."""
    import threading

    s, t, m = _inputs()
    want = _want(s, t, m)[1]
    errors = []

    def work():
        try:
            for _ in range(4):
                x = s.detach().clone().requires_grad_()
                F.ofd_loss(x, t, m, backend="cpu", reduction="sum").backward()
                torch.testing.assert_close(x.grad.double(), want, rtol=1e-5, atol=1e-6)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
