"""Forward + backward of every loss and implementation (kdkernels, eager, compile, floor,
engine_floor where it applies), fp32.

The same cases, inputs and implementations as ``python -m kdkernels bench``
(see kdkernels/bench.py); grouped by case so pytest-benchmark's table puts the
four implementations of one case together.
"""
import os

import pytest
import torch

from kdkernels import bench


def bench_cases():
    """Timed cases of the bench: the quick set, or the default sizes with KDK_BENCH_FULL=1;
    KDK_BENCH_DEVICE=cuda picks the GPU sizes."""
    device = os.environ.get("KDK_BENCH_DEVICE", "cpu")
    full = os.environ.get("KDK_BENCH_FULL", "0") not in ("", "0")
    return [c for c in bench.default_cases(device, quick=not full) if c.timed]


CASES = bench_cases()


@pytest.mark.parametrize("impl", bench.IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fwd_bwd(benchmark, case, impl, device, compiled_cache):
    if not bench.applies(impl, case, device):
        pytest.skip(f"{impl} is not measured for {case.name} on {device}")
    benchmark.group = case.name
    benchmark.extra_info.update(loss=case.loss, sizes=list(case.sizes), impl=impl, device=device,
                                threads=torch.get_num_threads())
    inputs = bench.make_inputs(case, device)
    compiled = None
    if impl == "compile":
        key = (case.loss, device)
        if key not in compiled_cache:
            compiled_cache[key] = torch.compile(bench.loss_fn(case.loss, None))
        compiled = compiled_cache[key]
    step = bench.make_step(impl, case, device, compiled=compiled)
    try:
        step(inputs)  # warm-up: compile / JIT / lazy init, outside the timing
    except NotImplementedError as exc:
        pytest.skip(f"{impl} {case.name}: not implemented ({str(exc).splitlines()[0]})")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def setup():
        bench.zero_grads(inputs)
        return (inputs,), {}

    def run(x):
        step(x)
        sync()

    benchmark.pedantic(run, setup=setup, rounds=10 if device == "cpu" else 50, warmup_rounds=1, iterations=1)
