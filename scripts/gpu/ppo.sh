#!/usr/bin/env bash
# kiln.rl on one GPU, in one run (< 9 minutes on an H100):
#   1. bench/ppo_vs_trl.py at batch 64 x 48 tokens, fp32 then bf16 autocast (BENCH_ITERS iterations each; TRL as
#      shipped and + gc.freeze(); kiln's phase breakdown; per-iteration training reward; final reward of every
#      policy sampled by one fp32 engine);
#   2. a larger `kiln ppo --demo` run (bundled model, word-list reward) with its reward/KL plot;
#   3. optionally (LORA_ITERS > 0) the LoRA (peft) variant of the demo;
#   4. optionally (REWARD_SEEDS="1 2 3 ...") the final-reward comparison over several seeds: kiln and TRL
#      (+ gc.freeze(), the same updates) trained REWARD_ITERS iterations from each seed, paired mean and spread;
#      REWARD_PARALLEL seeds run at once (default 1);
#   5. a compact table of all of it, printed last.
# PRECS (default "fp32 bf16") picks the bench precisions; DEMO_ITERS=0 skips the demo; KILN_FLAGS go to the bench
# (e.g. "--kiln-eager" for training steps without CUDA graphs).
#
#   bash scripts/gpu/ppo.sh            # from the repository root; results go to $OUT (default ./out/ppo)
#   DEVICE=cpu DEMO_ITERS=2 BENCH_ITERS=2 BENCH_BATCH=8 BENCH_LEN=8 bash scripts/gpu/ppo.sh   # dry run of every step
#
# TRL is the anchor of the bench (trl==1.12.0, the last release with PPOTrainer). If a wheel folder .whl/ exists,
# trl, datasets, dill and multiprocess are installed from it offline with --no-deps (the GPU image already has
# pyarrow, pandas, accelerate, ...); otherwise the bench runs the kiln side only. torch/transformers are never
# touched. Every step has a time limit (STEP_LIMIT_S, DEMO_LIMIT_S) so the whole script stays inside its budget.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/out/ppo}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
BENCH_ITERS="${BENCH_ITERS:-10}"
BENCH_BATCH="${BENCH_BATCH:-64}"
BENCH_LEN="${BENCH_LEN:-48}"
EVAL_SAMPLES="${EVAL_SAMPLES:-8}"   # responses per held-out prompt (32 prompts) for the final reward: 1 is too noisy
DEMO_ITERS="${DEMO_ITERS:-120}"
LORA_ITERS="${LORA_ITERS:-0}"
PRECS="${PRECS:-fp32 bf16}"
REWARD_SEEDS="${REWARD_SEEDS:-}"
REWARD_ITERS="${REWARD_ITERS:-30}"
REWARD_PARALLEL="${REWARD_PARALLEL:-1}"
KILN_FLAGS="${KILN_FLAGS:-}"
STEP_LIMIT_S="${STEP_LIMIT_S:-170}"
DEMO_LIMIT_S="${DEMO_LIMIT_S:-150}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee "$OUT/ppo.log") 2>&1
T_START=$(date +%s)

echo "== environment"
$PY - <<'PY'
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__,
      "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))
PY
if ! $PY -c "import matplotlib" 2>/dev/null; then
  { [ -d .whl ] && $PY -m pip install -q --no-index --find-links .whl matplotlib; } || echo "no matplotlib: no plot"
fi

HAVE_TRL=0
if $PY -c "import trl.experimental.ppo" 2>/dev/null; then
  HAVE_TRL=1
elif [ -d .whl ] && ls .whl/trl-1.12.0-*.whl >/dev/null 2>&1; then
  # The GPU image already has TRL's heavy dependencies (pyarrow, pandas, accelerate, xxhash, fsspec); only trl,
  # datasets, dill and multiprocess travel in .whl/, installed with --no-deps so torch/transformers stay as they are.
  echo "== installing trl==1.12.0 (+ datasets, dill, multiprocess) from .whl/ (offline, --no-deps)"
  before=$($PY -c "import torch, transformers; print(torch.__version__, transformers.__version__)")
  if $PY -m pip install -q --no-index --no-deps .whl/trl-1.12.0-*.whl .whl/datasets-*.whl .whl/dill-*.whl \
      .whl/multiprocess-*.whl; then
    after=$($PY -c "import torch, transformers; print(torch.__version__, transformers.__version__)")
    [ "$before" = "$after" ] || echo "WARNING: torch/transformers changed: $before -> $after"
    $PY -c "import trl.experimental.ppo" && HAVE_TRL=1
  else
    echo "trl install from .whl/ failed: kiln side only"
  fi
