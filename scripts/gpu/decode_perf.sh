#!/usr/bin/env bash
# kiln.llm batch-1 decode on an H100/H200: GPU tests of the decode kernels, per-linear GEMV bandwidth (kiln's
# Triton GEMV vs cuBLAS), then bench/llm_throughput.py workload (b) end to end with the GEMV off / on / on + PDL.
# Run from anywhere:  bash scripts/gpu/decode_perf.sh     (logs under "$OUT", default ./gpu_out)
# Bounded to < 8 min: tests <= 2 min, micro-benchmark <= 2 min, end-to-end runs share what is left (a run that
# would start after 5.3 min is skipped and reported as such).
# Variants: KILN_GEMV=off (cuBLAS + separate norm / SiLU kernels), on (default), on + KILN_PDL=1.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
START=$SECONDS
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
  git log --oneline -1 2>/dev/null || true
} 2>&1 | tee "$OUT/env.txt"

echo "== pytest: decode kernels at full size, basic ops, bf16 parity with the kernels on =="
timeout 130 python3 -m pytest -q -p no:cacheprovider -rs --durations=6 tests/ops/test_gemv.py \
  tests/ops/test_basic_ops.py tests/llm/test_gpu_parity.py --junitxml="$OUT/pytest_decode.xml" \
  2>&1 | tee "$OUT/pytest_decode.log"
test_rc=${PIPESTATUS[0]}

echo "== per-linear GEMV bandwidth (CUDA-graph chains over rotating weight copies) =="
timeout 130 python3 scripts/gpu/decode_gemv_bench.py --models llama-1b llama-8b --m 1 --sweep \
  2>&1 | tee "$OUT/gemv_bench.log"
micro_rc=${PIPESTATUS[0]}

e2e_rc=0
run_e2e() {  # $1 model, $2 label, $3 repeat, rest: env assignments
  local model=$1 label=$2 repeat=$3
  shift 3
  local log="$OUT/llm_${model}_${label}.log"
  if (( SECONDS - START > 320 )); then
    echo "skipped: time budget spent" > "$log"
    echo "== $model $label: skipped (time budget) =="
    return
  fi
  echo "== bench/llm_throughput.py $model (b) [$label: $*] =="
  env "$@" timeout 140 python3 bench/llm_throughput.py --models "$model" --workloads b --no-hf b \
    --repeat "$repeat" --json "$OUT/llm_${model}_${label}.json" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  (( rc != 0 )) && e2e_rc=$rc
}
run_e2e llama-1b gemv_on 3 KILN_GEMV=on KILN_PDL=0
run_e2e llama-1b cublas 3 KILN_GEMV=off KILN_PDL=0
run_e2e llama-1b gemv_pdl 3 KILN_GEMV=on KILN_PDL=1
run_e2e llama-8b gemv_on 1 KILN_GEMV=on KILN_PDL=0
run_e2e llama-8b cublas 1 KILN_GEMV=off KILN_PDL=0
run_e2e llama-8b gemv_pdl 1 KILN_GEMV=on KILN_PDL=1

echo
echo "== summary ($(( SECONDS - START )) s): pytest rc=$test_rc, micro-benchmark rc=$micro_rc, end-to-end rc=$e2e_rc =="
tail -n 2 "$OUT/pytest_decode.log"
awk '/^== per-linear decode bandwidth/{p=1} p' "$OUT/gemv_bench.log"
printf '\n%-10s %-10s %s\n' model variant "batch-1 decode (TPOT, tok/s, % of roofline)"
for model in llama-1b llama-8b; do
  for label in cublas gemv_on gemv_pdl; do
    log="$OUT/llm_${model}_${label}.log"
    tpot=$(grep -o 'TPOT p50 [0-9.]* ms' "$log" 2>/dev/null | tail -1)
    roof=$(grep -o 'batch-1 decode .*' "$log" 2>/dev/null | tail -1)
    printf '%-10s %-10s %s\n' "$model" "$label" "${tpot:-n/a}; ${roof:-$(head -c 80 "$log" 2>/dev/null)}"
  done
done
exit $(( test_rc != 0 || micro_rc != 0 || e2e_rc != 0 ))
