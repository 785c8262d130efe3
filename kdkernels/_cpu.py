"""The C++ CPU backend: loads the compiled extension ``kdkernels._C`` and the
kernel module of the ISA level torch runs at.

The loops are built once per ISA level (``kdkernels._kernels_default``,
``_kernels_avx2``, ``_kernels_avx512``; see setup.py); exactly one is imported
per process, the one matching ``torch.backends.cpu.get_cpu_capability()``
(which honours ``ATEN_CPU_CAPABILITY``), or the highest one built below it.

The functions follow the backend protocol documented in ``kdkernels/_ops.py``.
"""
from __future__ import annotations

import importlib

import torch

# ISA levels from the highest down; torch's capability names them in upper case.
LEVELS = ("AVX512", "AVX2", "DEFAULT")


def _levels_from(capability: str) -> tuple[str, ...]:
    """The levels a process at torch's ``capability`` may use, best first (SVE, VSX,
    ZVECTOR and the like run the DEFAULT build, which is NEON on aarch64)."""
    return LEVELS[LEVELS.index(capability):] if capability in LEVELS else ("DEFAULT",)


def _load():
    """(_C, capability of the installed kernels) or raise ImportError."""
    from . import _C as ext

    for level in _levels_from(torch.backends.cpu.get_cpu_capability()):
        try:
            kernels = importlib.import_module(f"{__package__}._kernels_{level.lower()}")
        except ModuleNotFoundError:
            continue  # not built for this platform
        ext._install_kernels(kernels.table)
        return ext, kernels.capability
    raise ImportError("no kernel module kdkernels._kernels_<isa> is built")


try:
    _C, CAPABILITY = _load()
except ImportError as exc:  # the extension was not built
    _C, CAPABILITY = None, None
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


def describe() -> str:
    """One line for logs and the benchmark: the kernels' ISA level and GEMM engine."""
    if _C is None:
        return f"not built ({_IMPORT_ERROR})"
    return (f"ISA {CAPABILITY} (torch: {torch.backends.cpu.get_cpu_capability()}), "
            f"float32 GEMMs: {_C.gemm_engine()}")


def empty_cache() -> None:
    """Frees the idle blocks the C++ kernels keep for big outputs (see README, "Output
    cache"); tensors in use are not touched. Nothing to do if the extension is not built."""
    if _C is not None:
        _C.empty_output_cache()


def _not_built(*args, **kwargs):
    _extension()  # raises, saying how to build it


# The backend protocol (kdkernels/_ops.py) is the extension's own functions: no Python
# frame per call (right after a large GEMM each one costs 5-10 us).
if _C is not None:
    ofd_forward, ofd_none, ofd_backward = _C.ofd_forward, _C.ofd_none, _C.ofd_backward
    nd_forward, lsh_forward, sp_forward = _C.nd_forward, _C.lsh_forward, _C.sp_forward
    # loss (no history) with a backward giving grads[i] * upstream to inputs[i] (see
    # kdkernels._ops.run); inputs may be None (f_t of LSH with codes)
    attach_scaled_grads = _C.attach_scaled_grads
else:
    ofd_forward = ofd_none = ofd_backward = nd_forward = lsh_forward = sp_forward = _not_built
    attach_scaled_grads = _not_built
