#!/usr/bin/env bash
# Quantized engines (issue 8) on an H100/H200: the GPU tests of the W8A16/W4A16 (split-K decode tiles), W8A8 INT8,
# FP8 and quantized-KV-cache kernels at full size, a quantized engine end to end through the Triton kernels, then
# bench/llm_throughput.py --quant on the Llama-3.2-1B and Llama-3.1-8B shapes: batch-1 decode (b), batch-64
# throughput (d) and engine size, each mode against our bf16 engine. Prints a short table last.
#
#   bash scripts/gpu/quant_engine.sh              # logs + JSON under "$OUT" (default ./gpu_out)
#   DRY_RUN=1 bash scripts/gpu/quant_engine.sh    # CPU: interpreter tests + the bench on a tiny shape
#
# Bounded to < 9 min: tests <= 150 s, 1B bench <= 140 s, 8B bench <= 230 s (each bench prints and saves every
# run as it finishes, so a timeout keeps what was measured). Fixed GEMM tiles (the default; KILN_GEMM_TUNE=0 kept for older checkouts): autotuning every
# decode batch size's M would eat the budget.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-gpu_out}"
DRY_RUN="${DRY_RUN:-0}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
export KILN_GEMM_TUNE=0
START=$SECONDS
if [[ "$DRY_RUN" == 1 ]]; then
  export TRITON_INTERPRET=1
  MODELS=(tiny)
  DEVICE=cpu
  TESTS=(tests/ops/test_w8a8_fp8_gemm.py tests/ops/test_quant_kv_attention.py)
  T_TEST=300; T_SMALL=300; T_BIG=0
else
  MODELS=(llama-1b llama-8b)
  DEVICE=cuda
  TESTS=(tests/ops/test_w8a8_fp8_gemm.py tests/ops/test_quant_kv_attention.py tests/ops/test_wo_gemm.py
         tests/quant/test_llm_w8a8.py "tests/llm/test_quant_build.py::test_quantized_engine_triton_kernels_match_reference_path")
  T_TEST=150; T_SMALL=140; T_BIG=230
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU (dry run)"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', torch.cuda.get_device_capability(0) if torch.cuda.is_available() else '')"
  git log --oneline -1 2>/dev/null || true
} 2>&1 | tee "$OUT/env.txt"

echo "== pytest: quantized-engine kernels at full size =="
timeout "$T_TEST" python3 -m pytest -q -p no:cacheprovider -rs --durations=6 "${TESTS[@]}" \
  --junitxml="$OUT/pytest_quant_engine.xml" 2>&1 | tee "$OUT/pytest_quant_engine.log"
test_rc=${PIPESTATUS[0]}

bench_rc=0
for model in "${MODELS[@]}"; do
  limit=$T_SMALL
  [[ "$model" == llama-8b ]] && limit=$T_BIG
  echo "== bench/llm_throughput.py --quant: $model (b, d) [limit ${limit}s] =="
  timeout "$limit" python3 bench/llm_throughput.py --models "$model" --workloads b d --repeat 2 \
    --quant int8-wo int4-wo w8a8 fp8 --device "$DEVICE" --json "$OUT/quant_${model}.json" \
    2>&1 | tee "$OUT/bench_quant_${model}.log"
  rc=${PIPESTATUS[0]}
  (( rc != 0 )) && bench_rc=$rc
done

echo
echo "== summary ($(( SECONDS - START )) s): pytest rc=$test_rc, bench rc=$bench_rc =="
tail -n 2 "$OUT/pytest_quant_engine.log"
python3 - "$OUT" "${MODELS[@]}" <<'EOF'
import json, re, sys
from pathlib import Path
out, models = Path(sys.argv[1]), sys.argv[2:]
print(f"{'model':<10}{'mode':<9}{'(b) tok/s':>11}{'vs bf16':>9}{'(d) tok/s':>11}{'vs bf16':>9}{'engine GB':>11}{'of bf16':>9}")
for m in models:
    f = out / f"quant_{m}.json"
    if not f.exists():
        print(f"{m:<10}no results (see {out}/bench_quant_{m}.log)")
        continue
    data = json.loads(f.read_text())
    res = {}
    for r in data["rows"]:
        g = re.match(rf"{re.escape(m)} (?:\((\w)\) (\S+) out tok/s|engine size (\S+))$", r["workload"])
        if not g:
            continue
        if g.group(3):
            res.setdefault(g.group(3), {})["size"] = (r["ours"], r["ours"] / r["anchor"])
        else:
            res.setdefault(g.group(2), {})[g.group(1)] = (r["ours"], r["ours"] / r["anchor"])
    for mode, v in res.items():
        cells = []
        for k in ("b", "d"):
            cells += [f"{v[k][0]:11.0f}", f"{v[k][1]:8.2f}x"] if k in v else [f"{'-':>11}", f"{'-':>9}"]
        s = v.get("size")
        cells += [f"{s[0]:11.3f}", f"{100 * s[1]:8.1f}%"] if s else [f"{'-':>11}", f"{'-':>9}"]
        print(f"{m:<10}{mode:<9}" + "".join(cells))
    print(f"  [{data['device']}]")
EOF
exit $(( test_rc != 0 || bench_rc != 0 ))
