"""Accuracy parity of the fused kdkernels backends on real data (issues #5, #11).

scikit-learn's bundled digits (1,797 8x8 images, nothing downloaded), a fixed
stratified train/test split, a teacher CNN (trained once, cached under --out)
and a smaller student CNN. For each distillation method and each of several
seeds (student initialisation, data order, dropout) the student is trained
twice: once with ``backend='reference'`` (eager PyTorch) and once with the
fused backend (``--backend``, default 'auto': the C++ kernels for CPU tensors,
Triton for CUDA). Parity is decided on what the kernels control:

1. kernel accuracy along every reference run: at each of the first 50 steps and
   every 10th step after, the distillation term and its gradient with respect
   to every trainable parameter (student and method extras) are computed by
   both backends on the reference run's own inputs (same batch, same dropout
   mask, BN statistics restored); the largest relative difference of the term
   and of the gradient (norm-wise) must be <= 1e-5. LSH's teacher bits are
   given to both backends as the same packed codes (computed in float64) in
   this check: the published bias (minus the median projection) puts one
   training sample of every hash function exactly on the threshold h_t = 0,
   where the bit is decided by the GEMM's rounding, not by the kernel;
2. accuracy parity over the seeds: |mean fused acc - mean reference acc| <=
   max(0.5 pp, 2 standard errors of that difference), with the standard error
   from the per-seed spread of both sets of runs.

The step-by-step difference of the two runs' total losses (the trajectories)
is still measured, printed and plotted, but not gated: it is not a property of
the kernels. Training is chaotic and LSH's targets are discontinuous, so a
rounding-sized difference (another GEMM engine, summation order or CPU) can
grow into a visible drift (seen: 3.6e-3 by step 50 for LSH on an AVX2 CPU,
1.6e-3 at step 49 for ND in the full run, and the reference against itself
with 1e-7 gradient noise).

The script exits 1 when a method fails parity; a method whose fused kernel is
not written yet (NotImplementedError) is reported as "not implemented" and
also fails the run (exit 2) unless --allow-missing.

Students: SGD (lr 0.02, momentum 0.9, nesterov, wd 5e-4, cosine), batch 64, 5
epochs and 3 seeds (--quick) or 30 epochs and 5 seeds. Recipes (each paper's,
scaled down to digits):
  lsh  CE + 6 * LSH; frozen Gaussian projection (std of the teacher classifier's
       weight), N = 4 D, bias = -median of the teacher projections over the
       training set, a Linear on the student feature (widths differ).
  nd   CE + KD(T=4) * min(1, epoch / warmup) + 2 * ND; teacher class means over
       the training set; projector (BN1d, Dropout 0.5, Linear) for the ND term.
  ofd  CE + scale * sum_i 2^-(n-1-i) * OFD_i (batchmean) over the n pre-ReLU
       stage outputs; margins from the teacher BNs, 1x1 conv + BN connectors.
  sp   CE + 100 * SP on the last stage output (post-ReLU, before pooling);
       the paper's 3000 makes this tiny student chaotic (see SP_BETA).

Outputs in --out: results.json, loss_curves.png, accuracy.png, teacher.pt.

    python examples/distill_digits.py --quick --out out/digits
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import kdkernels as kdk

METHODS = ("lsh", "nd", "ofd", "sp")
ACC_TOL_PP = 0.5  # percentage points: the floor of the accuracy criterion
ACC_TOL_SE = 2.0  # ... which is otherwise this many standard errors of the mean difference
KERNEL_TOL = 1e-5  # relative: the fused term and its gradient on the reference run's inputs
LOSS_STEPS = 50  # every one of the first LOSS_STEPS steps is checked ...
CHECK_EVERY = 10  # ... and every CHECK_EVERY-th step after them
SEEDS_QUICK, SEEDS_FULL = 3, 5
SEED = 0
# Student SGD learning rate. At 0.05 this tiny student's training is chaotic
# (edge of stability): two runs whose losses differ by one fp32 rounding
# (1e-7) drift apart by 1e-2 within 20-40 steps whatever computes the loss, so
# the 1e-3 per-step criterion would measure the dynamics, not the kernels.
# At 0.02 the reference and fused runs stay within ~1e-6 over whole runs.
STUDENT_LR = 0.02
TEACHER_WIDTHS = (16, 32, 64)
STUDENT_WIDTHS = (4, 8, 16)
LSH_BETA, ND_WEIGHT, KD_WEIGHT, KD_T = 6.0, 2.0, 1.0, 4.0
# SP: with the paper's 3000 (and still 1000 or 300) this tiny student's training
# is chaotic: scaling the reference SP loss by (1 + 2^-23) moves the total loss
# by 4e-3 within 25-35 steps, the reference against itself. At 100 the first 50
# steps stay within 3e-7 (later steps of the 30-epoch run drift again: the full
# run's accuracy parity is then statistical, not step by step).
SP_BETA = 100.0
# OFD's CIFAR total scale is 1e-3 for ~65k-element maps per sample; the digits
# maps are ~30x smaller, so the same relative strength needs ~30x more.
OFD_SCALE = 3e-2


# --------------------------------------------------------------------------- data
def load_data(test_size: float = 0.3):
    """Fixed stratified split of sklearn's digits: (x_train, y_train, x_test, y_test), x [n, 1, 8, 8] in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, stratify=y, random_state=SEED)
    mean, std = x_tr.mean(), x_tr.std()
    norm = lambda a: torch.from_numpy((a - mean) / std).unsqueeze(1)  # noqa: E731
    return norm(x_tr), torch.from_numpy(y_tr), norm(x_te), torch.from_numpy(y_te)


