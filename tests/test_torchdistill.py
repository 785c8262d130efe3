"""kdkernels' SP loss against torchdistill's SPKDLoss, as shipped (p=1) and with its
row norm switched to L2 (p=2, the paper's).

torchdistill's ``matmul_and_normalize`` calls ``normalize(G, 1)``: 1 is the norm
order p (dim stays 1), so rows are L1-normalised. Its forward returns
``||G_t - G_s||_F^2 / b^2`` for reduction='batchmean' and the plain sum for any
other reduction string; kdkernels' 'batchmean' and 'sum' match those.

torchdistill is installed without its dependencies (``pip install --no-deps
torchdistill``): ``torchdistill.losses`` needs only torch; ``torchdistill.core``
imports torchvision and is not used here.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.functional import normalize

import kdkernels as kdk
from helpers import cpu_sp_ready, triton_sp_ready

mid_level = pytest.importorskip("torchdistill.losses.mid_level", reason="torchdistill is not installed")
registry = pytest.importorskip("torchdistill.losses.registry")
SPKDLoss = mid_level.SPKDLoss


class SPKDLossL2(SPKDLoss):
    """torchdistill's SPKDLoss with the paper's L2 row norm."""

    def matmul_and_normalize(self, z):
        z = torch.flatten(z, 1)
        return normalize(torch.matmul(z, torch.t(z)), p=2, dim=1)


# the fused backends run as soon as their SP kernel exists (skipped, not failed, before);
# Triton on CPU tensors runs under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
BACKENDS = ["reference",
            pytest.param("cpu", marks=pytest.mark.skipif(not cpu_sp_ready(),
                                                         reason="the C++ SP kernel is not built/written yet")),
            pytest.param("triton", marks=pytest.mark.skipif(not triton_sp_ready(), reason="Triton SP cannot run here"))]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-4, atol=1e-6)}


def _torchdistill(loss_cls, f_s, f_t, reduction):
    loss = loss_cls(student_output_path="layer4", teacher_output_path="layer4", reduction=reduction)
    return loss({"layer4": {"output": f_s}}, {"layer4": {"output": f_t}})


def _inputs(shape_s, shape_t, dtype, seed, zero_row=False):
    gen = torch.Generator().manual_seed(seed)
    f_s = torch.randn(shape_s, generator=gen, dtype=torch.float64).relu().to(dtype)  # post-ReLU, as published
    f_t = torch.randn(shape_t, generator=gen, dtype=torch.float64).relu().to(dtype)
    if zero_row:  # an all-zero activation row: the clamped norm (eps=1e-12) on both sides
        f_s[1] = 0
        f_t[2] = 0
    return f_s, f_t


CASES = [
    ((8, 16, 4, 4), (8, 32, 2, 2), False),  # conv maps of different widths
    ((5, 7), (5, 11), False),  # odd sizes, already flat
    ((1, 3, 2), (1, 4), False),  # one-row batch
    ((6, 10), (6, 9), True),  # zero rows
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
@pytest.mark.parametrize("p, loss_cls", [(1, SPKDLoss), (2, SPKDLossL2)], ids=["p1-as-shipped", "p2-l2-rows"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_sp_matches_torchdistill(backend, dtype, reduction, p, loss_cls, case):
    shape_s, shape_t, zero_row = CASES[case]
    f_s, f_t = _inputs(shape_s, shape_t, dtype, seed=case, zero_row=zero_row)
    # both the student and the teacher require grad: both gradients must match
    s1, t1 = f_s.clone().requires_grad_(), f_t.clone().requires_grad_()
    s2, t2 = f_s.clone().requires_grad_(), f_t.clone().requires_grad_()
    want = _torchdistill(loss_cls, s1, t1, reduction)
    kwargs = {} if p == 2 else {"p": p}  # p=2 is the default
    got = kdk.sp_loss(s2, t2, reduction=reduction, backend=backend, **kwargs)
    assert got.dtype == want.dtype and got.shape == want.shape == ()
    torch.testing.assert_close(got, want.detach(), **TOL[dtype])
    # a non-unit upstream gradient
    (1.7 * want).backward()
    (1.7 * got).backward()
    torch.testing.assert_close(s2.grad, s1.grad, **TOL[dtype])
    torch.testing.assert_close(t2.grad, t1.grad, **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sp_module_in_torchdistill_registry_style(backend):
    """SPKDLoss built from a torchdistill config dict vs kdkernels.SPLoss(p=1) on the same io_dicts."""
    td_loss = registry.get_mid_level_loss({"key": "SPKDLoss", "kwargs": {
        "student_output_path": "layer4", "teacher_output_path": "layer4", "reduction": "batchmean"}})
    f_s, f_t = _inputs((12, 8, 3, 3), (12, 16, 3, 3), torch.float64, seed=7)
    s1, s2 = f_s.clone().requires_grad_(), f_s.clone().requires_grad_()
    want = td_loss({"layer4": {"output": s1}}, {"layer4": {"output": f_t}})
    got = kdk.SPLoss(p=1, backend=backend)(s2, f_t)
    torch.testing.assert_close(got, want.detach(), **TOL[torch.float64])
    want.backward()
    got.backward()
    torch.testing.assert_close(s2.grad, s1.grad, **TOL[torch.float64])


def test_p1_and_p2_differ():
    """The two row norms are different losses (why p=1 exists at all)."""
    f_s, f_t = _inputs((6, 10), (6, 9), torch.float64, seed=3)
    assert not torch.allclose(kdk.sp_loss(f_s, f_t, p=1, backend="reference"),
                              kdk.sp_loss(f_s, f_t, p=2, backend="reference"))


def _load_example(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"kdk_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torchdistill_example_runs(capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("yaml")
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions
    try:
        acc = _load_example("torchdistill_losses").main(
            ["--backend", "reference", "--epochs", "1", "--teacher-epochs", "1", "--p", "1"])
    finally:
        torch.set_num_threads(old)
    out = capsys.readouterr().out
    ours, theirs = [float(v) for v in out.split("SP on one batch: kdkernels ")[1].split(" (p=")[0].split(
        ", torchdistill SPKDLoss ")]
    assert ours == pytest.approx(theirs, rel=1e-5)
    total, plain = [float(v) for v in out.split("criterion on one batch: torchdistill ")[1].split("\n")[0].split(
        ", plain kdkernels ")]
    assert total == pytest.approx(plain, rel=1e-5)
    assert acc > 0.3


# --------------------------------------------------------------------------- kdkernels.integrations.torchdistill
def test_import_kdkernels_does_not_import_torchdistill():
    import subprocess
    import sys

    code = ("import sys, kdkernels, kdkernels.taps, kdkernels.integrations; "
            "assert 'torchdistill' not in sys.modules, 'imported'; "
            "import kdkernels.integrations.torchdistill; assert 'torchdistill' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))


def test_integration_registers_the_four_losses():
    from kdkernels.integrations import torchdistill as integ

    for key in ("KDKLSHLoss", "KDKNDLoss", "KDKOFDLoss", "KDKSPLoss"):
        assert registry.MIDDLE_LEVEL_LOSS_DICT[key] is getattr(integ, key)
    with pytest.raises(TypeError, match="unexpected keyword argument 'margn'"):
        registry.get_mid_level_loss({"key": "KDKOFDLoss", "kwargs": {
            "student_output_path": "a", "teacher_output_path": "b", "margin": [0.0], "margn": 1}})
    with pytest.raises(ValueError, match="weight: give the projection"):
        registry.get_mid_level_loss({"key": "KDKLSHLoss", "kwargs": {"student_output_path": "a",
                                                                     "teacher_output_path": "b", "num_hashes": 8}})
    with pytest.raises(TypeError, match="margin: expected a tensor"):
        registry.get_mid_level_loss({"key": "KDKOFDLoss", "kwargs": {"student_output_path": "a",
                                                                     "teacher_output_path": "b", "margin": 1.5}})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_kdksploss_p1_is_spkdloss(backend, reduction):
    """Built from the same config, KDKSPLoss(p=1) and SPKDLoss agree in value and gradient
    (SPKDLoss sums for any reduction but 'batchmean'; so does KDKSPLoss)."""
    import kdkernels.integrations.torchdistill  # noqa: F401

    kwargs = {"student_output_path": "layer4", "teacher_output_path": "layer4", "reduction": reduction}
    theirs = registry.get_mid_level_loss({"key": "SPKDLoss", "kwargs": kwargs})
    ours = registry.get_mid_level_loss({"key": "KDKSPLoss", "kwargs": {**kwargs, "p": 1, "backend": backend}})
    f_s, f_t = _inputs((10, 8, 3, 3), (10, 16, 2, 2), torch.float64, seed=5)
    s1, s2 = f_s.clone().requires_grad_(), f_s.clone().requires_grad_()
    want = theirs({"layer4": {"output": s1}}, {"layer4": {"output": f_t}})
    got = ours({"layer4": {"output": s2}}, {"layer4": {"output": f_t}}, torch.zeros(10))
    torch.testing.assert_close(got, want.detach(), **TOL[torch.float64])
    (2.5 * want).backward()
    (2.5 * got).backward()
    torch.testing.assert_close(s2.grad, s1.grad, **TOL[torch.float64])


CRITERION_YAML = """
train:
  criterion:
    key: 'WeightedSumLoss'
    kwargs:
      sub_terms:
        ofd:
          criterion:
            key: 'KDKOFDLoss'
            kwargs: {{student_output_path: 'connector', teacher_output_path: 'layer2', margin: '{dir}/margin.pt',
                     reduction: 'batchmean', backend: '{backend}'}}
          weight: 0.001
        nd:
          criterion:
            key: 'KDKNDLoss'
            kwargs: {{student_output_path: 'proj', teacher_output_path: 'avgpool', centers: '{dir}/centers.pt',
                     backend: '{backend}'}}
          weight: 2.0
        lsh:
          criterion:
            key: 'KDKLSHLoss'
            kwargs: {{student_output_path: 'proj', teacher_output_path: 'avgpool', num_hashes: 96, dim: 24,
                     std: 0.1, seed: 3, mse_weight: 0.5, teacher_logits_path: 'fc', backend: '{backend}'}}
          weight: 6.0
        sp:
          criterion:
            key: 'KDKSPLoss'
            kwargs: {{student_output_path: 'layer2', teacher_output_path: 'layer2', reduction: 'batchmean',
                     p: 2, backend: '{backend}'}}
          weight: 3000.0
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_yaml_criterion_matches_plain_losses(backend, tmp_path):
    """The criterion: section of a torchdistill YAML config, parsed by torchdistill's loader and built
    by get_high_level_loss (as its DistillationBox does), on one batch of io_dicts, against the
    plain kdkernels calls: the same value and student gradients."""
    pytest.importorskip("yaml")
    from torchdistill.common.yaml_util import load_yaml_file
    from torchdistill.losses.high_level import WeightedSumLoss

    import kdkernels.integrations.torchdistill  # noqa: F401

    gen = torch.Generator().manual_seed(11)
    b = 12
    margin = -torch.rand(6, generator=gen, dtype=torch.float64).float()
    centers = torch.randn(5, 24, generator=gen)
    torch.save(margin, tmp_path / "margin.pt")
    torch.save(centers, tmp_path / "centers.pt")
    (tmp_path / "config.yaml").write_text(CRITERION_YAML.format(dir=tmp_path, backend=backend))
    criterion = registry.get_high_level_loss(load_yaml_file(str(tmp_path / "config.yaml"))["train"]["criterion"])
    assert isinstance(criterion, WeightedSumLoss)

    labels = torch.arange(b) % 5
    t_logits = torch.randn(b, 5, generator=gen)
    t_logits[:4, 0] += 10  # some rows the teacher gets wrong, some right
    teacher_io = {"layer2": {"output": torch.randn(b, 6, 4, 4, generator=gen)},
                  "avgpool": {"output": torch.randn(b, 24, generator=gen)}, "fc": {"output": t_logits}}
    leaves = [torch.randn(b, 6, 4, 4, generator=gen), torch.randn(b, 24, generator=gen),
              torch.randn(b, 3, 4, 4, generator=gen).relu()]

    def student_io(conn, proj, layer2):
        return {"connector": {"output": conn}, "proj": {"output": proj}, "layer2": {"output": layer2}}

    ours = [x.clone().requires_grad_() for x in leaves]
    total = criterion({"student": student_io(*ours), "teacher": teacher_io}, {}, labels)
    mine = [x.clone().requires_grad_() for x in leaves]
    weight = kdk.lsh_weight(96, 24, 0.1, generator=torch.Generator().manual_seed(3))
    mask = t_logits.argmax(1) == labels
    assert 0 < mask.sum() < b
    plain = (0.001 * kdk.ofd_loss(mine[0], teacher_io["layer2"]["output"], margin, backend=backend)
             + 2.0 * kdk.nd_loss(mine[1], teacher_io["avgpool"]["output"], centers, labels, backend=backend)
             + 6.0 * kdk.lsh_loss(mine[1], teacher_io["avgpool"]["output"], weight, torch.zeros(96), mse_weight=0.5,
                                  sample_mask=mask, backend=backend)
             + 3000.0 * kdk.sp_loss(mine[2], teacher_io["layer2"]["output"], backend=backend))
    torch.testing.assert_close(total, plain, rtol=1e-5, atol=1e-6)
    total.backward()
    plain.backward()
    for a, b_ in zip(ours, mine):
        torch.testing.assert_close(a.grad, b_.grad, rtol=1e-5, atol=1e-7)
