import numpy as np
import pytest
import torch

import kdkernels as kdk
from helpers import Case, check_gradcheck, check_parity, randn

REDUCTIONS = ["mean", "sum", "none"]
SHAPES = [(1, 1, 1), (1, 3, 8), (5, 7, 13), (16, 32, 130), (3, 64, 257)]  # (B, D, N)


def make_case(batch, dim, hashes, reduction="mean", seed=0, mask=None, mse_weight=1.0, bias=True, layout=None):
    f_s = randn(batch, dim, seed=seed)
    f_t = randn(batch, dim, seed=seed + 1)
    weight = randn(hashes, dim, seed=seed + 2, scale=0.5).float()
    b = randn(hashes, seed=seed + 3, scale=0.1).float() if bias else None
    if mask == "bool":
        mask = torch.arange(batch) % 3 != 1
    elif mask == "float":
        mask = torch.rand(batch, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    elif mask == "empty":
        mask = torch.zeros(batch, dtype=torch.bool)
    if layout == "transposed":
        f_s, f_t = f_s.T.contiguous().T, f_t.T.contiguous().T
    elif layout == "sliced":
        f_s, f_t = torch.cat([f_s, f_s], 1)[:, ::2], torch.cat([f_t, f_t], 1)[:, ::2]
    kwargs = dict(reduction=reduction, sample_mask=mask, mse_weight=mse_weight)
    return Case(kdk.lsh_loss, (f_s, f_t, weight, b), kwargs)


def lsh_math(f_s, f_t, weight, bias, mse_weight):
    """Direct float64 math of the spec: l_i, dl/df_s, dl/df_t per row."""
    fs, ft, w = f_s.double().numpy(), f_t.double().numpy(), weight.double().numpy()
    b = np.zeros(w.shape[0]) if bias is None else bias.double().numpy()
    n, d = w.shape
    hs, ht = fs @ w.T + b, ft @ w.T + b
    y = (ht > 0).astype(np.float64)
    bce = np.maximum(hs, 0) - hs * y + np.log1p(np.exp(-np.abs(hs)))
    rows = mse_weight * ((fs - ft) ** 2).sum(1) / d + bce.sum(1) / n
    sig = 1 / (1 + np.exp(-hs))
    dfs = 2 * mse_weight * (fs - ft) / d + ((sig - y) / n) @ w
    dft = -2 * mse_weight * (fs - ft) / d
    return rows, dfs, dft


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mse_weight", [1.0, 0.5])
def test_reference_matches_float64_math(shape, reduction, mse_weight):
    case = make_case(*shape, reduction, mse_weight=mse_weight)
    rows, dfs, dft = lsh_math(*case.args, mse_weight)
    scale = 1 / shape[0] if reduction == "mean" else 1.0
    loss, (gs, gt) = case.run("reference", "one")
    expected = rows if reduction == "none" else rows.sum() * scale
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gs.numpy(), dfs * scale, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gt.numpy(), dft * scale, rtol=1e-10, atol=1e-12)


