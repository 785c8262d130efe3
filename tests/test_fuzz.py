"""Property-based parity (hypothesis): every fused backend equals the reference,
forward and every gradient, on random shapes, dtypes, strides, reductions and
upstream gradients, within the per-dtype tolerance of ``helpers.TOL``.

Profiles (hypothesis settings, registered here, not in conftest):
- ``ci`` (default): derandomized (the same examples on every run), no deadline,
  no example database; few and small examples for the Triton interpreter.
  The whole file takes well under 3 minutes on 2 cores.
- ``long``: many more and larger examples, random (new examples each run, a
  failing one is printed with its reproduction blob)::

      KDKERNELS_HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest -q tests/test_fuzz.py

Inputs are random values from a seed that hypothesis draws; the shapes, dtypes,
layouts (transposed, sliced with a storage offset, permuted, channels_last,
expanded), reductions, upstream gradients and the edge cases (ties, zero rows,
1-row batches, empty LSH masks) are drawn by hypothesis and shrink on failure.
Where a loss has a discontinuity that float rounding could flip differently on
two backends (the LSH teacher bit ``h_t > 0``, ND norm ties, OFD ties), the
values that decide it are drawn on a grid that every summation order computes
exactly, so the examples that land on the discontinuity (``h_t == 0``,
``||t|| == ||s||``, ``t == margin``, ``s == t'``) are tested deterministically.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, Tuple

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st

import kdkernels as kdk
from helpers import TOL, Case, assert_close

# --------------------------------------------------------------------------- profiles
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("kdkernels-ci", max_examples=60, deadline=None, derandomize=True, database=None,
                          print_blob=True, suppress_health_check=_SUPPRESS)
settings.register_profile("kdkernels-long", max_examples=400, deadline=None, derandomize=False,
                          print_blob=True, suppress_health_check=_SUPPRESS)
PROFILE = os.environ.get("KDKERNELS_HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"KDKERNELS_HYPOTHESIS_PROFILE: expected 'ci' or 'long', got {PROFILE!r}")
LONG = PROFILE == "long"
_PARENT = settings.get_profile(f"kdkernels-{PROFILE}")


@dataclass(frozen=True)
class Limits:
    examples: int  # max_examples of one test (one loss, one backend)
    dims: Dict[str, int]  # per-loss size caps
    dtypes: Tuple[torch.dtype, ...]


_ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# The Triton interpreter is slow (numpy per program) and does not emulate bf16 math.
_TRITON_DTYPES = (torch.float64, torch.float32, torch.float16)

_LIMITS = {
    # cpu: fast; sizes reach the spec's edge cases (N = 16384 hashes, widths in the thousands)
    ("ci", "cpu"): dict(ofd=Limits(60, dict(batch=8, channels=64, side=33, numel=1 << 17), _ALL_DTYPES),
                        nd=Limits(60, dict(batch=64, dim=2048, classes=100, numel=1 << 16), _ALL_DTYPES),
                        lsh=Limits(50, dict(batch=16, dim=3000, hashes=16384, work=1 << 22), _ALL_DTYPES),
                        sp=Limits(50, dict(batch=64, width=8192, numel=1 << 17, pairs=3), _ALL_DTYPES)),
    ("ci", "triton"): dict(ofd=Limits(30, dict(batch=4, channels=8, side=9, numel=2048), _TRITON_DTYPES),
                           nd=Limits(15, dict(batch=6, dim=40, classes=6, numel=128), _TRITON_DTYPES),
                           lsh=Limits(20, dict(batch=6, dim=48, hashes=300, work=1 << 13), _TRITON_DTYPES),
                           sp=Limits(20, dict(batch=8, width=64, numel=256, pairs=2), _TRITON_DTYPES)),
    ("long", "cpu"): dict(ofd=Limits(400, dict(batch=16, channels=256, side=64, numel=1 << 20), _ALL_DTYPES),
                          nd=Limits(400, dict(batch=512, dim=4096, classes=1000, numel=1 << 19), _ALL_DTYPES),
                          lsh=Limits(300, dict(batch=64, dim=4096, hashes=16384, work=1 << 25), _ALL_DTYPES),
                          sp=Limits(300, dict(batch=256, width=25088, numel=1 << 20, pairs=3), _ALL_DTYPES)),
    ("long", "triton"): dict(ofd=Limits(100, dict(batch=8, channels=16, side=17, numel=1 << 14), _TRITON_DTYPES),
                             nd=Limits(30, dict(batch=16, dim=300, classes=20, numel=1 << 11), _TRITON_DTYPES),
                             lsh=Limits(60, dict(batch=16, dim=200, hashes=2048, work=1 << 16), _TRITON_DTYPES),
                             sp=Limits(60, dict(batch=16, width=512, numel=1 << 12, pairs=3), _TRITON_DTYPES)),
}
HALF = (torch.float16, torch.bfloat16)


def limits(backend: str, loss: str) -> Limits:
    return _LIMITS[(PROFILE, backend if backend == "triton" else "cpu")][loss]


def fuzz(backend: str, loss: str):
    """Decorator for the inner @given function of one test: this profile, this
    backend's number of examples."""
    return settings(_PARENT, max_examples=limits(backend, loss).examples)


