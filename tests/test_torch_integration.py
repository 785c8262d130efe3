"""torch.library.opcheck on every op, and torch.compile(fullgraph=True) parity."""
import pytest
import torch

import kdkernels as kdk
from kdkernels import _ops
from helpers import randn


def _ofd_inputs(dtype=torch.float64):
    s = randn(2, 3, 4, 5, dtype=dtype)
    return s, randn(2, 3, 4, 5, seed=1, dtype=dtype), -torch.rand(3, generator=torch.Generator().manual_seed(2))


def _rows_inputs(dtype=torch.float64):
    return randn(5, 6, dtype=dtype), randn(5, 6, seed=1, dtype=dtype)


def op_samples(backend):
    """(op, args) pairs covering every custom op, with and without gradients."""
    s, t, margin = _ofd_inputs()
    f_s, f_t = _rows_inputs()
    weight, bias = randn(12, 6, seed=3, scale=0.5), randn(12, seed=4, scale=0.1)
    centers, labels = randn(3, 6, seed=5), torch.tensor([0, 1, 2, 1, 0])
    codes = kdk.lsh_codes(f_t, weight, bias)
    mask = torch.tensor([True, False, True, True, False])
    q_s, q_t = randn(5, 7, seed=6), randn(5, 4, seed=7)
    rw = torch.rand(5, dtype=torch.float64)
    grad_d = randn(2, 3, 4, 5, seed=8)
    req = lambda *xs: [x.clone().requires_grad_() for x in xs]  # noqa: E731
    samples = []
    for red in ("batchmean", "none"):
        samples.append((_ops.ofd_fwd, (*req(s, t), margin, red, backend, True, True)))
    samples.append((_ops.ofd_fwd, (s, t, margin, "mean", backend, False, False)))
    samples.append((_ops.ofd_bwd, (grad_d, s, t, margin, backend, True, True)))
    for red in ("mean", "none"):
        samples.append((_ops.nd_fwd, (*req(f_s, f_t), centers, labels, 1e-12, red, backend, True, True)))
        samples.append((_ops.lsh_fwd, (*req(f_s, f_t), weight, bias, mask, None, 1.0, red, backend, True, True)))
        samples.append((_ops.sp_fwd, (*req(q_s, q_t), 2.0, red, backend, True, True)))
    samples.append((_ops.lsh_fwd, (*req(f_s), None, weight, bias, None, codes, 0.0, "sum", backend, True, False)))
    samples.append((_ops.nd_bwd, (rw, f_s, f_t, centers, labels, 1e-12, backend, True, True)))
    samples.append((_ops.lsh_bwd, (rw, f_s, f_t, weight, None, None, 0.5, backend, True, True)))
    samples.append((_ops.sp_bwd, (rw, q_s, q_t, 1.0, backend, True, False)))
    return samples


def test_opcheck(backend):
    for op, args in op_samples(backend):
        torch.library.opcheck(op, args)


LOSS_CALLS = {
    "ofd": lambda x, y, backend: kdk.ofd_loss(x, y, torch.full((3,), -0.2, dtype=x.dtype), backend=backend),
    "nd": lambda x, y, backend: kdk.nd_loss(x.flatten(1), y.flatten(1), torch.ones(4, 60, dtype=x.dtype),
                                            torch.tensor([0, 1, 2, 3]), backend=backend),
    "lsh": lambda x, y, backend: kdk.lsh_loss(x.flatten(1), y.flatten(1), torch.ones(16, 60, dtype=x.dtype) * 0.1,
                                              backend=backend),
    "sp": lambda x, y, backend: kdk.sp_loss(x, y, backend=backend),
}