else
  echo "no trl and no .whl/ folder: the bench runs the kiln side only"
fi

echo "== bench/ppo_vs_trl.py, batch $BENCH_BATCH x $BENCH_LEN tokens, $BENCH_ITERS iterations (fp32, then bf16)"
TRL_FLAG=""
[ "$HAVE_TRL" = 1 ] || TRL_FLAG="--skip-trl"
[ "$BENCH_ITERS" -gt 0 ] || PRECS=""   # BENCH_ITERS=0: final-reward seeds and/or the demo only
for PREC in $PRECS; do
  EXTRA=""
  [ "$PREC" = bf16 ] && EXTRA="--bf16"
  echo "-- $PREC"
  timeout "$STEP_LIMIT_S" $PY bench/ppo_vs_trl.py --device "$DEVICE" --iterations "$BENCH_ITERS" \
      --batch-size "$BENCH_BATCH" --response-length "$BENCH_LEN" --eval-samples "$EVAL_SAMPLES" $EXTRA $TRL_FLAG $KILN_FLAGS \
      --json "$OUT/ppo_vs_trl_b${BENCH_BATCH}_$PREC.json" || echo "bench $PREC failed or timed out (rc $?)"
done

reward_seed() {  # one seed's paired kiln / TRL run; its lines printed together when it ends
  local seed=$1 log
  log=$(mktemp)
  timeout "$STEP_LIMIT_S" $PY bench/ppo_vs_trl.py --device "$DEVICE" --iterations "$REWARD_ITERS" \
      --batch-size "$BENCH_BATCH" --response-length "$BENCH_LEN" --eval-samples "$EVAL_SAMPLES" --seed "$seed" \
      --trl-runs gc_freeze $TRL_FLAG $KILN_FLAGS --json "$OUT/reward_seed$seed.json" > "$log" 2>&1 \
      || { rc=$?; tail -n 5 "$log" > "$log.tail"; echo "reward seed $seed failed or timed out (rc $rc):" >> "$log";
           cat "$log.tail" >> "$log"; rm -f "$log.tail"; }
  { echo "-- final reward, seed $seed: $REWARD_ITERS iterations, kiln and TRL + gc.freeze() (fp32)"
    grep -E "final eval|train scores" "$log"; grep -A5 "failed or timed out" "$log"; } || true
  rm -f "$log"
}
# REWARD_PARALLEL seeds at once: the bundled model leaves the GPU mostly idle, and rewards do not depend on timing
running=()
for SEED in $REWARD_SEEDS; do
  reward_seed "$SEED" &
  running+=($!)
  if (( ${#running[@]} >= REWARD_PARALLEL )); then
    wait "${running[0]}" || true
    running=("${running[@]:1}")
  fi
done
for pid in "${running[@]}"; do wait "$pid" || true; done

if [ "$DEMO_ITERS" -gt 0 ]; then
echo "== kiln ppo --demo (bundled Shakespeare model, word-list reward), $DEMO_ITERS iterations"
timeout "$DEMO_LIMIT_S" $PY -m kiln.cli ppo --demo --device "$DEVICE" --iterations "$DEMO_ITERS" --batch-size 64 \
    --num-mini-batches 4 --response-length 48 --learning-rate 3e-5 --kl-coef 0.02 --adaptive-kl 4 \
    --kl-horizon 2000 --eval-size 64 --seed 0 --no-progress --output-dir "$OUT/demo" \
    || echo "demo failed or timed out (rc $?)"
cp "$OUT/demo/ppo_curves.png" "$OUT/ppo_curves.png" 2>/dev/null || true
fi

if [ "$LORA_ITERS" -gt 0 ]; then
  echo "== kiln ppo --demo, LoRA (peft) variant, $LORA_ITERS iterations"
  timeout "$DEMO_LIMIT_S" $PY -m kiln.cli ppo --demo --device "$DEVICE" --iterations "$LORA_ITERS" --batch-size 64 \
      --num-mini-batches 4 --response-length 48 --learning-rate 3e-4 --lora-r 16 --eval-size 64 --seed 0 \
      --no-progress --output-dir "$OUT/demo_lora" || echo "LoRA demo failed or timed out (rc $?)"
fi

echo "== summary ($(( $(date +%s) - T_START )) s in all; files in $OUT)"
$PY - "$OUT" "$BENCH_BATCH" "$DEMO_ITERS" "$PRECS" <<'PY'
import json, sys
from pathlib import Path

out, batch = Path(sys.argv[1]), sys.argv[2]
rows = []
for prec in sys.argv[4].split():
    f = out / f"ppo_vs_trl_b{batch}_{prec}.json"
    if not f.exists():
        print(f"{prec}: no bench result")
        continue
    s = json.loads(f.read_text())["summary"]
    k, t, g = s["kiln"], s.get("trl"), s.get("trl_gc_freeze")
    ratio = lambda other: f"{other['s_per_iteration'] / k['s_per_iteration']:.2f}x" if other else "-"
    ph = k.get("phases_s", {})
    rows.append((prec, f"{k['s_per_iteration']:.3f}", f"{t['s_per_iteration']:.3f}" if t else "-", ratio(t),
                 f"{g['s_per_iteration']:.3f}" if g else "-", ratio(g),
                 f"{k['rollout_tokens_per_s'] / 1e3:.1f}k", f"{t['rollout_tokens_per_s'] / 1e3:.1f}k" if t else "-",
                 f"{k['final_eval_reward']:.4f}", f"{t['final_eval_reward']:.4f}" if t else "-",
                 f"{g['final_eval_reward']:.4f}" if g else "-",
                 " ".join(f"{n}={v:.3f}" for n, v in ph.items()),
                 f"{k['engine_vs_policy']['kl_engine_policy_per_token']:.1e}" if "engine_vs_policy" in k else "-"))
head = ("prec", "kiln s/it", "TRL s/it", "x", "TRL+gc s/it", "x", "kiln tok/s", "TRL tok/s", "kiln reward",
        "TRL reward", "TRL+gc reward", "kiln phases s/it", "KL(engine||policy)/tok")
if rows:
    w = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)))
