"""The shared benchmark table: workload, ours, anchor, ratio and device, printed and written as JSON."""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@dataclass
class Row:
    workload: str
    ours: float
    anchor: float | None
    unit: str
    higher_is_better: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """How many times better ours is than the anchor (>1 means kiln wins)."""
        if self.anchor is None or self.anchor == 0 or self.ours == 0:
            return None
        return self.ours / self.anchor if self.higher_is_better else self.anchor / self.ours


@dataclass
class Table:
    title: str
    ours_name: str = "kiln"
    anchor_name: str = "anchor"
    rows: list[Row] = field(default_factory=list)

    def add(self, *args, **kwargs) -> Row:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        return row

    def render(self) -> str:
        dev = device_name()
        w = max([len("workload")] + [len(r.workload) for r in self.rows]) + 2
        lines = [f"{self.title}  [{dev}]",
                 f"{'workload':<{w}}{self.ours_name:>14}{self.anchor_name:>14}{'ratio':>9}  unit"]
        for r in self.rows:
            anchor = f"{r.anchor:14.4g}" if r.anchor is not None else f"{'-':>14}"
            ratio = f"{r.ratio:8.2f}x" if r.ratio is not None else f"{'-':>9}"
            lines.append(f"{r.workload:<{w}}{r.ours:14.4g}{anchor}{ratio}  {r.unit}")
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        payload = {"title": self.title, "device": device_name(), "torch": torch.__version__,
                   "date": time.strftime("%Y-%m-%d %H:%M:%S"), "ours": self.ours_name, "anchor": self.anchor_name,
                   "rows": [dict(asdict(r), ratio=r.ratio) for r in self.rows]}
        path.write_text(json.dumps(payload, indent=2))
        return path


def synced_seconds(fn: Callable[[], object]) -> float:
    """Wall time of one call of ``fn`` in seconds, with CUDA synchronised before and after it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def median_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds, synchronising CUDA around each call."""
    for _ in range(warmup):
        fn()
    return statistics.median(synced_seconds(fn) for _ in range(repeat))


def alternating_rounds(fns: Sequence[Callable[[], object]], repeat: int) -> list[list[object]]:
    """``results[i][r]``: what ``fns[i]()`` returned in round r. Round r calls every fn once, in order, starting with
    fn ``r % len(fns)``. On a shared machine the speed drifts by 20-40% over minutes (the 2-core CI machine: the same
    backbone took 700 ms, then 1100 ms; an H100's bf16 decode step 1.16-1.27 ms across runs); measuring one side's
    repeats and then the other's puts that drift into the ratio, while alternating calls expose every side to it
    alike."""
    results: list[list[object]] = [[] for _ in fns]
    for r in range(repeat):
        for j in range(len(fns)):
            i = (r + j) % len(fns)
            results[i].append(fns[i]())
    return results


def paired_median_times(fns: Sequence[Callable[[], object]], repeat: int = 5, warmup: int = 1) -> list[float]:
    """Median wall time (s) of each of ``fns``, timed in alternating rounds (``alternating_rounds``)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    return [statistics.median(t) for t in alternating_rounds([lambda fn=fn: synced_seconds(fn) for fn in fns],
                                                             repeat)]


def cuda_time(fn, repeat=7, warmup=5, calls=10) -> float:
    """Median seconds per call by CUDA events around ``calls`` back-to-back launches (wall clock on a CPU).

    Timing a single launch would also count the Python launch path (checks, autotuner lookup) as GPU time;
    back-to-back calls keep the GPU queue full, as a model's layers do, like triton.testing.do_bench.
    """
    if not torch.cuda.is_available():
        return median_time(fn, repeat=3, warmup=1)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(calls):
            fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / calls)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (the roofline's bandwidth)."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        y.copy_(x)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del x, y
    return 2 * 2**30 / statistics.median(times)
