"""Load through real HTTP: concurrent streaming clients, 10% hanging up mid-stream, and a KV pool small enough to
force preemption. Afterwards nothing is left (KV blocks, engine requests, routes, event-loop tasks) and /metrics,
parsed by prometheus_client, adds up to what was sent. Uses bench/serve_load.py's client and checks."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from bench.serve_load import check_run, disconnecting, make_prompts, run_load, scrape, settle
from kiln.llm import SamplingParams

from .conftest import MODEL, client, start_server, wait_for

N_CLIENTS = 20
MAX_TOKENS = 32


def _want(reference, prompts):
    outs = reference.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    return [o.outputs[0].text for o in outs]


def _load_and_check(srv, reference, prompts):
    want = _want(reference, prompts)
    hang_up = disconnecting(len(prompts), 0.1)
    assert len(hang_up) == round(0.1 * len(prompts))
    base_tasks = srv.loop_tasks()
    before = scrape(srv.url)
    baseline = before[("kiln_server_event_loop_tasks", ())]
    results, wall = asyncio.run(run_load(srv.url, MODEL, prompts, MAX_TOKENS, hang_up, client="openai"))
    after = settle(srv.url, baseline)
    problems = check_run(results, want, before, after, baseline, [len(reference.tokenizer.encode(p)) for p in prompts])
    assert not problems, problems
    assert [r.status for r in results] == ["disconnected" if i in hang_up else "done" for i in range(len(prompts))]
    for r in results:
        if r.status == "disconnected":  # hung up early: a strict prefix of the full text arrived
            assert want[r.index].startswith(r.text) and len(r.text) < len(want[r.index])
        else:
            # (a random model's text can be partial UTF-8 bytes held back to the end: TPOT may be 0 then)
            assert r.completion_tokens == MAX_TOKENS and r.ttft > 0 and r.tpot >= 0
    # the engine and the server hold nothing: no KV blocks, requests, routes, admissions or extra tasks
    ae = srv.state.async_engine
    assert wait_for(lambda: srv.loop_tasks() == base_tasks), (srv.loop_tasks(), base_tasks)
    assert ae.num_routes == 0 and srv.state.in_flight == 0
    stats = ae.stats
    assert stats["kv_blocks_used"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0
    return results, before, after


def test_concurrent_streaming_clients_with_hangups_leave_nothing_behind(model_path, reference):
    srv = start_server(model_path, api_key=None)
    try:
        prompts = make_prompts(N_CLIENTS)
        _, before, after = _load_and_check(srv, reference, prompts)
        # histograms are consistent: cumulative buckets, +Inf bucket == count
        for h in ("kiln_time_to_first_token_seconds", "kiln_time_per_output_token_seconds"):
            buckets = sorted(((float(dict(lab)["le"]), v) for (n, lab), v in after.items() if n == h + "_bucket"))
            counts = [v for _, v in buckets]
            assert counts == sorted(counts) and buckets[-1][0] == float("inf")
            assert buckets[-1][1] == after[(h + "_count", ())] > 0 and after[(h + "_sum", ())] > 0
    finally:
        srv.stop()


def test_tiny_kv_pool_forces_preemption_and_no_request_fails(model_path, reference):
    # 12 sequences of ~55 tokens need ~48 blocks of 16; give them 10
    srv = start_server(model_path, api_key=None, num_kv_blocks=10, block_size=16)
    try:
        prompts = make_prompts(12)
        _, before, after = _load_and_check(srv, reference, prompts)
        assert after[("kiln_num_preemptions_total", ())] - before[("kiln_num_preemptions_total", ())] > 0
        assert after[("kiln_kv_blocks_total", ())] == 10
    finally:
        srv.stop()


def test_client_disconnect_aborts_and_frees_kv_blocks_at_once(server, reference):
    ae = server.state.async_engine
    before = scrape(server.url)
    # streaming: hang up after two chunks of a 200-token request
    c = client(server)
    stream = c.completions.create(model=MODEL, prompt="To be, or not", max_tokens=200, temperature=0, stream=True,
                                  extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it), next(it)
    assert ae.stats["kv_blocks_used"] > 0
    t0 = time.monotonic()
    stream.close()
    assert wait_for(lambda: ae.stats["kv_blocks_used"] == 0 and ae.num_routes == 0, timeout=5)
    freed_after = time.monotonic() - t0
    # non-streaming: the client times out and closes the connection while the server is still generating
    with httpx.Client(timeout=httpx.Timeout(0.3, connect=5)) as h, pytest.raises(httpx.ReadTimeout):
        h.post(server.url + "/v1/completions", headers={"Authorization": "Bearer sk-kiln-test"},
               json={"model": MODEL, "prompt": "the question", "max_tokens": 250, "ignore_eos": True,
                     "temperature": 0})
    assert wait_for(lambda: ae.stats["kv_blocks_used"] == 0 and server.state.in_flight == 0, timeout=5)
    after = scrape(server.url)
    assert after[("kiln_client_aborts_total", ())] - before[("kiln_client_aborts_total", ())] == 2
    assert after[("kiln_requests_total", (("endpoint", "/v1/completions"), ("status", "499")))] >= 1
    generated = after[("kiln_generation_tokens_total", ())] - before[("kiln_generation_tokens_total", ())]
    assert generated < 200 + 250  # both stopped early: the engine did not run them to the end
    assert freed_after < 2.0
