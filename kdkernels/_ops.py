"""torch.library custom ops that run the fused kernels, with fake kernels and autograd.

Every fused backend (``kdkernels._cpu`` for the C++ extension,
``kdkernels.triton`` for Triton) provides the same functions, called only from
here, after validation (kernels never validate):

    ofd_forward(s, t, margin, grad_scale, need_grad_s, need_grad_t) -> (total, grad_s, grad_t)
        total: 0-dim sum of d over every element, in the compute dtype;
        grad_s/grad_t: grad_scale * dd/ds, dd/dt in the input's dtype and layout.
    ofd_none(s, t, margin) -> d                          # [B, C, *], input dtype
    ofd_backward(grad_d, s, t, margin, need_grad_s, need_grad_t) -> (grad_s, grad_t)
    nd_forward(s, t, centers, labels, row_weight, eps, need_grad_s, need_grad_t) -> (rows, grad_s, grad_t)
    lsh_forward(f_s, f_t, weight, bias, teacher_codes, mse_weight, row_weight,
                need_grad_s, need_grad_t) -> (rows, grad_s, grad_t)
    sp_forward(q_s, q_t, p, row_weight, need_grad_s, need_grad_t) -> (rows, grad_s, grad_t)

Conventions: ``rows`` is the [B] per-row loss l_i in the compute dtype (float64
for float64 inputs, else float32); grads are those of ``sum_i row_weight[i] * l_i``
(``row_weight`` [B] contiguous, compute dtype); a gradient not asked for comes
back as an empty tensor (numel 0). ``margin`` is [C] contiguous in the compute
dtype, ``labels`` int64 and range-checked for the CPU backend (for Triton: any
int dtype, unchecked; its kernel makes a row with an out-of-range label NaN), ``bias``/``f_t``/``teacher_codes``
may be None (f_t only when mse_weight == 0 and codes are given). Inputs may be
strided; none is ever written.

Reductions are applied here: the kernels see row weights (1/B for 'mean', the
normalised mask for LSH, 1/b^2 for SP 'batchmean'), so the gradient is computed
in the forward pass when the reduction gives a scalar, and the backward only
scales it by grad_output. For 'none', the backward re-runs the kernel with the
upstream per-row (or per-element) gradient as row weights.

Eager calls skip the dispatcher: ``run`` (used by the functionals) and ``call``
(the autograd drop-ins and the backward re-runs) execute an op's Python body
directly, under a plain ``torch.autograd.Function`` that uses the op's own
setup_context and backward (a reduced loss on the CPU backend: under the C++
node of ``_C.attach_scaled_grads`` instead, same rule), when nothing needs the custom op: not compiling,
no Python dispatch or torch-function mode, only plain ``torch.Tensor`` inputs.
The custom op's dispatch and autograd wrappers cost about 40-60 us a call (hot
caches, CPU) on top of ~40 us, which matters at the sizes KD losses often see.
Everything else (torch.compile, tracing, FakeTensor, subclasses) goes through
the custom op.
"""
from __future__ import annotations

import threading
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

try:  # private helpers: without them every call goes through the custom op (always correct)
    _dispatch_stack_len = torch._C._len_torch_dispatch_stack  # user and infra (fake, proxy) modes alike
    _torch_function_mode_enabled = torch._C._is_torch_function_mode_enabled
    _functorch_level = torch._C._functorch.maybe_current_level
except AttributeError:  # pragma: no cover - other torch versions
    _dispatch_stack_len = _torch_function_mode_enabled = _functorch_level = None

from . import _validate as V



_BODIES: Dict[int, Callable] = {}  # id(op) -> the op's Python body
_AUTOGRAD: Dict[int, Tuple[Callable, Callable]] = {}  # id(op) -> (setup_context, backward)


def _fused_op(name: str):
    """``torch.library.custom_op`` (no mutated args) that also remembers the body for ``call``."""
    def wrap(fn):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        _BODIES[id(op)] = fn
        return op

    return wrap


def _register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    op.register_autograd(backward, setup_context=setup_context)
    _AUTOGRAD[id(op)] = (setup_context, backward)


