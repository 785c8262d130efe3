import numpy as np
import pytest
import torch

import kdkernels as kdk
from helpers import Case, check_gradcheck, check_parity, randn

REDUCTIONS = ["mean", "sum", "none"]
SHAPES = [(1, 1, 1), (1, 5, 3), (7, 13, 5), (33, 64, 10), (6, 300, 4)]  # (B, D, K)


def make_case(batch, dim, classes, reduction="mean", seed=0, layout=None, ties=True):
    s = randn(batch, dim, seed=seed)
    t = randn(batch, dim, seed=seed + 1, scale=1.3)
    centers = randn(classes, dim, seed=seed + 2).float() + 0.5
    labels = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed))
    if ties and batch >= 2:
        t[1] = s[1] * 1.0  # an exact tie (same values, same summation order): the student norm wins
    if layout == "transposed":
        s, t = s.T.contiguous().T, t.T.contiguous().T
    elif layout == "sliced":
        s, t = torch.cat([s, s], 1)[:, ::2], torch.cat([t, t], 1)[:, ::2]
    return Case(kdk.nd_loss, (s, t, centers, labels), dict(reduction=reduction))


def nd_math(s, t, centers, labels):
    """Direct float64 math of the spec, row by row: l_i, dl/ds_i, dl/dt_i."""
    s, t, c = s.double().numpy(), t.double().numpy(), centers.double().numpy()
    rows, ds, dt = np.zeros(len(s)), np.zeros_like(s), np.zeros_like(t)
    for i in range(len(s)):
        e = c[labels[i]] / np.linalg.norm(c[labels[i]])
        ns, nt = np.linalg.norm(s[i]), np.linalg.norm(t[i])
        dot = s[i] @ e
        if nt > ns:
            rows[i] = 1 - dot / nt
            ds[i] = -e / nt
            dt[i] = dot * t[i] / nt**3
        else:
            rows[i] = 1 - dot / ns
            ds[i] = -(e - dot * s[i] / ns**2) / ns
    return rows, ds, dt


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_matches_float64_math(shape, reduction):
    case = make_case(*shape, reduction)
    rows, ds, dt = nd_math(*case.args)
    scale = 1 / shape[0] if reduction == "mean" else 1.0
    loss, (gs, gt) = case.run("reference", "one")
    expected = rows if reduction == "none" else rows.sum() * scale
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gs.numpy(), ds * scale, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gt.numpy(), dt * scale, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_parity(backend, poison, dtype, shape, reduction):
    check_parity(make_case(*shape, reduction), backend, dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("upstream", ["two", "random"])
def test_upstream_gradient(backend, reduction, upstream):
    check_parity(make_case(9, 17, 4, reduction), backend, torch.float64, upstream)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_strided_inputs(backend, poison, layout, reduction):
    check_parity(make_case(6, 11, 3, reduction, layout=layout), backend, torch.float64, "random")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(backend, reduction):
    check_gradcheck(make_case(4, 6, 3, reduction, seed=3, ties=False), backend)  # smooth points only


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter does not emulate bf16 math")
    check_parity(make_case(5, 24, 3), backend, dtype)


def test_zero_vectors_use_eps(backend):
    """The published code divides by zero; kdkernels clamps norms at eps."""
    s = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    t = torch.zeros(2, 4, dtype=torch.float64)
    centers = torch.zeros(3, 4)
    labels = torch.tensor([0, 2])
    loss = kdk.nd_loss(s, t, centers, labels, backend=backend)
    assert loss.item() == 1.0
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_labels_int32(backend):
    case = make_case(5, 8, 3)
    s, t, c, labels = case.args
    a = kdk.nd_loss(s, t, c, labels.int(), backend=backend)
    b = kdk.nd_loss(s, t, c, labels, backend="reference")
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_module_and_function(backend):
    case = make_case(5, 8, 3)
    s, t, centers, labels = case.fresh_args()
    module = kdk.NDLoss(centers, backend=backend)
    assert torch.equal(module.state_dict()["centers"], centers)
    (g_module,) = torch.autograd.grad(module(s, t, labels), s)
    s2, t2, _, _ = case.fresh_args()
    loss = kdk.autograd.NDLossFunction.apply(s2, t2, centers, labels, 1e-12, "mean", backend)
    (g_fn,) = torch.autograd.grad(loss * 2.0, s2)
    torch.testing.assert_close(g_fn, 2.0 * g_module)


def test_deterministic(backend):
    case = make_case(64, 96, 10)
    s, t, centers, labels = case.fresh_args(torch.float32)
    first = [kdk.nd_loss(s, t, centers, labels, backend=backend)]
    first += list(torch.autograd.grad(first[0], (s, t)))
    second = [kdk.nd_loss(s, t, centers, labels, backend=backend)]
    second += list(torch.autograd.grad(second[0], (s, t)))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
