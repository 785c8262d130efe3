"""Ahead-of-time compile of the shipped Triton kernels for sm_80, sm_90 (NVIDIA) and
gfx942, gfx90a (AMD MI300, MI250), no GPU needed: every config compiles, none spills
or exceeds a hardware limit, every dot is a tensor-core / MFMA instruction with
native 16-bit operands for 16-bit inputs.

Runs ``python -m kdkernels.triton.aot`` once per test session (without
TRITON_INTERPRET, which replaces kernels by Python functions), for all four targets
in one process pool; under pytest-xdist the first worker compiles and the others
wait for its JSON (a lock file in the session's shared temp directory). The test
covers float32 and bfloat16 inputs to stay fast on 2 cores; the command line's
default also compiles float16 and float64.
"""
import json
import os
import subprocess
import sys
import tempfile

import pytest

triton = pytest.importorskip("triton")

from helpers import once_per_session  # noqa: E402

pytestmark = pytest.mark.xdist_group("aot")  # one worker runs the module (see conftest.py)

KERNELS = ["ofd_fwd_kernel", "ofd_bwd_kernel", "nd_fwd_kernel", "lsh_proj_kernel", "lsh_fused_kernel",
           "lsh_grad_kernel", "sp_gram_fwd_kernel", "sp_rows_fwd_kernel", "sp_bwd_kernel"]
