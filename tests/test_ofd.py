import numpy as np
import pytest
import torch

import kdkernels as kdk
from helpers import Case, check_gradcheck, check_parity, randn

REDUCTIONS = ["batchmean", "sum", "mean", "none"]
SHAPES = [(1, 1, 1, 1), (3, 7, 9, 11), (5, 6), (4, 3, 10), (2, 3, 4, 3, 2)]


def make_case(shape, reduction="batchmean", seed=0, layout=None, ties=True):
    s = randn(*shape, seed=seed)
    t = randn(*shape, seed=seed + 1)
    margin = -randn(shape[1], seed=seed + 2).abs().float()
    # ties: t == margin, s == t' (where t' = t), t' == 0
    flat_t, flat_s = t.view(-1), s.view(-1)
    channel = (torch.arange(t.numel()) // int(np.prod(shape[2:], dtype=np.int64))) % shape[1]
    if ties and t.numel() >= 4:
        flat_t[0] = margin[channel[0]].double()
        flat_t[1] = 0.0
        flat_s[2] = flat_t[2] = 0.7
    if layout == "channels_last":
        s = s.contiguous(memory_format=torch.channels_last)
        t = t.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        s = s.transpose(-1, -2).contiguous().transpose(-1, -2)
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "sliced":
        s = torch.cat([s, s], dim=-1)[..., ::2]
        t = torch.cat([t, t], dim=-1)[..., ::2]
    return Case(kdk.ofd_loss, (s, t, margin), dict(reduction=reduction))


def ofd_math(s, t, margin):
    """Direct float64 math of the spec, element by element: d, dd/ds, dd/dt."""
    s, t = s.double().numpy(), t.double().numpy()
    m = margin.double().numpy()
    d, ds, dt = (np.zeros_like(s) for _ in range(3))
    for idx in np.ndindex(s.shape):
        mc = m[idx[1]]
        tp = t[idx] if t[idx] > mc else mc
        on = (s[idx] > tp) or (tp > 0)
        d[idx] = (s[idx] - tp) ** 2 if on else 0.0
        ds[idx] = 2 * (s[idx] - tp) if on else 0.0
        dt[idx] = -2 * (s[idx] - tp) if (on and t[idx] > mc) else 0.0
    return d, ds, dt


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_matches_float64_math(shape, reduction):
    case = make_case(shape, reduction)
    s, t, margin = case.args
    d, ds, dt = ofd_math(s, t, margin)
    scale = {"batchmean": 1 / shape[0], "mean": 1 / s.numel(), "sum": 1.0, "none": 1.0}[reduction]
    loss, (gs, gt) = case.run("reference", "one")
    expected = d if reduction == "none" else d.sum() * scale
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gs.numpy(), ds * scale, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gt.numpy(), dt * scale, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_parity(backend, poison, dtype, shape, reduction):
    check_parity(make_case(shape, reduction), backend, dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("upstream", ["two", "random"])
def test_upstream_gradient(backend, reduction, upstream):
    check_parity(make_case((3, 5, 4, 7), reduction), backend, torch.float64, upstream)


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_strided_inputs(backend, poison, layout, reduction):
    case = make_case((2, 5, 6, 3), reduction, layout=layout)
    check_parity(case, backend, torch.float64, "random")
    if layout == "channels_last":
        # the gradient keeps the input's dense layout (no hidden copy on the way back)
        args = case.fresh_args()
        loss = kdk.ofd_loss(*args, backend=backend, reduction=reduction)
        (g,) = torch.autograd.grad(loss, args[0], torch.ones_like(loss))
        assert g.is_contiguous(memory_format=torch.channels_last)


def test_inputs_not_written(backend):
    case = make_case((3, 4, 5, 6))
    args = case.fresh_args()
    before = [a.detach().clone() for a in args]
    loss = kdk.ofd_loss(*args, backend=backend)
    loss.backward()
    for a, b in zip(args, before):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(backend, reduction):
    check_gradcheck(make_case((2, 3, 2, 3), reduction, seed=5, ties=False), backend)  # smooth points only


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter does not emulate bf16 math")
    check_parity(make_case((2, 4, 5, 3)), backend, dtype)


def test_teacher_without_grad(backend):
    s = randn(2, 3, 4, 4).requires_grad_()
    t = randn(2, 3, 4, 4, seed=1)
    margin = torch.full((3,), -0.5)
    kdk.ofd_loss(s, t, margin, backend=backend).backward()
    expected = s.detach().clone().requires_grad_()
    kdk.reference.ofd_loss(expected, t, margin).backward()
    torch.testing.assert_close(s.grad, expected.grad, rtol=1e-9, atol=1e-12)


def test_no_grad_mode(backend):
    case = make_case((2, 3, 4, 4))
    with torch.no_grad():
        loss = kdk.ofd_loss(*case.args, backend=backend)
    ref = kdk.reference.ofd_loss(*case.args)
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-12)


def test_module_and_function(backend):
    case = make_case((2, 3, 4, 4))
    s, t, margin = case.fresh_args()
    module = kdk.OFDLoss(margin, backend=backend)
    assert torch.equal(module.state_dict()["margin"], margin)
    loss = module(s, t)
    (g_module,) = torch.autograd.grad(loss, s)
    s2, t2, _ = case.fresh_args()
    loss_fn = kdk.autograd.OFDLossFunction.apply(s2, t2, margin, "batchmean", backend)
    (g_fn,) = torch.autograd.grad(loss_fn * 2.0, s2)
    torch.testing.assert_close(loss_fn, loss)
    torch.testing.assert_close(g_fn, 2.0 * g_module)


def test_deterministic(backend):
    s = randn(4, 8, 16, 16, dtype=torch.float32).requires_grad_()
    t = randn(4, 8, 16, 16, seed=1, dtype=torch.float32)
    margin = torch.full((8,), -0.3)
    results = []
    for _ in range(2):
        loss = kdk.ofd_loss(s, t, margin, backend=backend)
        (g,) = torch.autograd.grad(loss, s)
        results.append((loss, g))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
