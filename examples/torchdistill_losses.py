"""The four kdkernels losses as one torchdistill criterion, built from YAML.

``import kdkernels.integrations.torchdistill`` registers KDKOFDLoss, KDKNDLoss, KDKLSHLoss and
KDKSPLoss as torchdistill middle-level losses. This example trains a ResNet teacher (torchvision's
block layout, in-place ReLUs) on scikit-learn's bundled digits (no download), takes every
constant the losses need from it (OFD points and margins with ``kdk.taps.ofd_points``, ND class
means, LSH projection and bias), writes them to files, builds the criterion from the
``criterion:`` section of a torchdistill YAML config exactly as torchdistill's DistillationBox
does (``get_high_level_loss(config['train']['criterion'])``: a WeightedSumLoss of CE + the four
losses), checks it on one batch against the plain kdkernels losses and KDKSPLoss (p=1) against
torchdistill's own SPKDLoss, then distils a narrower student for a few epochs, in seconds on CPU.

The io_dicts (``io_dict[module_path]['output']``) are filled by ``kdk.taps.FeatureTaps``:
torchdistill's own forward hooks read a module's input or output, and an in-place ReLU overwrites
the input a hook kept, so they cannot give OFD's pre-ReLU points of a torchvision ResNet.

Needs ``pip install --no-deps torchdistill pyyaml`` (torchdistill.losses and its YAML loader import
torch, numpy and yaml alone; torchdistill.core needs torchvision and is not used).

    python examples/torchdistill_losses.py [--backend auto|reference|cpu] [--p 1|2] [--epochs N] [--teacher-epochs N]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchdistill.common.yaml_util import load_yaml_file
from torchdistill.losses.registry import get_high_level_loss, get_mid_level_loss

import kdkernels as kdk
import kdkernels.integrations.torchdistill  # noqa: F401  (registers the KDK*Loss keys)

CONFIG = """
train:
  criterion:
    key: 'WeightedSumLoss'
    kwargs:
      sub_terms:
        ce:
          criterion: {{key: 'CrossEntropyLoss', kwargs: {{reduction: 'mean'}}}}
          criterion_wrapper:
            key: 'SimpleLossWrapper'
            kwargs:
              input: {{is_from_teacher: False, module_path: '.', io: 'output'}}
              target: {{uses_label: True}}
          weight: 1.0
{ofd_terms}
        nd:
          criterion:
            key: 'KDKNDLoss'
            kwargs: {{student_output_path: 'proj', teacher_output_path: 'avgpool', centers: '{dir}/centers.pt',
                     backend: '{backend}'}}
          weight: 1.0
        lsh:
          criterion:
            key: 'KDKLSHLoss'
            kwargs: {{student_output_path: 'proj', teacher_output_path: 'avgpool', weight: '{dir}/lsh_weight.pt',
                     bias: '{dir}/lsh_bias.pt', backend: '{backend}'}}
          weight: 6.0
        sp:
          criterion:
            key: 'KDKSPLoss'
            kwargs: {{student_output_path: 'layer3', teacher_output_path: 'layer3', reduction: 'batchmean',
                     p: {p}, backend: '{backend}'}}
          weight: 100.0
