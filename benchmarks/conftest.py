"""pytest-benchmark suite over the cases of ``python -m kdkernels bench`` (not part of the unit tests).

    .venv/bin/python -m pytest benchmarks --benchmark-only            # quick CPU cases
    KDK_BENCH_FULL=1 .venv/bin/python -m pytest benchmarks --benchmark-only   # the default (issue-3) sizes
    KDK_BENCH_DEVICE=cuda ...                                         # GPU cases (skipped without CUDA)

Without ``--benchmark-only`` (or ``--benchmark-enable``) every benchmark here is
skipped, so a plain ``pytest`` over the repository does not run them.
"""
import os

import pytest
import torch



def bench_device() -> str:
    return os.environ.get("KDK_BENCH_DEVICE", "cpu")


def pytest_collection_modifyitems(config, items):
    def opt(name):
        try:
            return config.getoption(name)
        except ValueError:  # pytest-benchmark not installed
            return False

    if opt("benchmark_only") or opt("benchmark_enable"):
        return
    skip = pytest.mark.skip(reason="benchmarks: run with --benchmark-only")
    for item in items:
        if "benchmarks" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device():
    dev = bench_device()
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("KDK_BENCH_DEVICE=cuda but CUDA is not available")
    return dev


_COMPILED = {}


@pytest.fixture
def compiled_cache():
    """torch.compile of the reference, one per loss (compiled on first use, outside the timing)."""
    return _COMPILED
