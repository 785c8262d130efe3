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