# --------------------------------------------------------------------------- drawing helpers
def draw_size(data, hi: int, name: str) -> int:
    """A size in [1, hi] from a mix that favours edge cases: 1, powers of two and
    their neighbours, the cap itself, anything."""
    kind = data.draw(st.sampled_from(["small", "pow2", "max", "any"]), label=f"{name} kind")
    if kind == "small":
        return data.draw(st.integers(1, min(hi, 7)), label=name)
    if kind == "pow2":
        k = data.draw(st.integers(0, max(0, int(math.log2(hi)))), label=f"log2 {name}")
        return max(1, min(hi, (1 << k) + data.draw(st.sampled_from([-1, 0, 1]), label=f"{name} +-")))
    if kind == "max":
        return hi
    return data.draw(st.integers(1, hi), label=name)


def shrink_to(sizes, cap: int, keep=()):
    """Halve the largest size (not in ``keep``) until the product is <= cap."""
    sizes = list(sizes)
    while math.prod(sizes) > cap:
        i = max((j for j in range(len(sizes)) if j not in keep and sizes[j] > 1), key=lambda j: sizes[j],
                default=None)
        if i is None:
            break
        sizes[i] = (sizes[i] + 1) // 2
    return sizes


def generator(data) -> torch.Generator:
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))


def values(gen, shape, dtype, *, scale=1.0, grid=None):
    """Random normal values in float64, optionally rounded to multiples of ``grid``
    (exact in every dtype and every summation order), then cast to ``dtype``."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if grid is not None:
        x = torch.round(x / grid) * grid
    return x.to(dtype)


def layouts_for(x: torch.Tensor):
    out = ["contiguous", "sliced"]
    if x.dim() >= 2:
        out += ["transposed", "permuted"]
    if x.dim() in (4, 5):
        out.append("channels_last")
    if x.dim() >= 2 and x.shape[0] > 1:
        out.append("expanded")
    return out


def relayout(x: torch.Tensor, layout: str, gen: torch.Generator) -> torch.Tensor:
    """The same values as ``x`` (except 'expanded': the rows of x[0]) in another memory layout."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "sliced":  # every other element of the last dim, storage offset 1
        big = torch.zeros(x.shape[:-1] + (2 * x.shape[-1] + 1,), dtype=x.dtype)
        big[..., 1::2] = x
        return big[..., 1::2]
    if layout == "transposed":  # the last two dims column-major
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "permuted":  # a random dense permutation of the dims
        perm = torch.randperm(x.dim(), generator=gen).tolist()
        inv = [perm.index(i) for i in range(x.dim())]
        return x.permute(perm).contiguous().permute(inv)
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    if layout == "expanded":  # stride 0 over dim 0 (a leaf may require grad through it)
        return x[:1].expand(x.shape)
    raise AssertionError(layout)


