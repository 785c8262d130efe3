"""Tensors of more than 2^31 elements: int64 indexing.

- ``test_ofd_cpu_over_2_31_elements`` (marked ``huge``, skipped unless
  ``KDKERNELS_RUN_HUGE=1``): OFD on a float16 tensor of 2^31 + 2^22 elements on
  the CPU backend; the loss against a float64 reference computed over chunks, and
  the whole gradient against the float64 formula, chunk by chunk. It needs about
  13.5 GB of free memory (s, t and grad_s in float16) and a few minutes::

      KDKERNELS_RUN_HUGE=1 .venv/bin/python -m pytest -q -m huge tests/test_huge.py

  The last 2^22 elements (all past offset 2^31, in the last channel) hold values
  whose loss depends on their channel's margin and that carry ~10% of the total,
  so a kernel that wraps an int32 offset, drops the tail or reads the wrong
  channel there is off by far more than the float16 rounding of the loss.
- The Triton kernels cast program ids to int64 before any offset arithmetic
  (``tl.program_id(axis).to(tl.int64)``, the convention of design.md): checked
  statically on the source of every ``@triton.jit`` kernel, since the interpreter
  cannot run a 2^31-element launch in CI time.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import os
import pkgutil
import textwrap

import pytest
import torch

import kdkernels as kdk

# --------------------------------------------------------------------------- OFD > 2^31 elements on CPU
SHAPE = (2, 3, 8, 44826624)  # 2 * 3 * 8 * 44826624 = 2^31 + 2^22 elements
NUMEL = 2**31 + 2**22
TAIL = 2**22  # the last TAIL elements lie past offset 2^31, in channel 2 of sample 1
MARGIN = (-0.25, -1.0, -2.0)
CHUNK = 1 << 24

huge = pytest.mark.skipif(os.environ.get("KDKERNELS_RUN_HUGE") != "1",
                          reason="needs ~13.5 GB of memory and minutes; set KDKERNELS_RUN_HUGE=1")


def _fill(x: torch.Tensor, seed: int, mean: float = 0.0, std: float = 1.0):
    """Fill a huge flat float16 tensor fast: a random block of a length prime to the
    channel size, repeated (each channel sees other phases of it)."""
    period = CHUNK + 7
    block = (torch.randn(period, generator=torch.Generator().manual_seed(seed), dtype=torch.float32) * std
             + mean).half()
    flat = x.view(-1)
    for start in range(0, flat.numel(), period):
        n = min(period, flat.numel() - start)
        flat[start:start + n].copy_(block[:n])


def _expected_chunk(s_chunk: torch.Tensor, t_chunk: torch.Tensor, m: float):
    """float64 d and dd/ds of a chunk of one channel (margin m)."""
    s, t = s_chunk.double(), t_chunk.double()
    tc = t.clamp_min(m)  # no NaN here
    on = ((s > tc) | (tc > 0)).double()
    return (s - tc).pow(2) * on, 2 * (s - tc) * on


@pytest.mark.huge
@huge
def test_ofd_cpu_over_2_31_elements():
    assert NUMEL > 2**31 and torch.Size(SHAPE).numel() == NUMEL
    s = torch.empty(SHAPE, dtype=torch.float16)
    t = torch.empty(SHAPE, dtype=torch.float16)
    _fill(s, 0)
    _fill(t, 1)
    s.view(-1)[-TAIL:] = 8.0  # tail: t' = t = -1.5 in channel 2 only (margin -2); d = 90.25, ~10% of the sum
    t.view(-1)[-TAIL:] = -1.5
    margin = torch.tensor(MARGIN)

    with torch.no_grad():
        loss_mean = kdk.ofd_loss(s, t, margin, reduction="mean", backend="cpu")
    s.requires_grad_()
    loss_batchmean = kdk.ofd_loss(s, t, margin, reduction="batchmean", backend="cpu")
    (grad_s,) = torch.autograd.grad(loss_batchmean, s)
    s = s.detach()
    assert grad_s.shape == s.shape and grad_s.dtype == torch.float16

    total, worst, worst_at = 0.0, 0.0, -1
    rows = SHAPE[0] * SHAPE[1]  # one row per (sample, channel), row r has channel r % C
    s_rows, t_rows, g_rows = s.view(rows, -1), t.view(rows, -1), grad_s.view(rows, -1)
    inner = s_rows.shape[1]
    for r in range(rows):
        m = MARGIN[r % SHAPE[1]]
        for start in range(0, inner, CHUNK):
            end = min(inner, start + CHUNK)
            d, dd = _expected_chunk(s_rows[r, start:end], t_rows[r, start:end], m)
            total += d.sum().item()
            # grad of batchmean: dd/ds / B, rounded to float16 once
            expected = (dd / SHAPE[0]).half().double()
            err = ((g_rows[r, start:end].double() - expected).abs() - 1e-3 * expected.abs()).max().item()
            if err > worst:
                worst, worst_at = err, r * inner + start
    assert worst <= 1e-3, f"grad_s off by {worst:.3g} (beyond 1e-3 relative) in the chunk at offset {worst_at}"

    expected_mean = total / NUMEL
    assert loss_mean.dtype == torch.float16
    assert abs(loss_mean.item() - expected_mean) <= 2e-3 * abs(expected_mean), (
        f"mean loss {loss_mean.item()} != float64 reference {expected_mean}")
    # 'batchmean' overflows float16 (sum / B ~ 1e9), as the reference's cast does
    assert loss_batchmean.item() == torch.tensor(total / SHAPE[0]).half().item()
    # the tail's own contribution is visible at float16 precision
    tail_share = TAIL * 9.5**2 / total
    assert tail_share > 25 * 2e-3, tail_share


# --------------------------------------------------------------------------- Triton: int64 program ids
def _triton_kernels():
    pytest.importorskip("triton")
    from triton.runtime.jit import JITFunction

    import kdkernels.triton as ktriton

    kinds = [JITFunction]
    try:  # under TRITON_INTERPRET=1, @triton.jit gives an InterpretedFunction
        from triton.runtime.interpreter import InterpretedFunction
        kinds.append(InterpretedFunction)
    except ImportError:
        pass

    found = {}
    for info in pkgutil.iter_modules(ktriton.__path__):
        if info.name.startswith("_") or info.name == "aot":
            continue
        module = importlib.import_module(f"kdkernels.triton.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, tuple(kinds)) and obj.fn.__module__ == module.__name__:
                found[f"{info.name}.{name}"] = obj
    return found


def _program_id_uses(fn) -> list:
    """For each ``tl.program_id(...)`` call in fn's source: whether it is cast by ``.to(tl.int64)``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn.fn)))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    uses = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "program_id"):
            attr = parents.get(node)
            call = parents.get(attr)
            cast = (isinstance(attr, ast.Attribute) and attr.attr == "to" and isinstance(call, ast.Call)
                    and len(call.args) == 1 and ast.unparse(call.args[0]) in ("tl.int64", "triton.language.int64"))
            uses.append((ast.unparse(node), cast))
    return uses