def test_reference_mask_mean():
    case = make_case(6, 5, 9, mask="bool")
    f_s, f_t, w, b = case.args
    m = case.kwargs["sample_mask"]
    rows, _, _ = lsh_math(f_s, f_t, w, b, 1.0)
    loss = kdk.reference.lsh_loss(f_s, f_t, w, b, sample_mask=m)
    np.testing.assert_allclose(loss.item(), rows[m.numpy()].mean(), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_parity(backend, poison, dtype, shape, reduction):
    check_parity(make_case(*shape, reduction), backend, dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask", ["bool", "float", "empty"])
def test_sample_mask(backend, poison, reduction, mask):
    check_parity(make_case(7, 6, 20, reduction, mask=mask), backend, torch.float64, "random")


def test_empty_mask_mean_is_zero(backend):
    case = make_case(4, 5, 9, mask="empty")
    args = case.fresh_args()
    loss = kdk.lsh_loss(*args, backend=backend, **case.kwargs)
    assert loss.item() == 0.0
    grads = torch.autograd.grad(loss, args[:2])
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mse_weight", [0.0, 2.5])
def test_mse_weight_and_no_bias(backend, reduction, mse_weight):
    check_parity(make_case(5, 8, 24, reduction, mse_weight=mse_weight, bias=False), backend, torch.float64, "two")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("upstream", ["two", "random"])
def test_upstream_gradient(backend, reduction, upstream):
    check_parity(make_case(6, 9, 33, reduction), backend, torch.float64, upstream)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_strided_inputs(backend, poison, layout):
    check_parity(make_case(6, 10, 21, "none", layout=layout), backend, torch.float64, "random")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(backend, reduction):
    check_gradcheck(make_case(3, 4, 10, reduction, seed=2), backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter does not emulate bf16 math")
    check_parity(make_case(4, 16, 40), backend, dtype)


@pytest.mark.parametrize("hashes", [8, 13, 64])
def test_teacher_codes_round_trip(backend, hashes):
    """Training from packed codes equals training from the teacher features."""
    f_s, f_t, w, b = make_case(5, 7, hashes).args
    codes = kdk.lsh_codes(f_t, w, b)
    assert codes.dtype == torch.uint8 and codes.shape == (5, (hashes + 7) // 8)
    bits = kdk.reference.unpack_lsh_codes(codes, hashes, torch.float64)
    assert torch.equal(bits, ((f_t @ w.double().T + b.double()) > 0).double())
    x1 = f_s.clone().requires_grad_()
    x2 = f_s.clone().requires_grad_()
    a = kdk.lsh_loss(x1, None, w, b, teacher_codes=codes, mse_weight=0.0, backend=backend)
    r = kdk.lsh_loss(x2, f_t, w, b, mse_weight=0.0, backend="reference")
    torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)
    a.backward()
    r.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hashes", [16, 31, 47, 100])
def test_teacher_codes_parity(backend, dtype, hashes):
    """Packed codes in float32 and float64 (the C++ float path reads 16 bits a step),
    hash counts around the vector width, against the reference reading the same codes."""
    f_s, f_t, w, b = make_case(6, 9, hashes, seed=hashes).args
    codes = kdk.lsh_codes(f_t.to(dtype), w, b)
    case = Case(kdk.lsh_loss, (f_s, None, w, b), dict(teacher_codes=codes, mse_weight=0.0), diff=(0,))
    check_parity(case, backend, dtype, "random")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("codes", [False, True])
def test_many_hashes_in_chunks(backend, dtype, codes):
    """N large enough that the C++ kernel streams the hashes in two chunks (the second
    one partial) and accumulates the student gradient over them."""
    if backend == "triton":
        pytest.skip("C++ chunking; the Triton interpreter is slow at this size")
    batch, hashes = 40, 16461  # [2B, N] float32 logits: 5.0 MiB > the 4 MiB chunk budget
    f_s, f_t, w, b = make_case(batch, 24, hashes, seed=5).args
    if codes:
        code_bits = kdk.lsh_codes(f_t.to(dtype), w, b)
        case = Case(kdk.lsh_loss, (f_s, None, w, b), dict(teacher_codes=code_bits, mse_weight=0.0), diff=(0,))
    else:
        case = Case(kdk.lsh_loss, (f_s, f_t, w, b), dict(reduction="sum"))
    check_parity(case, backend, dtype, "random")


def test_module_and_function(backend):
    case = make_case(5, 8, 16)
    f_s, f_t, w, b = case.fresh_args()
    module = kdk.LSHLoss(w, b, backend=backend)
    assert set(module.state_dict()) == {"weight", "bias"}
    (g_module,) = torch.autograd.grad(module(f_s, f_t), f_s)
    f_s2, f_t2, _, _ = case.fresh_args()
    loss = kdk.autograd.LSHLossFunction.apply(f_s2, f_t2, w, b, 1.0, None, None, "mean", backend)
    (g_fn,) = torch.autograd.grad(loss * 2.0, f_s2)
    torch.testing.assert_close(g_fn, 2.0 * g_module)


def test_deterministic(backend):
    f_s, f_t, w, b = make_case(32, 48, 300).fresh_args(torch.float32)
    runs = []
    for _ in range(2):
        loss = kdk.lsh_loss(f_s, f_t, w, b, backend=backend)
        runs.append([loss, *torch.autograd.grad(loss, (f_s, f_t))])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
