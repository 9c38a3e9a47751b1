#!/usr/bin/env bash
# kiln.sparse on an H100/H200: the full-scale benchmark against spconv's GPU wheel, then the GPU tests; the
# benchmark's compact table (with the bars) is printed again last. Run from the repo root; < 8 minutes in all:
# benchmark rows stop at --budget-s 210 (the table so far still prints; `timeout` is only a backstop), tests 150 s.
# Triton autotuning is bounded (KILN_SPARSE_TUNE configs per key: 2 here, 3 by default; short timing) because
# every candidate is a compile on a cold machine and the backbone meets ~16 keys per dtype.
# spconv-cu126 2.3.8 is expected under PYTHONPATH=/tmp/site (see ../shared/GPU.md); without it the benchmark
# prints "spconv not installed" and reports kiln only.
set -uo pipefail
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:-/tmp/site}:$(pwd)"
export KILN_SPARSE_TUNE="${KILN_SPARSE_TUNE:-2}"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
python3 -c "import spconv; print('spconv', spconv.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"

echo "== benchmark (rows stop at --budget-s 210; timeout 270 s) =="
timeout 270 python3 bench/sparse_conv.py --scenes kitti nuscenes waymo --dtypes fp16 fp32 --budget-s 210 \
  --out "$OUT/sparse_conv.json" 2>&1 | grep -v Warning > "$OUT/sparse_conv.log"
bench_rc=${PIPESTATUS[0]}
echo "benchmark exit code $bench_rc; log in $OUT/sparse_conv.log"

echo "== GPU tests (timeout 150 s) =="
timeout 150 python3 -m pytest tests/sparse tests/ops/test_sparse_gemm.py tests/ops/test_hashing.py -q \
  -p no:cacheprovider 2>&1 | tee "$OUT/sparse_tests.log" | tail -6
test_rc=${PIPESTATUS[0]}

echo "== result (benchmark exit code $bench_rc, tests exit code $test_rc) =="
cat "$OUT/sparse_conv.txt" 2>/dev/null || tail -50 "$OUT/sparse_conv.log"
