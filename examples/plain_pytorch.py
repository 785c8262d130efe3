"""The four kdkernels losses added to an existing plain-PyTorch training loop.

A small conv teacher and a narrower conv student on generated 16x16 images
(no downloads), a few steps on CPU in seconds. The kdkernels parts are marked
``# kdk``; everything else is an ordinary loop.

    python examples/plain_pytorch.py                      # backend 'auto' (C++ kernels on CPU tensors)
    python examples/plain_pytorch.py --backend reference  # eager PyTorch references

'auto' never falls back: a backend whose kernel is missing raises.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import kdkernels as kdk

NUM_CLASSES = 10


class Net(nn.Module):
    """conv-BN-ReLU x2, pooled embedding, linear classifier. ``forward`` returns
    the logits, the embedding, the last stage's post-ReLU map and the pre-ReLU map
    of the last BN (what OFD distils)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        pre = self.bn2(self.conv2(x))  # [B, 2w, 8, 8] pre-ReLU
        fmap = F.relu(pre)
        emb = fmap.mean((2, 3))  # [B, 2w]
        return self.fc(emb), emb, fmap, pre


def make_data(n: int, gen: torch.Generator):
    """Images whose class sets a colour and a blob position: learnable in a few steps."""
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    x = 0.5 * torch.randn(n, 3, 16, 16, generator=gen)
    x[torch.arange(n), labels % 3] += 1.0
    rows, cols = (labels // 4) * 4, (labels % 4) * 4
    for i in range(n):
        x[i, :, rows[i]: rows[i] + 4, cols[i]: cols[i] + 4] += 2.0
    return x, labels


def batches(x, y, batch_size):
    for lo in range(0, x.shape[0], batch_size):
        yield x[lo: lo + batch_size], y[lo: lo + batch_size]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "triton"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x_train, y_train = make_data(512, gen)

    # an already trained teacher: here, a quick fit (frozen afterwards)
    teacher = Net(width=16)
    opt_t = torch.optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        for xb, yb in batches(x_train, y_train, 64):
            opt_t.zero_grad()
            F.cross_entropy(teacher(xb)[0], yb).backward()
            opt_t.step()
    teacher.eval().requires_grad_(False)

    # ---- kdk: constants from the teacher, one pass over the training data (eval mode)
    ofd_margin = kdk.ofd_margin_from_bn(teacher.bn2)  # [32]: E[x | x < 0] per channel
    means = kdk.ClassMeans(NUM_CLASSES, 32)  # streams, never holds every feature
    teacher_feats = []
    with torch.no_grad():
        for xb, yb in batches(x_train, y_train, 128):
            emb = teacher(xb)[1]
            means.update(emb, yb)
            teacher_feats.append(emb)
    centers = means.compute()  # [10, 32]; all-reduced under torch.distributed
    lsh_w = kdk.lsh_weight(4 * 32, 32, std=teacher.fc.weight.std().item(), generator=gen)
    lsh_b = kdk.lsh_bias_from_teacher(lsh_w, teacher_feats)  # -median per hash (the CIFAR recipe)

    # ---- the student, with the usual adapters (trainable, outside the losses)
    student = Net(width=8)  # embedding 16 < teacher's 32
    connector = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32))  # OFD: student -> teacher channels
    projector = nn.Linear(16, 32)  # LSH/ND: student embedding -> teacher width
    params = list(student.parameters()) + list(connector.parameters()) + list(projector.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)

    # ---- kdk: the four losses (modules hold their constants as buffers)
    be = args.backend
    lsh = kdk.LSHLoss(lsh_w, lsh_b, backend=be)
    nd = kdk.NDLoss(centers, backend=be)
    ofd = kdk.OFDLoss(ofd_margin, backend=be)
    sp = kdk.SPLoss(backend=be)  # SPLoss(global_batch=True) for the Gram over every rank's batch

    start = time.perf_counter()
    step = 0
    while step < args.steps:
        for xb, yb in batches(x_train, y_train, args.batch_size):
            with torch.no_grad():
                _, t_emb, t_map, t_pre = teacher(xb)
            logits, s_emb, s_map, s_pre = student(xb)
            loss_ce = F.cross_entropy(logits, yb)
            s_proj = projector(s_emb)
            loss_kd = (6.0 * lsh(s_proj, t_emb)  # kdk: beta=6 (CIFAR)
                       + 1.0 * nd(s_proj, t_emb, yb)  # kdk
                       + 1e-3 * ofd(connector(s_pre), t_pre)  # kdk: the published 1/1000 scale
                       + 3000.0 * sp(s_map, t_map))  # kdk: the published SP weight
            loss = loss_ce + loss_kd
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 10 == 0 or step == args.steps - 1:
                print(f"step {step:3d}  ce {loss_ce.item():.4f}  kd {loss_kd.item():.4f}")
            step += 1
            if step == args.steps:
                break
    with torch.no_grad():
        acc = (student(x_train)[0].argmax(1) == y_train).float().mean().item()
    print(f"backend={be}: {args.steps} steps in {time.perf_counter() - start:.2f} s, train accuracy {acc:.2%}")
    return acc


if __name__ == "__main__":
    main()
