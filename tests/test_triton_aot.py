"""Ahead-of-time compile of the shipped Triton kernels for sm_80 and sm_90 (no GPU
needed): every config compiles, none spills or exceeds a hardware limit.

Runs ``python -m kdkernels.triton.aot`` in a subprocess (without
TRITON_INTERPRET, which replaces kernels by Python functions). The test covers
float32 and bfloat16 inputs to stay fast on 2 cores; the command line's default
also compiles float16 and float64.
"""
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

KERNELS = ["ofd_fwd_kernel", "ofd_bwd_kernel", "nd_fwd_kernel", "lsh_proj_kernel", "lsh_fused_kernel",
           "lsh_grad_kernel", "sp_gram_fwd_kernel", "sp_rows_fwd_kernel", "sp_bwd_kernel"]
GEMM_KERNELS = ["lsh_proj_kernel", "lsh_fused_kernel", "lsh_grad_kernel", "sp_gram_fwd_kernel", "sp_bwd_kernel"]
NO_GEMM_VARIANTS = ("sum of splits",)  # lsh_grad_kernel after lsh_fused_kernel: an elementwise sum
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def aot_run():
    if not os.path.exists(CUOBJDUMP):
        pytest.skip("the triton wheel has no cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "kdkernels.triton.aot", "--arch", "80", "90",
                           "--dtypes", "fp32", "bf16"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    return proc


def test_every_config_compiles_without_spills(aot_run):
    assert aot_run.returncode == 0, f"AOT check failed:\n{aot_run.stdout[-6000:]}\n{aot_run.stderr[-3000:]}"
    assert "0 spilling, 0 failing" in aot_run.stdout


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("arch", [80, 90])
def test_table_lists_kernel(aot_run, kernel, arch):
    """The table has a section for each forward/backward kernel of the four losses on each arch."""
    assert f"\n{kernel}  sm_{arch}\n" in aot_run.stdout


def _section(stdout, kernel, arch):
    body = stdout.split(f"\n{kernel}  sm_{arch}\n", 1)[1]
    return [line for line in body.split("\n\n", 1)[0].splitlines()[1:] if line.strip()]


def _gemm_rows(stdout, kernel, arch):
    return [line for line in _section(stdout, kernel, arch) if not any(v in line for v in NO_GEMM_VARIANTS)]


@pytest.mark.parametrize("kernel", GEMM_KERNELS)
def test_bf16_gemms_use_native_16bit_tensor_cores(aot_run, kernel):
    """sm_90: every bf16 GEMM tile of >= 64 rows is a wgmma with bf16 operands; the
    16/32-row SP tiles (b <= 32) are mma.sync bf16 (wgmma needs 64 rows); sm_80: mma.sync bf16."""
    for arch in (80, 90):
        rows = [line for line in _gemm_rows(aot_run.stdout, kernel, arch) if " bf16 " in line]
        assert rows
        for line in rows:
            small = "BLOCK_M=16 " in line or "BLOCK_M=32 " in line
            want = "mma m16n8k16 bf16" if arch == 80 or small else "wgmma m64n"
            assert want in line and "tf32" not in line, line
            if arch == 90 and not small:
                assert line.split("wgmma ")[1].split()[1].startswith("bf16"), line


def test_float32_gemms_use_tf32x3_tensor_cores(aot_run):
    for kernel in GEMM_KERNELS:
        for line in _gemm_rows(aot_run.stdout, kernel, 90):
            if " fp32 " in line:
                assert "tf32" in line, line


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