# the types whose calls may skip the custom op (Parameter: no __torch_function__ of its own)
PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def _direct_ok(args) -> bool:
    """True when calling an op's body directly is the same as calling the op (C calls
    only, no generator: right after a large GEMM every Python frame costs ~5-10 us)."""
    if _dispatch_stack_len is None or torch.compiler.is_compiling() or _torch_function_mode_enabled():
        return False
    if _dispatch_stack_len() or _functorch_level() is not None:
        return False  # a Python mode, or a torch.func transform (its wrapped tensors look plain)
    for a in args:
        if isinstance(a, Tensor) and type(a) not in PLAIN_TENSOR_TYPES:
            return False
    return True


def call(op, *args):
    """``op(*args)`` without autograd; its body directly where that is equivalent."""
    return _BODIES[id(op)](*args) if _direct_ok(args) else op(*args)


def _with_setup_context(ctx, op, inputs, output):
    _AUTOGRAD[id(op)][0](ctx, inputs, output)
    return output


def forward_with_ctx(ctx, op, *inputs):
    """``call(op, *inputs)`` inside an autograd.Function's forward, with the op's
    setup_context applied to that Function's ``ctx``."""
    return _with_setup_context(ctx, op, inputs, call(op, *inputs))


def backward_with_ctx(ctx, op, *grads):
    """The op's registered backward on a ``ctx`` prepared by ``forward_with_ctx``."""
    return _AUTOGRAD[id(op)][1](ctx, *grads)


class _EagerAutograd(torch.autograd.Function):
    """An op's body with the op's own setup_context and backward (see ``run``)."""

    @staticmethod
    def forward(ctx, op, *inputs):
        ctx.op = op  # run() already checked that the body can run directly
        return _with_setup_context(ctx, op, inputs, _BODIES[id(op)](*inputs))

    @staticmethod
    def backward(ctx, *grads):
        return (None,) + tuple(backward_with_ctx(ctx, ctx.op, *grads))


def run(op, *inputs):
    """``op(*inputs)`` with autograd, as the functionals call it (eager: without the dispatcher).

    Every op here takes ``(a, b, ..., reduction, backend, need_grad_a, need_grad_b)``
    and gives ``(loss, grad_a, grad_b)``. A reduced loss on the CPU backend computes its
    gradients in the forward, so it gets the C++ node of ``_C.attach_scaled_grads``,
    which scales them in backward as ``_scale_saved`` does, instead of this module's
    Python backward (that saves ~0.1-0.3 ms a call when the kernels' GEMMs have just
    flushed the caches)."""
    if not _direct_ok(inputs):
        return op(*inputs)
    reduction, backend, need_a, need_b = inputs[-4:]
    if backend != "cpu" or reduction == "none" or not (need_a or need_b) or not torch.is_grad_enabled():
        return _EagerAutograd.apply(op, *inputs)
    loss, grad_a, grad_b = _BODIES[id(op)](*inputs)  # no history: the C++ kernels run without grad mode
    loss = backend_impl("cpu").attach_scaled_grads(loss, inputs[:2], (grad_a, grad_b))
    return loss, grad_a, grad_b


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_BACKEND_MODULES: Dict[str, object] = {}


def backend_impl(backend: str):
    """The module holding the kernels of a fused backend."""
    impl = _BACKEND_MODULES.get(backend)
    if impl is not None:
        return impl
    if backend == "cpu":
        from . import _cpu as impl
    elif backend == "triton":
        from . import triton as impl
    else:
        raise ValueError(f"backend: no fused kernels for {backend!r}")
    _BACKEND_MODULES[backend] = impl
    return impl


def _none_like(x: Tensor) -> Tensor:
    return x.new_empty(0)


def _grad_or_empty(x: Tensor, wanted: bool) -> Tensor:
    return torch.empty_like(x) if wanted else x.new_empty(0)


