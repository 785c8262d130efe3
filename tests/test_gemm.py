"""The GEMM engine of the LSH and SP C++ kernels (csrc/gemm.cpp): oneDNN for
float32 where the running torch exports it, ATen otherwise, and the same
losses either way."""
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


def test_engine_is_named():
    assert _cpu._C.gemm_engine() in ("onednn", "aten")


def test_onednn_is_used_where_torch_has_it():
    """On x86 with AVX-512 (this project's machines) the float32 GEMMs go through oneDNN;
    elsewhere the engine must still be one of the two."""
    if os.environ.get("KDKERNELS_GEMM") == "aten":
        pytest.skip("KDKERNELS_GEMM=aten forces ATen")
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if not (torch.backends.mkldnn.is_available() and all(f in flags for f in ("avx512bw", "avx512vl", "avx512dq"))):
        pytest.skip("oneDNN float32 matmul needs avx512bw/vl/dq on x86")
    assert _cpu._C.gemm_engine() == "onednn"


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


def test_forced_aten_engine_in_a_subprocess():
    """KDKERNELS_GEMM=aten: the engine says so, and LSH and SP still match the reference
    (forward and gradient) in float32."""
    code = r"""
import torch, kdkernels._C as C, kdkernels.functional as F
assert C.gemm_engine() == "aten", C.gemm_engine()
g = torch.Generator().manual_seed(0)
for name, args in [("lsh", (torch.randn(33, 40, generator=g), torch.randn(33, 40, generator=g),
                             torch.randn(200, 40, generator=g))),
                   ("sp", (torch.randn(70, 90, generator=g), torch.randn(70, 50, generator=g)))]:
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
    env = dict(os.environ, KDKERNELS_GEMM="aten")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
