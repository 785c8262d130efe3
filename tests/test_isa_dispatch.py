"""The C++ loops are built once per ISA level (kdkernels._kernels_<isa>) and the
process uses the one of torch's CPU capability: the parity script passes at
ATEN_CPU_CAPABILITY=default and at this machine's best level, each in a fresh process,
and (on an AVX-512 machine) with every ISA limit at AVX2, as on an AVX2-only CPU."""
import os
import subprocess
import sys

import pytest
import torch

from kdkernels import _cpu

pytestmark = pytest.mark.skipif(not _cpu.available(), reason="C++ extension not built")

SCRIPT = os.path.join(os.path.dirname(__file__), "cpu_parity_script.py")


def best_level():
    """This machine's best level as torch sees it without ATEN_CPU_CAPABILITY."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip()


def test_levels_from_capability():
    assert _cpu._levels_from("AVX512") == ("AVX512", "AVX2", "DEFAULT")
    assert _cpu._levels_from("AVX2") == ("AVX2", "DEFAULT")
    assert _cpu._levels_from("DEFAULT") == ("DEFAULT",)
    assert _cpu._levels_from("SVE256") == ("DEFAULT",)  # aarch64: the NEON build


def test_loaded_level_is_torchs():
    """The installed kernels are torch's level (every x86-64 level is built here)."""
    cap = torch.backends.cpu.get_cpu_capability()
    assert _cpu.CAPABILITY == _cpu._C.kernel_capability()
    if cap in _cpu.LEVELS:
        assert _cpu.CAPABILITY == cap
    assert cap in _cpu.describe() and _cpu._C.gemm_engine() in _cpu.describe()


def run_parity_script(level: str, **env) -> list:
    """Runs the parity script in a fresh process at torch capability ``level`` (with
    ``env`` added), asserts that it passed there, and returns oneDNN's verbose lines."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=level.lower(), **env)
    res = subprocess.run([sys.executable, SCRIPT, "--expect-isa", level], env=env, capture_output=True, text=True,
                         timeout=600)
    lines = res.stdout.strip().splitlines()
    script_lines = [line for line in lines if not line.startswith("onednn_verbose")]
    assert res.returncode == 0, "\n".join(script_lines)[-2000:] + res.stderr[-4000:]
    assert script_lines[-1].startswith(f"ok {level} ")
    return [line for line in lines if line.startswith("onednn_verbose")]


@pytest.mark.parametrize("which", ["default", "best"])
def test_parity_at_capability(which):
    level = "DEFAULT" if which == "default" else best_level()
    if level not in _cpu.LEVELS:
        pytest.skip(f"torch runs at {level}, which uses the DEFAULT build")
    run_parity_script(level)


def test_parity_as_on_an_avx2_machine():
    """On an AVX-512 machine, every ISA limit at AVX2 (torch's and the kernels' level,
    oneDNN's and MKL's GEMMs) is what a Zen 3 runs: the parity script passes there too,
    and oneDNN's verbose log shows none of its AVX-512 kernels ran."""
    if best_level() != "AVX512":
        pytest.skip("not an AVX-512 machine: 'best' above is its AVX2 or DEFAULT run")
    verbose = run_parity_script("AVX2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_VERBOSE="1")
    executed = [line for line in verbose if ",exec," in line]
    assert not [line for line in executed if "avx512" in line], "oneDNN ran AVX-512 kernels despite its cap"
    if _cpu._C.gemm_engine() != "aten":  # oneDNN takes some of the script's GEMMs
        assert any("avx2" in line for line in executed)


def test_kernel_modules_export_only_their_init():
    """Nothing compiled with one level's flags is visible to another module: each
    kernel module's dynamic symbol table defines its PyInit and nothing else."""
    import importlib
    import shutil

    if shutil.which("nm") is None:
        pytest.skip("no nm")
    path = importlib.import_module(f"kdkernels._kernels_{_cpu.CAPABILITY.lower()}").__file__
    out = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True, check=True).stdout
    linker = {"__bss_start", "_edata", "_end", "_init", "_fini"}
    names = [f[-1] for f in (line.split() for line in out.splitlines()) if len(f) == 3 and f[-1] not in linker]
    assert names == [f"PyInit__kernels_{_cpu.CAPABILITY.lower()}"], names