def scale_grad(grad: Tensor, grad_output: Tensor) -> Optional[Tensor]:
    """grad (computed for a unit upstream gradient) * grad_output, skipping the
    multiply in eager mode when a CPU grad_output is exactly 1 (the usual case;
    on CUDA reading the value would synchronise the host, so it always multiplies)."""
    if grad.numel() == 0:
        return None
    if (type(grad_output) is torch.Tensor and grad_output.device.type == "cpu" and grad_output.numel() == 1
            and not torch.compiler.is_compiling() and grad_output.item() == 1):
        return grad
    return grad * grad_output.to(grad.dtype)


def _scale_saved(ctx, grads, grad_output: Tensor):
    """The saved unit-upstream gradients times grad_output. Triton: one multiply, never
    a host read of grad_output (float32 math, the gradient's dtype). Not in place: the
    saved gradient must survive for a second backward (gradcheck, retain_graph)."""
    if ctx.backend != "triton":
        return tuple(scale_grad(g, grad_output) for g in grads)
    return tuple(g * grad_output if g.numel() else None for g in grads)


_UNIFORM_WEIGHTS: Dict[tuple, Tensor] = {}  # (batch, scale, dtype, device) -> [batch] filled with scale
_UNIFORM_WEIGHTS_SIZE = 32
_UNIFORM_WEIGHTS_LOCK = threading.Lock()


