"""kdkernels.taps: FeatureTaps and ofd_points on torchvision-structured models (tests/tv_models.py).

Captured values are held against a manual forward; the model's outputs, gradients and BN
statistics must be bitwise those of an untapped copy; in-place ReLUs must not be copied
around (counted at the dispatcher); stopped taps leave no hook behind; and a short OFD + ND +
LSH + SP distillation of a ResNet gives the same losses on the C++ and reference backends.
"""
from __future__ import annotations

import collections
import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import kdkernels as kdk
from kdkernels.taps import FeatureTaps, ofd_points
from tv_models import BasicBlock, Bottleneck, MobileNetV2, ResNet, WideResNet


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions: intra-op threads only add synchronisation (seconds on a busy 2-core box)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _resnet(block=BasicBlock, layers=(2, 2, 2), seed=0, **kw):
    torch.manual_seed(seed)
    model = ResNet(block, list(layers), **kw)
    for m in model.modules():  # affine params away from (1, 0), so margins differ per channel
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model


def _x(n=4, seed=1, size=12):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _manual_resnet_points(model, x):
    """Pre-ReLU sum of each stage's last block, computed without hooks or in-place ReLUs."""
    points = []
    h = torch.relu(model.bn1(model.conv1(x)))
    for stage in model.stages():
        for block in stage[:-1]:
            h = block(h)
        b = stage[-1]
        identity = h if b.downsample is None else b.downsample(h)
        out = torch.relu(b.bn1(b.conv1(h)))
        if isinstance(b, Bottleneck):
            out = torch.relu(b.bn2(b.conv2(out)))
            out = b.bn3(b.conv3(out))
        else:
            out = b.bn2(b.conv2(out))
        pre = out + identity
        points.append(pre)
        h = torch.relu(pre)
    return points


# --------------------------------------------------------------------------- captured values
@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_resnet_pre_relu_points_match_manual_forward(block):
    model = _resnet(block).eval()
    x = _x()
    points = ofd_points(model)
    assert [n for n, _ in points] == ["layer1.1", "layer2.1", "layer3.1"]
    last_bn = "bn3" if block is Bottleneck else "bn2"
    assert all(bn is getattr(model.get_submodule(n), last_bn) for n, bn in points)
    with torch.no_grad():
        want = _manual_resnet_points(model, x)
    with torch.inference_mode(), FeatureTaps(model, [n for n, _ in points], pre_relu=True) as taps:
        model(x)
        got = taps.features
    for (name, _), w in zip(points, want):
        assert (w < 0).any(), "a pre-ReLU point with no negative value could not tell pre from post ReLU"
        torch.testing.assert_close(got[name], w, rtol=0, atol=1e-6)
    # the stage's own path captures the same value (its output is the last block's ReLU output)
    with torch.no_grad(), FeatureTaps(model, ["layer2", "layer2.1.relu"], pre_relu=True) as taps:
        model(x)
        torch.testing.assert_close(taps["layer2"], want[1], rtol=0, atol=1e-6)
        # the block's ReLU module runs twice; the captured call is the last (the post-sum one)
        torch.testing.assert_close(taps["layer2.1.relu"], want[1], rtol=0, atol=1e-6)


