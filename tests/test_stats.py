"""The constants the losses need, computed from a teacher (kdkernels.stats):
OFD margins, ND class means, LSH projection and bias. Single process; the
rank-reduced versions are in test_distributed.py."""
from __future__ import annotations

import math

import pytest
import torch

import kdkernels as kdk


# --------------------------------------------------------------------------- OFD margin
def _margin_math(gamma: float, beta: float) -> float:
    """The published margin in plain float64 math (no torch)."""
    sigma, mu = abs(gamma), beta
    if sigma == 0:
        return 0.0
    tail = 0.5 * math.erfc((mu / sigma) / math.sqrt(2.0))  # Phi(-mu/sigma)
    if tail > 0.001:
        pdf = math.exp(-0.5 * (mu / sigma) ** 2) / math.sqrt(2.0 * math.pi)
        return mu - sigma * pdf / tail
    return -3.0 * sigma


@pytest.mark.parametrize("gamma, beta, expected", [
    (1.2, 0.3, -0.8563),  # spec check value
    (-1.2, 0.3, -0.8563),  # sigma = |gamma|
    (0.5, 2.0, -1.5),  # Phi(-4) < 0.001: the published fallback -3 sigma
    (0.0, 0.7, 0.0),  # gamma = 0: margin 0, no division by zero
    (0.0, -0.7, 0.0),
])
def test_ofd_margin_check_values(gamma, beta, expected):
    got = kdk.ofd_margin(torch.tensor([gamma]), torch.tensor([beta]))
    assert got.dtype == torch.float32 and got.shape == (1,)
    assert torch.isfinite(got).all()
    assert got.item() == pytest.approx(expected, abs=5e-5)


def test_ofd_margin_matches_float64_math_and_scipy():
    gen = torch.Generator().manual_seed(0)
    gamma = torch.randn(257, generator=gen, dtype=torch.float64) * 2
    beta = torch.randn(257, generator=gen, dtype=torch.float64) * 3
    gamma[:3] = torch.tensor([0.0, 1e-30, -2.0])
    beta[:3] = torch.tensor([0.4, 0.4, 2.0 * 3.0902])  # the last sits right at the 0.001 threshold
    got = kdk.ofd_margin(gamma, beta)
    assert got.dtype == torch.float32
    want = torch.tensor([_margin_math(g, b) for g, b in zip(gamma.tolist(), beta.tolist())], dtype=torch.float64)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)
    assert ((got < 0) | (gamma == 0)).all(), "E[x | x < 0] is negative"
    # the E[x | x < 0] branch against scipy's truncated normal
    stats = pytest.importorskip("scipy.stats")
    for g, b in zip(gamma.tolist()[3:40], beta.tolist()[3:40]):
        sigma = abs(g)
        if 0.5 * math.erfc((b / sigma) / math.sqrt(2.0)) > 0.001:
            mean = stats.truncnorm.mean(-math.inf, (0.0 - b) / sigma, loc=b, scale=sigma)
            assert _margin_math(g, b) == pytest.approx(mean, rel=1e-9, abs=1e-12)


def test_ofd_margin_reads_inputs_in_float64_and_leaves_them():
    gamma = torch.tensor([1.2, 0.5], dtype=torch.float16, requires_grad=True)
    beta = torch.tensor([0.3, 2.0], dtype=torch.float16)
    got = kdk.ofd_margin(gamma, beta)
    assert got.dtype == torch.float32 and not got.requires_grad
    want = torch.tensor([_margin_math(g, b) for g, b in zip(gamma.tolist(), beta.tolist())])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bn_cls, shape", [(torch.nn.BatchNorm2d, (2, 6, 3, 3)), (torch.nn.BatchNorm1d, (4, 6))])
def test_ofd_margin_from_bn(bn_cls, shape):
    bn = bn_cls(6).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.2, 0.5, 0.0, -1.0, 2.0, 0.1]))
        bn.bias.copy_(torch.tensor([0.3, 2.0, 1.0, -0.5, 0.0, 0.9]))
    got = kdk.ofd_margin_from_bn(bn)
    assert got.dtype == torch.float32 and got.shape == (6,) and not got.requires_grad
    torch.testing.assert_close(got, kdk.ofd_margin(bn.weight, bn.bias), rtol=0, atol=0)
    assert got[0].item() == pytest.approx(-0.8563, abs=5e-5)
    assert got[1].item() == pytest.approx(-1.5, abs=1e-6)
    assert got[2].item() == 0.0
    # usable as the OFD margin right away
    s, t = torch.randn(shape), torch.randn(shape)
    kdk.ofd_loss(s, t, got, backend="reference")


