"""Every bad-input rule: a ValueError/TypeError that names the argument, before any kernel runs."""
import pytest
import torch

import kdkernels as kdk

B, D, N, K, C = 4, 6, 10, 3, 5


def lsh_args(**over):
    args = dict(f_s=torch.randn(B, D), f_t=torch.randn(B, D), weight=torch.randn(N, D), bias=torch.randn(N))
    args.update(over)
    return args


def nd_args(**over):
    args = dict(s=torch.randn(B, D), t=torch.randn(B, D), centers=torch.randn(K, D), labels=torch.tensor([0, 1, 2, 0]))
    args.update(over)
    return args


def ofd_args(**over):
    args = dict(s=torch.randn(B, C, 3, 3), t=torch.randn(B, C, 3, 3), margin=-torch.rand(C))
    args.update(over)
    return args


BAD_LSH = [
    (dict(f_s=torch.randn(B, D, 1)), ValueError, "f_s"),
    (dict(f_s=torch.randn(B, D).int()), TypeError, "f_s"),
    (dict(f_s=[[1.0]]), TypeError, "f_s"),
    (dict(f_t=torch.randn(B, D + 1)), ValueError, "f_t"),
    (dict(f_t=torch.randn(B, D, dtype=torch.float64)), TypeError, "f_t"),
    (dict(f_t=None), ValueError, "f_t"),
    (dict(weight=torch.randn(N, D + 2)), ValueError, "weight"),
    (dict(weight=torch.randn(N, D, requires_grad=True)), ValueError, "weight"),
    (dict(bias=torch.randn(N + 1)), ValueError, "bias"),
    (dict(bias=torch.randn(N, requires_grad=True)), ValueError, "bias"),
    (dict(f_s=torch.randn(0, D), f_t=torch.randn(0, D)), ValueError, "f_s"),
    (dict(sample_mask=torch.ones(B + 1)), ValueError, "sample_mask"),
    (dict(sample_mask=torch.ones(B, dtype=torch.int64)), TypeError, "sample_mask"),
    (dict(teacher_codes=torch.zeros(B, 1, dtype=torch.uint8)), ValueError, "teacher_codes"),
    (dict(teacher_codes=torch.zeros(B, 2, dtype=torch.int32)), TypeError, "teacher_codes"),
    (dict(f_t=None, teacher_codes=torch.zeros(B, 2, dtype=torch.uint8)), ValueError, "f_t"),
    (dict(reduction="batchmean"), ValueError, "reduction"),
    (dict(mse_weight="x"), TypeError, "mse_weight"),
    (dict(backend="cuda"), ValueError, "backend"),
]

# more LSH cases for the short check of plain calls (kdkernels.functional._is_plain_lsh_call)
BAD_LSH_PLAIN_SHAPED = [
    (dict(weight=torch.randn(N, D, device="meta")), ValueError, "weight"),
    (dict(bias=torch.randn(N, device="meta")), ValueError, "bias"),
    (dict(f_t=torch.randn(B, D, device="meta")), ValueError, "f_t"),
    (dict(bias=torch.randn(N, 1)), ValueError, "bias"),
    (dict(bias=torch.zeros(N, dtype=torch.int64)), TypeError, "bias"),
    (dict(weight=torch.randn(0, D)), ValueError, "weight"),
    (dict(weight=torch.randn(N, D).int()), TypeError, "weight"),
    (dict(f_t=torch.randn(B + 1, D)), ValueError, "f_t"),
    (dict(mse_weight=[1.0]), TypeError, "mse_weight"),
]

BAD_ND = [
    (dict(s=torch.randn(B)), ValueError, "s"),
    (dict(t=torch.randn(B, D + 1)), ValueError, "t"),
    (dict(t=torch.randn(B, D).half()), TypeError, "t"),
    (dict(centers=torch.randn(K, D + 1)), ValueError, "centers"),
    (dict(centers=torch.randn(K, D, requires_grad=True)), ValueError, "centers"),
    (dict(labels=torch.tensor([0, 1, 2, 3])), ValueError, "labels"),
    (dict(labels=torch.tensor([0, -1, 2, 0])), ValueError, "labels"),
    (dict(labels=torch.tensor([0.0, 1, 2, 0])), TypeError, "labels"),
    (dict(labels=torch.tensor([0, 1, 2])), ValueError, "labels"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(reduction="batchmean"), ValueError, "reduction"),
    (dict(backend="gpu"), ValueError, "backend"),
]

