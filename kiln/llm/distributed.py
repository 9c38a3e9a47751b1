"""Tensor-parallel plumbing: the rank's view of its process group, start-up checks, and the worker processes.

``LLM(..., tensor_parallel_size=N)`` keeps the scheduler, the sampler and the tokenizer in the calling process
(rank 0) and starts N-1 worker processes itself (``torch.multiprocessing`` spawn). Every rank holds its shard of the
model and the KV cache of its heads; model collectives run on the default process group (NCCL on CUDA, one GPU per
rank; gloo on the CPU). Each step rank 0 sends the step's packed inputs (token ids, positions, slot mapping, block
tables, ...) to every worker over a pipe; the ranks then run the same forward and meet in its all-reduces.

A worker that dies (killed, crashed, out of memory) stops the engine with ``EngineDeadError`` naming the rank, its
exit code and its traceback when it sent one: a monitor thread waits on the workers' process sentinels and records
the death; on CUDA rank 0 waits for each step by polling an event, so a step whose collective waits on the dead rank
raises instead of hanging (gloo fails by itself when the peer's sockets close); shutdown then aborts the NCCL group. Workers exit when rank 0 goes away (their pipe reaches EOF), and ``shutdown`` (also run by
a finaliser at interpreter exit) stops them cleanly.

As with any spawn-based launcher, a script that builds a tensor-parallel engine at import time needs an
``if __name__ == "__main__":`` guard (the workers re-import the main module).
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import wait as wait_connections
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# last resort for a collective that never completes (a live but stuck peer); dead peers are caught much sooner
COLLECTIVE_TIMEOUT_S = float(os.environ.get("KILN_TP_TIMEOUT_S", "600"))
STARTUP_TIMEOUT_S = float(os.environ.get("KILN_TP_STARTUP_TIMEOUT_S", "600"))
TEARDOWN_TIMEOUT_S = 20.0  # how long shutdown waits for the process group to tear down
# ... and for the abort after a worker died: it returns at once or, with a collective stuck on the dead rank, never
DEAD_TEARDOWN_TIMEOUT_S = 10.0


class EngineDeadError(RuntimeError):
    """A tensor-parallel worker died: the engine cannot run another step (create a new one)."""


@dataclass
class TensorParallel:
    """This rank's place in its tensor-parallel group; at size 1 every collective is a no-op."""

    rank: int = 0
    size: int = 1
    group: Any = None            # None: the default process group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks in place (row-parallel partial sums, vocab-parallel embedding rows)."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., n]`` on each rank -> ``[..., size * n]``, rank-major along the last dimension (LM-head logits)."""
        if self.size == 1:
            return x
        x = x.contiguous()
        rows = x.reshape(-1, x.shape[-1])
        out = rows.new_empty(self.size * rows.shape[0], rows.shape[1])
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, rows, group=self.group)
        out = out.view(self.size, rows.shape[0], rows.shape[1]).movedim(0, 1)
        return out.reshape(*x.shape[:-1], self.size * x.shape[-1])


SINGLE = TensorParallel()


def divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"tensor_parallel_size={d} does not divide {what} ({n})")
    return n // d


def check_tensor_parallel_size(size: Any, config, device: torch.device) -> None:
    """Start-up checks of ``tensor_parallel_size`` against the devices and the model (ValueError naming them)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be an int >= 1, got {size!r}")
    if size == 1:
        return
    # the model first: whether a size can split it does not depend on the machine
    divide(config.num_heads, size, f"the number of attention heads of {config.architecture}")
    kv = config.num_kv_heads
    if kv % size and size % kv:
        raise ValueError(f"tensor_parallel_size={size} and the model's {kv} KV heads: one must divide the other "
                         "(KV heads are split across ranks, or replicated when there are fewer KV heads than ranks)")
    divide(config.intermediate_size, size, f"the MLP intermediate size of {config.architecture}")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        first = first_gpu(device) if count else 0
        if first + size > count:
            raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs (one per rank, from cuda:{first}) but "
                             f"{count} {'is' if count == 1 else 'are'} visible")
    elif device.type != "cpu":
        raise ValueError(f"tensor parallelism runs on cuda (NCCL) or cpu (gloo), not {device.type}")
    if dist.is_available() and dist.is_initialized():
        raise ValueError(f"tensor_parallel_size={size}: this process already initialised torch.distributed (e.g. "
                         "under torchrun); the engine starts its own tensor-parallel workers, so build it in a "
                         "process without a default process group")


def first_gpu(device: torch.device) -> int:
    """The GPU of rank 0: the device's index, else the current CUDA device."""
    return device.index if device.index is not None else torch.cuda.current_device()


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r runs on ``cuda:(first + r)``; on the CPU every rank uses the CPU. Rank 0 of an engine without
    tensor parallelism keeps the device as given."""
    if device.type == "cuda" and rank > 0:
        return torch.device("cuda", first_gpu(device) + rank)
    return device


def init_process_group(rank: int, size: int, port: int, device: torch.device, store=None) -> TensorParallel:
    """Join the default process group (NCCL on CUDA, gloo on the CPU) through rank 0's TCP store."""
    timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    if store is None:
        store = dist.TCPStore("127.0.0.1", port, size, False, timeout=timedelta(seconds=STARTUP_TIMEOUT_S))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    return TensorParallel(rank, size)