def _uncast(names, kernels):
    bad, checked = [], 0
    for name in names:
        uses = _program_id_uses(kernels[name])
        checked += len(uses)
        bad += [f"{name}: {call}" for call, cast in uses if not cast]
    return bad, checked


def test_triton_ofd_kernels_use_int64_offsets():
    """OFD walks [B, C, *] maps of billions of elements: its program ids must be int64."""
    kernels = _triton_kernels()
    ofd = [k for k in kernels if k.startswith("ofd.") and k.endswith("_kernel")]
    assert {"ofd.ofd_fwd_kernel", "ofd.ofd_bwd_kernel"} <= set(ofd), f"OFD kernels not found: {sorted(kernels)}"
    for name in ofd:
        assert _program_id_uses(kernels[name]), f"{name} reads no program id"
    bad, _ = _uncast(ofd, kernels)
    assert not bad, "program ids used without .to(tl.int64) (offsets past 2^31 would wrap): " + "; ".join(bad)


def test_triton_kernels_cast_program_ids_to_int64():
    """The convention of design.md for every kernel (flash-linear-attention style): each
    ``tl.program_id(axis)`` is cast with ``.to(tl.int64)`` where it is read."""
    kernels = _triton_kernels()
    bad, checked = _uncast(sorted(kernels), kernels)
    assert checked, "no tl.program_id call found in any kernel"
    assert not bad, "program ids used without .to(tl.int64): " + "; ".join(bad)


def test_program_id_check_can_fail():
    """The AST check flags an uncast program id (self-test on a made-up kernel source)."""

    class Fake:
        pass

    def kernel(x_ptr):  # a stand-in: only its source is read
        pid = tl.program_id(0)  # noqa: F821
        offs = pid * 1024 + tl.arange(0, 1024).to(tl.int64)  # noqa: F821
        return offs

    fake = Fake()
    fake.fn = kernel
    assert _program_id_uses(fake) == [("tl.program_id(0)", False)]