@pytest.mark.parametrize("loss", sorted(LOSS_CALLS))
def test_compile_fullgraph_training_step(backend, loss):
    """A step (a small model + the loss + backward) compiles with no graph break and matches eager."""
    torch._dynamo.reset()
    model = torch.nn.Conv2d(3, 3, 1).double()
    x = randn(4, 3, 4, 5)
    teacher = randn(4, 3, 4, 5, seed=1)

    def step(x):
        return LOSS_CALLS[loss](model(x), teacher, backend)

    eager = step(x)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    out = compiled(x)
    grads = torch.autograd.grad(out, list(model.parameters()))
    torch.testing.assert_close(out, eager, rtol=1e-9, atol=1e-12)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", sorted(LOSS_CALLS))
def test_compile_reference_backend(loss):
    torch._dynamo.reset()
    x, y = randn(4, 3, 4, 5).requires_grad_(), randn(4, 3, 4, 5, seed=1)
    compiled = torch.compile(lambda a, b: LOSS_CALLS[loss](a, b, "reference"), fullgraph=True, backend="aot_eager")
    out = compiled(x, y)
    torch.testing.assert_close(out, LOSS_CALLS[loss](x, y, "reference"), rtol=1e-9, atol=1e-12)


class _PassThroughFunctionMode(torch.overrides.TorchFunctionMode):
    """A torch-function mode that changes nothing: it only makes the ops go through the dispatcher."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reduction", ["default", "none"])
@pytest.mark.parametrize("loss", sorted(LOSS_CALLS))
def test_eager_fast_path_equals_custom_op_path(backend, loss, reduction):
    """Plain eager calls run the ops' bodies directly (kdkernels._ops.run/call); under a
    torch-function mode they go through the custom ops and their registered autograd.
    Same kernels, so the losses and gradients are bitwise equal."""
    x0, y0 = randn(4, 3, 4, 5), randn(4, 3, 4, 5, seed=1)
    assert _ops._direct_ok((x0, y0))
    results = []
    for through_op in (False, True):
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        call = LOSS_CALLS[loss]
        if reduction == "none":
            kwargs_call = {"ofd": lambda x, y, b: kdk.ofd_loss(x, y, torch.full((3,), -0.2, dtype=x.dtype),
                                                                reduction="none", backend=b),
                           "nd": lambda x, y, b: kdk.nd_loss(x.flatten(1), y.flatten(1), torch.ones(4, 60),
                                                              torch.tensor([0, 1, 2, 3]), reduction="none", backend=b),
                           "lsh": lambda x, y, b: kdk.lsh_loss(x.flatten(1), y.flatten(1), torch.ones(16, 60) * 0.1,
                                                                reduction="none", backend=b),
                           "sp": lambda x, y, b: kdk.sp_loss(x, y, reduction="none", backend=b)}
            call = kwargs_call[loss]
        if through_op:
            with _PassThroughFunctionMode():
                assert not _ops._direct_ok((x, y))
                out = call(x, y, backend)
        else:
            out = call(x, y, backend)
        upstream = torch.rand(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype) + 0.5
        out.backward(upstream)
        results.append((out.detach(), x.grad, y.grad))
    for a, b in zip(*results):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_direct_path_refused_for_fake_tensors_and_subclasses():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(3, 4)
    assert _ops._direct_ok((x, None, 1.0, "mean"))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert not _ops._direct_ok((fake,))
    assert _ops._direct_ok((torch.nn.Parameter(x),))  # no __torch_function__ of its own

    class Sub(torch.Tensor):
        pass

    assert not _ops._direct_ok((x, x.as_subclass(Sub)))  # any other subclass: through the custom op


def test_vmap_goes_through_the_custom_op(backend):
    """Under torch.func.vmap the inputs are wrapped tensors of type torch.Tensor: the eager
    fast path must step aside (the custom op's per-sample fallback then runs)."""
    if backend == "triton":
        pytest.skip("per-sample Triton launches under the interpreter: slow, nothing new")
    f_s, f_t = randn(3, 4, 5), randn(3, 4, 6, seed=1)
    got = torch.func.vmap(lambda a, b: kdk.sp_loss(a, b, backend=backend))(f_s, f_t)
    want = torch.stack([kdk.sp_loss(a, b, backend="reference") for a, b in zip(f_s, f_t)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
