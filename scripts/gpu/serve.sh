#!/usr/bin/env bash
# kiln serve on an H100/H200: bench/serve_load.py with 256 concurrent streaming clients (10% hang up mid-stream)
# on the bundled model, plus the forced-preemption run with a small KV pool. Writes logs + JSON under "$OUT".
#
# The GPU image has torch but (per KINDS.md's package list) probably not fastapi / uvicorn / prometheus-client.
# Nothing can be downloaded there, so two steps:
#   1. here, with network:   bash scripts/gpu/serve.sh fetch      -> wheels in .whl/ (cp312, manylinux)
#   2. on the GPU machine:   bash scripts/gpu/serve.sh            (carry .whl; installed into /tmp/site)
# Without the openai client the benchmark's clients speak raw SSE through httpx (--client auto does that).
set -uo pipefail
cd "$(dirname "$0")/../.."

SERVER_PKGS="fastapi starlette pydantic pydantic_core annotated_types annotated_doc opentelemetry_api
typing_inspection typing_extensions anyio sniffio idna uvicorn click h11 prometheus_client httpx httpcore certifi"

if [ "${1:-}" = "fetch" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  mkdir -p .whl
  for mod in $SERVER_PKGS; do
    dist=$(python3 -c "import importlib.metadata as m, sys; n='$mod'.replace('_','-'); print(f'{n}=={m.version(n)}')" 2>/dev/null) \
      || { echo "fetch: $mod is not installed here; install it first" >&2; exit 2; }
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$dist" \
      || { echo "fetch: no cp312 manylinux wheel for $dist" >&2; exit 2; }
  done
  ls -1 .whl
  exit 0
fi

OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/env.txt"

python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
  || { echo "no CUDA device visible to torch: run this on the GPU machine" | tee -a "$OUT/env.txt" >&2; exit 2; }

missing=""
for mod in fastapi uvicorn prometheus_client httpx; do
  python3 -c "import $mod" 2>/dev/null || missing="$missing $mod"
done
if [ -n "$missing" ]; then
  echo "missing on this machine:$missing -- run 'bash scripts/gpu/serve.sh fetch' where pip works and carry .whl" \
    | tee -a "$OUT/env.txt" >&2
  exit 2
fi
client=$(python3 -c "import openai" 2>/dev/null && echo openai || echo httpx)
if [ "$client" = openai ]; then
  echo "client: openai $(python3 -c 'import openai; print(openai.__version__)')"
else
  echo "client: openai is not installed here; the clients speak raw SSE over httpx"
fi | tee -a "$OUT/env.txt"
python3 -c "from kiln.models import default_model_path as p; assert (p() / 'model.safetensors').exists(), p()" \
  || { echo "the bundled model is missing from this checkout" >&2; exit 2; }

echo "== bench/serve_load.py --gpu (256 clients, bundled model; full run + forced-preemption run) =="
timeout 540 python3 bench/serve_load.py --gpu --clients 256 --client "$client" --json "$OUT/serve_load.json" \
  2>&1 | tee "$OUT/serve_load.log"
rc=${PIPESTATUS[0]}
echo "== bench rc=$rc (0: every check passed; see PROBLEM lines otherwise) =="
exit "$rc"
