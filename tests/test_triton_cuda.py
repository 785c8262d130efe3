"""The Triton backend on a real GPU (skipped without CUDA): parity in float32,
bfloat16 and float16 against the float64 reference, float64 gradcheck, NaN
propagation, determinism, CUDA-graph capture of forward + backward, and
torch.compile(fullgraph=True). Run by ``make gpu-check`` (scripts/gpu_check.sh),
which unsets the interpreter."""
import os

import pytest
import torch

import kdkernels as kdk
from kdkernels.triton import traffic

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    reason="needs a CUDA GPU and TRITON_INTERPRET unset (make gpu-check)")

DEV = "cuda"
# GPU tolerances against the float64 reference: (rtol, atol) of the loss and the gradient
TOL = {torch.float32: (2e-5, 1e-6), torch.bfloat16: (3e-2, 1e-3), torch.float16: (1e-2, 1e-4),
       torch.float64: (1e-10, 1e-12)}


def _g(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


def make(loss, dtype, scale=1):
    """(fn(student, backend), student float64 leaf) for one loss at a moderate size."""
    # constants on the device up front: no host-to-device copy inside a captured graph
    r = lambda *shape, seed: torch.randn(*shape, generator=_g(seed)).to(DEV)  # noqa: E731
    if loss == "ofd":
        s, t = r(4, 32 * scale, 14, 14, seed=0), r(4, 32 * scale, 14, 14, seed=1)
        m = -torch.rand(32 * scale, generator=_g(2)).to(DEV)
        fn = lambda x, b: kdk.ofd_loss(x, t.to(x.dtype), m, backend=b)  # noqa: E731
    elif loss == "nd":
        s, t, c = r(96, 256, seed=0), r(96, 256, seed=1), r(10, 256, seed=2)
        y = torch.randint(0, 10, (96,), generator=_g(3)).to(DEV)
        fn = lambda x, b: kdk.nd_loss(x, t.to(x.dtype), c.to(x.dtype), y, backend=b)  # noqa: E731
    elif loss == "lsh":
        s, t, w = r(200, 96, seed=0), r(200, 96, seed=1), r(1000, 96, seed=2) * 0.1
        fn = lambda x, b: kdk.lsh_loss(x, t.to(x.dtype), w.to(x.dtype), backend=b)  # noqa: E731
    else:
        s, t = r(48, 8, 6, 6, seed=0), r(48, 500, seed=1)
        fn = lambda x, b: kdk.sp_loss(x, t.to(x.dtype), backend=b)  # noqa: E731
    return fn, s


LOSSES = ["ofd", "nd", "lsh", "sp"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", LOSSES)
def test_parity_vs_float64_reference(loss, dtype):
    fn, s = make(loss, dtype)
    x = s.to(dtype).requires_grad_()
    out = fn(x, "triton")
    (g,) = torch.autograd.grad(out * 2, x)
    _assert_matches_float64(fn, x, out, g, dtype)


def _assert_matches_float64(fn, x, out, g, dtype):
    """out = fn(x, 'triton') and g its gradient for upstream 2 match the float64 reference within TOL[dtype]."""
    ref_x = x.detach().double().requires_grad_()
    ref = fn(ref_x, "reference")
    (ref_g,) = torch.autograd.grad(ref * 2, ref_x)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(g.double(), ref_g, rtol=rtol, atol=atol * max(1.0, float(ref_g.abs().max())))


@pytest.mark.parametrize("dim", [64, 96, 256, 300])
def test_lsh_float32_paths_under_highest(dim):
    """float32 under 'highest' on each LSH path (tf32x3 fused D <= 64, hand-split fused 64 < D <= 256,
    two GEMMs beyond), against the float64 reference with float32 tolerances."""
    r = lambda *shape, seed: torch.randn(*shape, generator=_g(seed)).to(DEV)  # noqa: E731
    s, t, w = r(130, dim, seed=0), r(130, dim, seed=1), r(700, dim, seed=2) / dim ** 0.5
    fn = lambda x, b: kdk.lsh_loss(x, t.to(x.dtype), w.to(x.dtype), backend=b)  # noqa: E731
    x = s.clone().requires_grad_()
    with traffic.matmul_precision("highest"):
        out = fn(x, "triton")
        (g,) = torch.autograd.grad(out * 2, x)
    _assert_matches_float64(fn, x, out, g, torch.float32)


def _tiny(loss):
    """(fn(x), x float64 leaf) small enough for a numerical Jacobian."""
    g = _g(5)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(DEV)  # noqa: E731
    if loss == "ofd":
        t, m = r(2, 3, 4, 4), -torch.rand(3, generator=g, dtype=torch.float64).to(DEV)
        return (lambda x: kdk.ofd_loss(x, t, m, backend="triton")), r(2, 3, 4, 4)
    if loss == "nd":
        t, c, y = r(5, 7), r(3, 7), torch.tensor([0, 1, 2, 1, 0], device=DEV)
        return (lambda x: kdk.nd_loss(x, t, c, y, backend="triton")), r(5, 7)
    if loss == "lsh":
        t, w = r(5, 7), r(20, 7) * 0.3
        return (lambda x: kdk.lsh_loss(x, t, w, backend="triton")), r(5, 7)
    t = r(6, 9)
    return (lambda x: kdk.sp_loss(x, t, backend="triton")), r(6, 5)


@pytest.mark.parametrize("loss", LOSSES)
def test_gradcheck_float64(loss):
    fn, x = _tiny(loss)
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(),), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
def test_nan_propagates(loss):
    fn, s = make(loss, torch.float32)
    x = s.float().clone()
    x.view(-1)[3] = float("nan")
    assert torch.isnan(fn(x, "triton"))


@pytest.mark.parametrize("loss", LOSSES)
def test_deterministic(loss):
    fn, s = make(loss, torch.float32)
    outs = []
    for _ in range(2):
        x = s.float().clone().requires_grad_()
        out = fn(x, "triton")
        out.backward()
        outs.append((out.detach(), x.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("loss", LOSSES)
def test_cuda_graph_capture_forward_backward(loss):
    """No host synchronisation on the path: forward + backward capture in a CUDA graph and replay."""
    fn, s = make(loss, torch.float32)
    x = s.float().clone().requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles the kernels) outside the capture
        for _ in range(2):
            x.grad = None
            fn(x, "triton").backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        out = fn(x, "triton")
        out.backward()
    graph.replay()
    torch.cuda.synchronize()
    x2 = s.float().clone().requires_grad_()
    ref = fn(x2, "triton")
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("loss", LOSSES)
def test_compile_fullgraph(loss):
    fn, s = make(loss, torch.float32)
    step = torch.compile(lambda v: fn(v, "triton"), fullgraph=True)
    x = s.float().clone().requires_grad_()
    out = step(x)
    out.backward()
    x2 = s.float().clone().requires_grad_()
    ref = fn(x2, "triton")
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)
