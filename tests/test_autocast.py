"""Under autocast each loss runs in float32 and gradients come back in the input dtype."""
import pytest
import torch

import kdkernels as kdk
from helpers import randn

BACKENDS = ["reference", "cpu"]


def calls():
    g = torch.Generator().manual_seed(0)
    centers, labels = torch.randn(3, 12, generator=g), torch.tensor([0, 1, 2, 1])
    weight = torch.randn(20, 12, generator=g) * 0.3
    margin = -torch.rand(3, generator=g)
    return {
        "ofd": lambda s, t, b: kdk.ofd_loss(s, t, margin, backend=b),
        "nd": lambda s, t, b: kdk.nd_loss(s.flatten(1), t.flatten(1), centers, labels, backend=b),
        "lsh": lambda s, t, b: kdk.lsh_loss(s.flatten(1), t.flatten(1), weight, backend=b),
        "sp": lambda s, t, b: kdk.sp_loss(s, t, backend=b),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["ofd", "nd", "lsh", "sp"])
def test_cpu_autocast_bfloat16(backend, loss):
    fn = calls()[loss]
    conv = torch.nn.Conv2d(3, 3, 1)
    x = randn(4, 3, 2, 2, dtype=torch.float32)
    teacher = randn(4, 3, 2, 2, seed=1, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = conv(x)  # bfloat16 under autocast
        assert s.dtype == torch.bfloat16
        s.retain_grad()
        out = fn(s, teacher, backend)
    assert out.dtype == torch.float32
    out.backward()
    assert s.grad.dtype == torch.bfloat16 and conv.weight.grad.dtype == torch.float32
    # the loss equals the float32 loss of the same (bfloat16-rounded) activations
    expected = fn(s.detach().float(), teacher, "reference")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["lsh", "sp"])
def test_triton_autocast_runs_the_gemms_in_the_autocast_dtype(loss):
    """Triton backend: under autocast the projection / Gram GEMMs get bfloat16 operands
    (as F.linear / mm would); the loss is float32 and gradients keep their dtype."""
    pytest.importorskip("triton")
    from kdkernels import _validate as V
    from kdkernels.triton import lsh, sp

    if not V.triton_interpreting():
        pytest.skip("CPU tensors need the Triton interpreter")
    seen = []
    target = lsh if loss == "lsh" else sp
    name = "lsh_forward" if loss == "lsh" else "sp_forward"
    original = getattr(target, name)

    def spy(*args, **kwargs):
        seen.append(args[0].dtype)
        return original(*args, **kwargs)

    fn = calls()[loss]
    s = randn(4, 3, 2, 2, dtype=torch.float32).requires_grad_()
    teacher = randn(4, 3, 2, 2, seed=1, dtype=torch.float32)
    setattr(target, name, spy)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(s, teacher, "triton")
    finally:
        setattr(target, name, original)
    assert seen and set(seen) == {torch.bfloat16} and out.dtype == torch.float32
    out.backward()
    assert s.grad.dtype == torch.float32
    expected = fn(s.detach().bfloat16().float(), teacher.bfloat16().float(), "reference")
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=1e-3)


def test_frozen_cast_is_cached():
    from kdkernels import functional as F

    w = torch.randn(8, 4)
    a = F._frozen_in_dtype(w, torch.bfloat16)
    assert F._frozen_in_dtype(w, torch.bfloat16) is a and torch.equal(a, w.bfloat16())
    w.add_(1)  # an in-place change invalidates the cached copy
    b = F._frozen_in_dtype(w, torch.bfloat16)
    assert b is not a and torch.equal(b, w.bfloat16())
