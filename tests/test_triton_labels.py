"""ND on the Triton backend checks label values on the device (no host read): a label
outside [0, K) makes that row's loss and gradients NaN, and the other rows are exact."""
import pytest
import torch

import kdkernels as kdk

pytest.importorskip("triton")
from kdkernels import _validate as V  # noqa: E402

pytestmark = pytest.mark.skipif(not V.triton_interpreting(), reason="CPU tensors need the Triton interpreter")


@pytest.mark.parametrize("bad", [3, -1, 1 << 40])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_out_of_range_label_gives_a_nan_row(bad, dtype):
    if dtype == torch.int32 and bad > 2**31:
        pytest.skip("does not fit int32")
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t, c = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, bad, 2, 1], dtype=dtype)
    rows = kdk.nd_loss(s, t, c, labels, reduction="none", backend="triton")
    good = [0, 2, 3]
    ref = kdk.nd_loss(s[good], t[good], c, labels[good].long(), reduction="none", backend="reference")
    assert torch.isnan(rows[1]) and torch.allclose(rows[good], ref)
    loss = kdk.nd_loss(s, t, c, labels, backend="triton")
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isnan(loss) and torch.isnan(grad[1]).all()
    with pytest.raises(ValueError, match="^labels"):  # the C++ backend keeps its host-side check
        kdk.nd_loss(s, t, c, labels, backend="cpu")
