"""The two LSH paths of the Triton backend under the interpreter: the fused
single-pass kernels (small D, teacher features, student gradient wanted; float32
under 'highest' at 64 < D <= 256 with operands split by hand) with several
hash-axis splits, and the two-GEMM path, each against the reference; and which
path a call takes."""
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
        monkeypatch.setattr(lsh, "FUSED_SPLIT_CONFIG", {})
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
    split = ["lsh_fused_split_kernel", "lsh_grad_kernel"]
    max_d = lsh.FUSED_CONFIG[(90, "fp32")][4]
    split_max_d = max(bd for arch, bd in lsh.FUSED_SPLIT_CONFIG if arch == 90)
    assert run(torch.float32, max_d) == fused
    assert run(torch.float32, max_d + 1) == split  # 'highest' beyond tf32x3's bound: split by hand
    assert run(torch.float32, split_max_d) == split
    assert run(torch.float32, split_max_d + 1) == two
    tf32_max_d = lsh.FUSED_CONFIG[(90, "fp32 tf32")][4]  # single-pass TF32 dots: wider D fuses
    assert tf32_max_d > max_d
    with traffic.matmul_precision("high"):
        assert run(torch.float32, max_d + 1) == fused
        assert run(torch.float32, tf32_max_d) == fused
        assert run(torch.float32, tf32_max_d + 1) == two
    assert run(torch.float16, max_d + 1) == fused
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


@pytest.mark.parametrize("shape,reduction,kw", [
    ((70, 100, 130), "mean", dict(mask="float")),                # BLOCK_D 128, two row blocks, N tail
    ((9, 200, 64), "sum", dict(layout="sliced")),                # BLOCK_D 256, D not a multiple of a chunk
    ((66, 256, 40), "mean", dict(mse_weight=0.0, bias=False)),
    ((5, 77, 24), "none", dict(mask="bool")),                    # 'none': the backward reruns the kernels
])
def test_split_kernel_parity(shape, reduction, kw, monkeypatch):
    """float32 under 'highest' with 64 < D <= 256: lsh_fused_split_kernel (3 hash splits) against the reference."""
    monkeypatch.setattr(lsh, "fused_splits", lambda *args: 3)
    case = make_case(*shape, reduction, **kw)
    launched = _kernels(lambda: check_parity(case, "triton", torch.float32, "random"))
    assert "lsh_fused_split_kernel" in launched, launched


def test_split_kernel_keeps_float32_accuracy():
    """Against float64 math, the hand-split products stay within a few times a float32 GEMM's
    error (TF32 alone, or a dropped low part, is ~2^-11 relative: hundreds of times more)."""
    f_s, f_t, w, b = make_case(64, 256, 512).fresh_args(torch.float64)

    def grad(dtype, backend):
        x = f_s.detach().to(dtype).requires_grad_()
        loss = kdk.lsh_loss(x, f_t.to(dtype), w.to(dtype), b.to(dtype), backend=backend)
        return torch.autograd.grad(loss, x)[0].double(), loss.double()

    exact_g, exact_l = grad(torch.float64, "reference")
    eager_g, eager_l = grad(torch.float32, "reference")
    launched = _kernels(lambda: grad(torch.float32, "triton"))
    assert "lsh_fused_split_kernel" in launched, launched
    split_g, split_l = grad(torch.float32, "triton")
    scale = exact_g.abs().max()
    eager_err, split_err = (eager_g - exact_g).abs().max() / scale, (split_g - exact_g).abs().max() / scale
    assert split_err < 2e-6 and split_err < 8 * eager_err, (split_err, eager_err)
    assert (split_l - exact_l).abs() / exact_l < 2e-6


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_split_kernel_non_finite_feature(bad):
    """A NaN or infinite student feature (D = 100): the same NaN/inf pattern as the reference
    (the split keeps inf whole: its low part is 0, not inf - inf)."""
    f_s, f_t, w, b = make_case(6, 100, 70).fresh_args(torch.float32)

    def run(backend):
        x = f_s.detach().clone()
        x[2, 3] = float(bad)
        x.requires_grad_()
        loss = kdk.lsh_loss(x, f_t.detach(), w, b, reduction="none", backend=backend)
        return loss.detach(), torch.autograd.grad(loss.sum(), x)[0]

    launched = _kernels(lambda: run("triton"))
    assert "lsh_fused_split_kernel" in launched, launched
    (loss, g), (ref_loss, ref_g) = run("triton"), run("reference")
    torch.testing.assert_close(loss, ref_loss, equal_nan=True, rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(g, ref_g, equal_nan=True, rtol=2e-4, atol=2e-5)