def _uniform_weight(batch: int, scale: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A [batch] tensor of ``scale``, cached: a fresh one costs 50-100 us right after a
    large GEMM has flushed the caches (every small op does), a dict hit a few. The
    kernels never write their inputs, so the cached tensor stays as made."""
    key = (batch, scale, dtype, device)
    w = _UNIFORM_WEIGHTS.get(key)
    if w is None:
        with torch.inference_mode(False):  # an ordinary tensor even when first made under inference_mode
            w = torch.full((batch,), scale, dtype=dtype, device=device)
        with _UNIFORM_WEIGHTS_LOCK:  # threads may fill the cache at once
            if len(_UNIFORM_WEIGHTS) >= _UNIFORM_WEIGHTS_SIZE:
                _UNIFORM_WEIGHTS.pop(next(iter(_UNIFORM_WEIGHTS)))
            _UNIFORM_WEIGHTS[key] = w
    return w


def _row_weight_for(reduction: str, batch: int, like: Tensor, mask: Optional[Tensor] = None,
                    batchmean_div: Optional[float] = None) -> Tensor:
    """[B] weights that turn per-row losses into the reduced loss."""
    dtype = compute_dtype(like.dtype)
    if mask is None:
        scale = 1.0
        if reduction == "mean" and batch:
            scale = 1.0 / batch
        elif reduction == "batchmean":
            scale = 1.0 / batchmean_div
        return _uniform_weight(batch, scale, dtype, like.device)
    w = mask.to(dtype).contiguous()
    if reduction == "mean":
        total = w.sum()
        w = w / torch.where(total != 0, total, torch.ones_like(total))
    elif reduction == "batchmean":
        w = w / batchmean_div
    return w


def _reduced(rows: Tensor, row_weight: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    """The loss in ``dtype`` from the per-row losses: ``rows`` for 'none', else sum_i w_i rows_i."""
    loss = rows if reduction == "none" else torch.dot(rows, row_weight)
    return loss if loss.dtype == dtype else loss.to(dtype)


# =========================================================================== OFD
@_fused_op("kdkernels::ofd_fwd")
def ofd_fwd(s: Tensor, t: Tensor, margin: Tensor, reduction: str, backend: str,
            need_grad_s: bool, need_grad_t: bool) -> Tuple[Tensor, Tensor, Tensor]:
    impl = backend_impl(backend)
    m = margin.to(compute_dtype(s.dtype)).contiguous()
    if reduction == "none":
        return impl.ofd_none(s, t, m), _none_like(s), _none_like(t)
    scale = {"batchmean": 1.0 / s.shape[0], "mean": 1.0 / s.numel(), "sum": 1.0}[reduction]
    total, grad_s, grad_t = impl.ofd_forward(s, t, m, scale, need_grad_s, need_grad_t)
    return (total * scale).to(s.dtype), grad_s, grad_t


@ofd_fwd.register_fake
def _(s, t, margin, reduction, backend, need_grad_s, need_grad_t):
    if reduction == "none":
        return torch.empty_like(s), _none_like(s), _none_like(t)
    return s.new_empty(()), _grad_or_empty(s, need_grad_s), _grad_or_empty(t, need_grad_t)


@_fused_op("kdkernels::ofd_bwd")
def ofd_bwd(grad_d: Tensor, s: Tensor, t: Tensor, margin: Tensor, backend: str,
            need_grad_s: bool, need_grad_t: bool) -> Tuple[Tensor, Tensor]:
    m = margin.to(compute_dtype(s.dtype)).contiguous()
    return backend_impl(backend).ofd_backward(grad_d, s, t, m, need_grad_s, need_grad_t)


@ofd_bwd.register_fake
def _(grad_d, s, t, margin, backend, need_grad_s, need_grad_t):
    return _grad_or_empty(s, need_grad_s), _grad_or_empty(t, need_grad_t)


def ofd_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # the gradient outputs are never differentiated: no zeros
    s, t, margin, reduction, backend, need_grad_s, need_grad_t = inputs
    ctx.reduction, ctx.backend, ctx.need = reduction, backend, (need_grad_s, need_grad_t)
    ctx.save_for_backward(*((s, t, margin) if reduction == "none" else output[1:]))


def ofd_backward(ctx, grad_loss, *_unused):
    if grad_loss is None:  # an undefined upstream gradient (grads are not materialised)
        grads = (None, None)
    elif ctx.reduction == "none":
        s, t, margin = ctx.saved_tensors
        grad_s, grad_t = call(ofd_bwd, grad_loss, s, t, margin, ctx.backend, *ctx.need)
        grads = (grad_s if ctx.need[0] else None, grad_t if ctx.need[1] else None)
    else:
        grads = _scale_saved(ctx, ctx.saved_tensors, grad_loss)
    return grads + (None,) * 5


_register_autograd(ofd_fwd, ofd_backward, ofd_setup_context)


# =========================================================================== row losses
def _rows_backward(ctx, grad_loss, op_backward):
    """Shared backward of the row losses (ND, LSH, SP)."""
    if grad_loss is None:  # an undefined upstream gradient (grads are not materialised)
        return (None, None)
    if ctx.reduction == "none":
        saved = ctx.saved_tensors
        row_weight = grad_loss.to(compute_dtype(grad_loss.dtype))
        if ctx.has_mask:
            row_weight = row_weight * saved[-1].to(row_weight.dtype)
        grad_a, grad_b = op_backward(row_weight.contiguous(), ctx)
        return (grad_a if ctx.need[0] else None, grad_b if ctx.need[1] else None)
    return _scale_saved(ctx, ctx.saved_tensors[:2], grad_loss)


# --------------------------------------------------------------------------- ND
def _nd_labels(labels: Tensor, centers: Tensor, backend: str, check: bool = True) -> Tensor:
    """Labels as the backend reads them. CPU: range-checked here (ValueError; reads the
    values) and int64. Triton: unchecked and in their own int dtype -- the kernel
    checks the range on the device (NaN row), so nothing waits for the GPU."""
    if backend == "triton":
        return labels
    if check:
        V.check_label_values("labels", labels, centers.shape[0])
    return labels.long()


@_fused_op("kdkernels::nd_fwd")
def nd_fwd(s: Tensor, t: Tensor, centers: Tensor, labels: Tensor, eps: float, reduction: str, backend: str,
           need_grad_s: bool, need_grad_t: bool) -> Tuple[Tensor, Tensor, Tensor]:
    labels = _nd_labels(labels, centers, backend)
    grads = reduction != "none"
    w = _row_weight_for(reduction, s.shape[0], s)
    rows, grad_s, grad_t = backend_impl(backend).nd_forward(
        s, t, centers, labels, w, eps, need_grad_s and grads, need_grad_t and grads)
    return _reduced(rows, w, reduction, s.dtype), grad_s, grad_t


@nd_fwd.register_fake
def _(s, t, centers, labels, eps, reduction, backend, need_grad_s, need_grad_t):
    if reduction == "none":
        return s.new_empty(s.shape[0]), _none_like(s), _none_like(t)
    return s.new_empty(()), _grad_or_empty(s, need_grad_s), _grad_or_empty(t, need_grad_t)


@_fused_op("kdkernels::nd_bwd")
def nd_bwd(row_weight: Tensor, s: Tensor, t: Tensor, centers: Tensor, labels: Tensor, eps: float, backend: str,
           need_grad_s: bool, need_grad_t: bool) -> Tuple[Tensor, Tensor]:
    _, grad_s, grad_t = backend_impl(backend).nd_forward(
        s, t, centers, _nd_labels(labels, centers, backend, check=False), row_weight, eps, need_grad_s, need_grad_t)
    return grad_s, grad_t


@nd_bwd.register_fake
def _(row_weight, s, t, centers, labels, eps, backend, need_grad_s, need_grad_t):
    return _grad_or_empty(s, need_grad_s), _grad_or_empty(t, need_grad_t)


def nd_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # the gradient outputs are never differentiated: no zeros
    s, t, centers, labels, eps, reduction, backend, need_grad_s, need_grad_t = inputs
    ctx.reduction, ctx.backend, ctx.need, ctx.eps, ctx.has_mask = reduction, backend, (need_grad_s, need_grad_t), eps, False
    ctx.save_for_backward(*((s, t, centers, labels) if reduction == "none" else output[1:]))


def nd_backward(ctx, grad_loss, *_unused):
    def rerun(row_weight, ctx):
        s, t, centers, labels = ctx.saved_tensors
        return call(nd_bwd, row_weight, s, t, centers, labels, ctx.eps, ctx.backend, *ctx.need)

    return _rows_backward(ctx, grad_loss, rerun) + (None,) * 7


_register_autograd(nd_fwd, nd_backward, nd_setup_context)


# --------------------------------------------------------------------------- LSH
@_fused_op("kdkernels::lsh_fwd")
def lsh_fwd(f_s: Tensor, f_t: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
            sample_mask: Optional[Tensor], teacher_codes: Optional[Tensor], mse_weight: float,
            reduction: str, backend: str, need_grad_s: bool, need_grad_t: bool) -> Tuple[Tensor, Tensor, Tensor]:
    grads = reduction != "none"
    w = _row_weight_for(reduction, f_s.shape[0], f_s, sample_mask)
    rows, grad_s, grad_t = backend_impl(backend).lsh_forward(
        f_s, f_t, weight, bias, teacher_codes, mse_weight, w, need_grad_s and grads, need_grad_t and grads)
    if reduction == "none" and sample_mask is not None:
        rows = rows * sample_mask.to(rows.dtype)
    empty_t = f_s.new_empty(0) if f_t is None else grad_t
    return _reduced(rows, w, reduction, f_s.dtype), grad_s, empty_t


@lsh_fwd.register_fake
def _(f_s, f_t, weight, bias, sample_mask, teacher_codes, mse_weight, reduction, backend, need_grad_s, need_grad_t):
    if reduction == "none":
        return f_s.new_empty(f_s.shape[0]), _none_like(f_s), _none_like(f_s)
    grad_t = _grad_or_empty(f_t, need_grad_t) if f_t is not None else _none_like(f_s)
    return f_s.new_empty(()), _grad_or_empty(f_s, need_grad_s), grad_t


@_fused_op("kdkernels::lsh_bwd")
def lsh_bwd(row_weight: Tensor, f_s: Tensor, f_t: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
            teacher_codes: Optional[Tensor], mse_weight: float, backend: str,
            need_grad_s: bool, need_grad_t: bool) -> Tuple[Tensor, Tensor]:
    _, grad_s, grad_t = backend_impl(backend).lsh_forward(
        f_s, f_t, weight, bias, teacher_codes, mse_weight, row_weight, need_grad_s, need_grad_t)
    return grad_s, (f_s.new_empty(0) if f_t is None else grad_t)


@lsh_bwd.register_fake
def _(row_weight, f_s, f_t, weight, bias, teacher_codes, mse_weight, backend, need_grad_s, need_grad_t):
    grad_t = _grad_or_empty(f_t, need_grad_t) if f_t is not None else _none_like(f_s)
    return _grad_or_empty(f_s, need_grad_s), grad_t


def lsh_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # the gradient outputs are never differentiated: no zeros
    f_s, f_t, weight, bias, mask, codes, mse_weight, reduction, backend, need_grad_s, need_grad_t = inputs
    ctx.reduction, ctx.backend, ctx.need = reduction, backend, (need_grad_s, need_grad_t)
    ctx.mse_weight, ctx.has_mask = mse_weight, mask is not None
    ctx.has = (f_t is not None, bias is not None, codes is not None)
    if reduction == "none":
        ctx.save_for_backward(f_s, f_t, weight, bias, codes, mask)
    else:
        ctx.save_for_backward(*output[1:])


def lsh_backward(ctx, grad_loss, *_unused):
    def rerun(row_weight, ctx):
        f_s, f_t, weight, bias, codes, _mask = ctx.saved_tensors
        return call(lsh_bwd, row_weight, f_s, f_t, weight, bias, codes, ctx.mse_weight, ctx.backend, *ctx.need)

    grad_s, grad_t = _rows_backward(ctx, grad_loss, rerun)
    return (grad_s, grad_t) + (None,) * 9


_register_autograd(lsh_fwd, lsh_backward, lsh_setup_context)


# --------------------------------------------------------------------------- SP
@_fused_op("kdkernels::sp_fwd")
def sp_fwd(q_s: Tensor, q_t: Tensor, p: float, reduction: str, backend: str,
           need_grad_s: bool, need_grad_t: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """One layer pair, already flattened: q_s [b, Ks], q_t [b, Kt]."""
    b = q_s.shape[0]
    grads = reduction != "none"
    w = _row_weight_for(reduction, b, q_s, batchmean_div=float(b * b))
    rows, grad_s, grad_t = backend_impl(backend).sp_forward(q_s, q_t, p, w, need_grad_s and grads, need_grad_t and grads)
    return _reduced(rows, w, reduction, q_s.dtype), grad_s, grad_t


@sp_fwd.register_fake
def _(q_s, q_t, p, reduction, backend, need_grad_s, need_grad_t):
    if reduction == "none":
        return q_s.new_empty(q_s.shape[0]), _none_like(q_s), _none_like(q_t)
    return q_s.new_empty(()), _grad_or_empty(q_s, need_grad_s), _grad_or_empty(q_t, need_grad_t)


@_fused_op("kdkernels::sp_bwd")
def sp_bwd(row_weight: Tensor, q_s: Tensor, q_t: Tensor, p: float, backend: str,
           need_grad_s: bool, need_grad_t: bool) -> Tuple[Tensor, Tensor]:
    _, grad_s, grad_t = backend_impl(backend).sp_forward(q_s, q_t, p, row_weight, need_grad_s, need_grad_t)
    return grad_s, grad_t


@sp_bwd.register_fake
def _(row_weight, q_s, q_t, p, backend, need_grad_s, need_grad_t):
    return _grad_or_empty(q_s, need_grad_s), _grad_or_empty(q_t, need_grad_t)


def sp_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # the gradient outputs are never differentiated: no zeros
    q_s, q_t, p, reduction, backend, need_grad_s, need_grad_t = inputs
    ctx.reduction, ctx.backend, ctx.need, ctx.p, ctx.has_mask = reduction, backend, (need_grad_s, need_grad_t), p, False
    ctx.save_for_backward(*((q_s, q_t) if reduction == "none" else output[1:]))


def sp_backward(ctx, grad_loss, *_unused):
    def rerun(row_weight, ctx):
        q_s, q_t = ctx.saved_tensors
        return call(sp_bwd, row_weight, q_s, q_t, ctx.p, ctx.backend, *ctx.need)

    return _rows_backward(ctx, grad_loss, rerun) + (None,) * 5


_register_autograd(sp_fwd, sp_backward, sp_setup_context)
