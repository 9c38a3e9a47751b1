"""Load test of ``kiln serve``: N concurrent streaming clients (10% hang up mid-stream) against a real server.

    python bench/serve_load.py                       # 64 clients on the CPU, bundled model (tiny random Llama
                                                     #   if the bundled model is not there)
    python bench/serve_load.py --gpu                 # 256 clients on CUDA
    python bench/serve_load.py --model tiny          # tiny random Llama (needs transformers)

The server runs as a separate process (``python -m kiln.llm.server.cli serve``) so clients and engine do not share
a GIL. Each client streams one completion (greedy, ignore_eos, --max-tokens) through the official ``openai``
client (raw httpx SSE where openai is not installed). Checks, each failing the run (exit 1):
every non-disconnecting request completes; on the CPU (fp32) its text equals ``LLM.generate``'s greedy text;
afterwards no KV blocks are in use, nothing runs or waits, no request or event-loop task is left; /metrics
parses with prometheus_client and its counters add up to what was sent. A second run with a KV pool a quarter
of what the load needs forces preemption: no request may fail. Reports p50/p99 TTFT and TPOT and tokens/s
(anchor for tokens/s: offline ``LLM.generate`` of the same prompts) through bench.common's Table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OPENINGS = ["To be, or not to be", "Now is the winter of our discontent", "All the world's a stage",
            "Friends, Romans, countrymen", "If music be the food of love", "O Romeo, Romeo",
            "Once more unto the breach", "Is this a dagger which I see", "The quality of mercy",
            "Shall I compare thee", "What light through yonder window", "Double, double toil and trouble",
            "Tomorrow, and tomorrow", "Good night, good night", "Cry havoc", "Et tu, Brute"]
WORDS = ["king", "crown", "night", "sword", "love", "ghost", "storm", "queen", "blood", "heaven", "fool", "honour",
         "grave", "sea", "rose", "star"]


def make_prompts(n: int) -> list[str]:
    """n distinct prompts (an opening line and two words chosen by the index)."""
    return [f"{OPENINGS[i % len(OPENINGS)]}, {WORDS[(i // len(OPENINGS)) % len(WORDS)]} and "
            f"{WORDS[(i * 7 + 3) % len(WORDS)]}" for i in range(n)]


def disconnecting(n: int, frac: float) -> set[int]:
    """Indices of the round(frac * n) clients that hang up, spread evenly over the n."""
    k = round(frac * n)
    return {i * n // k + (n // k) // 2 for i in range(k)} if k else set()


# ------------------------------------------------------------------------------------------------ clients
@dataclass
class ClientResult:
    index: int
    status: str                 # "done", "disconnected" or "failed"
    text: str = ""
    ttft: float | None = None
    tpot: float | None = None
    completion_tokens: int = 0
    chunks: int = 0
    error: str = ""


async def _openai_stream(ac, model, prompt, max_tokens):
    stream = await ac.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                         stream=True, stream_options={"include_usage": True},
                                         extra_body={"ignore_eos": True})
    try:
        async for ch in stream:
            yield (ch.choices[0].text if ch.choices else ""), (ch.usage.completion_tokens if ch.usage else None)
    finally:
        await stream.close()


async def _httpx_stream(ac, model, prompt, max_tokens):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    async with ac.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            usage = ev.get("usage")
            yield (ev["choices"][0]["text"] if ev["choices"] else ""), (usage["completion_tokens"] if usage else None)


def make_client(base_url: str, api_key: str | None, kind: str = "auto", timeout: float = 600.0):
    if kind in ("auto", "openai"):
        try:
            import httpx
            import openai

            limits = httpx.Limits(max_connections=2048, max_keepalive_connections=2048)
            return "openai", openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=api_key or "none", max_retries=0,
                                                timeout=timeout,
                                                http_client=openai.DefaultAsyncHttpxClient(limits=limits))
        except ImportError:
            if kind == "openai":
                raise
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return "httpx", httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout,
                                      limits=httpx.Limits(max_connections=2048, max_keepalive_connections=2048))


async def one_client(kind, ac, model, index, prompt, max_tokens, hang_up_after: int | None) -> ClientResult:
    res = ClientResult(index, "done")
    stream = (_openai_stream if kind == "openai" else _httpx_stream)(ac, model, prompt, max_tokens)
    t0 = time.perf_counter()
    first = last = None
    try:
        async for text, usage in stream:
            now = time.perf_counter()
            if text:
                res.text += text
                res.chunks += 1
                first = first if first is not None else now
                last = now
            if usage is not None:
                res.completion_tokens = usage
            if hang_up_after is not None and res.chunks >= hang_up_after:
                res.status = "disconnected"
                break
    except Exception as exc:  # counted and reported as a failure
        res.status, res.error = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        await stream.aclose()
    if first is not None:
        res.ttft = first - t0
        if res.status == "done" and res.completion_tokens > 1:
            res.tpot = (last - first) / (res.completion_tokens - 1)
    return res


async def run_load(base_url: str, model: str, prompts: list[str], max_tokens: int, hang_up: set[int],
                   api_key: str | None = None, client: str = "auto") -> tuple[list[ClientResult], float]:
    """All clients at once; -> (results in prompt order, wall seconds)."""
    kind, ac = make_client(base_url, api_key, client)
    try:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_client(kind, ac, model, i, p, max_tokens,
                                                    3 + i % 5 if i in hang_up else None)
                                          for i, p in enumerate(prompts)))
        return list(results), time.perf_counter() - t0
    finally:
        await ac.close() if kind == "openai" else await ac.aclose()


# ------------------------------------------------------------------------------------------------ metrics
def scrape(base_url: str) -> dict:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(base_url + "/metrics", timeout=30).text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def m(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def settle(base_url: str, baseline_tasks: float, timeout: float = 15.0) -> dict:
    """Scrape until nothing runs, waits, holds KV blocks or lingers on the loop (or time runs out)."""
    deadline = time.monotonic() + timeout
    while True:
        s = scrape(base_url)
        idle = (m(s, "kiln_kv_blocks_used") == 0 and m(s, "kiln_num_requests_running") == 0
                and m(s, "kiln_num_requests_waiting") == 0 and m(s, "kiln_server_requests_in_flight") == 0
                and m(s, "kiln_server_event_loop_tasks") <= baseline_tasks)
        if idle or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


def check_run(results: list[ClientResult], want: list[str] | None, before: dict, after: dict,
              baseline_tasks: float, prompt_lens: list[int]) -> list[str]:
    """Every problem found in one run (an empty list means it passed)."""
    problems = []
    failed = [r for r in results if r.status == "failed"]
    if failed:
        problems.append(f"{len(failed)} requests failed, e.g. {failed[0].error}")
    done = [r for r in results if r.status == "done"]
    if want is not None:
        wrong = [r.index for r in done if r.text != want[r.index]]
        if wrong:
            problems.append(f"{len(wrong)} completed requests differ from LLM.generate (e.g. #{wrong[0]})")
    gone = [r for r in results if r.status == "disconnected"]

    def delta(name, **labels):
        return m(after, name, **labels) - m(before, name, **labels)

    for name, value in [("kiln_kv_blocks_used", 0), ("kiln_num_requests_running", 0),
                        ("kiln_num_requests_waiting", 0), ("kiln_server_requests_in_flight", 0)]:
        if m(after, name) != value:
            problems.append(f"after the run {name} = {m(after, name)} (want {value})")
    if m(after, "kiln_server_event_loop_tasks") > baseline_tasks:
        problems.append(f"{m(after, 'kiln_server_event_loop_tasks') - baseline_tasks:.0f} event-loop tasks left")
    checks = [
        ("requests answered 200", delta("kiln_requests_total", endpoint="/v1/completions", status="200"),
         len(results) - len(failed)),
        ("client aborts", delta("kiln_client_aborts_total"), len(gone)),
        ("prompt tokens", delta("kiln_prompt_tokens_total"), sum(prompt_lens)),
        ("finished by length", delta("kiln_request_finished_total", finish_reason="length"), len(done)),
        ("finished by abort", delta("kiln_request_finished_total", finish_reason="abort"), len(gone)),
        ("TTFT observations", delta("kiln_time_to_first_token_seconds_count"), len(results) - len(failed)),
        ("TPOT observations", delta("kiln_time_per_output_token_seconds_count"), len(done)),
    ]
    for what, got, expect in checks:
        if got != expect:
            problems.append(f"/metrics {what}: {got:g} != {expect}")
    generated = delta("kiln_generation_tokens_total")
    floor = sum(r.completion_tokens for r in done) + sum(1 for r in gone)
    if generated < floor:
        problems.append(f"/metrics generation tokens {generated:g} < {floor} seen by clients")
    return problems


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


# ------------------------------------------------------------------------------------------------ server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: str, args: list[str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        cmd = [sys.executable, "-m", "kiln.llm.server.cli", "serve", model, "--port", str(self.port),
               "--log-level", "warning", *args]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    def wait_ready(self, timeout: float = 300.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError("server did not become healthy")

    def stop(self) -> int:
        self.proc.send_signal(2)  # SIGINT: uvicorn's graceful shutdown
        try:
            rc = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.log.close()
        return rc


# ------------------------------------------------------------------------------------------------ main
def resolve_model(name: str | None, workdir: Path) -> Path:
    if name not in (None, "tiny"):
        return Path(name)
    if name is None:
        from kiln.models import default_model_path

        path = default_model_path()
        if (path / "model.safetensors").exists():
            return path
        print(f"bundled model not found at {path}; using a tiny random Llama", file=sys.stderr)
    from tests.llm.conftest import make_checkpoint

    path = workdir / "tiny-llama"
    make_checkpoint(path, "llama", seed=0)
    return path


def one_run(label, model_path, server_args, prompts, max_tokens, hang_up, want, tok, args, workdir):
    srv = ServerProcess(str(model_path), server_args, workdir / f"server-{label}.log")
    try:
        srv.wait_ready()
        asyncio.run(run_load(srv.url, model_path.name, prompts[:2], 4, set(), client=args.client))  # warm up
        base = scrape(srv.url)
        baseline_tasks = m(base, "kiln_server_event_loop_tasks")
        results, wall = asyncio.run(run_load(srv.url, model_path.name, prompts, max_tokens, hang_up,
                                             client=args.client))
        after = settle(srv.url, baseline_tasks)
    finally:
        rc = srv.stop()
    problems = check_run(results, want, base, after, baseline_tasks, [len(tok.encode(p)) for p in prompts])
    if rc != 0:
        problems.append(f"server exited with {rc} on SIGINT")
    done = [r for r in results if r.status == "done"]
    ttft = [r.ttft for r in results if r.ttft is not None]
    tpot = [r.tpot for r in done if r.tpot is not None]
    toks = sum(r.completion_tokens for r in done) + sum(len(tok.encode(r.text)) for r in results
                                                        if r.status == "disconnected")
    return dict(label=label, results=results, wall=wall, ttft=ttft, tpot=tpot, tokens=toks, problems=problems,
                preemptions=m(after, "kiln_num_preemptions_total") - m(base, "kiln_num_preemptions_total"),
                kv_total=m(after, "kiln_kv_blocks_total"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint/engine dir, or 'tiny' (default: bundled model)")
    ap.add_argument("--gpu", action="store_true", help="run on CUDA with 256 clients (unless --clients)")
    ap.add_argument("--clients", type=int, default=None, help="concurrent clients (default 64; 256 with --gpu)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--disconnect-frac", type=float, default=0.1)
    ap.add_argument("--dtype", default=None, help="default float32 on the CPU, auto (bf16) on the GPU")
    ap.add_argument("--client", default="auto", choices=["auto", "openai", "httpx"])
    ap.add_argument("--no-preempt-run", action="store_true", help="skip the run with a tiny KV pool")
    ap.add_argument("--strict", action=argparse.BooleanOptionalAction, default=None,
                    help="require exact greedy parity (default: on for fp32, off otherwise: bf16 batches differ)")
    ap.add_argument("--json", default=None, help="where to write the table as JSON (default bench/serve_load.json)")
    args = ap.parse_args(argv)
    n = args.clients or (256 if args.gpu else 64)
    device = "cuda" if args.gpu else "cpu"
    dtype = args.dtype or ("float32" if device == "cpu" else "auto")
    strict = args.strict if args.strict is not None else dtype == "float32"

    from bench.common import Table
    from kiln.llm import LLM, SamplingParams

    workdir = Path(tempfile.mkdtemp(prefix="kiln-serve-load-"))
    model_path = resolve_model(args.model, workdir)
    prompts = make_prompts(n)
    hang_up = disconnecting(n, args.disconnect_frac)

    print(f"reference: LLM.generate of {n} prompts x {args.max_tokens} tokens ({device}, {dtype})", flush=True)
    # on a GPU the reference keeps a small KV pool and is freed before the server process claims its memory
    llm = LLM(model_path, device=device, dtype=dtype, **({"kv_cache_memory_bytes": 2**31} if device == "cuda" else {}))
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4))
    t0 = time.perf_counter()
    ref = llm.generate(prompts, params)
    offline_wall = time.perf_counter() - t0
    want = [o.outputs[0].text for o in ref]
    offline_tps = sum(len(o.outputs[0].token_ids) for o in ref) / offline_wall
    tok = llm.tokenizer
    longest = max(len(tok.encode(p)) for p in prompts) + args.max_tokens
    del llm, ref
    if device == "cuda":
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()

    common = ["--device", device, "--dtype", dtype, "--max-num-seqs", str(max(256, n)), "--max-queue", str(n)]
    runs = [one_run("full", model_path, common, prompts, args.max_tokens, hang_up, want if strict else None, tok,
                    args, workdir)]
    if not args.no_preempt_run:
        block = 16
        need = -(-longest // block)
        kv_blocks = max(need + 1, n * need // 4)  # a quarter of what all sequences need at once
        runs.append(one_run(f"preempt ({kv_blocks} KV blocks)", model_path,
                            common + ["--num-kv-blocks", str(kv_blocks), "--block-size", str(block)], prompts,
                            args.max_tokens, hang_up, want if strict else None, tok, args, workdir))

    table = Table(f"kiln serve: {n} streaming clients ({len(hang_up)} hang up), {args.max_tokens} tokens each, "
                  f"{model_path.name}", anchor_name="LLM.generate")
    for r in runs:
        lab = r["label"]
        done = [x for x in r["results"] if x.status == "done"]
        table.add(f"{lab}: TTFT p50", 1e3 * percentile(r["ttft"], 0.5), None, "ms", higher_is_better=False)
        table.add(f"{lab}: TTFT p99", 1e3 * percentile(r["ttft"], 0.99), None, "ms", higher_is_better=False)
        table.add(f"{lab}: TPOT p50", 1e3 * percentile(r["tpot"], 0.5), None, "ms", higher_is_better=False)
        table.add(f"{lab}: TPOT p99", 1e3 * percentile(r["tpot"], 0.99), None, "ms", higher_is_better=False)
        table.add(f"{lab}: output tokens/s", r["tokens"] / r["wall"], offline_tps if lab == "full" else None,
                  "tok/s")
        table.add(f"{lab}: completed / hung up / failed", len(done), None,
                  f"{sum(x.status == 'disconnected' for x in r['results'])} / "
                  f"{sum(x.status == 'failed' for x in r['results'])}")
        table.add(f"{lab}: preemptions", r["preemptions"], None, f"of {r['kv_total']:.0f} KV blocks")
    print(table.render())
    out = table.save(args.json or ROOT / "bench" / "serve_load.json")
    print(f"wrote {out}")
    problems = [f"[{r['label']}] {p}" for r in runs for p in r["problems"]]
    if not args.no_preempt_run and runs[1]["preemptions"] == 0:
        problems.append("the small-KV run did not preempt anything")
    if not strict:
        mismatch = sum(x.text != want[x.index] for r in runs for x in r["results"] if x.status == "done")
        print(f"greedy parity not required ({dtype}); {mismatch} completed requests differ from LLM.generate")
    for p in problems:
        print("PROBLEM:", p, file=sys.stderr)
    print("all checks passed" if not problems else f"{len(problems)} checks failed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
