"""The C++ autograd node of eager reduced losses on the CPU backend
(``_C.attach_scaled_grads``, used by ``kdkernels._ops.run``): the same gradients
and autograd behaviour as the custom op's Python backward."""
import pytest
import torch

import kdkernels.functional as F
from kdkernels import _cpu

pytestmark = pytest.mark.skipif(not _cpu.available(), reason="C++ extension not built")


def _inputs(loss, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    if loss == "ofd":
        return [r(2, 3, 4, 5), r(2, 3, 4, 5)], dict(margin=-r(3).abs())
    if loss == "nd":
        return [r(6, 9), r(6, 9)], dict(centers=r(4, 9), labels=torch.tensor([0, 1, 2, 3, 0, 1]))
    if loss == "sp":
        return [r(7, 11), r(7, 5)], {}
    return [r(5, 8), r(5, 8)], dict(weight=r(40, 8), bias=r(40))


def _call(loss, a, b, kw, backend):
    if loss == "ofd":
        return F.ofd_loss(a, b, kw["margin"], backend=backend)
    if loss == "nd":
        return F.nd_loss(a, b, kw["centers"], kw["labels"], backend=backend)
    if loss == "sp":
        return F.sp_loss(a, b, backend=backend)
    return F.lsh_loss(a, b, kw["weight"], kw["bias"], backend=backend)


LOSSES = ["ofd", "nd", "sp", "lsh"]


@pytest.mark.parametrize("loss", LOSSES)
def test_node_is_the_cpp_one_and_matches_reference(loss):
    (a, b), kw = _inputs(loss)
    grads = {}
    for backend in ("cpu", "reference"):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_(loss != "lsh")
        out = _call(loss, x, y, kw, backend)
        if backend == "cpu":
            assert out.grad_fn.name() == "kdkernels::ScaledGradsBackward"
        out.backward(torch.tensor(-1.5, dtype=out.dtype))
        grads[backend] = (x.grad, y.grad)
    for got, want in zip(grads["cpu"], grads["reference"]):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", LOSSES)
def test_retain_graph_twice_then_a_clear_error(loss):
    (a, b), kw = _inputs(loss, seed=1)
    x = a.clone().requires_grad_()
    out = _call(loss, x, b, kw, "cpu")
    out.backward(retain_graph=True)
    first = x.grad.clone()
    out.backward(retain_graph=False)
    torch.testing.assert_close(x.grad, 2 * first)
    with pytest.raises(RuntimeError, match="backward already ran"):
        out.backward()


@pytest.mark.parametrize("loss", ["sp", "ofd"])
def test_only_the_asked_input_and_hooks(loss):
    """autograd.grad of one input leaves the other alone; a hook on the input sees the
    gradient; the gradient of a unit upstream is the kernel's own tensor (no copy)."""
    (a, b), kw = _inputs(loss, seed=2)
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    seen = []
    y.register_hook(lambda g: seen.append(g.clone()))
    (gy,) = torch.autograd.grad(_call(loss, x, y, kw, "cpu"), [y])
    assert x.grad is None and y.grad is None
    torch.testing.assert_close(seen[0], gy)
    (want,) = torch.autograd.grad(_call(loss, x, y, kw, "reference"), [y])
    torch.testing.assert_close(gy, want, rtol=1e-10, atol=1e-12)


def test_upstream_that_requires_grad_is_multiplied():
    """create_graph with an upstream gradient that requires grad: the result depends on it."""
    (a, b), kw = _inputs("sp", seed=3)
    x = a.clone().requires_grad_()
    out = _call("sp", x, b, kw, "cpu")
    up = torch.tensor(1.0, dtype=out.dtype, requires_grad=True)
    (gx,) = torch.autograd.grad(out, [x], up, create_graph=True)
    assert gx.requires_grad
    (d_up,) = torch.autograd.grad(gx.sum(), [up])
    torch.testing.assert_close(d_up, gx.detach().sum())


def test_no_grad_and_inference_mode_build_no_graph():
    (a, b), kw = _inputs("lsh", seed=4)
    x = a.clone().requires_grad_()
    with torch.no_grad():
        assert _call("lsh", x, b, kw, "cpu").grad_fn is None
    with torch.inference_mode():
        assert _call("lsh", x, b, kw, "cpu").grad_fn is None
