"""Child process of ``test_tensor_parallel.py``: a TP=2 worker is killed while steps run, and ``generate`` must raise
EngineDeadError naming it. It runs apart from the test process because on CUDA the collective that waited on the
dead rank may stay queued on rank 0's stream (the NCCL abort does not always return), which would stall any later
test on that GPU.

    python tests/llm/tp_killed_mid_step.py CHECKPOINT ENGINE_KWARGS_JSON   # prints "killed PID" then one verdict
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time


def main(path: str, engine_kwargs: dict) -> None:
    from kiln.llm import LLM, SamplingParams
    from kiln.llm.distributed import EngineDeadError

    prompts = [[0, 5, 9, 33, 100, 7, 12], [0, 3, 200], list(range(2, 45))]
    params = SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True)
    llm = LLM(path, tensor_parallel_size=2, **engine_kwargs)
    pid = llm.engine.workers.procs[0].pid
    print(f"killed {pid}", flush=True)
    threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
    t0 = time.time()
    try:
        for _ in range(200):
            llm.generate(prompts, params)
        print("no error", flush=True)
    except EngineDeadError as exc:
        print(f"EngineDeadError after {time.time() - t0:.1f} s: {exc}", flush=True)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent test
        print(f"{type(exc).__name__}: {exc}", flush=True)
    os._exit(0)  # skip interpreter teardown: a CUDA stream may still wait on the dead rank


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
