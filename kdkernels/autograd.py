"""``torch.autograd.Function`` drop-ins: ``XLossFunction.apply(...)`` with positional
arguments in the order of the functional's signature.

They validate like the functionals and run the same custom ops and backward
rules (``kdkernels._ops``); with ``backend='reference'`` they differentiate the
eager reference.
"""
from __future__ import annotations

import torch

from . import _ops
from . import functional as F
from . import reference

__all__ = ["LSHLossFunction", "NDLossFunction", "OFDLossFunction", "SPLossFunction"]


def _reference_forward(ctx, fn, tensors, **kwargs):
    """Run a reference loss with autograd enabled on detached copies, keeping the
    graph for backward. ``tensors``: the Function's tensor inputs (None allowed)."""
    leaves = [None if x is None else x.detach().requires_grad_(need and x.is_floating_point())
              for x, need in zip(tensors, ctx.needs_input_grad)]
    with torch.enable_grad():
        loss = fn(*leaves, **kwargs)
    ctx.reference = (loss, leaves)
    return loss.detach()


def _reference_backward(ctx, grad, num_args):
    loss, leaves = ctx.reference
    wanted = [x for x in leaves if x is not None and x.requires_grad]
    grads = iter(torch.autograd.grad(loss, wanted, grad, allow_unused=True) if wanted else ())
    out = [next(grads) if x is not None and x.requires_grad else None for x in leaves]
    return tuple(out) + (None,) * (num_args - len(out))


class OFDLossFunction(torch.autograd.Function):
    """apply(s, t, margin, reduction='batchmean', backend='auto')"""

    @staticmethod
    def forward(ctx, s, t, margin, reduction="batchmean", backend="auto"):
        backend = F._check_ofd(s, t, margin, reduction, backend)
        ctx.fused = backend != "reference"
        if not ctx.fused:
            return _reference_forward(ctx, reference.ofd_loss, (s, t, margin), reduction=reduction)
        inputs = (s, t, margin, reduction, backend, *ctx.needs_input_grad[:2])
        return _ops.forward_with_ctx(ctx, _ops.ofd_fwd, *inputs)[0]

    @staticmethod
    def backward(ctx, grad):
        if not ctx.fused:
            return _reference_backward(ctx, grad, 5)
        return _ops.backward_with_ctx(ctx, _ops.ofd_fwd, grad)[:5]


class NDLossFunction(torch.autograd.Function):
    """apply(s, t, centers, labels, eps=1e-12, reduction='mean', backend='auto')"""

    @staticmethod
    def forward(ctx, s, t, centers, labels, eps=1e-12, reduction="mean", backend="auto"):
        backend, eps = F._check_nd(s, t, centers, labels, eps, reduction, backend)
        ctx.fused = backend != "reference"
        if not ctx.fused:
            from . import _validate as V

            V.check_label_values("labels", labels, centers.shape[0])
            return _reference_forward(ctx, reference.nd_loss, (s, t, centers, labels), eps=eps, reduction=reduction)
        inputs = (s, t, centers.to(s.dtype), labels, eps, reduction, backend, *ctx.needs_input_grad[:2])
        return _ops.forward_with_ctx(ctx, _ops.nd_fwd, *inputs)[0]

    @staticmethod
    def backward(ctx, grad):
        if not ctx.fused:
            return _reference_backward(ctx, grad, 7)
        return _ops.backward_with_ctx(ctx, _ops.nd_fwd, grad)[:7]


class LSHLossFunction(torch.autograd.Function):
    """apply(f_s, f_t, weight, bias=None, mse_weight=1.0, sample_mask=None,
    teacher_codes=None, reduction='mean', backend='auto')"""

    @staticmethod
    def forward(ctx, f_s, f_t, weight, bias=None, mse_weight=1.0, sample_mask=None, teacher_codes=None,
                reduction="mean", backend="auto"):
        backend, mse_weight = F._check_lsh(f_s, f_t, weight, bias, mse_weight, sample_mask, teacher_codes,
                                           reduction, backend)
        ctx.fused = backend != "reference"
        if not ctx.fused:
            def loss_fn(f_s, f_t, weight, bias):
                return reference.lsh_loss(f_s, f_t, weight, bias, mse_weight=mse_weight, sample_mask=sample_mask,
                                          teacher_codes=teacher_codes, reduction=reduction)

            return _reference_forward(ctx, loss_fn, (f_s, f_t, weight, bias))
        need_t = f_t is not None and ctx.needs_input_grad[1]
        inputs = (f_s, f_t, weight.to(f_s.dtype), None if bias is None else bias.to(f_s.dtype), sample_mask,
                  teacher_codes, mse_weight, reduction, backend, ctx.needs_input_grad[0], need_t)
        return _ops.forward_with_ctx(ctx, _ops.lsh_fwd, *inputs)[0]

    @staticmethod
    def backward(ctx, grad):
        if not ctx.fused:
            return _reference_backward(ctx, grad, 9)
        return _ops.backward_with_ctx(ctx, _ops.lsh_fwd, grad)[:9]


class SPLossFunction(torch.autograd.Function):
    """apply(f_s, f_t, p=2.0, reduction='batchmean', backend='auto') for one layer pair."""

    @staticmethod
    def forward(ctx, f_s, f_t, p=2.0, reduction="batchmean", backend="auto"):
        backend = F._check_sp([f_s], [f_t], p, reduction, False, backend)
        ctx.fused = backend != "reference"
        if not ctx.fused:
            return _reference_forward(ctx, reference.sp_loss, (f_s, f_t), p=float(p), reduction=reduction)
        ctx.shapes = (f_s.shape, f_t.shape)
        inputs = (F._as_rows(f_s), F._as_rows(f_t), float(p), reduction, backend,
                  *ctx.needs_input_grad[:2])
        return _ops.forward_with_ctx(ctx, _ops.sp_fwd, *inputs)[0]

    @staticmethod
    def backward(ctx, grad):
        if not ctx.fused:
            return _reference_backward(ctx, grad, 5)
        grad_s, grad_t = _ops.backward_with_ctx(ctx, _ops.sp_fwd, grad)[:2]
        reshape = lambda g, shape: None if g is None else g.reshape(shape)  # noqa: E731
        return reshape(grad_s, ctx.shapes[0]), reshape(grad_t, ctx.shapes[1]), None, None, None
