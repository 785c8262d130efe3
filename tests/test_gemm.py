"""The GEMM engine of the LSH and SP C++ kernels (csrc/gemm.cpp): float32 through
the faster of oneDNN (torch's registered mkldnn::_linear_pointwise) and ATen,
timed per call shape on its first call, or the one KDKERNELS_GEMM forces; float64 through
ATen; the same losses either way."""
import os
import subprocess
import sys

import pytest
import torch

from kdkernels import _cpu

pytestmark = pytest.mark.skipif(not _cpu.available(), reason="C++ extension not built")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 7, 3), (64, 300, 33), (130, 17, 257), (4, 0, 6)])
@pytest.mark.parametrize("layout", ["contiguous", "b_transposed", "a_strided"])
def test_gemm_matches_torch_mm(dtype, m, k, n, layout):
    g = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    a = torch.randn(m, k, generator=g, dtype=dtype)
    b = torch.randn(k, n, generator=g, dtype=dtype)
    if layout == "b_transposed":
        b = torch.randn(n, k, generator=g, dtype=dtype).t()
    elif layout == "a_strided":
        a = torch.randn(m, 2 * k + 1, generator=g, dtype=dtype)[:, 1::2]
    got = _cpu._C.gemm(a, b)
    assert got.shape == (m, n) and got.is_contiguous() and got.dtype == dtype
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5 * max(1, k) ** 0.5)
    torch.testing.assert_close(got, a @ b, **tol)


def test_engine_is_named_with_its_reason():
    engine = _cpu._C.gemm_engine()
    assert engine in ("per-shape", "onednn", "aten")
    reason = _cpu._C.gemm_engine_reason()
    if os.environ.get("KDKERNELS_GEMM"):
        assert "forced" in reason
    elif engine == "onednn":
        pytest.fail(f"oneDNN for every shape without KDKERNELS_GEMM: {reason}")
    elif engine == "per-shape":  # each shape timed once; its choice and times are listed
        a, b = torch.randn(48, 40), torch.randn(40, 56)
        first = _cpu._C.gemm(a, b)
        assert "48x40x56" in _cpu._C.gemm_engine_reason()
        assert torch.equal(_cpu._C.gemm(a, b), first)  # the shape's engine is fixed after its first call


