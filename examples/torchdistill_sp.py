"""kdkernels.SPLoss as the SP loss of a torchdistill-style distillation step.

torchdistill builds its criterion from a config (``key`` + ``kwargs``) looked up
in a registry, and its mid-level losses read the outputs of named modules from
``io_dict[path]['output']`` filled by forward hooks. This example registers a
kdkernels-backed SP loss in torchdistill's own registry, builds it from the same
kind of config torchdistill's YAML holds, checks it against torchdistill's
``SPKDLoss`` (p=1 reproduces it; p=2, the default, is the paper's L2 row norm),
then trains a small student on scikit-learn's bundled digits (no download) for
a few epochs, in seconds on CPU.

Needs only ``pip install --no-deps torchdistill`` (torchdistill.losses imports
torch alone; torchdistill.core needs torchvision, so the hooks are written out
here in a few lines, as torchdistill's ForwardHookManager does).

    python examples/torchdistill_sp.py [--backend auto|reference|cpu] [--p 1|2]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from torchdistill.losses.registry import get_mid_level_loss, register_mid_level_loss

import kdkernels as kdk


@register_mid_level_loss(key="KDKSPLoss")
class KDKSPLoss(nn.Module):
    """torchdistill mid-level loss: kdkernels' fused SP on the outputs of the named modules.

    The kwargs are SPKDLoss's (student_output_path, teacher_output_path, reduction)
    plus kdkernels' p, global_batch and backend. torchdistill treats any reduction
    other than 'batchmean' as 'sum'; so does this.
    """

    def __init__(self, student_output_path, teacher_output_path, reduction="batchmean", p=2.0,
                 global_batch=False, backend="auto", **kwargs):
        super().__init__()
        self.student_output_path = student_output_path
        self.teacher_output_path = teacher_output_path
        reduction = "batchmean" if reduction == "batchmean" else "sum"
        self.sp = kdk.SPLoss(p=p, reduction=reduction, global_batch=global_batch, backend=backend)

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs):
        return self.sp(student_io_dict[self.student_output_path]["output"],
                       teacher_io_dict[self.teacher_output_path]["output"])


def hook_outputs(model: nn.Module, paths):
    """io_dict[path]['output'], filled on every forward (torchdistill's layout)."""
    io_dict = {path: {} for path in paths}
    modules = dict(model.named_modules())
    for path in paths:
        def hook(module, inputs, output, path=path):
            io_dict[path]["output"] = output
        modules[path].register_forward_hook(hook)
    return io_dict


def mlp(hidden: int, layers: int) -> nn.Sequential:
    mods, width = [], 64
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    mods.append(nn.Linear(width, 10))
    return nn.Sequential(*mods)


def load_digits():
    from sklearn.datasets import load_digits as _load  # ships with scikit-learn, no download

    x, y = _load(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    return x, torch.tensor(y)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "triton"])
    parser.add_argument("--p", type=float, default=2.0, choices=[1.0, 2.0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    x, y = load_digits()
    perm = torch.randperm(x.shape[0])
    x_train, y_train, x_test, y_test = x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]

    teacher, student = mlp(256, 3), mlp(32, 2)
    opt_t = torch.optim.Adam(teacher.parameters(), lr=1e-3)
    for _ in range(5):  # a quickly trained teacher
        for lo in range(0, 1400, 64):
            opt_t.zero_grad()
            F.cross_entropy(teacher(x_train[lo: lo + 64]), y_train[lo: lo + 64]).backward()
            opt_t.step()
    teacher.eval().requires_grad_(False)

    # the distilled layers: the last hidden ReLU of each (post-ReLU, as the paper)
    t_path, s_path = "5", "3"
    t_io, s_io = hook_outputs(teacher, [t_path]), hook_outputs(student, [s_path])
    # what torchdistill's YAML `criterion` section would hold
    criterion_config = {"key": "KDKSPLoss", "kwargs": {
        "student_output_path": s_path, "teacher_output_path": t_path, "reduction": "batchmean",
        "p": args.p, "backend": args.backend}}
    sp_loss = get_mid_level_loss(criterion_config)

    # same value as torchdistill's own SPKDLoss (p=1 as shipped; p=2 with an L2 row norm)
    spkd = get_mid_level_loss({"key": "SPKDLoss", "kwargs": {
        "student_output_path": s_path, "teacher_output_path": t_path, "reduction": "batchmean"}})
    if args.p == 2.0:
        spkd.matmul_and_normalize = lambda z: F.normalize(torch.flatten(z, 1) @ torch.flatten(z, 1).T, p=2, dim=1)
    teacher(x_train[:64]), student(x_train[:64])
    ours, theirs = sp_loss(s_io, t_io).item(), spkd(s_io, t_io).item()
    print(f"SP on one batch: kdkernels {ours:.6g}, torchdistill SPKDLoss {theirs:.6g} (p={args.p:g})")

    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        for lo in range(0, 1400, 64):
            xb, yb = x_train[lo: lo + 64], y_train[lo: lo + 64]
            with torch.no_grad():
                teacher(xb)  # fills t_io
            logits = student(xb)  # fills s_io
            loss = F.cross_entropy(logits, yb) + 3000.0 * sp_loss(s_io, t_io)  # CE + 3000 * L_SP
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = (student(x_test).argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch}: loss {loss.item():.4f}, student test accuracy {acc:.2%}")
    print(f"{args.epochs} epochs in {time.perf_counter() - start:.2f} s (backend={args.backend})")
    return acc


if __name__ == "__main__":
    main()
