"""Builds kdkernels and its C++ extensions (build without isolation:
``pip install --no-build-isolation -e .`` so they compile against the installed torch).

- ``kdkernels._C``: tensors, checks, GEMMs and the Python bindings, built for the
  baseline ISA of the platform (csrc/*.cpp);
- ``kdkernels._kernels_<isa>``: the loops (csrc/kernels/*.cpp), once per ISA level
  (x86-64: default, avx2, avx512; elsewhere: default). kdkernels/_cpu.py imports
  the one that matches torch's CPU capability (``ATEN_CPU_CAPABILITY`` honoured).

No ``-march=native``: the build runs on any CPU of its architecture.
``KDKERNELS_NATIVE=1`` adds it to every module, for a build that only runs here.
"""
import glob
import os
import platform

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

COMMON = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unused-function", "-Wno-psabi"]
if os.environ.get("KDKERNELS_NATIVE", "0") == "1":
    COMMON.append("-march=native")

# ISA levels as ATen compiles its own kernels (CPU_CAPABILITY and its flags).
if platform.machine().lower() in ("x86_64", "amd64"):
    ISA_FLAGS = {
        "default": [],
        "avx2": ["-mavx2", "-mfma", "-mf16c"],
        "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    }
else:
    ISA_FLAGS = {"default": []}

# The kernel modules hide everything but their PyInit, so no inline function
# compiled for one level can stand in for another's (see README, "CPU kernels").
# (-Wno-*: ATen's CUDA-style unroll pragmas; GCC's own AVX-512 intrinsics headers)
HIDDEN = ["-fvisibility=hidden", "-fvisibility-inlines-hidden", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"]


def kernel_module(level):
    return CppExtension(
        f"kdkernels._kernels_{level}",
        sorted(glob.glob("csrc/kernels/*.cpp")),
        include_dirs=[os.path.abspath("csrc")],
        define_macros=[("CPU_CAPABILITY", level.upper()), (f"CPU_CAPABILITY_{level.upper()}", None)],
        extra_compile_args=COMMON + HIDDEN + ISA_FLAGS[level],
        extra_link_args=["-fopenmp"],
    )


class BuildExtensions(BuildExtension.with_options(use_ninja=True)):
    """Each extension's objects in their own folder: the kernel modules share their sources."""

    def build_extension(self, ext):
        base = self.build_temp
        self.build_temp = os.path.join(base, ext.name.rsplit(".", 1)[-1])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base


setup(
    name="kdkernels",
    version="0.1.0",
    description="Fused kernels for knowledge-distillation losses (LSHFM, ND, OFD, SP)",
    packages=find_packages(include=["kdkernels", "kdkernels.*"]),
    ext_modules=[
        CppExtension(
            "kdkernels._C",
            sorted(glob.glob("csrc/*.cpp")),
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args=COMMON,
            extra_link_args=["-fopenmp"],
        )
    ] + [kernel_module(level) for level in ISA_FLAGS],
    cmdclass={"build_ext": BuildExtensions},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.4"]},
)