def draw_layout(data, x: torch.Tensor, gen, name: str) -> torch.Tensor:
    return relayout(x, data.draw(st.sampled_from(layouts_for(x)), label=f"layout {name}"), gen)


def describe(x) -> str:
    if not isinstance(x, torch.Tensor):
        return repr(x)
    return f"{tuple(x.shape)}/{str(x.dtype).replace('torch.', '')}/stride{tuple(x.stride())}"


# --------------------------------------------------------------------------- the check
def run_case(case: Case, backend: str, upstream: str, args=None, upstream_dtype=None):
    """Case.run, except that a loss that does not depend on any differentiable arg
    (LSH with only f_t requiring grad and mse_weight=0: the bits carry no gradient)
    gives None gradients instead of an autograd error. ``upstream_dtype``: round a
    random upstream gradient to this dtype (the float64 answer of a float32 case)."""
    args = case.fresh_args() if args is None else args
    loss = case.fn(*args, backend=backend, **case.kwargs)
    if not loss.requires_grad:
        return loss.detach(), (None,) * len(case.diff)
    if upstream == "one":  # as helpers.Case.run
        grad = torch.ones_like(loss)
    elif upstream == "two":
        grad = torch.full_like(loss, 2.0)
    else:
        gen = torch.Generator().manual_seed(1234)
        grad = torch.randn(loss.shape, generator=gen, dtype=torch.float64).to(upstream_dtype or loss.dtype)
        grad = grad.to(loss.dtype)
    grads = torch.autograd.grad(loss, [args[i] for i in case.diff], grad, allow_unused=True)
    return loss.detach(), grads


def float64_answer(case: Case, upstream: str, dtype):
    """The reference in float64 on the same (already rounded) values: the yardstick
    for examples where the reference itself is not within TOL of the exact answer."""
    args = [a.detach().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in case.args]
    return run_case(Case(case.fn, args, case.kwargs, case.diff), "reference", upstream, upstream_dtype=dtype)


NO_WORSE = 4.0


def close_or_no_worse(actual, expected, truth_fn, dtype, what):
    """Within TOL of the reference; or, where the reference is itself that far from
    the float64 answer (an ill-conditioned example, e.g. SP with near-zero Gram
    rows), no further from the float64 answer than 4x the reference's error (on such
    examples the two errors are rounding noise of the same size: their ratio was seen
    from 0.2 to 2.8; a wrong kernel is off by orders of magnitude)."""
    try:
        assert_close(actual, expected, dtype, what)
        return
    except AssertionError as exc:
        if dtype == torch.float64 or actual is None or expected is None:
            raise
        truth = truth_fn()
        if truth is None:
            raise
        err = (actual.double() - truth).abs().nan_to_num(nan=float("inf")).max().item()
        ref_err = (expected.double() - truth).abs().nan_to_num(nan=float("inf")).max().item()
        if not err <= NO_WORSE * ref_err + TOL[dtype]["atol"]:
            raise AssertionError(f"{exc}\n{what}: max error vs the float64 answer {err:.3g}, "
                                 f"the reference's {ref_err:.3g}") from None