def batches(n: int, batch_size: int, epoch: int, seed: int = SEED):
    """Deterministic shuffled index batches for one epoch (same order for every run)."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(n, generator=g)
    for i in range(0, n - batch_size + 1, batch_size):  # drop the ragged last batch (BN stats)
        yield perm[i:i + batch_size]


# --------------------------------------------------------------------------- models
def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class Stage(nn.Module):
    """conv-BN-ReLU-conv-BN (the pre-ReLU point OFD distils), then ReLU outside."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, 1)
        self.short = conv_bn(cin, cout, 1, stride) if (stride != 1 or cin != cout) else nn.Identity()

    @property
    def bn(self) -> nn.BatchNorm2d:  # the BN right before the distilled ReLU
        return self.conv2[1]

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x))) + self.short(x)  # pre-ReLU


class Net(nn.Module):
    """Three residual stages (8x8, 4x4, 2x2), global average pool, linear classifier.

    forward -> dict(pre=[pre-ReLU stage outputs], last=post-ReLU last stage map,
    feat=pooled penultimate feature, logits).
    """

    def __init__(self, widths=(32, 64, 128), num_classes: int = 10):
        super().__init__()
        self.widths = tuple(widths)
        self.stem = nn.Sequential(conv_bn(1, widths[0]), nn.ReLU())
        strides = (1, 2, 2)
        cins = (widths[0],) + tuple(widths[:-1])
        self.stages = nn.ModuleList(Stage(ci, co, s) for ci, co, s in zip(cins, widths, strides))
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        pre = []
        x = self.stem(x)
        for stage in self.stages:
            p = stage(x)
            pre.append(p)
            x = F.relu(p)
        feat = x.mean((2, 3))
        return {"pre": pre, "last": x, "feat": feat, "logits": self.fc(feat)}


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i:i + 256])["logits"].argmax(1) for i in range(0, len(x), 256)])
    return float((pred == y).float().mean()) * 100.0


def make_optimizer(params, lr: float, steps: int, warmup: int = 0):
    """SGD (momentum 0.9, nesterov, wd 5e-4), linear warm-up over ``warmup`` steps, then cosine."""
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)

    def factor(i):
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(i - warmup, steps - warmup) / max(1, steps - warmup)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def progress(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr,
                    disable=not sys.stderr.isatty())
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, *_):
                pass

            def set_postfix(self, **_):
                pass

            def close(self):
                pass

        return _Null()


