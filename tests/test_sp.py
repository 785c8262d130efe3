import numpy as np
import pytest
import torch

import kdkernels as kdk
from helpers import Case, check_gradcheck, check_parity, randn

REDUCTIONS = ["batchmean", "sum", "none"]
SHAPES = [((1, 3), (1, 5)), ((2, 1), (2, 1)), ((5, 4, 3), (5, 7)), ((9, 3, 4, 4), (9, 6, 2, 2)), ((33, 70), (33, 130))]


def make_case(shape_s, shape_t, reduction="batchmean", p=2.0, seed=0, layout=None):
    f_s = randn(*shape_s, seed=seed)
    f_t = randn(*shape_t, seed=seed + 1)
    if layout == "channels_last":
        f_s, f_t = f_s.contiguous(memory_format=torch.channels_last), f_t.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        f_s, f_t = torch.cat([f_s, f_s], -1)[..., ::2], torch.cat([f_t, f_t], -1)[..., ::2]
    return Case(kdk.sp_loss, (f_s, f_t), dict(reduction=reduction, p=p))


def sp_math(f_s, f_t, p):
    """Direct float64 math: row sums of (G_t - G_s)^2 and the student gradient of their sum."""
    def gram(f):
        q = f.reshape(f.shape[0], -1).double().numpy()
        a = q @ q.T
        n = np.maximum(np.linalg.norm(a, ord=p, axis=1, keepdims=True), 1e-12)
        return q, a, n, a / n

    q_s, a_s, n_s, g_s = gram(f_s)
    _, _, _, g_t = gram(f_t)
    rows = ((g_t - g_s) ** 2).sum(1)
    dg = -2 * (g_t - g_s)
    if p == 2:
        da = (dg - (dg * g_s).sum(1, keepdims=True) * g_s) / n_s
    else:
        da = (dg - (dg * g_s).sum(1, keepdims=True) * np.sign(a_s)) / n_s
    dq = (da + da.T) @ q_s
    return rows, dq.reshape(f_s.shape)


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("p", [2.0, 1.0])
def test_reference_matches_float64_math(shapes, reduction, p):
    case = make_case(*shapes, reduction, p=p)
    rows, dq = sp_math(*case.args, p)
    b = shapes[0][0]
    scale = 1 / b**2 if reduction == "batchmean" else 1.0
    loss, (gs, _) = case.run("reference", "one")
    expected = rows if reduction == "none" else rows.sum() * scale
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(gs.numpy(), dq * scale, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_parity(backend, poison, dtype, shapes, reduction):
    check_parity(make_case(*shapes, reduction), backend, dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("upstream", ["two", "random"])
@pytest.mark.parametrize("p", [2.0, 1.0])
def test_upstream_gradient(backend, reduction, upstream, p):
    check_parity(make_case((6, 5, 3), (6, 8), reduction, p=p), backend, torch.float64, upstream)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_strided_inputs(backend, poison, layout):
    check_parity(make_case((4, 3, 5, 2), (4, 2, 3, 3), "none", layout=layout), backend, torch.float64, "random")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("p", [2.0, 1.0])
def test_gradcheck(backend, reduction, p):
    check_gradcheck(make_case((4, 5), (4, 3, 2), reduction, p=p, seed=4), backend)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b", [63, 64, 127, 128, 129, 200])
def test_batch_sizes_around_the_gram_blocking(backend, dtype, b):
    """The C++ Gram matrix is one GEMM below b = 128 and three blocks of its upper
    triangle from 128 up (odd b: unequal blocks); both sides get gradients."""
    check_parity(make_case((b, 3, 7), (b, 19), "batchmean", seed=b), backend, dtype, "random")


def test_clamped_row_norm(backend):
    """A zero row of Q gives a zero Gram row, whose norm is clamped at 1e-12."""
    f_s = randn(4, 6)
    f_s[2] = 0.0
    check_parity(Case(kdk.sp_loss, (f_s, randn(4, 5, seed=1)), dict(reduction="sum")), backend, torch.float64, "two")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter does not emulate bf16 math")
    check_parity(make_case((6, 8), (6, 12)), backend, dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sequences_of_pairs(backend, reduction):
    pairs_s = [randn(5, 4, seed=1), randn(5, 2, 3, seed=2)]
    pairs_t = [randn(5, 6, seed=3), randn(5, 3, seed=4)]
    args = [[x.clone().requires_grad_() for x in pairs] for pairs in (pairs_s, pairs_t)]
    ref_args = [[x.clone().requires_grad_() for x in pairs] for pairs in (pairs_s, pairs_t)]
    loss = kdk.sp_loss(*args, reduction=reduction, backend=backend)
    ref = sum(kdk.sp_loss(a, b, reduction=reduction, backend="reference") for a, b in zip(*ref_args))
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-12)
    loss.sum().backward()
    ref.sum().backward()
    for x, y in zip(args[0] + args[1], ref_args[0] + ref_args[1]):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-12)


def test_module_and_function(backend):
    case = make_case((5, 4, 3), (5, 7))
    f_s, f_t = case.fresh_args()
    (g_module,) = torch.autograd.grad(kdk.SPLoss(backend=backend)(f_s, f_t), f_s)
    f_s2, f_t2 = case.fresh_args()
    loss = kdk.autograd.SPLossFunction.apply(f_s2, f_t2, 2.0, "batchmean", backend)
    (g_fn,) = torch.autograd.grad(loss * 2.0, f_s2)
    assert g_fn.shape == f_s2.shape
    torch.testing.assert_close(g_fn, 2.0 * g_module)


def test_deterministic(backend):
    f_s, f_t = make_case((16, 200), (16, 300)).fresh_args(torch.float32)
    runs = []
    for _ in range(2):
        loss = kdk.sp_loss(f_s, f_t, backend=backend)
        runs.append([loss, *torch.autograd.grad(loss, (f_s, f_t))])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
