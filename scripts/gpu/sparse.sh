#!/usr/bin/env bash
# kiln.sparse on an H100/H200: GPU tests, then the full-scale benchmark against spconv's GPU wheel.
# Run from the repo root. spconv-cu126 2.3.8 is expected under PYTHONPATH=/tmp/site (see ../shared/GPU.md);
# without it the benchmark prints "spconv not installed" and reports kiln only.
set -uo pipefail
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:-/tmp/site}:$(pwd)"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
python3 -c "import spconv; print('spconv', spconv.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"

echo "== GPU tests =="
timeout 240 python3 -m pytest tests/sparse tests/ops/test_sparse_gemm.py tests/ops/test_hashing.py -q \
  -p no:cacheprovider 2>&1 | tee "$OUT/sparse_tests.log" | tail -15
test_rc=${PIPESTATUS[0]}

echo "== benchmark (bounded by --budget-s; timeout 360 s) =="
timeout 360 python3 bench/sparse_conv.py --scenes kitti nuscenes waymo --dtypes fp16 fp32 --budget-s 280 \
  --out "$OUT/sparse_conv.json" 2>&1 | tee "$OUT/sparse_conv.log" | grep -v Warning | tail -45
echo "tests exit code: $test_rc"
