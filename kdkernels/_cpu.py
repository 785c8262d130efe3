"""The C++ CPU backend: loads the compiled extension ``kdkernels._C``.

The functions follow the backend protocol documented in ``kdkernels/_ops.py``.
"""
from __future__ import annotations

try:
    from . import _C
except ImportError as exc:  # the extension was not built
    _C = None
    _IMPORT_ERROR = exc
else:
    _IMPORT_ERROR = None


def available() -> bool:
    return _C is not None


def _extension():
    if _C is None:
        raise RuntimeError(
            "backend 'cpu': the C++ extension kdkernels._C is not built "
            f"({_IMPORT_ERROR}); build it with `pip install --no-build-isolation -e .` "
            "(or `make setup`), or pass backend='reference'")
    return _C


def ofd_forward(s, t, margin, grad_scale, need_grad_s, need_grad_t):
    return tuple(_extension().ofd_forward(s, t, margin, grad_scale, need_grad_s, need_grad_t))


def ofd_none(s, t, margin):
    return _extension().ofd_none(s, t, margin)


def ofd_backward(grad_d, s, t, margin, need_grad_s, need_grad_t):
    return tuple(_extension().ofd_backward(grad_d, s, t, margin, need_grad_s, need_grad_t))


def nd_forward(s, t, centers, labels, row_weight, eps, need_grad_s, need_grad_t):
    return tuple(_extension().nd_forward(s, t, centers, labels, row_weight, eps, need_grad_s, need_grad_t))


def lsh_forward(f_s, f_t, weight, bias, teacher_codes, mse_weight, row_weight, need_grad_s, need_grad_t):
    return tuple(_extension().lsh_forward(f_s, f_t, weight, bias, teacher_codes, mse_weight, row_weight,
                                          need_grad_s, need_grad_t))


def sp_forward(q_s, q_t, p, row_weight, need_grad_s, need_grad_t):
    return tuple(_extension().sp_forward(q_s, q_t, p, row_weight, need_grad_s, need_grad_t))