GEMM_KERNELS = ["lsh_proj_kernel", "lsh_fused_kernel", "lsh_grad_kernel", "sp_gram_fwd_kernel", "sp_bwd_kernel"]
NO_GEMM_VARIANTS = ("sum of splits",)  # lsh_grad_kernel after lsh_fused_kernel: an elementwise sum
TARGETS = ["sm_80", "sm_90", "hip:gfx942", "hip:gfx90a"]
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compile_all():
    """(returncode, stdout + stderr, rows) of ``python -m kdkernels.triton.aot`` for TARGETS."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "aot.json")
        proc = subprocess.run([sys.executable, "-m", "kdkernels.triton.aot", "--target", *TARGETS,
                               "--dtypes", "fp32", "bf16", "--json", out], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=900)
        rows = json.load(open(out)) if os.path.exists(out) else []
    return proc.returncode, proc.stdout + proc.stderr[-3000:], rows


@pytest.fixture(scope="module")
def aot_run(tmp_path_factory):
    """(returncode, stdout, rows) of one AOT run, shared by the xdist workers of a session."""
    if not os.path.exists(CUOBJDUMP):
        pytest.skip("the triton wheel has no cuobjdump")
    return once_per_session(tmp_path_factory, "aot", _compile_all)


def test_every_config_compiles_without_spills(aot_run):
    rc, stdout, rows = aot_run
    assert rc == 0, f"AOT check failed:\n{stdout[-8000:]}"
    assert "0 spilling, 0 failing" in stdout
    assert {r["target"] for r in rows} == set(TARGETS)
    assert not [r for r in rows if r["problems"]]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("target", TARGETS)
def test_table_lists_kernel(aot_run, kernel, target):
    """The table has a section for each forward/backward kernel of the four losses on each target."""
    assert f"\n{kernel}  {target}\n" in aot_run[1]
    assert [r for r in aot_run[2] if r["kernel"] == kernel and r["target"] == target]


def _rows(aot_run, kernel, target, dtype):
    rows = [r for r in aot_run[2] if r["kernel"] == kernel and r["target"] == target and r["dtype"] == dtype]
    assert rows, (kernel, target, dtype)
    return rows


def _gemm_rows(aot_run, kernel, target, dtype):
    """The rows of configs with a GEMM (all but the elementwise NO_GEMM_VARIANTS)."""
    return [r for r in _rows(aot_run, kernel, target, dtype) if not any(v in r["variant"] for v in NO_GEMM_VARIANTS)]


@pytest.mark.parametrize("kernel", GEMM_KERNELS)
def test_bf16_gemms_use_native_16bit_tensor_cores(aot_run, kernel):
    """sm_90: every bf16 GEMM is a wgmma with bf16 operands (no mma.sync: SP's tiles are 64
    rows for any b); sm_80: mma.sync bf16."""
    for arch in (80, 90):
        for r in _gemm_rows(aot_run, kernel, f"sm_{arch}", "bf16"):
            ops = r["mma"].split(", ")
            want = "mma m16n8k16 bf16" if arch == 80 else "wgmma m64n"
            assert all(op.startswith(want) and op.split()[2].startswith("bf16") for op in ops), r


@pytest.mark.parametrize("kernel", GEMM_KERNELS)
@pytest.mark.parametrize("target", ["hip:gfx942", "hip:gfx90a"])
def test_amd_gemms_use_mfma(aot_run, kernel, target):
    """AMD: every dot is an MFMA; bf16 operands stay bf16; float32 is the native float32
    MFMA for 'highest' (ieee), xf32 (gfx942) or bf16x3 (gfx90a) for 'high'; no spill, no
    scratch, LDS within 64 KiB, at most 2 pipeline stages."""
    operand = {"bf16": "bf16", "ieee": "f32", "tf32": "xf32", "bf16x3": "bf16"}
    fast = "tf32" if target == "hip:gfx942" else "bf16x3"
    seen = set()
    for dtype in ("bf16", "fp32"):
        for r in _gemm_rows(aot_run, kernel, target, dtype):
            prec = "bf16" if dtype == "bf16" else r["prec"]
            seen.add(prec)
            ops = r["mma"].split(", ")
            assert r["dots"] and all(op.startswith("mfma ") and op.split()[2] == operand[prec] for op in ops), r
            assert r["spill"] == 0 and r["scratch"] == 0 and r["smem"] <= 64 * 1024 and r["stages"] <= 2, r
    assert seen == {"bf16", "ieee", fast}


def test_float32_gemms_use_tf32x3_tensor_cores(aot_run):
    for kernel in GEMM_KERNELS:
        rows = _gemm_rows(aot_run, kernel, "sm_90", "fp32")
        assert {r["prec"] for r in rows} == {"tf32x3", "tf32"}  # 'highest' and 'high' / 'medium'
        for r in rows:
            assert all(op.startswith("wgmma m64n") and op.endswith("tf32") for op in r["mma"].split(", ")), r


def test_float32_highest_split_kernel(aot_run):
    """lsh_fused_split_kernel (float32 under 'highest', 64 < D <= 256) is compiled for sm_90 only,
    one row per FUSED_SPLIT_CONFIG entry, with TF32 and bf16 wgmmas (its hand split) and 0 spills."""
    from kdkernels.triton import lsh

    rows = [r for r in aot_run[2] if r["kernel"] == "lsh_fused_split_kernel"]
    assert {r["target"] for r in rows} == {"sm_90"}
    assert len(rows) == len([key for key in lsh.FUSED_SPLIT_CONFIG if key[0] == 90])
    for r in rows:
        ops = r["mma"].split(", ")
        assert r["dtype"] == "fp32" and r["spill"] == 0 and all(op.startswith("wgmma m64n") for op in ops), r
        assert {op.split()[2] for op in ops} == {"tf32", "bf16"}, r


def test_problems_flags_spills_and_limits():
    from kdkernels.triton.aot import problems

    base = dict(error=None, spill=0, regs=64, num_warps=4, smem=1024, arch=80)
    assert problems(base) == []
    assert problems(dict(base, spill=8))
    assert problems(dict(base, regs=256))
    assert problems(dict(base, regs=255, num_warps=16))  # 255 x 512 > 64K registers
    assert problems(dict(base, smem=200 * 1024))         # over sm_80's 163 KB
    assert not problems(dict(base, smem=200 * 1024, arch=90))
    assert problems(dict(base, error="CompilationError: x"))
    assert problems(dict(base, dtype="bf16", mma="wgmma m64n64k8 tf32"))
    assert not problems(dict(base, dtype="bf16", mma="wgmma m64n64k16 bf16"))
    assert problems(dict(base, dots=2, mma="-"))          # a dot without tensor cores


def test_problems_flags_amd_spills_and_limits():
    from kdkernels.triton.aot import problems

    base = dict(error=None, backend="hip", spill=0, scratch=0, regs=256, num_warps=8, smem=32768, arch=80,
                dtype="bf16", dots=1, mma="mfma 32x32x8 bf16")
    assert problems(base) == []
    assert problems(dict(base, spill=3))                   # SGPR or VGPR spills
    assert problems(dict(base, regs=513))                  # over 512 VGPRs a wave
    assert problems(dict(base, smem=65 * 1024))            # over 64 KiB of LDS
    assert problems(dict(base, scratch=16))
    assert problems(dict(base, mma="-"))                   # a dot without MFMA
    assert problems(dict(base, mma="mfma 32x32x2 f32"))    # bf16 widened to float32
    assert not problems(dict(base, dtype="fp32", mma="mfma 32x32x2 f32"))


def test_amdgcn_metadata_and_mfma_names():
    from kdkernels.triton.aot import amdgpu_metadata, tensor_core_ops

    asm = ("v_mfma_f32_32x32x8_bf16 a[0:15], v[2:3], v[4:5], a[0:15]\n v_mfma_f32_32x32x8bf16_1k v[0:15]\n"
           "v_mfma_f32_32x32x2f32 v[0:15]\n v_mfma_f64_16x16x4f64 v[0:7]\n v_mfma_f32_32x32x4_xf32 v[0:15]\n"
           ".amdgpu_metadata\n  - .agpr_count: 4\n    .group_segment_fixed_size: 0\n"
           "    .private_segment_fixed_size: 0\n    .sgpr_count:     91\n    .sgpr_spill_count: 2\n"
           "    .vgpr_count:     214\n    .vgpr_spill_count: 0\n")
    assert tensor_core_ops(asm) == "mfma 16x16x4 f64, mfma 32x32x2 f32, mfma 32x32x4 xf32, mfma 32x32x8 bf16"
    meta = amdgpu_metadata(asm)
    assert (meta["vgpr_count"], meta["agpr_count"], meta["sgpr_count"], meta["sgpr_spill_count"]) == (214, 4, 91, 2)