BAD_OFD = [
    (dict(s=torch.randn(B)), ValueError, "s"),
    (dict(t=torch.randn(B, C, 3, 4)), ValueError, "t"),
    (dict(t=torch.randn(B, C, 3, 3, dtype=torch.float64)), TypeError, "t"),
    (dict(margin=torch.zeros(C + 1)), ValueError, "margin"),
    (dict(margin=torch.zeros(C, 1)), ValueError, "margin"),
    (dict(margin=torch.zeros(C, requires_grad=True)), ValueError, "margin"),
    (dict(s=torch.randn(0, C, 3, 3), t=torch.randn(0, C, 3, 3)), ValueError, "s"),
    (dict(reduction="avg"), ValueError, "reduction"),
]

BAD_SP = [
    (dict(f_s=torch.randn(B, D), f_t=torch.randn(B + 1, D)), ValueError, "f_t"),
    (dict(f_s=torch.randn(B, D), f_t=torch.randn(B, D).double()), TypeError, "f_t"),
    (dict(f_s=torch.randn(B, D), f_t=[torch.randn(B, D)]), TypeError, "f_t"),
    (dict(f_s=[torch.randn(B, D)], f_t=[]), ValueError, "f_t"),
    (dict(f_s=[torch.randn(B, D), torch.randn(B, 2)], f_t=[torch.randn(B, D), torch.randn(B + 2, 2)]), ValueError, "f_t[1]"),
    (dict(f_s=torch.randn(B, D), f_t=torch.randn(B, D), p=3.0), ValueError, "p"),
    (dict(f_s=torch.randn(B, D), f_t=torch.randn(B, D), reduction="mean"), ValueError, "reduction"),
    (dict(f_s=torch.randn(B, D).long(), f_t=torch.randn(B, D)), TypeError, "f_s"),
]



@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("over,error,name", BAD_LSH)
def test_lsh_bad_input(backend, over, error, name):
    args = lsh_args(**over)
    args.setdefault("backend", backend)
    with pytest.raises(error, match=rf"^{name.replace('[', '.').replace(']', '.')}\b"):
        kdk.lsh_loss(args.pop("f_s"), args.pop("f_t"), args.pop("weight"), args.pop("bias"), **args)


@pytest.mark.parametrize("over,error,name", BAD_LSH_PLAIN_SHAPED)
def test_lsh_bad_plain_shaped_input(over, error, name):
    args = lsh_args(**over)
    with pytest.raises(error, match=rf"^{name}\b"):
        kdk.lsh_loss(args.pop("f_s"), args.pop("f_t"), args.pop("weight"), args.pop("bias"), backend="cpu", **args)


def _plain_lsh(args):
    from kdkernels.functional import _is_plain_lsh_call

    return _is_plain_lsh_call(args["f_s"], args["f_t"], args["weight"], args["bias"], args.get("mse_weight", 1.0),
                              args.get("sample_mask"), args.get("teacher_codes"), args.get("reduction", "mean"))


@pytest.mark.parametrize("over,error,name", [c for c in BAD_LSH + BAD_LSH_PLAIN_SHAPED if c[2] != "backend"])
def test_lsh_short_check_refuses_what_the_checks_refuse(over, error, name):
    assert not _plain_lsh(lsh_args(**over))


def test_lsh_short_check_takes_the_common_call():
    """The call a training loop makes (here with strided features, a Parameter projection,
    no bias, float64) skips the detailed checks."""
    assert _plain_lsh(lsh_args())
    assert _plain_lsh(lsh_args(f_s=torch.randn(D, B).t(), weight=torch.nn.Parameter(torch.randn(N, D), requires_grad=False),
                               bias=None, reduction="sum"))
    assert _plain_lsh(lsh_args(f_s=torch.randn(B, D).double(), f_t=torch.randn(B, D).double()))
    assert not _plain_lsh(lsh_args(sample_mask=torch.ones(B)))  # masks and codes: the detailed checks


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("over,error,name", BAD_ND)
def test_nd_bad_input(backend, over, error, name):
    args = nd_args(**over)
    args.setdefault("backend", backend)
    with pytest.raises(error, match=rf"^{name}\b"):
        kdk.nd_loss(args.pop("s"), args.pop("t"), args.pop("centers"), args.pop("labels"), **args)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("over,error,name", BAD_OFD)
