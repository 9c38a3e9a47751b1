#!/usr/bin/env bash
# kiln.llm tensor parallelism on a machine with two GPUs (H100s): TP=2 greedy output equals TP=1 on a random
# checkpoint with the Llama-3.1-8B widths (2 layers, read from sharded safetensors files, fp32; bf16 reported), then
# bench (c) -- 512 requests of 1000 in / 1000 out, Llama-3.1-8B shape, bf16, dummy weights -- at TP=1 and TP=2,
# then the tensor-parallel tests on the GPUs (NCCL, CUDA graphs captured on every rank, a worker killed mid-run).
#
#   bash scripts/gpu/tp.sh                  # from anywhere; logs and JSON under $OUT (default ./gpu_out/tp)
#   DRY_RUN=1 bash scripts/gpu/tp.sh        # every step on the CPU (gloo) with a tiny shape, about 3 minutes
#   STEPS="check tests" bash scripts/gpu/tp.sh; STEPS=bench bash scripts/gpu/tp.sh   # split over two calls
#
# Bounded to < 9.5 min per call: the equality check <= 4 min, the bench <= 5.5 min (TP=1 rows are saved before
# TP=2 runs), the tests get what is left of 9 min (skipped if under 40 s). A short table comes last.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-gpu_out/tp}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
START=$SECONDS
STEPS="${STEPS:-check bench tests}"
has_step() { [[ " $STEPS " == *" $1 "* ]]; }
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  export TRITON_INTERPRET=1
  DEV=(--device cpu); MODEL=tiny; LAYERS=2; PROMPTS=4; TOKENS=16
else
  DEV=(); MODEL=llama-8b; LAYERS=2; PROMPTS=8; TOKENS=32
fi
{
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'GPUs', torch.cuda.device_count())"
  git log --oneline -1 2>/dev/null || true
} 2>&1 | tee "$OUT/env.txt"
# one CLI test imports the server: fastapi from the offline wheel folder if the image lacks it (carry .whl)
if ! python3 -c "import fastapi" 2>/dev/null && [ -d .whl ]; then
  python3 -m pip install -q --no-index --find-links .whl fastapi uvicorn httpx 2>&1 | grep -v WARNING || true
fi
if [[ "${DRY_RUN:-0}" != 1 ]] && (( $(python3 -c "import torch; print(torch.cuda.device_count())") < 2 )); then
  echo "tp.sh needs two GPUs (DRY_RUN=1 runs it on the CPU)"
  exit 2
fi

check_rc=0; bench_rc=0; test_rc=0
if has_step check; then
echo "== TP=2 vs TP=1 greedy equality: random $MODEL checkpoint, $LAYERS layers, fp32 (checked) and bf16 (reported) =="
timeout 240 python3 scripts/gpu/tp_check.py --model "$MODEL" --layers "$LAYERS" --tp 2 --prompts "$PROMPTS" \
  --tokens "$TOKENS" --bf16 --json "$OUT/tp_check.json" "${DEV[@]}" 2>&1 | tee "$OUT/tp_check.log"
check_rc=${PIPESTATUS[0]}
fi

if has_step bench; then
echo "== bench (c): $MODEL shape at TP=1 and TP=2 (bf16, dummy weights) =="
if [[ "${DRY_RUN:-0}" == 1 ]]; then BENCH_MODEL=tiny; else BENCH_MODEL=llama-8b; fi
timeout 330 python3 bench/llm_throughput.py --models "$BENCH_MODEL" --workloads c --tensor-parallel-size 1 2 \
  --repeat 1 --json "$OUT/tp_bench.json" "${DEV[@]}" 2>&1 | tee "$OUT/tp_bench.log"
bench_rc=${PIPESTATUS[0]}
fi

left=$(( 540 - (SECONDS - START) ))
if ! has_step tests; then
  echo "tests not in STEPS" > "$OUT/pytest_tp.log"
elif (( left >= 40 )); then
  echo "== pytest tests/llm/test_tensor_parallel.py (${left} s left) =="
  timeout "$left" python3 -m pytest -q -p no:cacheprovider -rs --durations=5 tests/llm/test_tensor_parallel.py \
    --junitxml="$OUT/pytest_tp.xml" 2>&1 | tee "$OUT/pytest_tp.log"
  test_rc=${PIPESTATUS[0]}
else
  echo "skipped: time budget spent" | tee "$OUT/pytest_tp.log"
fi

echo
echo "== summary ($(( SECONDS - START )) s): equality check rc=$check_rc, bench rc=$bench_rc, pytest rc=$test_rc =="
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
try:
    for r in json.loads((out / "tp_check.json").read_text()):
        result = ("PASS" if r["passed"] else "FAIL") if r["checked"] else "info"
        rows.append((f"greedy tp=2 == tp=1 ({r['dtype']})", f"{r['identical_sequences']}/{r['sequences']} identical",
                     f"max rel logit diff {r['max_rel_logit_diff']:.1e}", result))
except (OSError, ValueError, KeyError) as exc:
    rows.append(("greedy tp=2 == tp=1", "no result", str(exc)[:40], "FAIL"))
try:
    bench = json.loads((out / "tp_bench.json").read_text())
    for r in bench.get("rows", []):
        ratio = r["ours"] / r["anchor"] if r.get("anchor") else float("nan")
        rows.append((r["workload"], f"{r['ours']:.0f} tok/s", f"{ratio:.2f}x tp=1", ""))
except (OSError, ValueError, KeyError) as exc:
    rows.append(("bench (c)", "no result", str(exc)[:40], ""))
tail = (out / "pytest_tp.log").read_text().strip().splitlines()[-1:] if (out / "pytest_tp.log").exists() else []
rows.append(("pytest test_tensor_parallel.py", (tail[0] if tail else "no log")[:60], "", ""))
w = max(len(r[0]) for r in rows)
for r in rows:
    print(f"{r[0]:<{w}}  {r[1]:<24} {r[2]:<28} {r[3]}")
PY
exit $(( check_rc != 0 || bench_rc != 0 || test_rc != 0 ))