def test_ofd_margin_bad_inputs():
    with pytest.raises(ValueError, match="gamma"):
        kdk.ofd_margin(torch.ones(2, 3), torch.ones(3))
    with pytest.raises(TypeError, match="gamma"):
        kdk.ofd_margin(torch.ones(3, dtype=torch.int64), torch.ones(3))
    with pytest.raises(TypeError, match="beta"):
        kdk.ofd_margin(torch.ones(3), [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="beta.*\\(3,\\).*\\(4,\\)"):
        kdk.ofd_margin(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="bn"):
        kdk.ofd_margin_from_bn(torch.nn.BatchNorm2d(4, affine=False))
    with pytest.raises(ValueError, match="bn"):
        kdk.ofd_margin_from_bn(torch.nn.ReLU())


# --------------------------------------------------------------------------- class means
def _means_loop(features, labels, num_classes):
    out = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
    for k in range(num_classes):
        rows = [features[i].double() for i in range(features.shape[0]) if int(labels[i]) == k]
        out[k] = torch.stack(rows).sum(0) / len(rows)
    return out.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_class_means_vs_loop(dtype):
    gen = torch.Generator().manual_seed(1)
    feats = (torch.randn(41, 7, generator=gen) * 3 + 1).to(dtype)
    labels = torch.randint(0, 5, (41,), generator=gen)
    labels[:5] = torch.arange(5)
    got = kdk.class_means(feats, labels, 5)
    assert got.dtype == torch.float32 and got.shape == (5, 7)
    torch.testing.assert_close(got, _means_loop(feats, labels, 5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.uint8])
def test_class_means_streaming_equals_one_shot(label_dtype):
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(100, 6, generator=gen)
    labels = (torch.arange(100) % 10).to(label_dtype)
    one_shot = kdk.class_means(feats, labels, 10)
    acc = kdk.ClassMeans(10, 6)
    for lo in range(0, 100, 17):  # uneven chunks, as a DataLoader's last batch
        assert acc.update(feats[lo: lo + 17], labels[lo: lo + 17]) is acc
    torch.testing.assert_close(acc.compute(), one_shot, rtol=1e-6, atol=1e-7)
    # compute() does not consume the state: more data can follow
    acc.update(feats[:1], labels[:1])
    assert not torch.equal(acc.compute()[0], one_shot[0])


def test_class_means_detaches_and_ignores_grad_mode():
    feats = torch.randn(6, 3, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    got = kdk.class_means(feats, labels, 3)
    assert not got.requires_grad
    torch.testing.assert_close(got, _means_loop(feats.detach(), labels, 3), rtol=1e-6, atol=1e-7)


def test_class_means_bad_inputs():
    feats, labels = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 2, 2])
    with pytest.raises(ValueError, match=r"class\(es\) \[3\] have no sample"):
        kdk.class_means(feats, labels, 4)
    with pytest.raises(ValueError, match="labels.*\\[0, 2\\).*2"):
        kdk.class_means(feats, labels, 2)
    with pytest.raises(ValueError, match="labels"):
        kdk.class_means(feats, torch.tensor([0, -1, 0, 1, 2, 2]), 3)
    with pytest.raises(TypeError, match="labels"):
        kdk.class_means(feats, labels.float(), 3)
    with pytest.raises(ValueError, match="labels"):
        kdk.class_means(feats, labels[:5], 3)
    with pytest.raises(ValueError, match="features"):
        kdk.class_means(torch.randn(6), labels, 3)
    with pytest.raises(TypeError, match="features"):
        kdk.class_means(feats.long(), labels, 3)
    with pytest.raises(ValueError, match="num_classes"):
        kdk.ClassMeans(0, 3)
    with pytest.raises(ValueError, match="dim"):
        kdk.ClassMeans(3, 0)
    with pytest.raises(ValueError, match="features.*width 4"):
        kdk.ClassMeans(3, 4).update(feats, labels)
    with pytest.raises(ValueError, match="update"):
        kdk.ClassMeans(3, 3).compute()


# --------------------------------------------------------------------------- LSH
def test_lsh_weight():
    w = kdk.lsh_weight(512, 64, 0.06, generator=torch.Generator().manual_seed(0))
    assert w.shape == (512, 64) and w.dtype == torch.float32 and not w.requires_grad
    assert abs(w.std().item() - 0.06) < 0.002 and abs(w.mean().item()) < 0.002
    again = kdk.lsh_weight(512, 64, 0.06, generator=torch.Generator().manual_seed(0))
    assert torch.equal(w, again)
    assert kdk.lsh_weight(3, 2, 1.0, dtype=torch.float64).dtype == torch.float64
    for args, name in [((0, 4, 0.1), "num_hashes"), ((4, 0, 0.1), "dim"), ((4, 4, 0.0), "std"),
                       ((4, 4, float("nan")), "std")]:
        with pytest.raises(ValueError, match=name):
            kdk.lsh_weight(*args)