def test_plain_taps_capture_module_outputs():
    model = _resnet().eval()
    x = _x()
    with torch.no_grad(), FeatureTaps(model, ["layer1", "layer3.0.conv1", "avgpool"]) as taps:
        logits = model(x)
        f = taps.features
        want = _manual_resnet_points(model, x)
    torch.testing.assert_close(f["layer1"], torch.relu(want[0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.fc(f["avgpool"].flatten(1)), logits, rtol=0, atol=1e-6)
    assert set(f) == {"layer1", "layer3.0.conv1", "avgpool"}


def test_wrn_points_are_the_next_bn_outputs():
    torch.manual_seed(0)
    model = WideResNet(n=2).eval()
    x = _x()
    points = ofd_points(model)
    assert [n for n, _ in points] == ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"]
    assert points[0][1] is model.block2.layer[0].bn1 and points[2][1] is model.bn1
    with torch.no_grad():
        f1 = model.block1(model.conv1(x))
        f2 = model.block2(f1)
        f3 = model.block3(f2)
        want = [model.block2.layer[0].bn1(f1), model.block3.layer[0].bn1(f2), model.bn1(f3)]
        # pre_relu=False: the in-place relu1 that follows each BN overwrites the captured output
        with FeatureTaps(model, [n for n, _ in points]) as taps:
            model(x)
            with pytest.raises(RuntimeError, match="modified in place after capture"):
                taps.features
        with FeatureTaps(model, [n for n, _ in points], pre_relu=True) as taps:
            model(x)
            got = taps.features
    for (name, _), w in zip(points, want):
        assert (w < 0).any()
        torch.testing.assert_close(got[name], w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("final_conv", [True, False])
def test_mobilenetv2_points(final_conv):
    torch.manual_seed(0)
    model = MobileNetV2(final_conv=final_conv).eval()
    x = _x(size=32)
    points = ofd_points(model)
    last = "features.10.1" if final_conv else "features.9"
    assert [n for n, _ in points] == ["features.4.conv.0.1", "features.6.conv.0.1", "features.8.conv.0.1", last]
    assert all(bn is model.get_submodule(n) for n, bn in points[:3])
    assert points[3][1] is (model.features[10][1] if final_conv else model.features[9].conv[3])
    with torch.no_grad():
        h, want = x, []
        for i, m in enumerate(model.features):
            if i in (4, 6, 8):
                want.append(m.conv[0][1](m.conv[0][0](h)))
            h = m(h)
        want.append(model.features[10][1](model.features[10][0](model.features[9](model.features[8](
            model.features[7](model.features[:7](x)))))) if final_conv else model.features(x))
        with FeatureTaps(model, [n for n, _ in points] + ["features.4.conv.0"], pre_relu=True) as taps:
            model(x)
            got = taps.features
    for (name, _), w in zip(points, want):
        torch.testing.assert_close(got[name], w, rtol=0, atol=1e-5)
    # the conv-BN-ReLU6 Sequential ends with its ReLU6 call: its input is the BN output
    assert torch.equal(got["features.4.conv.0"], got["features.4.conv.0.1"])
    margins = [kdk.ofd_margin_from_bn(bn) for _, bn in points]
    assert [m.shape[0] for m in margins] == [72, 96, 144, 64 if final_conv else 32]


def test_unknown_architecture_says_how_to_name_points():
    with pytest.raises(ValueError, match=r"by hand.*FeatureTaps\(model.*pre_relu=True.*ofd_margin_from_bn"):
        ofd_points(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))


def test_bad_names():
    model = _resnet()
    with pytest.raises(ValueError, match="names: no module 'layer9'"):
        FeatureTaps(model, ["layer9"])
    with pytest.raises(ValueError, match="names: each module path once"):
        FeatureTaps(model, ["layer1", "layer1"])
    with pytest.raises(ValueError, match="names: expected a non-empty list"):
        FeatureTaps(model, [])


# --------------------------------------------------------------------------- the model is unchanged
def _train_step(model, x, y, taps=None):
    model.zero_grad()
    torch.manual_seed(0)  # the same dropout mask
    if taps is None:
        logits = model(x)
    else:
        with taps:
            logits = model(x)
            assert taps.features
    F.cross_entropy(logits, y).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("pre_relu", [False, True])
@pytest.mark.parametrize("arch", ["resnet", "wrn", "mobilenetv2"])
def test_outputs_gradients_and_bn_stats_unchanged(arch, pre_relu):
    torch.manual_seed(0)
    model, x = {"resnet": (_resnet(), _x()), "wrn": (WideResNet(), _x()),
                "mobilenetv2": (MobileNetV2(), _x(size=32))}[arch]
    model.train()
    y = torch.arange(x.shape[0]) % 10
    tapped = copy.deepcopy(model)
    plain_names = {"resnet": ["layer1", "layer2.0", "avgpool"], "wrn": ["block1", "block2.layer.0.conv1", "fc"],
                   "mobilenetv2": ["features.3", "features.10", "classifier.1"]}[arch]
    names = [n for n, _ in ofd_points(tapped)] if pre_relu else plain_names
    want_out, want_grad = _train_step(model, x, y)
    got_out, got_grad = _train_step(tapped, x, y, FeatureTaps(tapped, names, pre_relu=pre_relu))
    assert torch.equal(got_out, want_out)
    for name in want_grad:
        assert torch.equal(got_grad[name], want_grad[name]), name
    for (name, a), (_, b) in zip(model.named_buffers(), tapped.named_buffers()):
        assert torch.equal(a, b), name
    assert all(m.inplace for m in tapped.modules() if isinstance(m, (nn.ReLU, nn.ReLU6)))


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _count_ops(model, x, taps=None):
    with torch.no_grad(), _CountOps() as counter:
        if taps is None:
            model(x)
        else:
            with taps:
                model(x)
    return counter.ops


def test_pre_relu_copies_nothing_and_runs_out_of_place_only_where_needed():
    """No clone or copy: an in-place ReLU call that would overwrite a captured value runs out of
    place (writing a fresh output instead of its input); every other ReLU stays in place."""
    model = _resnet(layers=(2, 2, 2)).eval()
    x = _x()
    plain = _count_ops(model, x)
    assert plain["relu_"] == 1 + 3 * 2 * 2 and plain["relu"] == 0  # stem + 2 calls per block
    tapped = _count_ops(model, x, FeatureTaps(model, [n for n, _ in ofd_points(model)], pre_relu=True))
    # the last block of each stage (the tapped module) runs its 2 calls out of place; 8 stay in place
    assert tapped["relu"] == 3 * 2 and tapped["relu_"] == plain["relu_"] - 3 * 2
    for op in ("clone", "copy_", "_to_copy"):
        assert tapped[op] == plain[op], op
    assert sum(tapped.values()) == sum(plain.values())
    # MobileNetV2: only the ReLU6 right after each of the 3 tapped expansion BNs and the final one
    torch.manual_seed(0)
    mnv2 = MobileNetV2().eval()
    xm = _x(size=32)
    plain = _count_ops(mnv2, xm)
    tapped = _count_ops(mnv2, xm, FeatureTaps(mnv2, [n for n, _ in ofd_points(mnv2)], pre_relu=True))
    assert tapped["hardtanh"] == plain["hardtanh"] + 4 and tapped["hardtanh_"] == plain["hardtanh_"] - 4
    for op in ("clone", "copy_", "_to_copy"):
        assert tapped[op] == plain[op], op


def test_stopped_taps_leave_no_hooks_and_capture_nothing():
    model = _resnet()
    hooks = lambda: [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]  # noqa: E731
    before = hooks()
    taps = FeatureTaps(model, [n for n, _ in ofd_points(model)], pre_relu=True)
    assert hooks() == before and not taps.active
    taps.start()
    assert hooks() != before and taps.active
    with pytest.raises(RuntimeError, match="already started"):
        taps.start()
    taps.stop()
    assert hooks() == before
    model(_x())
    assert taps.features == {}
    with pytest.raises(KeyError, match="nothing captured"):
        taps["layer1.1"]


def test_no_leak_across_steps_and_detach():
    model = _resnet().eval()
    taps = FeatureTaps(model, ["layer1", "fc"], detach=True)
    with taps:
        model(_x(seed=1))
        first = taps["layer1"]
        assert not first.requires_grad  # detached although grad mode is on
        model(_x(seed=2))
        second = taps.features
        assert not torch.equal(second["layer1"], first)
        with torch.no_grad():
            torch.testing.assert_close(second["layer1"], model.layer1(torch.relu(model.bn1(model.conv1(_x(seed=2))))))
        model.layer2(second["layer1"])  # a submodule run on its own does not start a new step
        assert set(taps.features) == {"layer1", "fc"}
        # the taps hold no reference to an earlier step's tensors
        gone = weakref.ref(second["fc"])
        del second
        model(_x(seed=3))
        assert gone() is None
    assert set(taps.pop()) == {"layer1", "fc"} and taps.features == {}
    attached = FeatureTaps(model, ["layer1"])
    with attached:
        model(_x())
        assert attached["layer1"].requires_grad


class _DiscardsReLU(nn.Module):
    """Relies on the side effect of an in-place ReLU whose result it drops."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.bn(x)
        self.relu(out)
        return out


class _FunctionalReLU(nn.Module):
    def __init__(self, inplace):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.inplace = inplace

    def forward(self, x):
        return F.relu_(self.bn(x)) if self.inplace else F.relu(self.bn(x))


def test_unsafe_patterns_raise():
    x = _x()
    model = nn.Sequential(_DiscardsReLU())
    with FeatureTaps(model, ["0"], pre_relu=True), pytest.raises(RuntimeError, match="discarded that call's result"):
        model(x)
    # an in-place functional relu after the tapped BN: detected from the version counter
    model = _FunctionalReLU(inplace=True)
    with FeatureTaps(model, ["bn"], pre_relu=True) as taps:
        model(x)
        with pytest.raises(RuntimeError, match="modified in place after capture"):
            taps["bn"]
    # a functional (out-of-place) relu inside the tapped module: hooks cannot see its input
    model = _FunctionalReLU(inplace=False)
    with FeatureTaps(model, [""], pre_relu=True), pytest.raises(RuntimeError, match="functional relu"):
        model(x)


def test_dataparallel_prefix_names():
    model = _resnet().eval()
    x = _x()
    wrapped = nn.DataParallel(model)  # on a machine without GPUs it runs the module itself
    with torch.no_grad():
        with FeatureTaps(model, ["layer2.1"], pre_relu=True) as plain:
            model(x)
        with FeatureTaps(wrapped, ["module.layer2.1", "layer3.1"], pre_relu=True) as taps:
            wrapped(x)
            f = taps.features
    assert torch.equal(f["module.layer2.1"], plain["layer2.1"])
    assert [n for n, _ in ofd_points(wrapped)] == [n for n, _ in ofd_points(model)]


# --------------------------------------------------------------------------- torch.compile
def test_under_torch_compile_fullgraph():
    """Taps started before the compiled model's first call are traced into its graph, with no graph
    break: the same features, outputs and gradients as eager (ReLU-input captures in a ResNet,
    BN-output captures in a WideResNet); after stop() the compiled model captures nothing."""
    import torch._dynamo

    torch._dynamo.reset()
    model, x, y = _resnet(layers=(1, 1)).train(), _x(), torch.arange(4)
    names = [n for n, _ in ofd_points(model)]
    taps = FeatureTaps(model, names, pre_relu=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    results = []
    for runner in (model, compiled):
        model.zero_grad()
        with taps:
            logits = runner(x)
            f = taps.features
            (F.cross_entropy(logits, y) + sum(v.square().mean() for v in f.values())).backward()
        results.append((logits.detach(), {n: v.detach() for n, v in f.items()},
                        [p.grad.clone() for p in model.parameters()]))
    (o1, f1, g1), (o2, f2, g2) = results
    torch.testing.assert_close(o2, o1)
    for n in names:
        torch.testing.assert_close(f2[n], f1[n])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a)
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    taps.clear()
    compiled(x)
    assert taps.features == {}

    torch.manual_seed(0)
    wrn = WideResNet().eval()
    with torch.no_grad(), FeatureTaps(wrn, [n for n, _ in ofd_points(wrn)], pre_relu=True) as taps:
        wrn(_x(size=8))
        want = taps.features
        torch.compile(wrn, backend="aot_eager", fullgraph=True)(_x(size=8))
        got = taps.features
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n])
    torch._dynamo.reset()


def test_torch_compile_taps_started_late():
    """torch.compile does not guard on module hooks by default, so taps started after the compiled
    model's first call are not seen (a KeyError says so) unless
    torch._dynamo.config.skip_nnmodule_hook_guards is False."""
    import torch._dynamo

    model, x = _resnet(layers=(1,)).eval(), _x()  # one stage: a small graph to compile three times
    names = [n for n, _ in ofd_points(model)]
    taps = FeatureTaps(model, names, pre_relu=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    compiled(x)
    with taps, pytest.raises(KeyError, match="skip_nnmodule_hook_guards"):
        compiled(x)
        taps[names[0]]
    old = torch._dynamo.config.skip_nnmodule_hook_guards
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    try:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        compiled(x)
        with taps:
            compiled(x)
            assert set(taps.features) == set(names)
    finally:
        torch._dynamo.config.skip_nnmodule_hook_guards = old
        torch._dynamo.reset()


# --------------------------------------------------------------------------- DDP
def _ddp_worker(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _resnet(layers=(1, 1)).train()  # the same initial weights on every rank
    plain = DDP(copy.deepcopy(model))
    tapped = DDP(model)
    x = _x(seed=10 + rank)
    y = torch.arange(4) + rank
    names = [n for n, _ in ofd_points(tapped)]
    assert names == ["layer1.0", "layer2.0"]
    taps = FeatureTaps(tapped, ["module." + names[0], names[1]], pre_relu=True)
    with taps:
        logits = tapped(x)
        f = taps.features
    want = plain(x)
    assert torch.equal(logits, want)
    F.cross_entropy(logits, y).backward()
    F.cross_entropy(want, y).backward()
    for a, b in zip(plain.parameters(), tapped.parameters()):
        assert torch.equal(a.grad, b.grad)  # DDP's all-reduce saw the same gradients
    with torch.no_grad():  # train mode: batch statistics, so the same values as the tapped forward
        manual = _manual_resnet_points(copy.deepcopy(model), x)
    torch.testing.assert_close(f["module." + names[0]].detach(), manual[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(f[names[1]].detach(), manual[1], rtol=0, atol=1e-6)


def test_under_ddp(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from test_distributed import run_ranks

    run_ranks(tmp_path, _ddp_worker)


# --------------------------------------------------------------------------- a short distillation
def _distill(backend, steps=4):
    """OFD (every stage) + ND + LSH + SP from a ResNet teacher into a narrower ResNet student."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 8, 8, generator=gen)
    y = torch.arange(64) % 10
    x[torch.arange(64), y % 3] += 1.0
    teacher = _resnet(layers=(1, 1, 1), widths=(8, 16, 32), seed=1).eval().requires_grad_(False)
    torch.manual_seed(2)
    student = ResNet(BasicBlock, [1, 1, 1], widths=(4, 8, 16))
    points = ofd_points(teacher)
    names = [n for n, _ in points]
    margins = [kdk.ofd_margin_from_bn(bn) for _, bn in points]
    connectors = nn.ModuleList(nn.Sequential(nn.Conv2d(c, bn.num_features, 1, bias=False),
                                             nn.BatchNorm2d(bn.num_features))
                               for c, (_, bn) in zip((4, 8, 16), points))
    proj = nn.Linear(16, 32)
    t_pre = FeatureTaps(teacher, names, pre_relu=True, detach=True)
    t_post = FeatureTaps(teacher, ["layer3", "avgpool"], detach=True)
    s_pre = FeatureTaps(student, names, pre_relu=True)
    s_post = FeatureTaps(student, ["layer3", "avgpool"])
    with torch.no_grad():  # the teacher constants, in one pass
        means = kdk.ClassMeans(10, 32)
        means.update(teacher.embed(x), y)
        lsh_w = kdk.lsh_weight(4 * 32, 32, std=teacher.fc.weight.std().item(),
                               generator=torch.Generator().manual_seed(3))
        lsh_b = kdk.lsh_bias_from_teacher(lsh_w, [teacher.embed(x)])
    ofd = [kdk.OFDLoss(m, backend=backend) for m in margins]
    nd, lsh = kdk.NDLoss(means.compute(), backend=backend), kdk.LSHLoss(lsh_w, lsh_b, backend=backend)
    sp = kdk.SPLoss(backend=backend)
    params = [*student.parameters(), *connectors.parameters(), *proj.parameters()]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    history = []
    with t_pre, t_post, s_pre, s_post:
        for step in range(steps):
            xb, yb = x[16 * step: 16 * step + 16], y[16 * step: 16 * step + 16]
            with torch.no_grad():
                teacher(xb)
            logits = student(xb)
            s_emb, t_emb = proj(s_post["avgpool"].flatten(1)), t_post["avgpool"].flatten(1)
            terms = torch.stack([
                sum(2.0 ** -(len(names) - 1 - i) * crit(conn(s_pre[n]), t_pre[n])
                    for i, (n, crit, conn) in enumerate(zip(names, ofd, connectors))) / 1000,
                nd(s_emb, t_emb, yb),
                lsh(s_emb, t_emb),
                sp(s_post["layer3"], t_post["layer3"]),
            ])
            loss = F.cross_entropy(logits, yb) + terms @ torch.tensor([1.0, 1.0, 6.0, 100.0])
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(terms.detach())
    return torch.stack(history), [p.detach() for p in params]


def test_short_distillation_cpu_matches_reference():
    ref_hist, ref_params = _distill("reference")
    cpu_hist, cpu_params = _distill("cpu")
    assert (ref_hist > 0).all() and not torch.equal(ref_hist[0], ref_hist[-1])
    torch.testing.assert_close(cpu_hist, ref_hist, rtol=1e-4, atol=1e-6)
    for a, b in zip(cpu_params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