def test_mkldnn_disabled_still_exact():
    """torch.backends.mkldnn.enabled = False sends the GEMMs to ATen, same values."""
    import kdkernels.functional as F

    g = torch.Generator().manual_seed(3)
    f_s, f_t = torch.randn(37, 70, generator=g), torch.randn(37, 70, generator=g)
    w = torch.randn(300, 70, generator=g)
    on = F.lsh_loss(f_s, f_t, w, backend="cpu")
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        off = F.lsh_loss(f_s, f_t, w, backend="cpu")
    finally:
        torch.backends.mkldnn.enabled = before
    ref = F.lsh_loss(f_s, f_t, w, backend="reference")
    torch.testing.assert_close(on, ref, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(off, ref, rtol=2e-5, atol=1e-6)


FORCED = r"""
import sys, torch
sys.path.insert(0, {root!r})
import kdkernels._cpu as cpu, kdkernels.functional as F
assert cpu._C.gemm_engine() == {engine!r}, cpu._C.gemm_engine()
g = torch.Generator().manual_seed(0)
for name, args in [("lsh", (torch.randn(33, 40, generator=g), torch.randn(33, 40, generator=g),
                             torch.randn(9000, 40, generator=g))),
                   ("sp", (torch.randn(130, 90, generator=g), torch.randn(130, 50, generator=g)))]:
    fn = getattr(F, name + "_loss")
    out = []
    for backend in ("cpu", "reference"):
        x = args[0].clone().requires_grad_()
        loss = fn(x, *args[1:], backend=backend)
        loss.backward()
        out.append((loss.detach(), x.grad))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=2e-4, atol=2e-5)
print("ok")
"""


def run_forced(value, engine):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, KDKERNELS_GEMM=value)
    return subprocess.run([sys.executable, "-c", FORCED.format(root=root, engine=engine)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("engine", ["aten", "onednn"])
def test_forced_engine_in_a_subprocess(engine):
    """KDKERNELS_GEMM forces the engine; LSH (N streamed in two chunks, so the
    accumulating GEMM runs) and SP (130 rows: its Gram by one GEMM or the triangle kernel, as timed) still match the reference."""
    if engine == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    res = run_forced(engine, engine)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "ok"


def test_bad_engine_name_is_refused():
    res = run_forced("mkl", "aten")
    assert res.returncode != 0 and "KDKERNELS_GEMM must be 'aten' or 'onednn'" in res.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,k", [(1, 1), (3, 17), (5, 1000), (7, 2500), (64, 16), (13, 4097), (37, 300)])
@pytest.mark.parametrize("layout", ["contiguous", "row_strided", "column_strided"])
def test_gram_kernel_matches_mm(dtype, b, k, layout):
    """The SP triangle kernel (csrc/kernels/gram.cpp) of the installed ISA level:
    row counts that are not a multiple of its block (3 or 4 rows), K not a multiple
    of the vector width and longer than one chunk (1024 floats / 512 doubles), rows
    with a stride, a transposed-like Q (copied first); the result is exactly symmetric."""
    g = torch.Generator().manual_seed(b * 100 + k)
    q = torch.randn(b, k, generator=g, dtype=dtype)
    if layout == "row_strided":
        q = torch.randn(b, k + 9, generator=g, dtype=dtype)[:, 3:k + 3]
    elif layout == "column_strided":
        q = torch.randn(k, b, generator=g, dtype=dtype).t()
    got = _cpu._C._gram_kernel(q)
    assert got.shape == (b, b) and got.is_contiguous() and got.dtype == dtype
    assert torch.equal(got, got.t())
    ref = (q.double() @ q.double().t()).to(dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-5 * k ** 0.5)
    torch.testing.assert_close(got, ref, **tol)
    torch.testing.assert_close(_cpu._C.gram(q), ref, **tol)  # whichever way the timed choice took


def test_gram_kernel_propagates_nan_and_refuses_half():
    q = torch.randn(9, 70)
    q[4, 33] = float("nan")
    got = _cpu._C._gram_kernel(q)
    nan_rows = torch.isnan(got).any(dim=1)
    assert nan_rows.tolist() == [True] * 9  # row 4's NaN reaches every product with row 4
    assert torch.isnan(got[4]).all() and torch.isnan(got[:, 4]).all()
    assert not torch.isnan(got[[0, 1, 2, 3, 5, 6, 7, 8]][:, [0, 1, 2, 3, 5, 6, 7, 8]]).any()
    with pytest.raises(RuntimeError, match="float32 or float64"):
        _cpu._C._gram_kernel(torch.randn(4, 8).half())


def test_timed_choices_are_listed():
    """The Gram and LSH projection choices appear with their times in the engine's reason."""
    import kdkernels.functional as F

    g = torch.Generator().manual_seed(5)
    F.sp_loss(torch.randn(70, 130, generator=g), torch.randn(70, 90, generator=g), backend="cpu")
    F.lsh_loss(torch.randn(21, 40, generator=g), torch.randn(21, 40, generator=g), torch.randn(300, 40, generator=g),
               backend="cpu")
    reason = _cpu._C.gemm_engine_reason()
    assert "gram 70x130 @" in reason and "gram 70x90 @" in reason
    assert "lsh projection [21,40] x 300 columns @" in reason
    assert ("triangle kernel (" in reason or "one GEMM (" in reason) and " ms)" in reason


def test_gram_above_the_kernel_bound_is_one_gemm():
    """From 257 rows on the triangle kernel's per-pair buffer would grow with b^2:
    one GEMM, untimed (no choice listed)."""
    q = torch.randn(300, 40)
    torch.testing.assert_close(_cpu._C.gram(q), q @ q.t(), rtol=1e-5, atol=1e-4)
    assert "gram 300x40" not in _cpu._C.gemm_engine_reason()
