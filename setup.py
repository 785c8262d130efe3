"""Builds kdkernels and its C++ extension kdkernels._C (build without isolation:
``pip install --no-build-isolation -e .`` so it compiles against the installed torch)."""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

extra = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unused-function", "-Wno-psabi"]
if os.environ.get("KDKERNELS_NATIVE", "1") == "1":
    extra.append("-march=native")

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
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.4"]},
)
