import os

# The Triton backend runs on CPU tensors only under the interpreter; it must be
# set before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("KDKERNELS_BACKEND", None)

import pytest  # noqa: E402
import torch  # noqa: E402

from kdkernels.bench import pin_inductor_vector_width  # noqa: E402

pin_inductor_vector_width()  # torch.compile tests stay meaningful under ATEN_CPU_CAPABILITY=avx2


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


FUSED_BACKENDS = [
    "cpu",
    pytest.param("triton", marks=pytest.mark.skipif(not _triton_importable(), reason="triton is not installed")),
]


@pytest.fixture(params=FUSED_BACKENDS)
def backend(request):
    """Each fused backend, held against the reference."""
    return request.param


@pytest.fixture
def poison():
    """Deterministic mode makes torch.empty/empty_like (in Python and in ATen's C++)
    fill new tensors with NaN, so an output element a kernel forgets to write shows up."""
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old)


def pytest_collection_modifyitems(config, items):
    """The long subprocess-bound modules (marked ``xdist_group``: the AOT compile, the
    traffic report, the training harness) are collected first, so that under
    ``-n 2 --dist loadgroup`` (``make test``) one worker starts on them while the other
    takes the rest, and neither ends the session waiting on the other."""
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)
