"""NaN and Inf: a NaN anywhere in an input that a loss reads gives a NaN loss on
every backend (the reference included), never a silent 0 from a skipped branch or
a comparison that is false for NaN. With reduction='none' exactly the affected
rows/elements are NaN (a NaN does not leak into other rows through a shared
tile or reduction). Inf follows the reference: the same value or the same
NaN-ness, on the loss; under NaN the gradients of the fused backends are NaN
exactly where the reference's are.

Each case places one bad value where a careless kernel would drop it:
- OFD: s = NaN where t' <= 0 (the mask ``s > t'`` is False for NaN, so
  ``d = NaN^2 * 0`` must stay NaN), t = NaN under a student that would lose,
  margin = NaN (every element of that channel).
- ND: a NaN teacher whose finite entries are small (``||t|| > ||s||`` is False
  for NaN: the published ``max`` would quietly take the student norm), a NaN
  student, a NaN class mean (the rows with that label only); a NaN in a class
  mean that no label selects is not read and changes nothing.
- LSH: a NaN teacher feature with ``mse_weight=0`` (the bit ``h_t > 0`` is False
  for NaN), NaN in f_s, in one weight entry or bias entry (every row), in a
  float sample_mask, and in a row that a bool mask switches off (the reference
  multiplies, so 0 * NaN = NaN).
- SP: NaN in either side, or in the second of two layer pairs (every row).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch

import kdkernels as kdk
from conftest import FUSED_BACKENDS
from helpers import TOL, randn

ALL_BACKENDS = ["reference"] + FUSED_BACKENDS
NAN, INF = float("nan"), float("inf")


@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request):
    """The reference and each fused backend: the NaN rule binds them all."""
    return request.param


@dataclass
class Poke:
    """One call of a loss with one bad value: ``args[arg][index] = value``.
    ``bad_rows(shape)``: the entries of the 'none' loss (of that shape) that must be NaN."""

    fn: Callable
    args: List
    kwargs: Dict
    diff: Sequence[int]
    arg: int
    index: Tuple
    bad_rows: Callable
    reductions: Sequence[str]
    default: str

    def make(self, value: float, dtype: torch.dtype, reduction: Optional[str] = None):
        args = []
        for i, a in enumerate(self.args):
            if isinstance(a, torch.Tensor) and a.is_floating_point() and (i in self.diff or i == 0 or i == 1):
                a = a.to(dtype)
            elif isinstance(a, torch.Tensor):
                a = a.clone()
            args.append(a)
        target = args[self.arg]
        target = target.clone() if target is self.args[self.arg] else target
        target[self.index] = value
        args[self.arg] = target
        kwargs = dict(self.kwargs, reduction=reduction or self.default)
        return args, kwargs

    def run(self, backend, args, kwargs, upstream="ones"):
        args = [a.detach().clone().requires_grad_(i in self.diff) if isinstance(a, torch.Tensor) else a
                for i, a in enumerate(args)]
        loss = self.fn(*args, backend=backend, **kwargs)
        if upstream == "ones":
            grad = torch.ones_like(loss)
        else:
            grad = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape).to(loss.dtype)
        grads = torch.autograd.grad(loss, [args[i] for i in self.diff], grad, allow_unused=True)
        return loss.detach(), grads


def _all(shape):
    return torch.ones(shape, dtype=torch.bool)


def _rows(*rows):
    def bad(shape):
        m = torch.zeros(shape, dtype=torch.bool)
        m[list(rows)] = True
        return m
    return bad


# --------------------------------------------------------------------------- OFD
def _ofd(arg, index, bad):
    s = randn(3, 4, 3, 5, seed=0)
    t = randn(3, 4, 3, 5, seed=1)
    margin = -(torch.rand(4, generator=torch.Generator().manual_seed(2)) * 0.5 + 0.25)  # in [-0.75, -0.25]
    # the traps: element (1, 2, 1, 3) has t far below the margin (t' = margin < 0) and s
    # below t' (mask False for finite s); element (2, 1, 0, 4) has a large s over t
    s[1, 2, 1, 3], t[1, 2, 1, 3] = -3.0, -5.0
    s[2, 1, 0, 4], t[2, 1, 0, 4] = -2.0, 0.5
    return Poke(kdk.ofd_loss, [s, t, margin], {}, (0, 1), arg, index, bad,
                ["batchmean", "sum", "mean", "none"], "batchmean")


def _ofd_element(*idx):
    def bad(shape):
        m = torch.zeros(shape, dtype=torch.bool)
        m[idx] = True
        return m
    return bad


def _ofd_channel(c):
    def bad(shape):
        m = torch.zeros(shape, dtype=torch.bool)
        m[:, c] = True
        return m
    return bad


# --------------------------------------------------------------------------- ND
def _nd(arg, index, bad):
    s = randn(4, 5, seed=0) * 2.0  # ||s|| ~ 4.5
    t = randn(4, 5, seed=1) * 0.1  # ||t|| ~ 0.2: finite teachers lose to the student
    centers = randn(3, 5, seed=2).float() + 0.5
    labels = torch.tensor([1, 0, 1, 2])
    return Poke(kdk.nd_loss, [s, t, centers, labels], {}, (0, 1), arg, index, bad, ["mean", "sum", "none"], "mean")


# --------------------------------------------------------------------------- LSH
def _lsh(arg, index, bad, mse_weight=1.0, mask=None):
    f_s = randn(4, 5, seed=0)
    f_t = randn(4, 5, seed=1)
    weight = randn(9, 5, seed=2, scale=0.5).float()
    bias = randn(9, seed=3, scale=0.1).float()
    kwargs = dict(mse_weight=mse_weight, sample_mask=mask)
    return Poke(kdk.lsh_loss, [f_s, f_t, weight, bias], kwargs, (0, 1), arg, index, bad,
                ["mean", "sum", "none"], "mean")


class _MaskArg:
    """LSH with the sample mask as an extra positional arg (so it can be poked)."""

    @staticmethod
    def fn(f_s, f_t, weight, bias, mask, *, backend, **kwargs):
        return kdk.lsh_loss(f_s, f_t, weight, bias, sample_mask=mask, backend=backend, **kwargs)


def _lsh_mask(kind, index, bad):
    p = _lsh(0, None, bad)
    if kind == "float":
        mask = torch.linspace(0.2, 1.0, 4, dtype=torch.float64)
        arg = 4
    else:  # bool mask that switches row 2 off; the NaN goes into f_s row 2
        mask = torch.tensor([True, True, False, True])
        arg = 0
    return Poke(_MaskArg.fn, p.args + [mask], dict(mse_weight=1.0), (0, 1), arg, index, bad,
                ["mean", "sum", "none"], "mean")


# --------------------------------------------------------------------------- SP
def _sp_fn(f_s, f_t, *, backend, **kwargs):
    return kdk.sp_loss(f_s, f_t, backend=backend, **kwargs)


def _sp_two_pairs(a, b, c, d, *, backend, **kwargs):
    return kdk.sp_loss([a, b], [c, d], backend=backend, **kwargs)


def _sp(arg, index, p=2.0):
    f_s = randn(4, 6, seed=0)
    f_t = randn(4, 2, 3, seed=1)
    return Poke(_sp_fn, [f_s, f_t], dict(p=p), (0, 1), arg, index, _all, ["batchmean", "sum", "none"], "batchmean")


def _sp2(arg, index):
    xs = [randn(4, 6, seed=0), randn(4, 3, 2, 2, seed=1), randn(4, 2, 3, seed=2), randn(4, 7, seed=3)]
    return Poke(_sp_two_pairs, xs, {}, (0, 1, 2, 3), arg, index, _all, ["batchmean", "sum", "none"], "batchmean")


CASES = {
    # OFD
    "ofd-s-masked-off": lambda: _ofd(0, (1, 2, 1, 3), _ofd_element(1, 2, 1, 3)),
    "ofd-s-first": lambda: _ofd(0, (0, 0, 0, 0), _ofd_element(0, 0, 0, 0)),
    "ofd-t-under-student": lambda: _ofd(1, (1, 2, 1, 3), _ofd_element(1, 2, 1, 3)),
    "ofd-t-last": lambda: _ofd(1, (2, 3, 2, 4), _ofd_element(2, 3, 2, 4)),
    "ofd-margin": lambda: _ofd(2, (2,), _ofd_channel(2)),
    # ND
    "nd-s": lambda: _nd(0, (2, 3), _rows(2)),
    "nd-t-small-teacher": lambda: _nd(1, (1, 0), _rows(1)),
    "nd-t-last": lambda: _nd(1, (3, 4), _rows(3)),
    "nd-centers-used": lambda: _nd(2, (1, 2), _rows(0, 2)),
    # LSH
    "lsh-f_t-mse0": lambda: _lsh(1, (2, 1), _rows(2), mse_weight=0.0),
    "lsh-f_t": lambda: _lsh(1, (0, 4), _rows(0)),
    "lsh-f_s": lambda: _lsh(0, (3, 0), _rows(3)),
    "lsh-f_s-mse0": lambda: _lsh(0, (1, 2), _rows(1), mse_weight=0.0),
    "lsh-weight": lambda: _lsh(2, (8, 4), _all),
    "lsh-bias": lambda: _lsh(3, (5,), _all),
    "lsh-mask-float": lambda: _lsh_mask("float", (1,), _rows(1)),
    "lsh-row-masked-off": lambda: _lsh_mask("bool", (2, 3), _rows(2)),
    # SP
    "sp-f_s": lambda: _sp(0, (1, 3)),
    "sp-f_t": lambda: _sp(1, (3, 1, 2)),
    "sp-f_s-p1": lambda: _sp(0, (0, 0), p=1.0),
    "sp-second-pair": lambda: _sp2(3, (2, 6)),
}
CASE_IDS = sorted(CASES)


def _poke(name) -> Poke:
    return CASES[name]()


def _check_none_pattern(loss, poke, name):
    expected = poke.bad_rows(loss.shape)
    got = torch.isnan(loss)
    assert torch.equal(got, expected), (
        f"{name}: NaN entries of the 'none' loss {got.nonzero().tolist()} != expected {expected.nonzero().tolist()}")


# --------------------------------------------------------------------------- the NaN rule
@pytest.mark.parametrize("name", CASE_IDS)
def test_nan_gives_nan(any_backend, name):
    """Every reduction, float32: NaN loss; 'none' NaN exactly in the affected rows."""
    poke = _poke(name)
    for reduction in poke.reductions:
        args, kwargs = poke.make(NAN, torch.float32, reduction)
        loss, _ = poke.run(any_backend, args, kwargs)
        if reduction == "none":
            _check_none_pattern(loss, poke, f"{name} ({reduction})")
        else:
            assert torch.isnan(loss), f"{name}: reduction={reduction!r} gives {loss.item()} for a NaN input"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", CASE_IDS)
def test_nan_gives_nan_dtypes(any_backend, name, dtype):
    """The other dtypes (their kernels are other template instances), reduction='none'."""
    if any_backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter does not emulate bf16 math")
    poke = _poke(name)
    args, kwargs = poke.make(NAN, dtype, "none")
    loss, _ = poke.run(any_backend, args, kwargs)
    _check_none_pattern(loss, poke, f"{name} ({dtype})")


def test_nan_in_unused_class_mean_is_not_read(any_backend):
    """A NaN class mean that no label selects is not an input the loss reads: the
    loss and gradients are those of the clean call."""
    poke = _nd(2, (0, 1), _rows())
    poke.args[3] = torch.tensor([1, 2, 1, 2])  # class 0 unused
    clean_args, kwargs = poke.make(1.5, torch.float32, "none")
    bad_args, _ = poke.make(NAN, torch.float32, "none")
    clean, clean_grads = poke.run(any_backend, clean_args, kwargs, upstream="ramp")
    bad, bad_grads = poke.run(any_backend, bad_args, kwargs, upstream="ramp")
    assert torch.isfinite(bad).all(), f"a NaN in an unselected class mean leaked: {bad}"
    torch.testing.assert_close(bad, clean, rtol=0, atol=0)
    for g, cg in zip(bad_grads, clean_grads):
        torch.testing.assert_close(g, cg, rtol=0, atol=0)


# --------------------------------------------------------------------------- fused == reference under NaN and Inf
def _compare(name, value, backend, dtype, reduction, grads: bool, upstream="ones"):
    poke = _poke(name)
    args, kwargs = poke.make(value, dtype, reduction)
    loss, g = poke.run(backend, args, kwargs, upstream)
    ref, rg = poke.run("reference", args, kwargs, upstream)
    tol = TOL[dtype]
    what = f"{name} value={value} reduction={kwargs['reduction']}"
    assert loss.dtype == ref.dtype and loss.shape == ref.shape
    nan_got, nan_ref = torch.isnan(loss), torch.isnan(ref)
    assert torch.equal(nan_got, nan_ref), (
        f"{what}: loss NaN at {nan_got.nonzero().tolist()}, reference at {nan_ref.nonzero().tolist()}"
        f" (loss {loss.tolist()}, reference {ref.tolist()})")
    torch.testing.assert_close(loss.double(), ref.double(), equal_nan=True, **tol,
                               msg=lambda m: f"{what}: loss {loss.tolist()} vs reference {ref.tolist()}: {m}")
    if not grads:
        return
    for i, a, b in zip(poke.diff, g, rg):
        if a is None or b is None:
            other = b if a is None else a
            assert other is None or torch.count_nonzero(other) == 0, f"{what}: grad of arg {i} missing on one side"
            continue
        na, nb = torch.isnan(a), torch.isnan(b)
        assert torch.equal(na, nb), (f"{what}: grad of arg {i} NaN at {na.nonzero().tolist()[:8]}, "
                                     f"reference at {nb.nonzero().tolist()[:8]}")
        torch.testing.assert_close(a.double(), b.double(), equal_nan=True, **tol,
                                   msg=lambda m: f"{what}: grad of arg {i}: {m}")


@pytest.mark.parametrize("reduction", ["default", "none"])
@pytest.mark.parametrize("name", CASE_IDS)
def test_nan_gradients_follow_reference(backend, name, reduction):
    """Under a NaN input the fused gradients are NaN exactly where the reference's are."""
    _compare(name, NAN, backend, torch.float64, None if reduction == "default" else reduction, grads=True,
             upstream="ramp")


