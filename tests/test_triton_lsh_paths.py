"""The two LSH paths of the Triton backend under the interpreter: the fused
single-pass kernel (small D, teacher features, student gradient wanted) with
several hash-axis splits, and the two-GEMM path, each against the reference;
and which path a call takes."""
import pytest
import torch

pytest.importorskip("triton")

import kdkernels as kdk  # noqa: E402
from helpers import check_parity  # noqa: E402
from kdkernels.triton import lsh, traffic  # noqa: E402
from test_lsh import make_case  # noqa: E402


@pytest.fixture(params=["fused-3-splits", "two-gemm"])
def path(request, monkeypatch):
    if request.param == "two-gemm":
        monkeypatch.setattr(lsh, "FUSED_CONFIG", {})
    else:
        monkeypatch.setattr(lsh, "fused_splits", lambda *args: 3)
    return request.param


def _kernels(fn):
    counts = traffic.Counts()
    with traffic.counting(counts):
        fn()
    return counts.kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape,reduction,kw", [
    ((16, 32, 130), "mean", {}),                               # N not a multiple of the hash tile
    ((70, 24, 200), "none", dict(mask="bool")),                # two row blocks, 'none' with a mask
    ((9, 13, 64), "sum", dict(mask="float", layout="sliced")),  # D not a power of two, strided
    ((5, 7, 40), "mean", dict(mse_weight=0.0, bias=False)),
])
def test_parity(path, dtype, shape, reduction, kw):
    case = make_case(*shape, reduction, **kw)
    launched = _kernels(lambda: check_parity(case, "triton", dtype, "random"))
    assert ("lsh_fused_kernel" in launched) == (path == "fused-3-splits"), launched


def test_nan_teacher_row(path):
    """A NaN teacher feature: NaN loss and student gradient in its row only."""
    f_s, f_t, w, b = make_case(6, 9, 70).fresh_args(torch.float32)
    f_t = f_t.detach().clone()
    f_t[2, 3] = float("nan")
    loss = kdk.lsh_loss(f_s, f_t, w, b, reduction="none", backend="triton")
    (g,) = torch.autograd.grad(loss.sum(), f_s)
    bad = torch.zeros(6, dtype=torch.bool)
    bad[2] = True
    assert torch.isnan(loss[bad]).all() and not torch.isnan(loss[~bad]).any()
    assert torch.isnan(g[bad]).all() and not torch.isnan(g[~bad]).any()


def test_which_path():
    """fused: teacher features and the student gradient, D within the arch's bound;
    otherwise (packed codes, loss only, wider D, float64) the two GEMMs. float32's bound
    on D depends on the matmul precision."""
    def run(dtype, dim, codes=False, grad=True):
        f_s, f_t, w, b = make_case(4, dim, 24).fresh_args(dtype)
        f_s.requires_grad_(grad)
        kwargs = dict(teacher_codes=kdk.lsh_codes(f_t, w, b), mse_weight=0.0) if codes else {}
        return _kernels(lambda: kdk.lsh_loss(f_s, None if codes else f_t, w, b, backend="triton", **kwargs))

    fused, two = ["lsh_fused_kernel", "lsh_grad_kernel"], ["lsh_proj_kernel", "lsh_grad_kernel"]
    max_d = lsh.FUSED_CONFIG[(90, "fp32")][4]
    assert run(torch.float32, max_d) == fused
    assert run(torch.float32, max_d + 1) == two
    tf32_max_d = lsh.FUSED_CONFIG[(90, "fp32 tf32")][4]  # single-pass TF32 dots: wider D fuses
    assert tf32_max_d > max_d
    with traffic.matmul_precision("high"):
        assert run(torch.float32, tf32_max_d) == fused
        assert run(torch.float32, tf32_max_d + 1) == two
    assert run(torch.float32, 8, codes=True) == two
    assert run(torch.float32, 8, grad=False) == two
    assert run(torch.float64, 8) == two


def test_row_chunks(path, monkeypatch):
    """Several row chunks (the last one partial): each chunk's splits and row blocks."""
    monkeypatch.setattr(lsh, "L2_CHUNK_BYTES", 1)  # the smallest chunk: one row block of the widest kernel
    check_parity(make_case(150, 24, 70, "sum", mask="float"), "triton", torch.float32, "random")


def test_wide_d_fuses_under_tf32_precision():
    """float32 with matmul precision 'high': D=200 (BLOCK_D 256) takes the fused kernel; parity
    with the reference (the interpreter multiplies in float32, so the tolerances are float32's)."""
    case = make_case(70, 200, 130, "mean", mask="float")
    with traffic.matmul_precision("high"):
        launched = _kernels(lambda: check_parity(case, "triton", torch.float32, "random"))
    assert "lsh_fused_kernel" in launched, launched
