"""The Triton backend: fused GPU kernels (one file per loss) behind the backend
protocol documented in ``kdkernels/_ops.py``.

Importing this package never imports triton: ``import kdkernels`` and the CPU
backend keep working where triton is not installed. Triton is imported on the
first call of a protocol function, and a missing triton is then reported as an
``ImportError`` that says what to install.
"""
from __future__ import annotations

import importlib

__all__ = ["available", "ofd_forward", "ofd_none", "ofd_backward", "nd_forward", "lsh_forward", "sp_forward"]

_MISSING = ("backend 'triton' needs the triton package (>= 3.4), which could not be imported ({err}); "
            "install it with `pip install 'triton>=3.4'` (or `pip install kdkernels[triton]`), "
            "or pass backend='cpu' / backend='reference'")


def available() -> bool:
    """Whether triton can be imported (does not raise)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def _module(name: str):
    """kdkernels.triton.<name>, importing triton first with a clear error if it is missing."""
    try:
        importlib.import_module("triton")
        import triton.language  # noqa: F401
    except ImportError as exc:
        raise ImportError(_MISSING.format(err=exc)) from exc
    return importlib.import_module(f"{__name__}.{name}")


def ofd_forward(s, t, margin, grad_scale, need_grad_s, need_grad_t):
    return _module("ofd").ofd_forward(s, t, margin, grad_scale, need_grad_s, need_grad_t)


def ofd_none(s, t, margin):
    return _module("ofd").ofd_none(s, t, margin)


def ofd_backward(grad_d, s, t, margin, need_grad_s, need_grad_t):
    return _module("ofd").ofd_backward(grad_d, s, t, margin, need_grad_s, need_grad_t)


def nd_forward(s, t, centers, labels, row_weight, eps, need_grad_s, need_grad_t):
    return _module("nd").nd_forward(s, t, centers, labels, row_weight, eps, need_grad_s, need_grad_t)


def lsh_forward(f_s, f_t, weight, bias, teacher_codes, mse_weight, row_weight, need_grad_s, need_grad_t):
    return _module("lsh").lsh_forward(f_s, f_t, weight, bias, teacher_codes, mse_weight, row_weight,
                                      need_grad_s, need_grad_t)


def sp_forward(q_s, q_t, p, row_weight, need_grad_s, need_grad_t):
    return _module("sp").sp_forward(q_s, q_t, p, row_weight, need_grad_s, need_grad_t)