@pytest.mark.parametrize("value", [INF, -INF], ids=["+inf", "-inf"])
@pytest.mark.parametrize("reduction", ["default", "none"])
@pytest.mark.parametrize("name", CASE_IDS)
def test_inf_follows_reference(backend, name, reduction, value):
    """An infinite input: the fused loss equals the reference's (same value, or NaN
    where the reference is NaN), per element for 'none'."""
    _compare(name, value, backend, torch.float32, None if reduction == "default" else reduction, grads=False)


def test_reference_inf_examples():
    """Spot values of the reference under Inf, so 'follows the reference' is anchored:
    OFD t = +inf gives +inf; t = -inf falls back to the margin (finite); s = -inf
    where t' <= 0 gives NaN (inf^2 * 0, the reference multiplies by the mask);
    ND t = +inf: the teacher wins with an infinite norm, loss 1."""
    s = torch.tensor([[[0.5, 0.0, 1.0]]])
    t = torch.tensor([[[INF, -INF, 0.0]]])
    d = kdk.reference.ofd_loss(s, t, torch.tensor([-1.0]), reduction="none")
    assert d[0, 0, 0] == INF and d[0, 0, 1] == 1.0 and d[0, 0, 2] == 1.0
    d = kdk.reference.ofd_loss(torch.tensor([[[-INF]]]), torch.tensor([[[-3.0]]]), torch.tensor([-1.0]),
                               reduction="none")
    assert torch.isnan(d).all()
    loss = kdk.reference.nd_loss(torch.ones(1, 3), torch.tensor([[INF, 0.0, 0.0]]), torch.ones(1, 3),
                                 torch.tensor([0]), reduction="none")
    assert loss.item() == 1.0
