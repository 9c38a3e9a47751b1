#!/usr/bin/env bash
# kiln.rl on one GPU: a larger `kiln ppo --demo` run (reward/KL plot) and bench/ppo_vs_trl.py.
#
#   bash scripts/gpu/ppo.sh            # from the repository root; results go to $OUT (default ./out/ppo)
#   DEVICE=cpu DEMO_ITERS=2 LORA_ITERS=2 BENCH_ITERS=2 bash scripts/gpu/ppo.sh   # a dry run of every step
#
# TRL is the anchor of the bench (trl==1.12.0, the last release with PPOTrainer). If a wheel folder .whl/ exists
# (trl-1.12.0 and its dependencies: datasets, pyarrow, pandas, dill, multiprocess, xxhash, accelerate, ...), TRL is
# installed from it offline; otherwise the bench runs the kiln side only. torch/transformers are never touched:
# --no-index keeps pip to .whl/, and the installed torch satisfies TRL's requirement.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/out/ppo}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
DEMO_ITERS="${DEMO_ITERS:-150}"
LORA_ITERS="${LORA_ITERS:-60}"
BENCH_ITERS="${BENCH_ITERS:-10}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee "$OUT/ppo.log") 2>&1

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

echo "== kiln ppo --demo (bundled Shakespeare model, word-list reward), larger run"
$PY -m kiln.cli ppo --demo --device "$DEVICE" --iterations "$DEMO_ITERS" --batch-size 64 --num-mini-batches 4 \
    --response-length 48 --learning-rate 3e-5 --kl-coef 0.02 --adaptive-kl 4 --kl-horizon 2000 --eval-size 64 \
    --seed 0 --no-progress --output-dir "$OUT/demo"
cp "$OUT/demo/ppo_curves.png" "$OUT/ppo_curves.png" 2>/dev/null || true

echo "== kiln ppo --demo, LoRA (peft) variant"
if $PY -c "import peft" 2>/dev/null; then
  $PY -m kiln.cli ppo --demo --device "$DEVICE" --iterations "$LORA_ITERS" --batch-size 64 --num-mini-batches 4 \
      --response-length 48 --learning-rate 3e-4 --lora-r 16 --eval-size 64 --seed 0 --no-progress \
      --output-dir "$OUT/demo_lora" || echo "LoRA demo failed (see above)"
else
  echo "peft not installed: LoRA variant skipped"
fi

echo "== bench/ppo_vs_trl.py (same model, reward, prompts, hyper-parameters; TRL as shipped and + gc.freeze())"
TRL_FLAG=""
[ "$HAVE_TRL" = 1 ] || TRL_FLAG="--skip-trl"
for CFG in "16 fp32" "64 fp32" "64 bf16"; do
  set -- $CFG
  EXTRA=""
  [ "$2" = bf16 ] && EXTRA="--bf16"
  $PY bench/ppo_vs_trl.py --device "$DEVICE" --iterations "$BENCH_ITERS" --batch-size "$1" --response-length 48 \
      $EXTRA $TRL_FLAG --json "$OUT/ppo_vs_trl_b$1_$2.json"
done
echo "== done: $OUT"
ls -la "$OUT"
