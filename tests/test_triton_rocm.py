"""AMD ROCm devices, without one: torch reports them as device "cuda" with
``torch.version.hip`` set. backend='auto' picks Triton for them, the device's
target (gfx arch, 64-lane wavefronts) is read from its properties, and every
launch passes a dot precision that triton's HIP backend accepts for that arch and
the warp count of the launch heuristics. Kernels are replaced by recorders (no
kernel runs); the code they would compile is checked by tests/test_triton_aot.py.
"""
import types

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.amd.compiler import HIPBackend  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import KernelInterface  # noqa: E402

from kdkernels import _validate as V  # noqa: E402
from kdkernels.triton import _utils, lsh, nd, ofd, sp  # noqa: E402


def _fake_gpu(monkeypatch, hip, gfx="gfx942:sramecc+:xnack-", warp_size=64, capability=(9, 0)):
    props = types.SimpleNamespace(gcnArchName=gfx, warp_size=warp_size, multi_processor_count=304, name="fake")
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda idx: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx: capability)
    monkeypatch.setattr(_utils, "_TARGETS", {})


def test_auto_picks_triton_for_rocm_tensors(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    monkeypatch.delenv("KDKERNELS_BACKEND", raising=False)
    assert V.resolve_backend("auto", torch.device("cuda", 0)) == "triton"
    assert V.resolve_backend("triton", torch.device("cuda", 0)) == "triton"
    with pytest.raises(ValueError, match="ROCm"):
        V.resolve_backend("cpu", torch.device("cuda", 0))


@pytest.mark.parametrize("gfx, ws", [("gfx942:sramecc+:xnack-", 64), ("gfx90a:sramecc+:xnack-", 64),
                                     ("gfx1100", None)])
def test_target_of_a_rocm_device(monkeypatch, gfx, ws):
    _fake_gpu(monkeypatch, "6.4.0", gfx, ws)
    tgt = _utils.target(torch.device("cuda", 0))
    assert tgt == _utils.Target("hip", gfx.split(":")[0], 64 if ws else 32)  # no warp_size: triton's rule
    assert _utils.arch(torch.device("cuda", 0)) == 80
    assert _utils.warp_size(torch.device("cuda", 0)) == tgt.warp_size


def test_target_of_an_nvidia_device(monkeypatch):
    _fake_gpu(monkeypatch, None, warp_size=32, capability=(9, 0))
    assert _utils.target(torch.device("cuda", 0)) == _utils.Target("cuda", 90, 32)
    _fake_gpu(monkeypatch, None, warp_size=32, capability=(8, 6))
    assert _utils.arch(torch.device("cuda", 0)) == 80
    assert _utils.target(torch.device("cpu")) == _utils.MODEL_TARGET


def _allowed(arch):
    return HIPBackend(GPUTarget("hip", arch, 64)).parse_options({}).allowed_dot_input_precisions


@pytest.mark.parametrize("arch", ["gfx942", "gfx90a"])
@pytest.mark.parametrize("matmul_precision", ["highest", "high", "medium"])
def test_dot_precision_accepted_by_the_hip_backend(monkeypatch, arch, matmul_precision):
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: matmul_precision)
    tgt = _utils.Target("hip", arch, 64)
    got = {dt: _utils.dot_precision(dt, tgt) for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
    assert set(got.values()) <= set(_allowed(arch)), got
    assert got[torch.float64] == "ieee" and got[torch.bfloat16] == "ieee"
    if matmul_precision == "highest":
        assert got[torch.float32] == "ieee"  # float32 accuracy: CDNA's float32 MFMA
    else:
        assert got[torch.float32] == ("tf32" if arch == "gfx942" else "bf16x3")
    # NVIDIA unchanged
    cuda = _utils.Target("cuda", 90, 32)
    assert _utils.dot_precision(torch.float32, cuda) == ("tf32x3" if matmul_precision == "highest" else "tf32")


class _Recorder:
    """Stands in for a kernel: records the launch keywords, runs nothing."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((self.name, kw))


@pytest.mark.parametrize("arch", ["gfx942", "gfx90a"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launches_on_a_rocm_device(monkeypatch, arch, dtype):
    """Every kernel launch on a (fake) ROCm target: a dot precision its backend accepts, and
    num_warps from the configs through the 64-lane rule (``scale_warps``)."""
    calls = []
    for mod in (lsh, nd, ofd, sp):
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and isinstance(obj, KernelInterface):
                monkeypatch.setattr(mod, name, _Recorder(name, calls))
    tgt = _utils.Target("hip", arch, 64)
    monkeypatch.setattr(_utils, "target", lambda device: tgt)
    x = lambda *shape: torch.randn(*shape).to(dtype)  # noqa: E731
    rw = torch.full((32,), 1 / 32)
    lsh.lsh_forward(x(32, 64), x(32, 64), x(256, 64), x(256), None, 1.0, rw, True, True)  # 16-bit: fused path
    lsh.lsh_forward(x(32, 64), x(32, 64), x(256, 64), x(256), None, 1.0, rw, False, False)  # two-GEMM path
    sp.sp_forward(x(32, 700), x(32, 300), 2.0, rw, True, True)
    nd.nd_forward(x(32, 64), x(32, 64), x(10, 64), torch.zeros(32, dtype=torch.long), rw, 1e-12, True, True)
    ofd.ofd_forward(x(4, 8, 4, 4), x(4, 8, 4, 4), torch.zeros(8), 1.0, True, True)
    names = {name for name, _ in calls}
    assert {"lsh_proj_kernel", "sp_gram_fwd_kernel", "sp_bwd_kernel", "nd_fwd_kernel", "ofd_fwd_kernel"} <= names
    assert ("lsh_fused_kernel" in names) == (dtype == torch.bfloat16)  # fp32 fuses only D <= 32 on AMD
    assert torch.get_float32_matmul_precision() == "highest"  # torch's default
    for name, kw in calls:
        if "DOT_PREC" in kw:
            assert kw["DOT_PREC"] in _allowed(arch), (name, kw["DOT_PREC"])
            assert kw["DOT_PREC"] == "ieee", name  # float32 MFMA, native 16-bit MFMA
        assert 1 <= kw["num_warps"] <= 1024 // 64, (name, kw["num_warps"])
        assert kw.get("num_stages", 2) <= 2, name  # the HIP backend's stream-pipeliner depth
    # the warps of the NVIDIA configs, through the 64-lane rule
    assert ("ofd_fwd_kernel", _utils.scale_warps(ofd.NUM_WARPS, 64)) in {(n, kw["num_warps"]) for n, kw in calls}
    assert ("nd_fwd_kernel", _utils.scale_warps(nd.config(64)[3], 64)) in {(n, kw["num_warps"]) for n, kw in calls}