def check(case: Case, backend: str, upstream: str):
    """Fused backend vs reference on the same inputs: loss and every gradient close
    (helpers.TOL of the inputs' dtype, see close_or_no_worse), dtypes/shapes equal,
    no input written."""
    dtype = case.args[0].dtype if isinstance(case.args[0], torch.Tensor) else case.args[case.diff[0]].dtype
    if currently_in_test_context():  # printed with a failing example
        note("args: " + ", ".join(describe(a) for a in case.args))
        note(f"kwargs: {case.kwargs}, diff: {tuple(case.diff)}, upstream: {upstream}")
    args = case.fresh_args()
    before = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
    loss, grads = run_case(case, backend, upstream, args=args)
    for i, (a, b) in enumerate(zip(args, before)):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a.detach(), b), f"{backend} wrote to input {i}"
    ref_loss, ref_grads = run_case(case, "reference", upstream)
    assert loss.dtype == ref_loss.dtype, f"loss dtype {loss.dtype} != reference {ref_loss.dtype}"
    assert loss.shape == ref_loss.shape, f"loss shape {tuple(loss.shape)} != reference {tuple(ref_loss.shape)}"
    truth = []

    def truth_of(k):  # k = 0: the loss, k = 1 + j: the j-th gradient; computed once, on demand
        def get():
            if not truth:
                truth.append(float64_answer(case, upstream, dtype))
            t_loss, t_grads = truth[0]
            return t_loss if k == 0 else t_grads[k - 1]
        return get

    close_or_no_worse(loss, ref_loss, truth_of(0), dtype, "loss")
    for j, (i, g, rg) in enumerate(zip(case.diff, grads, ref_grads)):
        if g is None and rg is not None:  # autograd's None means zero: then the reference must be all zeros
            assert torch.count_nonzero(rg) == 0, f"grad of arg {i}: missing, the reference's is nonzero"
            continue
        if g is not None and rg is None:
            assert torch.count_nonzero(g) == 0, f"grad of arg {i}: nonzero where the reference has none"
            continue
        if g is not None:
            assert g.dtype == case.args[i].dtype, f"grad of arg {i}: dtype {g.dtype} != input {case.args[i].dtype}"
            assert g.shape == case.args[i].shape, f"grad of arg {i}: shape {tuple(g.shape)}"
        close_or_no_worse(g, rg, truth_of(1 + j), dtype, f"grad of arg {i}")


UPSTREAM = st.sampled_from(["one", "two", "random"])


def draw_diff(data, *options):
    return data.draw(st.sampled_from(options), label="requires grad")