# --------------------------------------------------------------------------- teacher
def train_teacher(data, epochs: int, batch_size: int, cache: str) -> nn.Module:
    x_tr, y_tr, _, _ = data
    key = {"widths": list(TEACHER_WIDTHS), "epochs": epochs, "batch_size": batch_size, "seed": SEED,
           "torch": torch.__version__}
    teacher = Net(TEACHER_WIDTHS)
    if os.path.exists(cache):
        blob = torch.load(cache, map_location="cpu", weights_only=False)
        if blob.get("key") == key:
            teacher.load_state_dict(blob["state_dict"])
            return teacher.eval()
    torch.manual_seed(SEED)
    teacher = Net(TEACHER_WIDTHS)
    steps = epochs * (len(x_tr) // batch_size)
    opt, sched = make_optimizer(teacher.parameters(), 0.1, steps)
    bar = progress(steps, "teacher")
    for epoch in range(epochs):
        teacher.train()
        for idx in batches(len(x_tr), batch_size, epoch, seed=SEED + 7):
            loss = F.cross_entropy(teacher(x_tr[idx])["logits"], y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
    torch.save({"key": key, "state_dict": teacher.state_dict()}, cache)
    return teacher.eval()


# --------------------------------------------------------------------------- methods
class Method(nn.Module):
    """Trainable extras of a method (connectors, projectors) + its distillation term."""

    name = "ce"

    def __init__(self, teacher: nn.Module, data, backend: str):
        super().__init__()
        self.backend = backend

    def distill(self, out_s: dict, out_t: dict, y: torch.Tensor, epoch: int, **loss_kwargs) -> torch.Tensor:
        return out_s["logits"].new_zeros(())

    def check_kwargs(self, out_t: dict) -> dict:
        """Keyword arguments for the loss in the kernel-accuracy check (the same for both backends)."""
        return {}


class LSHMethod(Method):
    name = "lsh"

    def __init__(self, teacher, data, backend):
        super().__init__(teacher, data, backend)
        d_t = teacher.widths[-1]
        std = float(teacher.fc.weight.detach().std())
        g = torch.Generator().manual_seed(SEED + 11)
        weight = kdk.lsh_weight(4 * d_t, d_t, std, generator=g)  # N = 4 D
        x_tr = data[0]
        with torch.no_grad():
            feats = (teacher(x_tr[i:i + 256])["feat"] for i in range(0, len(x_tr), 256))
            bias = kdk.lsh_bias_from_teacher(weight, feats)
        self.loss = kdk.LSHLoss(weight, bias, backend=backend)
        self.proj = nn.Linear(STUDENT_WIDTHS[-1], d_t)

    def distill(self, out_s, out_t, y, epoch, **loss_kwargs):
        return LSH_BETA * self.loss(self.proj(out_s["feat"]), out_t["feat"], **loss_kwargs)

    def check_kwargs(self, out_t):
        # The teacher bits in float64: the median bias puts samples on h_t = 0, where a
        # float32 bit is decided by the GEMM's rounding (see the module docstring).
        f_t = out_t["feat"].double()
        return {"teacher_codes": kdk.lsh_codes(f_t, self.loss.weight.double(), self.loss.bias.double())}


class NDMethod(Method):
    name = "nd"

    def __init__(self, teacher, data, backend, warmup: int = 1):
        super().__init__(teacher, data, backend)
        x_tr, y_tr = data[0], data[1]
        d_t = teacher.widths[-1]
        with torch.no_grad():
            meter = kdk.ClassMeans(10, d_t)
            for i in range(0, len(x_tr), 256):
                meter.update(teacher(x_tr[i:i + 256])["feat"], y_tr[i:i + 256])
            centers = meter.compute()
        self.loss = kdk.NDLoss(centers, backend=backend)
        d_s = STUDENT_WIDTHS[-1]
        self.proj = nn.Sequential(nn.BatchNorm1d(d_s), nn.Dropout(0.5), nn.Linear(d_s, d_t))
        self.warmup = warmup

    def distill(self, out_s, out_t, y, epoch, **loss_kwargs):
        kd = F.kl_div(F.log_softmax(out_s["logits"] / KD_T, 1), F.softmax(out_t["logits"] / KD_T, 1),
                      reduction="batchmean") * KD_T ** 2
        return KD_WEIGHT * min(1.0, (epoch + 1) / self.warmup) * kd + ND_WEIGHT * self.loss(
            self.proj(out_s["feat"]), out_t["feat"], y)


class OFDMethod(Method):
    name = "ofd"

    def __init__(self, teacher, data, backend):
        super().__init__(teacher, data, backend)
        self.connectors = nn.ModuleList(conv_bn(cs, ct, 1) for cs, ct in zip(STUDENT_WIDTHS, teacher.widths))
        self.losses = nn.ModuleList(kdk.OFDLoss(kdk.ofd_margin_from_bn(st.bn), backend=backend)
                                    for st in teacher.stages)
        n = len(self.losses)
        self.stage_weights = [2.0 ** -(n - 1 - i) for i in range(n)]

    def distill(self, out_s, out_t, y, epoch, **loss_kwargs):
        total = 0.0
        for w, conn, loss, s, t in zip(self.stage_weights, self.connectors, self.losses, out_s["pre"], out_t["pre"]):
            total = total + w * loss(conn(s), t)
        return OFD_SCALE * total


class SPMethod(Method):
    name = "sp"

    def __init__(self, teacher, data, backend):
        super().__init__(teacher, data, backend)
        self.loss = kdk.SPLoss(backend=backend)

    def distill(self, out_s, out_t, y, epoch, **loss_kwargs):
        return SP_BETA * self.loss(out_s["last"], out_t["last"])


METHOD_CLASSES = {"lsh": LSHMethod, "nd": NDMethod, "ofd": OFDMethod, "sp": SPMethod}


# --------------------------------------------------------------------------- student training
@torch.no_grad()
def teacher_outputs(teacher: nn.Module, x: torch.Tensor) -> dict:
    """The (eval-mode, frozen) teacher's outputs over the whole training set, computed once."""
    teacher.eval()
    outs = [teacher(x[i:i + 256]) for i in range(0, len(x), 256)]
    return {"pre": [torch.cat([o["pre"][k] for o in outs]) for k in range(len(outs[0]["pre"]))],
            **{key: torch.cat([o[key] for o in outs]) for key in ("last", "feat", "logits")}}


def teacher_outputs_at(out: dict, idx: torch.Tensor) -> dict:
    return {"pre": [p[idx] for p in out["pre"]], **{k: out[k][idx] for k in ("last", "feat", "logits")}}


def train_student(data, teacher: Optional[nn.Module], method: Optional[str], backend: str, epochs: int,
                  batch_size: int, desc: str, lr: float = STUDENT_LR, seed: int = 0,
                  max_steps: Optional[int] = None, check_backend: Optional[str] = None) -> dict:
    """Train a fresh student. ``seed`` fixes its initialisation, the data order and the
    dropout stream, so two calls with the same seed differ only in the loss backend.
    Returns acc, per-step total losses, seconds and ``checks``.

    ``check_backend``: at the checked steps (the first LOSS_STEPS, then every
    CHECK_EVERY-th), compare the distillation term and its parameter gradient
    computed by ``check_backend`` and by the reference on this run's very same
    inputs (see kernel_check); the run itself is not changed by the check."""
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(SEED + 1 + 1000 * seed)
    student = Net(STUDENT_WIDTHS)
    extra = None
    if method is not None:
        kwargs = {"warmup": max(1, round(epochs / 12))} if method == "nd" else {}
        extra = METHOD_CLASSES[method](teacher, data, backend, **kwargs)
    params = list(student.parameters()) + (list(extra.parameters()) if extra is not None else [])
    steps = epochs * (len(x_tr) // batch_size)
    opt, sched = make_optimizer(params, lr, steps)
    teacher_out = teacher_outputs(teacher, x_tr) if extra is not None else None
    losses: List[float] = []
    checks: List[dict] = []
    bar = progress(min(steps, max_steps or steps), desc)
    torch.manual_seed(SEED + 2 + 1000 * seed)  # dropout etc.: the same stream in every run of this seed
    start = time.perf_counter()
    for epoch in range(epochs):
        student.train()
        if extra is not None:
            extra.train()
        for idx in batches(len(x_tr), batch_size, epoch, seed=SEED + seed):
            x, y = x_tr[idx], y_tr[idx]
            out_s = student(x)
            loss = F.cross_entropy(out_s["logits"], y)
            if extra is not None:
                out_t = teacher_outputs_at(teacher_out, idx)
                step = len(losses)
                if check_backend is not None and (step < LOSS_STEPS or step % CHECK_EVERY == 0):
                    checks.append(dict(step=step, **kernel_check(extra, check_backend, backend, params, loss,
                                                                 out_s, out_t, y, epoch)))
                loss = loss + extra.distill(out_s, out_t, y, epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            if len(losses) % 10 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if max_steps is not None and len(losses) >= max_steps:
                break
        if max_steps is not None and len(losses) >= max_steps:
            break
    seconds = time.perf_counter() - start
    bar.close()
    return {"acc": accuracy(student, x_te, y_te), "losses": losses, "seconds": seconds, "checks": checks}


def _set_loss_backend(extra: nn.Module, backend: str) -> None:
    for m in extra.modules():
        if isinstance(m, (kdk.LSHLoss, kdk.NDLoss, kdk.OFDLoss, kdk.SPLoss)):
            m.backend = backend


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (inf when either is not finite)."""
    a, b = a.double(), b.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def kernel_check(extra: nn.Module, fused: str, run_backend: str, params: List[nn.Parameter],
                 ce: torch.Tensor, out_s: dict, out_t: dict, y: torch.Tensor, epoch: int) -> dict:
    """The distillation term and its gradient w.r.t. ``params``, computed by the ``fused``
    backend and by the reference on the same inputs (same dropout mask, BN statistics
    restored, for LSH the same teacher bits).

    Returns the relative differences from the reference of the term (``term``), of
    the flattened gradient (``grad``, norm-wise) and of the total loss CE + term
    (``total``); ``None`` values when the fused kernel is not written
    (NotImplementedError). Leaves the RNG stream, every buffer of ``extra`` and its
    losses' backend (``run_backend``) as they were."""
    rng = torch.get_rng_state()
    buffers = [b.clone() for b in extra.buffers()]
    kwargs = extra.check_kwargs(out_t)
    results = {}
    try:
        for name in ("reference", fused):
            torch.set_rng_state(rng)
            _set_loss_backend(extra, name)
            term = extra.distill(out_s, out_t, y, epoch, **kwargs)
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                              for g, p in zip(grads, params)])
            results[name] = (term.detach(), flat)
            for b, saved in zip(extra.buffers(), buffers):
                b.copy_(saved)
    except NotImplementedError:
        return {"term": None, "grad": None, "total": None}
    finally:
        _set_loss_backend(extra, run_backend)
        torch.set_rng_state(rng)
    (t_ref, g_ref), (t_kdk, g_kdk) = results["reference"], results[fused]
    return {"term": _rel(t_kdk, t_ref), "grad": _rel(g_kdk, g_ref),
            "total": _rel(ce.detach() + t_kdk, ce.detach() + t_ref)}


def rel_diffs(a: List[float], b: List[float]) -> List[float]:
    """Per-step |a - b| / |a| of two loss trajectories (inf where either is not finite)."""
    return [abs(x - y) / max(abs(x), 1e-12) if math.isfinite(x) and math.isfinite(y) else float("inf")
            for x, y in zip(a, b)]


def max_rel_diff(a: List[float], b: List[float], steps: int = LOSS_STEPS) -> float:
    return max(rel_diffs(a[:steps], b[:steps]), default=0.0)


def mean_sd(values: List[float]):
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def accuracy_tolerance(ref_accs: List[float], kdk_accs: List[float]) -> float:
    """max(ACC_TOL_PP, ACC_TOL_SE standard errors of the difference of the two means)."""
    n = len(ref_accs)
    se = math.sqrt((mean_sd(ref_accs)[1] ** 2 + mean_sd(kdk_accs)[1] ** 2) / n)
    return max(ACC_TOL_PP, ACC_TOL_SE * se)


def worst(checks: List[dict], key: str) -> Optional[float]:
    vals = [c[key] for c in checks if c[key] is not None]
    return max(vals) if vals else None


# --------------------------------------------------------------------------- one method
def compare_method(name: str, data, teacher, fused: str, epochs: int, batch_size: int, lr: float,
                   seeds: int) -> dict:
    """Reference and fused runs of one method over ``seeds`` seeds; the entry for results.json
    (with ``curves`` for the plots, removed before saving)."""
    ref_runs, kdk_runs, checks = [], [], []
    entry = {"backend": fused, "seeds": seeds}
    for seed in range(seeds):
        ref = train_student(data, teacher, name, "reference", epochs, batch_size, f"{name} reference s{seed}", lr,
                            seed=seed, check_backend=fused)
        ref_runs.append(ref)
        checks += [dict(c, seed=seed) for c in ref["checks"]]
        if any(c["term"] is None for c in ref["checks"]):
            break
        kdk_runs.append(train_student(data, teacher, name, fused, epochs, batch_size, f"{name} {fused} s{seed}",
                                      lr, seed=seed))
    ref_accs = [r["acc"] for r in ref_runs]
    entry.update(reference_accs=ref_accs, reference_acc=mean_sd(ref_accs)[0], reference_acc_sd=mean_sd(ref_accs)[1],
                 seconds_reference=sum(r["seconds"] for r in ref_runs),
                 curves={"reference": ref_runs[0]["losses"]})
    if len(kdk_runs) < seeds:
        entry.update(status="not implemented", kdkernels_acc=None, kdkernels_accs=[], max_rel_loss_diff_50=None,
                     max_rel_loss_diff_same_inputs_50=None, seconds_kdkernels=None, kernel_check=None,
                     error=f"backend {fused!r} raised NotImplementedError for {name}")
        return entry
    kdk_accs = [r["acc"] for r in kdk_runs]
    early = [c for c in checks if c["step"] < LOSS_STEPS]
    kernel = {"steps_checked": len(checks), "max_rel_term_diff": worst(checks, "term"),
              "max_rel_grad_diff": worst(checks, "grad"), "tolerance": KERNEL_TOL,
              "worst_grad_step": max(checks, key=lambda c: c["grad"])["step"] if checks else None}
    trajectories = [max_rel_diff(r["losses"], k["losses"]) for r, k in zip(ref_runs, kdk_runs)]
    acc_diff = mean_sd(kdk_accs)[0] - mean_sd(ref_accs)[0]
    acc_tol = accuracy_tolerance(ref_accs, kdk_accs)
    kernel_ok = all(c["term"] <= KERNEL_TOL and c["grad"] <= KERNEL_TOL for c in checks)
    acc_ok = abs(acc_diff) <= acc_tol + 1e-9
    entry.update(kdkernels_accs=kdk_accs, kdkernels_acc=mean_sd(kdk_accs)[0], kdkernels_acc_sd=mean_sd(kdk_accs)[1],
                 acc_diff_pp=acc_diff, acc_tol_pp=acc_tol, kernel_check=kernel,
                 max_rel_loss_diff_same_inputs_50=worst(early, "total"),
                 max_rel_loss_diff_50=max(trajectories), max_rel_loss_diff_50_per_seed=trajectories,
                 seconds_kdkernels=sum(k["seconds"] for k in kdk_runs),
                 status="ok" if kernel_ok and acc_ok else "parity failed",
                 failed=[what for what, ok in (("kernel accuracy", kernel_ok), ("accuracy", acc_ok)) if not ok])
    entry["curves"].update(kdkernels=kdk_runs[0]["losses"],
                           trajectory=[rel_diffs(r["losses"], k["losses"]) for r, k in zip(ref_runs, kdk_runs)],
                           checks=checks)
    return entry


# --------------------------------------------------------------------------- plots
def plot(out: str, results: dict, curves: Dict[str, dict]) -> None:
    """loss_curves.png: per method the total loss of seed 0 (top) and, below, the trajectory
    difference per seed (not gated) with the kernel-accuracy checks (gated at KERNEL_TOL);
    accuracy.png: mean test accuracy per method and backend, with the seeds' spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves)
    cols = max(1, len(names))
    fig, axes = plt.subplots(2, cols, figsize=(4.2 * cols, 6.4), squeeze=False)
    for col, name in enumerate(names):
        top, bottom = axes[0][col], axes[1][col]
        c = curves[name]
        top.plot(c["reference"], label="reference", lw=2.2, alpha=0.6)
        if c.get("kdkernels"):
            top.plot(c["kdkernels"], label="kdkernels", lw=1.0, ls="--")
        top.set_title(f"{name}: total loss per step (seed 0)")
        top.set_yscale("log")
        top.legend()
        for seed, diffs in enumerate(c.get("trajectory", [])):
            bottom.plot([max(d, 1e-10) for d in diffs], lw=0.8, alpha=0.7,
                        label="trajectories (not gated)" if seed == 0 else None)
        checks = c.get("checks", [])
        for key, marker in (("term", "o"), ("grad", "x")):
            pts = [(ch["step"], max(ch[key], 1e-10)) for ch in checks if ch[key] is not None]
            if pts:
                bottom.scatter(*zip(*pts), s=6, marker=marker, label=f"kernel check: {key}")
        bottom.axhline(KERNEL_TOL, color="r", lw=0.8, ls=":", label=f"gate {KERNEL_TOL:g}")
        bottom.set_yscale("log")
        bottom.set_xlabel("step")
        bottom.set_title(f"{name}: relative difference")
        bottom.legend(fontsize=6)
    if not names:
        axes[0][0].set_axis_off()
        axes[1][0].set_axis_off()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_curves.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 4.5, 3.6))
    xs = np.arange(len(names))
    methods = results["methods"]
    for shift, key, label in ((-0.2, "reference", "reference"), (0.2, "kdkernels", "kdkernels")):
        means = [methods[n].get(f"{key}_acc") or 0.0 for n in names]
        sds = [methods[n].get(f"{key}_acc_sd") or 0.0 for n in names]
        ax.bar(xs + shift, means, 0.4, yerr=sds, capsize=3, label=f"{label} (mean, sd over seeds)")
    ax.axhline(results["teacher_acc"], color="k", ls="--", lw=1, label="teacher")
    ax.axhline(results["student_acc"], color="gray", ls=":", lw=1, label="student (CE only)")
    ax.set_xticks(xs, names)
    ax.set_ylabel("test accuracy (%)")
    accs = [a for n in names for a in methods[n].get("reference_accs", []) + methods[n].get("kdkernels_accs", [])]
    ax.set_ylim(max(0, min([results["student_acc"]] + accs) - 3), 100)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy.png"), dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/digits", help="output folder (results.json, plots, teacher cache)")
    ap.add_argument("--quick", action="store_true", help="few epochs and seeds (< 2 min on 2 cores)")
    ap.add_argument("--backend", default="auto", choices=["auto", "cpu", "triton", "reference"],
                    help="the fused backend compared with 'reference' (default auto)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--device", default="cpu", help="torch device (cpu or cuda)")
    ap.add_argument("--epochs", type=int, default=None, help="student epochs (default 5 quick, 30 full)")
    ap.add_argument("--seeds", type=int, default=None,
                    help=f"seeds per method (default {SEEDS_QUICK} quick, {SEEDS_FULL} full)")
    ap.add_argument("--lr", type=float, default=STUDENT_LR, help=f"student learning rate (default {STUDENT_LR})")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (default 1: these models are tiny, and on a busy machine spinning "
                         "worker threads cost more than they save)")
    ap.add_argument("--allow-missing", action="store_true",
                    help="a fused kernel that is not written yet (NotImplementedError) is reported, not a failure")
    args = ap.parse_args(argv)
    seeds = args.seeds or (SEEDS_QUICK if args.quick else SEEDS_FULL)
    if seeds < 1:
        ap.error(f"--seeds: expected at least 1, got {seeds}")
    if args.threads < 1:
        ap.error(f"--threads: expected at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)

    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("distill_digits: --device cuda asked but CUDA is not available", file=sys.stderr)
        return 2
    torch.use_deterministic_algorithms(True, warn_only=True)
    batch_size = 64
    teacher_epochs = 8 if args.quick else 40
    epochs = args.epochs or (5 if args.quick else 30)

    data = [t.to(device) for t in load_data()]
    t0 = time.perf_counter()
    teacher = train_teacher([t.cpu() for t in data], teacher_epochs, batch_size,
                            os.path.join(args.out, "teacher.pt")).to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher_acc = accuracy(teacher, data[2], data[3])
    base = train_student(data, None, None, "reference", epochs, batch_size, "student (CE)", args.lr)
    results = {"teacher_acc": teacher_acc, "student_acc": base["acc"], "methods": {},
               "config": {"quick": args.quick, "backend": args.backend, "epochs": epochs, "batch_size": batch_size,
                          "lr": args.lr, "seeds": seeds,
                          "teacher_epochs": teacher_epochs, "device": str(device), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                          "kdkernels_gemm": os.environ.get("KDKERNELS_GEMM", ""),
                          "acc_tol_pp": ACC_TOL_PP, "acc_tol_se": ACC_TOL_SE, "kernel_tol": KERNEL_TOL,
                          "loss_steps": LOSS_STEPS, "check_every": CHECK_EVERY,
                          "train_size": len(data[0]), "test_size": len(data[2])}}
    curves: Dict[str, dict] = {}
    failed, missing = [], []
    for name in args.methods:
        entry = compare_method(name, data, teacher, args.backend, epochs, batch_size, args.lr, seeds)
        curves[name] = entry.pop("curves")
        results["methods"][name] = entry
        if entry["status"] == "not implemented":
            missing.append(name)
        elif entry["status"] != "ok":
            failed.append(name)
    results["passed"] = not failed and (not missing or args.allow_missing)
    results["seconds_total"] = time.perf_counter() - t0
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot(args.out, results, curves)
    print_table(results, args, epochs, seeds, len(data[0]), len(data[2]))
    if failed:
        print(f"FAILED parity: {', '.join(failed)}", file=sys.stderr)
        return 1
    if missing and not args.allow_missing:
        print(f"not implemented in backend {args.backend!r}: {', '.join(missing)} (use --allow-missing to accept)",
              file=sys.stderr)
        return 2
    return 0


def print_table(results: dict, args, epochs: int, seeds: int, n_train: int, n_test: int) -> None:
    print(f"digits: teacher {results['teacher_acc']:.2f}%  student (CE only) {results['student_acc']:.2f}%  "
          f"[{n_train} train / {n_test} test, {epochs} epochs, {seeds} seeds, fused backend {args.backend!r}, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}]")
    head = (f"{'method':<7}{'ref acc (sd)':>14}{'kdk acc (sd)':>14}{'diff pp':>9}{'tol pp':>8}"
            f"{'kernel: term':>14}{'grad':>10}{'trajectory (50)':>17}{'s ref':>8}{'s kdk':>8}  status")
    print(head)
    print("-" * len(head))
    for name, e in results["methods"].items():
        k = e.get("kernel_check") or {}
        ref = f"{fmt(e['reference_acc'])} ({fmt(e.get('reference_acc_sd'))})"
        kdk_ = f"{fmt(e['kdkernels_acc'])} ({fmt(e.get('kdkernels_acc_sd'))})" if e["kdkernels_acc"] is not None else "-"
        print(f"{name:<7}{ref:>14}{kdk_:>14}{fmt(e.get('acc_diff_pp'), '+.2f'):>9}{fmt(e.get('acc_tol_pp')):>8}"
              f"{fmt(k.get('max_rel_term_diff'), '.2e'):>14}{fmt(k.get('max_rel_grad_diff'), '.2e'):>10}"
              f"{fmt(e['max_rel_loss_diff_50'], '.2e'):>17}{fmt(e['seconds_reference'], '.1f'):>8}"
              f"{fmt(e['seconds_kdkernels'], '.1f'):>8}  {e['status']}")
    print(f"criteria: kernel (the fused term and its parameter gradient on the reference runs' own inputs, "
          f"steps < {LOSS_STEPS} and every {CHECK_EVERY}th) <= {KERNEL_TOL:g} relative; "
          f"|mean acc diff| <= max({ACC_TOL_PP} pp, {ACC_TOL_SE:g} standard errors) over {seeds} seeds; "
          f"total {results['seconds_total']:.1f}s; results in {args.out}")
    print(f"trajectory (50): largest relative difference of the two runs' total losses over the first "
          f"{LOSS_STEPS} steps, worst seed; measured, not gated (chaotic training amplifies rounding)")


if __name__ == "__main__":
    sys.exit(main())