pairs = []
for f in sorted(out.glob("reward_seed*.json")):
    s = json.loads(f.read_text())["summary"]
    if "trl_gc_freeze" in s:
        pairs.append((f.stem, s["kiln"]["final_eval_reward"], s["trl_gc_freeze"]["final_eval_reward"]))
        rev = [s[n].get("final_eval_reward_reverse_order") for n in ("kiln", "trl_gc_freeze")]
        if None not in rev and rev != [pairs[-1][1], pairs[-1][2]]:
            print(f"{f.stem}: the engine scored a policy differently in reverse order: kiln {rev[0]:.4f}, "
                  f"TRL+gc {rev[1]:.4f}")
if pairs:
    import statistics as st
    for name, k, t in pairs:
        print(f"{name}: final eval reward kiln {k:.4f}  TRL+gc {t:.4f}  diff {k - t:+.4f}")
    d = [k - t for _, k, t in pairs]
    se = st.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
    print(f"over {len(d)} seeds: kiln {st.mean(k for _, k, _ in pairs):.4f}  TRL {st.mean(t for _, _, t in pairs):.4f}"
          f"  paired diff {st.mean(d):+.4f} +- {se:.4f} (s.e.)")
for name in ("demo", "demo_lora"):
    f = out / name / "demo_result.json"
    if f.exists():
        d = json.loads(f.read_text())
        its = len(d["history"])
        print(f"{name}: {its} iterations, held-out reward {d['before']['eval/scores']:.4f} -> "
              f"{d['after']['eval/scores']:.4f}, KL {d['final_kl']:.2f} nats/response, {d['wall_s']:.0f} s "
              f"({d['wall_s'] / max(its, 1):.3f} s/iteration incl. evals); plot {out / name / 'ppo_curves.png'}")
    elif name == "demo" and int(sys.argv[3]) > 0:
        print("demo: no result")
PY
