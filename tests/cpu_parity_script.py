"""Compact parity check of the C++ backend against the reference, run as a script
in a fresh process (tests/test_isa_dispatch.py runs it once per ATEN_CPU_CAPABILITY;
the README's qemu check runs it with --tiny):

    python tests/cpu_parity_script.py [--tiny] [--expect-isa LEVEL]

Every loss, forward and gradients, float64 / float32 / bfloat16, sizes around
the vector widths (tails), NaN inputs, OFD channels_last, LSH teacher codes and
bias, SP p=1 and p=2, and SP's triangle Gram kernel alone (it may lose the timed
choice to one GEMM inside the loss). Prints one line per
check and "ok <isa> <gemm engine>" at the end; exits non-zero on a mismatch.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's kdkernels

import torch  # noqa: E402

import kdkernels.functional as F  # noqa: E402
from kdkernels import _cpu  # noqa: E402

TOL = {torch.float64: (1e-9, 1e-11), torch.float32: (2e-4, 2e-5), torch.bfloat16: (5e-2, 5e-2)}


def run(fn, args, diff, backend, **kw):
    args = [a.detach().clone().requires_grad_(i in diff) if isinstance(a, torch.Tensor) and a.is_floating_point()
            else a for i, a in enumerate(args)]
    loss = fn(*args, backend=backend, **kw)
    grads = torch.autograd.grad(loss.sum(), [args[i] for i in diff], allow_unused=True)
    return [loss.detach()] + [g if g is not None else torch.zeros_like(args[i]) for i, g in zip(diff, grads)]


def check(name, fn, args, diff=(0, 1), **kw):
    dtype = args[0].dtype
    rtol, atol = TOL[dtype]
    got, want = run(fn, args, diff, "cpu", **kw), run(fn, args, diff, "reference", **kw)
    for what, g, w in zip(["loss"] + [f"grad{i}" for i in diff], got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"{name} {dtype} {what}: {m}")
    print("pass", name, str(dtype).replace("torch.", ""), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="a few small cases (for slow emulators)")
    ap.add_argument("--expect-isa", default=None, help="fail unless the kernels run at this ISA level")
    a = ap.parse_args()
    if a.expect_isa is not None and _cpu.CAPABILITY != a.expect_isa.upper():
        sys.exit(f"kernels run at {_cpu.CAPABILITY}, expected {a.expect_isa.upper()}")
    g = torch.Generator().manual_seed(0)
    dtypes = (torch.float32,) if a.tiny else (torch.float64, torch.float32, torch.bfloat16)

    def r(*shape, dt):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dt)

    for dt in dtypes:
        ofd_shapes = [(2, 3, 5, 7)] if a.tiny else [(2, 3, 5, 7), (3, 4, 6, 6), (2, 33, 1, 1)]
        for shape in ofd_shapes:
            s, t = r(*shape, dt=dt), r(*shape, dt=dt)
            if shape == (2, 3, 5, 7):
                t.view(-1)[::7] = float("nan")
            m = -r(shape[1], dt=dt if dt == torch.float64 else torch.float32).abs()
            check(f"ofd{list(shape)}", F.ofd_loss, [s, t, m])
            check(f"ofd{list(shape)} none", F.ofd_loss, [s, t, m], reduction="none")
            if not a.tiny:
                cl = torch.channels_last
                check(f"ofd{list(shape)} channels_last", F.ofd_loss,
                      [s.to(memory_format=cl), t.to(memory_format=cl), m])
        for B, D, C in ([(5, 19, 3)] if a.tiny else [(5, 19, 3), (9, 70, 4), (17, 300, 6)]):
            labels = torch.randint(0, C, (B,), generator=g)
            check(f"nd[{B},{D}]", F.nd_loss, [r(B, D, dt=dt), r(B, D, dt=dt), r(C, D, dt=dt), labels])
        for b, K in ([(6, 13)] if a.tiny else [(6, 13), (37, 50), (130, 21)]):
            for p in (1.0, 2.0):
                check(f"sp[{b},{K}] p={p:g}", F.sp_loss, [r(b, K, dt=dt), r(b, K + 3, dt=dt)], p=p)
        for B, D, N in ([(5, 9, 70)] if a.tiny else [(5, 9, 70), (7, 33, 200), (3, 17, 600)]):
            fs, ft, w, bias = r(B, D, dt=dt), r(B, D, dt=dt), r(N, D, dt=dt), r(N, dt=dt)
            check(f"lsh[{B},{D},{N}]", F.lsh_loss, [fs, ft, w, bias], diff=(0, 1))
            if not a.tiny:
                codes = F.lsh_codes(ft, w, bias)
                check(f"lsh[{B},{D},{N}] codes", F.lsh_loss, [fs, None, w, bias], diff=(0,), teacher_codes=codes,
                      mse_weight=0.0)
    big = [r(2, 64, 96, 96, dt=torch.float32) for _ in range(2)] + [-torch.rand(64, generator=g)]
    for n in range(2):  # >= 4 MiB outputs: from the output cache, the second time a reused block
        check(f"ofd{list(big[0].shape)} cached output, call {n + 1}", F.ofd_loss, big)
    for dt in (torch.float32, torch.float64):  # the triangle kernel: row blocks and K chunks with tails
        for b, K in ([(5, 37)] if a.tiny else [(5, 37), (14, 1100), (3, 2100)]):
            q = r(b, K, dt=dt)
            got, want = _cpu._C._gram_kernel(q), (q.double() @ q.double().t()).to(dt)
            torch.testing.assert_close(got, want, rtol=1e-5 if dt == torch.float32 else 1e-12,
                                       atol=1e-4 if dt == torch.float32 else 1e-11, msg=lambda m: f"gram {dt}: {m}")
            print("pass", f"gram[{b},{K}]", str(dt).replace("torch.", ""), flush=True)
    print("ok", _cpu.CAPABILITY, _cpu._C.gemm_engine())


if __name__ == "__main__":
    main()