def test_ofd_bad_input(backend, over, error, name):
    args = ofd_args(**over)
    args.setdefault("backend", backend)
    with pytest.raises(error, match=rf"^{name}\b"):
        kdk.ofd_loss(args.pop("s"), args.pop("t"), args.pop("margin"), **args)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("over,error,name", BAD_SP)
def test_sp_bad_input(backend, over, error, name):
    args = dict(over)
    args.setdefault("backend", backend)
    with pytest.raises(error, match=rf"^{name.replace('[', '.').replace(']', '.')}"):
        kdk.sp_loss(args.pop("f_s"), args.pop("f_t"), **args)


def test_messages_say_expected_and_actual():
    with pytest.raises(ValueError) as info:
        kdk.ofd_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.zeros(5))
    assert "(3,)" in str(info.value) and "(5,)" in str(info.value)
    with pytest.raises(ValueError) as info:
        kdk.nd_loss(**nd_args(labels=torch.tensor([0, 1, 7, 0])))
    assert "[0, 3)" in str(info.value) and "7" in str(info.value)


def test_device_mismatch_is_named():
    meta = torch.randn(B, C, 3, 3, device="meta")
    with pytest.raises(ValueError, match="^t: expected device cpu"):
        kdk.ofd_loss(torch.randn(B, C, 3, 3), meta, torch.zeros(C), backend="reference")


def test_backend_env_default(monkeypatch):
    monkeypatch.setenv("KDKERNELS_BACKEND", "reference")
    args = ofd_args()
    assert torch.equal(kdk.ofd_loss(**args), kdk.reference.ofd_loss(**args))
    monkeypatch.setenv("KDKERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="^KDKERNELS_BACKEND"):
        kdk.ofd_loss(**args)


def test_triton_without_interpreter_names_cuda(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA.*TRITON_INTERPRET"):
        kdk.ofd_loss(**ofd_args(), backend="triton")


def test_cpu_backend_refuses_other_devices():
    meta = dict(s=torch.randn(B, C, 3, 3, device="meta"), t=torch.randn(B, C, 3, 3, device="meta"),
                margin=torch.zeros(C, device="meta"))
    with pytest.raises(ValueError, match="^backend: 'cpu'"):
        kdk.ofd_loss(**meta, backend="cpu")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_errors_leave_no_damage(backend):
    """After a rejected call the next valid call works and gives the right result."""
    args = nd_args()
    for bad in (dict(labels=torch.tensor([0, 9, 0, 0])), dict(centers=torch.randn(K, D + 1))):
        with pytest.raises(ValueError):
            kdk.nd_loss(**{**args, **bad}, backend=backend)
    torch.testing.assert_close(kdk.nd_loss(**args, backend=backend), kdk.reference.nd_loss(**args))


def test_frozen_operand_error_says_why():
    with pytest.raises(ValueError, match="margin: must not require grad"):
        kdk.ofd_loss(**ofd_args(margin=torch.zeros(C, requires_grad=True)))


def test_cpu_backend_without_the_extension_says_how_to_build_it():
    """With kdkernels._C missing, the CPU backend raises (naming the build command) and
    the reference still runs: no silent fallback, no crash."""
    import subprocess
    import sys

    code = """
import sys, torch
sys.modules["kdkernels._C"] = None  # as if the extension had not been built
import kdkernels as kdk
s, t, m = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.zeros(3)
print(float(kdk.ofd_loss(s, t, m, backend="reference")) >= 0)
try:
    kdk.ofd_loss(s, t, m, backend="cpu")
except RuntimeError as e:
    print(str(e))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "True"
    assert "backend 'cpu': the C++ extension kdkernels._C is not built" in lines[1]
    assert "pip install --no-build-isolation" in lines[1]
