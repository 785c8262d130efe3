#!/usr/bin/env bash
# make gpu-check: the Triton backend on one CUDA GPU, under 8 minutes (the steps' timeouts add up to 7.7).
#  1. tests/test_triton_cuda.py: parity fp32/bf16/fp16 vs the float64 reference, gradcheck
#     (float64), NaN propagation, determinism, CUDA-graph capture of forward+backward,
#     torch.compile(fullgraph=True);
#  2. the loss test files with backend='triton' on the GPU's compiler (not the interpreter);
#  3. python -m kdkernels bench --device cuda --quick (eager, torch.compile, floor, peak memory) -> JSON.
# Without a GPU it says so and exits 0.
set -euo pipefail
PY=${PY:-python}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-check: no CUDA GPU visible (torch.cuda.is_available() is False): nothing to check, skipped."
    exit 0
fi
export TRITON_INTERPRET=0
OUT=${OUT:-out/gpu-check}
mkdir -p "$OUT"
"$PY" -c "import torch; print('gpu-check on', torch.cuda.get_device_name(), 'torch', torch.__version__)"
timeout 200 "$PY" -m pytest -x -q tests/test_triton_cuda.py
timeout 60 "$PY" -m pytest -x -q tests/test_triton_traffic.py -k counter
timeout 200 "$PY" -m kdkernels bench --device cuda --quick --out "$OUT/bench"
echo "gpu-check: passed; bench JSON in $OUT/bench/bench.json"
