"""Launch grids of the Triton backend stay within CUDA's limits (y, z <= 65535) for any size."""
import pytest
import torch

pytest.importorskip("triton")
from kdkernels.triton import _utils, lsh, sp  # noqa: E402


@pytest.mark.parametrize("K", [1, 4096, 10**6, 10**10])
def test_sp_splits_bounded_by_programs_not_k(monkeypatch, K):
    monkeypatch.setattr(_utils, "MODEL_SMS", 132)
    for b in (2, 64, 300):
        bm = sp.block_m(b, torch.bfloat16, 90)
        for other in (1, sp.cdiv(b, bm)):
            per = sp._k_split(K, other, torch.device("cpu"), 64)
            assert per % 64 == 0 and sp.cdiv(K, per) <= 2 * 132 <= 65535


@pytest.mark.parametrize("B,N", [(10**9, 1), (128, 2048), (10**7, 65536)])
def test_lsh_row_blocks_bounded(B, N):
    for kind in ("half", "fp32"):
        pm, gm = lsh.proj_config(kind, False, 90)[0], lsh.grad_config(kind, 90)[0]
        chunk = lsh.chunk_rows(B, N, 2, max(pm, gm), min(pm, gm))
        assert 0 < chunk <= B and -(-chunk // min(pm, gm)) <= 65535
        assert chunk == B or chunk % max(pm, gm) == 0
