"""Traffic, launches and host syncs of the Triton backend, counted under the
interpreter (``kdkernels.triton.traffic``): the counter itself, zero host syncs for
every loss in float32 and bfloat16, and the issue-12 traffic targets.

The counts are exact (deterministic interpreter runs), so each target either holds
or not; the rows that do not meet theirs are strict xfails that say why.
"""
import pytest
import torch

pytest.importorskip("triton")

from kdkernels.triton import traffic  # noqa: E402

# rows that are over their target, with the reason (strict: a row that starts meeting
# its target fails the test, so this list cannot go stale)
OVER_TARGET = {
    ("ofd", "fp32"): "the upstream gradient (2) is known only in backward: scaling the fused gradient is a "
                     "full read + write; any design needs >= 4/3 of the minimum",
    ("ofd", "bf16"): "as fp32",
    ("nd", "fp32"): "gathered class-mean rows (one per sample, 1 unit) plus the upstream-gradient pass",
    ("nd", "bf16"): "as fp32",
    ("lsh", "fp32"): "GEMM tile re-reads of f_s/f_t/W/G counted as requested bytes; float32 3xTF32 tiles "
                     "are register-limited (64x128 projection, 64x64 G W)",
    ("lsh", "bf16"): "GEMM tile re-reads counted as requested bytes (64x128 tiles)",
}


@pytest.fixture(scope="module")
def rows():
    return {(r["loss"], r["dtype"]): r for r in traffic.report()}


def test_counter_sees_kernel_bytes_and_host_syncs():
    """The counter is exact on a kernel whose traffic is known, and catches a host read."""
    import kdkernels as kdk

    s = torch.randn(4, 8, 32, 32, requires_grad=True)
    t, m = torch.randn(4, 8, 32, 32), -torch.rand(8)
    c = traffic.Counts()
    with traffic.counting(c):
        kdk.ofd_loss(s, t, m, backend="triton")
        int(s.detach().max())  # a host read
    unit, programs = s.numel() * 4, s.numel() // 1024  # one 1024-element channel plane a program
    assert c.kernel_read == 2 * unit + 4 * programs     # s, t, and one margin a program
    assert c.kernel_written == unit + 4 * programs      # the gradient and one partial sum a program
    assert c.launches == 1 and c.syncs == 1 and c.sync_ops == ["_local_scalar_dense"]


@pytest.mark.parametrize("dtype", list(traffic.DTYPES))
@pytest.mark.parametrize("loss", list(traffic.TARGETS))
def test_no_host_syncs(rows, loss, dtype):
    r = rows[(loss, dtype)]
    assert r["counts"].syncs == 0, r["counts"].sync_ops


@pytest.mark.parametrize("dtype", list(traffic.DTYPES))
@pytest.mark.parametrize("loss", list(traffic.TARGETS))
def test_traffic_target(request, rows, loss, dtype):
    if (loss, dtype) in OVER_TARGET:
        request.applymarker(pytest.mark.xfail(strict=True, reason=OVER_TARGET[(loss, dtype)]))
    r = rows[(loss, dtype)]
    assert r["ratio"] <= r["target"], traffic.format_rows([r])
