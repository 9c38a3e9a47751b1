#!/usr/bin/env bash
# One GPU call after kernel work done without a GPU (session 5 wrote several): the GPU tests of the kernels that
# changed, the weight-only GEMMs at batch 1 and batch 64, and batch-1 decode against the roofline. Every log goes
# into one tarball, because a device call brings back at most 8 files.
#
#   bash scripts/gpu/kernels_check.sh            # < 9.5 min on an H100; $OUT/kernels_check.tgz + a table last
#   STEPS="tests gemv" bash scripts/gpu/kernels_check.sh
#
# Steps (each under its own timeout): tests (200 s), gemv (M = 1 per linear, 100 s), batch (M = 64: split vs
# joined int4 dot, 100 s), decode (bench/llm_throughput.py (b) on the 1B and 8B shapes, 160 s).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-gpu_out}"
LOGS="$(mktemp -d)"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
STEPS="${STEPS:-tests gemv batch decode}"
has_step() { [[ " $STEPS " == *" $1 "* ]]; }
declare -A RC
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git log --oneline -1 2>/dev/null || true
} > "$LOGS/env.txt" 2>&1
cat "$LOGS/env.txt"

run() {  # $1 step name, $2 seconds, rest: command
  local name=$1 limit=$2
  shift 2
  echo "== $name: $* (limit ${limit}s)"
  timeout -s KILL "$limit" "$@" > "$LOGS/$name.log" 2>&1
  RC[$name]=$?
  tail -n 4 "$LOGS/$name.log"
}

if has_step tests; then
  run tests 200 python3 -m pytest -q -p no:cacheprovider -x -rs tests/ops/test_hashing.py tests/ops/test_wo_gemm.py \
    tests/ops/test_gemm.py tests/ops/test_w8a8_fp8_gemm.py tests/sparse/test_triton_path.py \
    tests/sparse/test_rulebook_paths.py
fi
has_step gemv && run gemv 100 python3 scripts/gpu/wo_gemv_bench.py --models llama-8b llama-1b
has_step batch && run batch 100 python3 scripts/gpu/wo_gemv_bench.py --models llama-8b llama-1b --batch 64
has_step decode && run decode 160 python3 bench/llm_throughput.py --models llama-1b llama-8b --workloads b \
  --no-hf b --repeat 1 --json "$LOGS/decode.json"

tar czf "$OUT/kernels_check.tgz" -C "$LOGS" .
echo
echo "== summary (logs in $OUT/kernels_check.tgz)"
for name in tests gemv batch decode; do
  has_step "$name" || continue
  printf '%-7s rc=%-4s %s\n' "$name" "${RC[$name]:-?}" "$(grep -E 'passed|failed|error' "$LOGS/$name.log" 2>/dev/null | tail -1)"
done
grep -h "one decode step's linears" "$LOGS/gemv.log" 2>/dev/null
grep -h -A30 "== M = " "$LOGS/batch.log" 2>/dev/null
grep -h "batch-1 decode" "$LOGS/decode.log" 2>/dev/null
