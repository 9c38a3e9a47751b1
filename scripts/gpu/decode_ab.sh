#!/usr/bin/env bash
# A/B of a batch-1 decode step between an older tree and this one, on one GPU machine: decode_step_probe.py's
# graph replay and run-ahead TPOT for each model / mode, each side in its own process, alternating.
#
#   mkdir -p _base && git archive REV kiln scripts bench | tar -x -C _base     # the older tree (untracked copy)
#   BASE=_base MODELS="llama-1b" QUANTS="bf16 int8-wo int4-wo" ROUNDS=2 bash scripts/gpu/decode_ab.sh
#
# Logs under $OUT (probe_<model>_<quant>_<side><round>.log); one line per run.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-gpu_out}"
BASE="${BASE:?BASE must name the directory of the older tree}"
mkdir -p "$OUT"
export PYTHONDONTWRITEBYTECODE=1
for model in ${MODELS:-llama-1b}; do
  for q in ${QUANTS:-int4-wo}; do
    for r in $(seq 1 "${ROUNDS:-1}"); do
      for side in base new; do
        dir=$([[ $side == base ]] && echo "$BASE" || echo .)
        log="$OUT/probe_${model}_${q}_${side}${r}.log"
        timeout -s KILL "${LIMIT:-150}" python3 "$dir/scripts/gpu/decode_step_probe.py" --model "$model" --quant "$q" \
          --tokens "${TOKENS:-256}" --replays 100 --rounds 1 > "$log" 2>&1
        echo "$model $q $side$r: $(grep -E '^graph replay' "$log" | cut -c1-44)" \
             "| $(grep -E '^async_scheduling=True' "$log" | cut -c1-42)" \
             "| $(grep -E '^greedy twin' "$log" | cut -c1-130)"
      done
    done
  done
done
