#!/usr/bin/env bash
# The whole pytest suite on a GPU machine (every test that takes a CUDA device runs its Triton kernels compiled,
# not interpreted), in parallel with pytest-xdist. The machine has no network: the test extras it lacks come as
# wheels in .whl/ (scripts/gpu/fetch_test_wheels.sh downloads them here; carry .whl), installed into /tmp/site.
#
#   bash scripts/gpu/full_suite.sh          # carry .whl; $OUT/pytest.log (+ _serial), the summary last
#   TESTS="tests/llm tests/rl" PYTEST_ARGS=-v bash scripts/gpu/full_suite.sh   # a subset; -v names failures as they happen
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -n 2
  ls .whl/*.tar.gz >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-build-isolation \
    --target /tmp/site .whl/*.tar.gz 2>&1 | tail -n 2
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
# pass 1 in parallel; pass 2 re-runs its failures one at a time: engines size their KV cache from the GPU memory
# left free, which the other workers' engines take (a clear ValueError under contention, not a failure of the code)
timeout -s KILL "${LIMIT:-420}" python3 -m pytest -q -n "${WORKERS:-12}" -rfEs --durations=10 ${PYTEST_ARGS:-} ${TESTS:-tests} \
  > "$OUT/pytest.log" 2>&1
echo "pass 1 (parallel) rc=$?: $(tail -n 1 "$OUT/pytest.log")"
# (--lfnf none: when pass 1 failed nothing, pass 2 runs nothing, not the whole selection again)
timeout -s KILL "${LIMIT2:-150}" python3 -m pytest -q --lf --lfnf none -rfEs ${PYTEST_ARGS:-} ${TESTS:-tests} \
  > "$OUT/pytest_serial.log" 2>&1
echo "pass 2 (its failures, serially) rc=$?"
grep -E "^(FAILED|ERROR)" "$OUT/pytest_serial.log" | cut -c1-200 | head -40
tail -n 3 "$OUT/pytest_serial.log"
