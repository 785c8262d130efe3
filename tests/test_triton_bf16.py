"""bfloat16 on the Triton backend under the interpreter: the kernels feed bfloat16
operands to tl.dot unconverted (native on a GPU; the interpreter widens them, exactly),
and each loss and gradient matches the float64 reference on the same rounded inputs."""
import pytest
import torch

import kdkernels as kdk

pytest.importorskip("triton")
from kdkernels import _validate as V  # noqa: E402

pytestmark = pytest.mark.skipif(not V.triton_interpreting(), reason="CPU tensors need the Triton interpreter")


def _case(loss):
    g = torch.Generator().manual_seed(3)
    r = lambda *shape: torch.randn(*shape, generator=g).bfloat16()  # noqa: E731
    if loss == "ofd":
        t, m = r(3, 5, 7, 6), -torch.rand(5, generator=g)
        return r(3, 5, 7, 6), lambda x, b: kdk.ofd_loss(x, t.to(x.dtype), m, backend=b)
    if loss == "nd":
        t, c, y = r(9, 40), r(4, 40), torch.randint(0, 4, (9,), generator=g)
        return r(9, 40), lambda x, b: kdk.nd_loss(x, t.to(x.dtype), c.to(x.dtype), y, backend=b)
    if loss == "lsh":
        t, w, bias = r(70, 40), r(300, 40) * 0.2, r(300) * 0.1
        return r(70, 40), lambda x, b: kdk.lsh_loss(x, t.to(x.dtype), w.to(x.dtype), bias.to(x.dtype), backend=b)
    t = r(20, 130)
    return r(20, 3, 5, 5), lambda x, b: kdk.sp_loss(x, t.to(x.dtype), backend=b)


@pytest.mark.parametrize("reduction_scale", [1.0, 2.0])
@pytest.mark.parametrize("loss", ["ofd", "nd", "lsh", "sp"])
def test_bfloat16_matches_float64_reference(loss, reduction_scale):
    s, fn = _case(loss)
    x = s.clone().requires_grad_()
    out = fn(x, "triton")
    (g,) = torch.autograd.grad(out * reduction_scale, x)
    ref_x = s.double().requires_grad_()
    ref = fn(ref_x, "reference")
    (ref_g,) = torch.autograd.grad(ref * reduction_scale, ref_x)
    assert out.dtype == torch.bfloat16 and g.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(g.double(), ref_g, rtol=2e-2, atol=2e-2 * float(ref_g.abs().max()))