def test_lsh_bias_even_count_takes_lower_middle():
    weight = torch.tensor([[1.0], [-1.0]])
    feats = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    got = kdk.lsh_bias_from_teacher(weight, [feats])
    # projections [1,2,3,4] -> lower middle 2; [-1,-2,-3,-4] -> lower middle -3
    torch.testing.assert_close(got, torch.tensor([-2.0, 3.0]), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", [1 << 22, 50])
def test_lsh_bias_from_teacher_vs_torch_median(dtype, block):
    gen = torch.Generator().manual_seed(3)
    # integer-valued: every projection is exact, whatever the GEMM's blocking
    weight = torch.randint(-4, 5, (33, 5), generator=gen).to(dtype)
    feats = torch.randint(-6, 7, (20, 5), generator=gen).to(dtype)
    want = -(feats @ weight.T).median(dim=0).values
    batches = (feats[i: i + 6] for i in range(0, 20, 6))  # a one-shot generator, as a DataLoader loop
    got = kdk.lsh_bias_from_teacher(weight, batches, max_block_elements=block)
    assert got.dtype == dtype and got.shape == (33,)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # real-valued data: the same up to the GEMM's rounding
    weight = kdk.lsh_weight(64, 16, 0.06, generator=gen, dtype=dtype)
    feats = torch.randn(31, 16, generator=gen, dtype=dtype)
    got = kdk.lsh_bias_from_teacher(weight, [feats[:10], feats[10:]], max_block_elements=block)
    torch.testing.assert_close(got, -(feats @ weight.T).median(dim=0).values)


def test_lsh_bias_from_teacher_other_dtypes_and_nan():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    feats = torch.tensor([[1.0, 5.0], [float("nan"), 3.0], [2.0, 4.0]])
    got = kdk.lsh_bias_from_teacher(weight, [feats])
    assert torch.isnan(got).all()  # NaN propagates, as torch.median (NaN * 0 is NaN: every projection of that row)
    # half features with a float32 weight; a half weight comes back in half
    got = kdk.lsh_bias_from_teacher(weight, [feats[[0, 2]].half()])
    torch.testing.assert_close(got, torch.tensor([-1.0, -4.0]), rtol=0, atol=0)
    got = kdk.lsh_bias_from_teacher(weight.half(), [feats[[0, 2]]])
    assert got.dtype == torch.float16
    # teacher features that require grad are fine (no graph is kept)
    got = kdk.lsh_bias_from_teacher(weight, [feats[[0, 2]].requires_grad_()])
    assert not got.requires_grad


def test_lsh_bias_from_teacher_bad_inputs():
    weight = torch.randn(8, 4)
    with pytest.raises(ValueError, match="features_iterable: gave no features"):
        kdk.lsh_bias_from_teacher(weight, [])
    with pytest.raises(ValueError, match="features.*width 4"):
        kdk.lsh_bias_from_teacher(weight, [torch.randn(3, 5)])
    with pytest.raises(ValueError, match="features"):
        kdk.lsh_bias_from_teacher(weight, [torch.randn(3)])
    with pytest.raises(TypeError, match="features"):
        kdk.lsh_bias_from_teacher(weight, [torch.ones(3, 4, dtype=torch.int64)])
    with pytest.raises(ValueError, match="weight"):
        kdk.lsh_bias_from_teacher(torch.randn(8), [torch.randn(3, 4)])
    with pytest.raises(TypeError, match="weight"):
        kdk.lsh_bias_from_teacher(weight.long(), [torch.randn(3, 4)])


def test_lsh_bias_feeds_the_loss():
    gen = torch.Generator().manual_seed(4)
    weight = kdk.lsh_weight(32, 8, 0.06, generator=gen)
    feats = torch.randn(50, 8, generator=gen)
    bias = kdk.lsh_bias_from_teacher(weight, [feats])
    codes = kdk.lsh_codes(feats, weight, bias)
    bits = kdk.reference.unpack_lsh_codes(codes, 32, torch.float32)
    # minus the median splits every hash function's data near half and half (strict >: the median row is 0)
    frac = bits.mean(0)
    assert ((frac > 0.35) & (frac <= 0.5)).all()


def test_plain_pytorch_example_runs():
    """examples/plain_pytorch.py: the helpers above feeding the four losses in a loop."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "plain_pytorch.py"
    spec = importlib.util.spec_from_file_location("kdk_example_plain_pytorch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    acc = module.main(["--backend", "reference", "--steps", "6"])
    assert 0.0 <= acc <= 1.0