# --------------------------------------------------------------------------- OFD
def ofd_example(data, backend):
    lim = limits(backend, "ofd")
    gen = generator(data)
    dtype = data.draw(st.sampled_from(lim.dtypes), label="dtype")
    ndim = data.draw(st.integers(2, 5), label="ndim")
    sizes = [draw_size(data, lim.dims["batch"], "B"), draw_size(data, lim.dims["channels"], "C")]
    sizes += [draw_size(data, lim.dims["side"], f"spatial{i}") for i in range(ndim - 2)]
    shape = shrink_to(sizes, lim.dims["numel"] if dtype not in HALF else min(lim.dims["numel"], 4096))
    grid = 0.5 if data.draw(st.booleans(), label="on a grid (ties)") else None
    scale = data.draw(st.sampled_from([1.0, 0.01, 30.0] if dtype not in HALF else [1.0, 0.1, 4.0]), label="scale")
    s = values(gen, shape, torch.float64, scale=scale)
    t = values(gen, shape, torch.float64, scale=scale)
    margin = -values(gen, (shape[1],), torch.float64, scale=scale).abs()
    if grid is not None:  # quantise everything: ties t == margin, s == t', t' == 0 are then common
        g = grid * scale
        s, t, margin = (torch.round(x / g) * g for x in (s, t, margin))
        if data.draw(st.booleans(), label="exact ties"):
            flat_s, flat_t = s.view(-1), t.view(-1)
            n = flat_t.numel()
            ch = (torch.arange(n) // math.prod(shape[2:])) % shape[1]
            k = torch.randperm(n, generator=gen)[: max(1, n // 4)]
            flat_t[k[0::3]] = margin[ch[k[0::3]]]  # t == margin
            flat_s[k[1::3]] = flat_t[k[1::3]].clamp_min(margin[ch[k[1::3]]])  # s == t'
            flat_t[k[2::3]] = 0.0  # t' == 0 (margins are <= 0)
    margin_dtype = data.draw(st.sampled_from([torch.float32, torch.float64, dtype]), label="margin dtype")
    margin = margin.to(margin_dtype)
    if data.draw(st.booleans(), label="strided margin"):
        margin = relayout(margin, "sliced", gen)
    s = draw_layout(data, s.to(dtype), gen, "s")
    t = draw_layout(data, t.to(dtype), gen, "t")
    reduction = data.draw(st.sampled_from(["batchmean", "sum", "mean", "none"]), label="reduction")
    diff = draw_diff(data, (0, 1), (0,), (1,))
    check(Case(kdk.ofd_loss, (s, t, margin), dict(reduction=reduction), diff), backend,
          data.draw(UPSTREAM, label="upstream"))


def test_ofd(backend, poison):
    @fuzz(backend, "ofd")
    @given(data=st.data())
    def run(data):
        ofd_example(data, backend)

    run()


# --------------------------------------------------------------------------- ND
_LABEL_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]


def nd_example(data, backend):
    lim = limits(backend, "nd")
    gen = generator(data)
    dtype = data.draw(st.sampled_from(lim.dtypes), label="dtype")
    batch, dim = shrink_to([draw_size(data, lim.dims["batch"], "B"), draw_size(data, lim.dims["dim"], "D")],
                           lim.dims["numel"])
    label_dtype = data.draw(st.sampled_from(_LABEL_DTYPES), label="label dtype")
    max_classes = min(lim.dims["classes"], 127 if label_dtype == torch.int8 else 255)
    classes = draw_size(data, max_classes, "K")
    # rows on a grid of 1/4: squared norms are exact in any order, so norm ties are exact ties
    grid = 0.25 if data.draw(st.booleans(), label="on a grid") else None
    s = values(gen, (batch, dim), torch.float64, grid=grid)
    t = values(gen, (batch, dim), torch.float64, grid=grid,
               scale=data.draw(st.sampled_from([1.0, 0.5, 2.0]), label="teacher scale"))
    # ties ||t|| == ||s|| (the student wins): a copy, a negation, a permutation (exact on the grid)
    tie = data.draw(st.sampled_from(["none", "copy", "neg"] + (["perm"] if grid else [])), label="ties")
    rows = torch.randperm(batch, generator=gen)[: (batch + 1) // 2]
    if tie == "copy":
        t[rows] = s[rows]
    elif tie == "neg":
        t[rows] = -s[rows]
    elif tie == "perm":
        t[rows] = s[rows][:, torch.randperm(dim, generator=gen)]
    if dtype not in HALF and data.draw(st.booleans(), label="a zero row"):  # eps clamps (huge gradients)
        s[0] = 0.0
        t[0] = 0.0
    centers = values(gen, (classes, dim), torch.float64) + 0.5
    if classes > 1 and data.draw(st.booleans(), label="a zero class mean"):
        centers[-1] = 0.0
    centers = centers.to(data.draw(st.sampled_from([torch.float32, torch.float64, dtype]), label="centers dtype"))
    centers = relayout(centers, data.draw(st.sampled_from(["contiguous", "transposed", "sliced"]),
                                          label="layout centers"), gen)
    labels = torch.randint(0, classes, (batch,), generator=gen).to(label_dtype)
    if data.draw(st.booleans(), label="strided labels"):
        labels = relayout(labels, "sliced", gen)
    s = draw_layout(data, s.to(dtype), gen, "s")
    t = draw_layout(data, t.to(dtype), gen, "t")
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    diff = draw_diff(data, (0, 1), (0,), (1,))
    check(Case(kdk.nd_loss, (s, t, centers, labels), dict(reduction=reduction), diff), backend,
          data.draw(UPSTREAM, label="upstream"))


def test_nd(backend, poison):
    @fuzz(backend, "nd")
    @given(data=st.data())
    def run(data):
        nd_example(data, backend)

    run()


# --------------------------------------------------------------------------- LSH
def lsh_example(data, backend):
    lim = limits(backend, "lsh")
    gen = generator(data)
    dtype = data.draw(st.sampled_from(lim.dtypes), label="dtype")
    hashes = draw_size(data, lim.dims["hashes"], "N")
    batch, dim, hashes = shrink_to([draw_size(data, lim.dims["batch"], "B"), draw_size(data, lim.dims["dim"], "D"),
                                    hashes], lim.dims["work"], keep=(2,))
    batch, dim, hashes = shrink_to([batch, dim, hashes], lim.dims["work"])
    # The teacher bit 1[h_t > 0] is discontinuous: the teacher side (f_t, weight, bias) is
    # on a grid where h_t is exact in every summation order (h_t == 0 then happens and
    # must give bit 0). Only float64 may also draw general values (flips need |h_t| < 1e-15).
    exact = dtype != torch.float64 or data.draw(st.booleans(), label="exact teacher")
    f_s = values(gen, (batch, dim), torch.float64)
    f_t = values(gen, (batch, dim), torch.float64, grid=0.25 if exact else None).clamp(-2, 2)
    weight = values(gen, (hashes, dim), torch.float64, scale=0.5, grid=0.125 if exact else None).clamp(-1, 1)
    bias = None
    if data.draw(st.booleans(), label="bias"):
        bias = values(gen, (hashes,), torch.float64, scale=0.25, grid=0.125 if exact else None)
    frozen_dtype = data.draw(st.sampled_from([torch.float32, torch.float64, dtype]), label="frozen dtype")
    if not exact:
        frozen_dtype = torch.float64
    weight = relayout(weight.to(frozen_dtype), data.draw(st.sampled_from(["contiguous", "transposed", "sliced"]),
                                                         label="layout weight"), gen)
    if bias is not None:
        bias = relayout(bias.to(frozen_dtype), data.draw(st.sampled_from(["contiguous", "sliced"]),
                                                         label="layout bias"), gen)
    mask_kind = data.draw(st.sampled_from(["none", "bool", "float", "empty"]), label="mask")
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(batch, generator=gen) < 0.6
    elif mask_kind == "float":
        mask = torch.rand(batch, generator=gen, dtype=torch.float64).to(
            data.draw(st.sampled_from([torch.float32, torch.float64, dtype]), label="mask dtype"))
    elif mask_kind == "empty":
        mask = torch.zeros(batch, dtype=torch.bool)
    teacher = data.draw(st.sampled_from(["features", "codes", "codes+features"]), label="teacher")
    mse_weight = 0.0 if teacher == "codes" else data.draw(st.sampled_from([1.0, 0.0, 2.5]), label="mse_weight")
    codes = kdk.lsh_codes(f_t.to(dtype), weight, bias) if teacher != "features" else None
    f_s = draw_layout(data, f_s.to(dtype), gen, "f_s")
    f_t = None if teacher == "codes" else draw_layout(data, f_t.to(dtype), gen, "f_t")
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    diff = (0,) if f_t is None else draw_diff(data, (0, 1), (0,), (1,))
    kwargs = dict(reduction=reduction, mse_weight=mse_weight, sample_mask=mask, teacher_codes=codes)
    check(Case(kdk.lsh_loss, (f_s, f_t, weight, bias), kwargs, diff), backend, data.draw(UPSTREAM, label="upstream"))


def test_lsh(backend, poison):
    @fuzz(backend, "lsh")
    @given(data=st.data())
    def run(data):
        lsh_example(data, backend)

    run()


# --------------------------------------------------------------------------- SP
def _sp_pairs(*xs, backend, num_pairs, **kwargs):
    """Case.fn for SP: positional args are the student tensors then the teacher tensors."""
    if num_pairs == 0:  # plain tensors, not sequences
        return kdk.sp_loss(xs[0], xs[1], backend=backend, **kwargs)
    return kdk.sp_loss(list(xs[:num_pairs]), list(xs[num_pairs:]), backend=backend, **kwargs)


def sp_example(data, backend):
    lim = limits(backend, "sp")
    gen = generator(data)
    dtype = data.draw(st.sampled_from(lim.dtypes), label="dtype")
    batch = draw_size(data, lim.dims["batch"], "b")
    num_pairs = data.draw(st.integers(1, lim.dims["pairs"]), label="pairs")
    as_sequence = num_pairs > 1 or data.draw(st.booleans(), label="a one-pair sequence")
    zero_row = dtype not in HALF and batch > 1 and data.draw(st.booleans(), label="a zero row")
    tensors = []
    for side in ("s", "t"):
        for i in range(num_pairs):
            # Width 1 (rank-1 Gram: every row of G is +-q/||q||) only in float64: there the
            # gradient is a cancellation amplified by 1/|q_r|, rounding noise of 1e-3 relative
            # in any float32 implementation, the reference's included.
            ndim = data.draw(st.integers(1 if dtype == torch.float64 else 2, 4), label=f"ndim {side}{i}")
            width = draw_size(data, lim.dims["width"], f"width {side}{i}") if ndim > 1 else 1
            if dtype != torch.float64:
                width = max(width, 2)
            dims = [width]
            if ndim > 2:  # split the width over ndim - 1 dims
                dims = [data.draw(st.integers(1, 5), label=f"dim {side}{i}.{j}") for j in range(ndim - 2)] + [width]
            batch_, *dims = shrink_to([batch] + dims, lim.dims["numel"], keep=(0,))
            x = values(gen, [batch_] + dims, torch.float64, scale=data.draw(
                st.sampled_from([1.0, 0.05, 5.0] if dtype not in HALF else [1.0, 0.25]), label=f"scale {side}{i}"))
            if zero_row:
                x[1] = 0.0
            tensors.append(draw_layout(data, x.to(dtype), gen, f"{side}{i}"))
    p = data.draw(st.sampled_from([2.0, 1.0, 2, 1]), label="p")
    reduction = data.draw(st.sampled_from(["batchmean", "sum", "none"]), label="reduction")
    n = num_pairs if as_sequence else 0
    diff_kind = data.draw(st.sampled_from(["both", "student", "teacher"]), label="requires grad")
    diff = tuple(i for i in range(2 * num_pairs)
                 if diff_kind == "both" or (diff_kind == "student") == (i < num_pairs))
    check(Case(_sp_pairs, tuple(tensors), dict(num_pairs=n, p=p, reduction=reduction), diff), backend,
          data.draw(UPSTREAM, label="upstream"))


def test_sp(backend, poison):
    @fuzz(backend, "sp")
    @given(data=st.data())
    def run(data):
        sp_example(data, backend)

    run()


# --------------------------------------------------------------------------- the harness itself
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_harness_catches_a_wrong_backend(dtype):
    """The check can fail: a 'backend' that is the reference with a loss 0.1% off is
    caught, in float64 and in float32 (where the float64 yardstick is consulted)."""
    real = kdk.reference.ofd_loss

    def off_by_a_little(*args, **kwargs):
        return real(*args, **kwargs) * 1.001

    gen = torch.Generator().manual_seed(0)
    case = Case(lambda s, t, m, backend, **kw: (off_by_a_little if backend == "wrong" else real)(s, t, m, **kw),
                (torch.randn(2, 3, 4, generator=gen, dtype=dtype), torch.randn(2, 3, 4, generator=gen, dtype=dtype),
                 -torch.rand(3, generator=gen)), dict(reduction="sum"))
    with pytest.raises(AssertionError):
        check(case, "wrong", "one")
    check(case, "reference", "one")