# ------------------------------------------------------------------------------------------------ worker processes
@dataclass
class WorkerSpec:
    """Everything a worker needs to build its rank of the engine (picklable)."""

    rank: int
    size: int
    port: int
    model: str
    loras: list | None
    load_format: str
    engine_config: dict
    device: str            # rank 0's device; this rank runs on rank_device(device, rank)
    threads: int
    log_level: int = logging.WARNING


def worker_spec(rank: int, size: int, port: int, model: str, loras, load_format: str, engine_config: dict,
                device: torch.device, threads: int) -> WorkerSpec:
    """The spec of worker ``rank``. It carries rank 0's device: ``build_rank`` adds the rank itself (cuda:0 ->
    cuda:1 for rank 1); handing it cuda:1 made rank 1 ask for cuda:2, "invalid device ordinal" on two GPUs."""
    return WorkerSpec(rank, size, port, model, loras, load_format, engine_config, str(device), threads,
                      logging.getLogger().getEffectiveLevel())


def _worker_main(spec: WorkerSpec, conn) -> None:
    """A worker's life: load its shard of the model, join the process group, allocate its KV cache (and capture its
    CUDA graphs), then run every step rank 0 sends until told to stop (or rank 0's pipe closes)."""
    logging.basicConfig(level=spec.log_level, format=f"%(asctime)s tp-rank{spec.rank} %(levelname)s %(name)s: "
                                                     "%(message)s")
    tp = None
    try:
        if spec.threads > 0:
            torch.set_num_threads(spec.threads)
        from tqdm.auto import tqdm

        # tqdm's default lock is a multiprocessing semaphore, which the fast exit below would leak
        tqdm.set_lock(threading.RLock())
        device = torch.device(spec.device)
        conn.send(("started", os.getpid()))
        from .config import EngineConfig
        from .engine import build_rank

        config = EngineConfig(**spec.engine_config)
        tp = TensorParallel(spec.rank, spec.size)
        _, runner, _ = build_rank(Path(spec.model), spec.loras, spec.load_format, config, device, tp,
                                  connect=lambda: (conn.send(("loaded", None)),
                                                   init_process_group(spec.rank, spec.size, spec.port,
                                                                      rank_device(device, spec.rank))))
        conn.send(("ready", runner.num_blocks))
        while True:
            try:
                kind, payload = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                logger.warning("rank 0 went away; worker %d exits", spec.rank)
                break
            if kind == "step":
                runner.run(payload)
            elif kind == "update_weights":
                runner.load_named_tensors(payload)
            elif kind == "shutdown":
                runner.release_graphs()
                break
            else:
                raise RuntimeError(f"unknown message {kind!r} from rank 0")
    except BaseException:  # noqa: BLE001 - report anything to rank 0, then die with a non-zero code
        tb = traceback.format_exc()
        logger.error("tensor-parallel worker %d failed:\n%s", spec.rank, tb)
        try:
            conn.send(("error", tb))
        except (OSError, ValueError):
            pass
        conn.close()
        os._exit(1)
    if tp is not None and dist.is_initialized() and dist.get_backend() != "nccl":
        # NCCL: no teardown here; it waits on rank 0, which waits for this process to exit (the exit frees it)
        dist.destroy_process_group()
    conn.close()
    logging.shutdown()
    os._exit(0)  # nothing left to flush; skips a second of interpreter teardown per worker


