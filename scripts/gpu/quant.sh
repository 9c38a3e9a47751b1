#!/usr/bin/env bash
# kiln.quant on an H100/H200: GPU tests (kernels at full size) + the INT8 GEMM / conv benchmark.
# Run from the repo root:  bash scripts/gpu/quant.sh     (writes logs and JSON under "$OUT", default ./gpu_out)
# Bounded to < 5 min: tests ~1-2 min (fixed GEMM tiles), benchmark ~2-3 min (autotuned over 8 tile shapes).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
  python3 -c "import sklearn, onnx, onnxruntime; print('sklearn', sklearn.__version__, 'onnx', onnx.__version__, 'ort', onnxruntime.__version__)" \
    || echo "note: sklearn/onnx/onnxruntime missing: the digits / ONNX tests will be skipped"
} 2>&1 | tee "$OUT/env.txt"

echo "== pytest (GPU: Triton kernels for real, full-size shapes; fixed GEMM tiles) =="
KILN_GEMM_TUNE=0 timeout 170 python3 -m pytest -q -p no:cacheprovider -rs --durations=8 \
  tests/ops/test_gemm.py tests/quant --junitxml="$OUT/pytest_quant.xml" 2>&1 | tee "$OUT/pytest_quant.log"
test_rc=${PIPESTATUS[0]}

echo "== bench/int8_gemm.py (autotuned) =="
timeout 200 python3 bench/int8_gemm.py --out "$OUT/int8_gemm.json" 2>&1 | tee "$OUT/bench_int8_gemm.log"
bench_rc=${PIPESTATUS[0]}

echo
echo "== summary: pytest rc=$test_rc, bench rc=$bench_rc =="
tail -n 3 "$OUT/pytest_quant.log"
# the short table: the last block the benchmark printed
awk '/^INT8 GEMM \(kiln Triton/{p=1} p' "$OUT/bench_int8_gemm.log"
exit $(( test_rc != 0 || bench_rc != 0 ))