"""
OFD_TERM = """        ofd{i}:
          criterion:
            key: 'KDKOFDLoss'
            kwargs: {{student_output_path: 'connector{i}', teacher_output_path: '{point}',
                     margin: '{dir}/margin{i}.pt', backend: '{backend}'}}
          weight: {weight}"""


class Block(nn.Module):
    """torchvision's BasicBlock layout: conv1 bn1 relu conv2 bn2 (+ downsample), one in-place
    ReLU module called twice, the second time on the residual sum."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        shortcut = stride != 1 or cin != cout
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) \
            if shortcut else None

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class Net(nn.Module):
    """stem, stages layer1..layer3 (8x8, 4x4, 2x2 maps), avgpool, fc: torchvision ResNet names."""

    def __init__(self, widths):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        cin = widths[0]
        for i, w in enumerate(widths):
            setattr(self, f"layer{i + 1}", nn.Sequential(Block(cin, w, 1 if i == 0 else 2), Block(w, w, 1)))
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def load_digits():
    from sklearn.datasets import load_digits as _load  # ships with scikit-learn, no download

    x, y = _load(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0, torch.tensor(y)


def write_constants(teacher, x_train, y_train, directory: Path, generator) -> list:
    """OFD margins, ND class means, LSH projection and bias from the teacher, as files."""
    points = kdk.taps.ofd_points(teacher)  # [(module path, BN before its ReLU)]
    for i, (_, bn) in enumerate(points):
        torch.save(kdk.ofd_margin_from_bn(bn), directory / f"margin{i}.pt")
    emb_tap = kdk.taps.FeatureTaps(teacher, ["avgpool"], detach=True)
    means, embeddings = kdk.ClassMeans(10, teacher.fc.in_features), []
    with torch.no_grad(), emb_tap:
        for lo in range(0, x_train.shape[0], 256):
            teacher(x_train[lo: lo + 256])
            embeddings.append(emb_tap["avgpool"].flatten(1))
            means.update(embeddings[-1], y_train[lo: lo + 256])
    torch.save(means.compute(), directory / "centers.pt")
    dim = teacher.fc.in_features
    weight = kdk.lsh_weight(4 * dim, dim, std=teacher.fc.weight.std().item(), generator=generator)
    torch.save(weight, directory / "lsh_weight.pt")
    torch.save(kdk.lsh_bias_from_teacher(weight, embeddings), directory / "lsh_bias.pt")
    return points


def io_dicts(teacher_taps, student_taps, logits, connectors, proj):
    """torchdistill's io_dict layout, {module path: {'output': tensor}}, from the taps."""
    t = {n: {"output": v} for n, v in teacher_taps.items()}
    t["avgpool"] = {"output": t["avgpool"]["output"].flatten(1)}
    s = {".": {"output": logits}, "layer3": {"output": student_taps["layer3"]},
         "proj": {"output": proj(student_taps["avgpool"].flatten(1))}}
    for i, (conn, name) in enumerate(connectors):
        s[f"connector{i}"] = {"output": conn(student_taps[name])}
    return s, t


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "triton"])
    parser.add_argument("--p", type=int, default=2, choices=[1, 2], help="SP row norm (1: torchdistill's SPKDLoss)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--teacher-epochs", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    x, y = load_digits()
    perm = torch.randperm(x.shape[0])
    x_train, y_train, x_test, y_test = x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]

    teacher, student = Net((16, 32, 64)), Net((8, 16, 32))
    opt_t = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    for _ in range(args.teacher_epochs):  # a quickly trained teacher
        for lo in range(0, 1400, 64):
            opt_t.zero_grad()
            F.cross_entropy(teacher(x_train[lo: lo + 64]), y_train[lo: lo + 64]).backward()
            opt_t.step()
    teacher.eval().requires_grad_(False)

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        points = write_constants(teacher, x_train, y_train, directory, torch.Generator().manual_seed(0))
        names = [n for n, _ in points]
        ofd_terms = "\n".join(OFD_TERM.format(i=i, point=n, dir=tmp, backend=args.backend,
                                              weight=2.0 ** -(len(names) - 1 - i) / 1000)  # the paper's stage weights
                              for i, n in enumerate(names))
        config_path = directory / "config.yaml"
        config_path.write_text(CONFIG.format(ofd_terms=ofd_terms, dir=tmp, backend=args.backend, p=args.p))
        config = load_yaml_file(str(config_path))  # torchdistill's YAML loader
        criterion = get_high_level_loss(config["train"]["criterion"])
    print(criterion)

    # student side: OFD connectors (1x1 conv + BN, student width -> teacher width), a projector for ND/LSH
    connectors = [(nn.Sequential(nn.Conv2d(student.get_submodule(n).conv2.out_channels, bn.num_features, 1, bias=False),
                                 nn.BatchNorm2d(bn.num_features)), n) for n, bn in points]
    proj = nn.Linear(student.fc.in_features, teacher.fc.in_features)
    t_taps = [kdk.taps.FeatureTaps(teacher, names, pre_relu=True, detach=True),
              kdk.taps.FeatureTaps(teacher, ["layer3", "avgpool"], detach=True)]
    s_taps = [kdk.taps.FeatureTaps(student, names, pre_relu=True), kdk.taps.FeatureTaps(student, ["layer3", "avgpool"])]

    def forward(xb):
        with torch.no_grad():
            teacher(xb)
        logits = student(xb)
        return io_dicts({**t_taps[0].features, **t_taps[1].features}, {**s_taps[0].features, **s_taps[1].features},
                        logits, connectors, proj)

    for taps in t_taps + s_taps:
        taps.start()
    # one batch: the YAML criterion against the same losses called directly
    s_io, t_io = forward(x_train[:64])
    total = criterion({"student": s_io, "teacher": t_io}, {}, y_train[:64])
    plain = F.cross_entropy(s_io["."]["output"], y_train[:64])
    for i, (_, bn) in enumerate(points):
        plain = plain + 2.0 ** -(len(names) - 1 - i) / 1000 * kdk.ofd_loss(
            s_io[f"connector{i}"]["output"], t_io[names[i]]["output"], kdk.ofd_margin_from_bn(bn), backend=args.backend)
    nd, lsh = criterion.term_dict["nd"][0].nd, criterion.term_dict["lsh"][0].lsh  # constants as loaded from the files
    s_emb, t_emb = s_io["proj"]["output"], t_io["avgpool"]["output"]
    plain = plain + kdk.nd_loss(s_emb, t_emb, nd.centers, y_train[:64], backend=args.backend)
    plain = plain + 6.0 * kdk.lsh_loss(s_emb, t_emb, lsh.weight, lsh.bias, backend=args.backend)
    plain = plain + 100.0 * kdk.sp_loss(s_io["layer3"]["output"], t_io["layer3"]["output"], p=args.p,
                                        backend=args.backend)
    print(f"criterion on one batch: torchdistill {total.item():.6g}, plain kdkernels {plain.item():.6g}")
    spkd = get_mid_level_loss({"key": "SPKDLoss", "kwargs": {
        "student_output_path": "layer3", "teacher_output_path": "layer3", "reduction": "batchmean"}})
    if args.p == 1:  # SPKDLoss's rows are L1-normalised: p=1 is it exactly
        ours = criterion.term_dict["sp"][0](s_io, t_io).item()
        print(f"SP on one batch: kdkernels {ours:.6g}, torchdistill SPKDLoss {spkd(s_io, t_io).item():.6g} (p=1)")

    params = [*student.parameters(), *proj.parameters()] + [p for conn, _ in connectors for p in conn.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        student.train()
        for lo in range(0, 1400, 64):
            s_io, t_io = forward(x_train[lo: lo + 64])
            loss = criterion({"student": s_io, "teacher": t_io}, {}, y_train[lo: lo + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
        student.eval()
        with torch.no_grad():
            acc = (student(x_test).argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch}: loss {loss.item():.4f}, student test accuracy {acc:.2%}")
    for taps in t_taps + s_taps:
        taps.stop()
    print(f"{args.epochs} epochs in {time.perf_counter() - start:.2f} s (backend={args.backend})")
    return acc


if __name__ == "__main__":
    main()