class TPWorkers:
    """Rank 0's handle on the N-1 worker processes: start, per-step send, liveness, shutdown."""

    def __init__(self, size: int, model: str, loras, load_format: str, engine_config: dict, device: torch.device):
        import torch.multiprocessing as mp

        self.size = size
        self.device = device
        self.error: str | None = None
        self._closing = False
        self._lock = threading.Lock()
        ctx = mp.get_context("spawn")
        # rank 0 hosts the store on a port the OS picks, so two engines never race for one
        self.store = dist.TCPStore("127.0.0.1", 0, size, True, timeout=timedelta(seconds=STARTUP_TIMEOUT_S),
                                   wait_for_workers=False)
        threads = max(1, (os.cpu_count() or 1) // size) if device.type == "cpu" else 0
        self.procs, self.conns = [], []
        for rank in range(1, size):
            parent, child = ctx.Pipe(duplex=True)
            spec = worker_spec(rank, size, self.store.port, model, loras, load_format, engine_config, device,
                               threads)
            proc = ctx.Process(target=_worker_main, args=(spec, child), name=f"kiln-tp-rank{rank}", daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        self._wake_r, self._wake_w = ctx.Pipe(duplex=False)
        self._monitor = threading.Thread(target=self._watch, name="kiln-tp-monitor", daemon=True)
        self._monitor.start()
        self._wait_for("started")
        logger.info("started %d tensor-parallel workers (pids %s)", size - 1, [p.pid for p in self.procs])

    # -------------------------------------------------------------------------------------------- start-up
    def connect_rank0(self) -> TensorParallel:
        """Join the process group once every worker has loaded its shard (a worker that fails to load is reported
        with its traceback instead of leaving rank 0 waiting for it in the rendezvous)."""
        self._wait_for("loaded")
        return init_process_group(0, self.size, self.store.port, rank_device(self.device, 0), store=self.store)

    def _wait_for(self, kind: str) -> list:
        """Wait for message ``kind`` from every worker, failing fast (with its traceback) if one dies."""
        values = [None] * len(self.conns)
        pending = set(range(len(self.conns)))
        while pending:
            ready = wait_connections([self.conns[i] for i in pending] + [self._wake_r], timeout=STARTUP_TIMEOUT_S)
            if not ready:
                self._fail(f"tensor-parallel workers did not report {kind!r} within {STARTUP_TIMEOUT_S:.0f} s")
            for i in list(pending):
                conn = self.conns[i]
                if conn not in ready:
                    continue
                try:
                    msg, value = conn.recv()
                except (EOFError, OSError):
                    self.check()
                    self._fail(f"tensor-parallel worker rank {i + 1} closed its pipe during start-up")
                if msg == "error":
                    self._record_death(i, value)
                    self.check()
                if msg == kind:
                    values[i] = value
                    pending.discard(i)
            if self._wake_r in ready:
                self.check()
        return values

    def wait_ready(self, num_blocks: int) -> None:
        blocks = self._wait_for("ready")
        if any(b != num_blocks for b in blocks):
            self._fail(f"ranks disagree on the KV-cache size: rank 0 has {num_blocks} blocks, workers {blocks}")

    # -------------------------------------------------------------------------------------------- liveness
    def _watch(self) -> None:
        sentinels = {p.sentinel: i for i, p in enumerate(self.procs)}
        ready = wait_connections(list(sentinels) + [self._wake_r])
        if self._closing:
            return
        for s in ready:
            if s in sentinels:
                self._record_death(sentinels[s], None)
        if self.error is not None:
            # Only record and log: a step in flight on rank 0 polls for the error (wait_until) and raises. Aborting
            # NCCL from this thread while the step's thread was inside a collective call deadlocked both (seen on
            # 2x H100); the group is aborted by shutdown, once no step runs.
            logger.error("%s", self.error)

    def _record_death(self, index: int, tb: str | None) -> None:
        with self._lock:
            if self.error is not None and tb and "Worker traceback" not in self.error:
                self.error += f". Worker traceback:\n{tb}"  # the monitor thread got there first
            if self.error is not None or self._closing:
                return
            proc, conn = self.procs[index], self.conns[index]
            if tb is None:
                try:  # a worker that raised sent its traceback before exiting
                    while conn.poll(0):
                        msg, value = conn.recv()
                        if msg == "error":
                            tb = value
                except (EOFError, OSError):
                    pass
            # another thread (a caller's join) may reap the process between our wait and our poll, making our
            # waitpid fail and exitcode read None for a moment: poll until whoever reaped it records the code
            deadline = time.monotonic() + 1.0
            proc.join(timeout=0.05)
            code = proc.exitcode
            while code is None and time.monotonic() < deadline:
                proc.join(timeout=0.05)
                code = proc.exitcode
            how = "is unresponsive" if code is None else (f"was killed by signal {-code}" if code < 0
                                                          else f"exited with code {code}")
            self.error = (f"tensor-parallel worker rank {index + 1} (pid {proc.pid}) {how}; the engine is stopped "
                          "and cannot run more steps" + (f". Worker traceback:\n{tb}" if tb else ""))

    def check(self, wait: float = 0.0) -> None:
        """Raise ``EngineDeadError`` if a worker has died (polls the processes too: the monitor may lag).

        ``wait``: after a collective failed, give a dying worker that long to be reaped (its sockets close before
        its process can be waited for)."""
        if self.error is None and not self._closing:
            # a sentinel turns readable when its process exits; unlike is_alive() it needs no reaping, which the
            # monitor thread may be doing at the same moment
            sentinels = {p.sentinel: i for i, p in enumerate(self.procs)}
            for s in wait_connections(list(sentinels), timeout=wait):
                self._record_death(sentinels[s], None)
        if self.error is not None:
            raise EngineDeadError(self.error)

    def _fail(self, message: str) -> None:
        with self._lock:
            if self.error is None:
                self.error = message
        raise EngineDeadError(self.error)

    # -------------------------------------------------------------------------------------------- messages
    def send(self, kind: str, payload: Any = None) -> None:
        """Send one message to every worker (pickled once)."""
        self.check()
        data = pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
        for i, conn in enumerate(self.conns):
            try:
                conn.send_bytes(data)
            except (BrokenPipeError, EOFError, OSError):
                self._record_death(i, None)
                self.check()

    def send_step(self, step_input) -> None:
        self.send("step", step_input)

    def wait_for_device(self, device: torch.device) -> None:
        """Wait for rank 0's queued work by polling an event instead of a blocking synchronise, so a worker that
        dies mid-step (its peers' NCCL kernels then wait forever) raises EngineDeadError instead of a hang."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        self.wait_until(event.query)

    def wait_until(self, done: Callable[[], bool]) -> None:
        """Poll ``done`` until it is true; raise EngineDeadError as soon as a worker is recorded dead."""
        while not done():
            if self.error is not None:
                raise EngineDeadError(self.error)
            time.sleep(0)  # let the monitor thread record a death

    # -------------------------------------------------------------------------------------------- shutdown
    def _leave_process_group(self) -> None:
        """Destroy the group (an NCCL group with a dead member is aborted), in a helper thread with a deadline:
        NCCL's teardown can block for good on a dead peer, and shutdown must return either way."""
        if not dist.is_initialized():
            return
        dead = self.error is not None and self.device.type == "cuda"
        errors: list[BaseException] = []

        def leave():
            try:
                if dead:
                    dist.distributed_c10d._abort_process_group()
                else:
                    dist.destroy_process_group()
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        t = threading.Thread(target=leave, name="kiln-tp-teardown", daemon=True)
        t.start()
        limit = DEAD_TEARDOWN_TIMEOUT_S if dead else TEARDOWN_TIMEOUT_S
        t.join(limit)
        if t.is_alive():
            logger.warning("the process group did not tear down within %.0f s; another tensor-parallel engine "
                           "cannot start in this process (restart it)", limit)
        elif errors:
            logger.warning("leaving the process group failed: %s", errors[0])

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the workers (a clean exit if they are idle, else terminate), then leave the process group."""
        if self._closing:
            return
        self._closing = True
        data = pickle.dumps(("shutdown", None))
        for conn in self.conns:
            try:
                conn.send_bytes(data)
            except (BrokenPipeError, EOFError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=timeout)
            if proc.is_alive():
                logger.warning("tensor-parallel worker %s did not exit; terminating it", proc.name)
                proc.terminate()
                proc.join(timeout=timeout)
            if proc.is_alive():
                proc.kill()
                proc.join()
        try:
            self._wake_w.send_bytes(b"x")
        except (OSError, ValueError):
            pass
        for conn in self.conns:
            conn.close()
        # last, with the workers gone: NCCL's teardown on rank 0 blocked while a worker was still exiting
        self._leave_process_group()
        self.store = None
        logger.info("tensor-parallel workers stopped")
