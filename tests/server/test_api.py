"""The OpenAI endpoints through the official client: exact parity with LLM.generate / LLM.chat, and every option."""

from __future__ import annotations

import httpx
import pytest

from kiln.llm import SamplingParams

from .conftest import MODEL, PROMPTS, client, greedy, metric, scrape

CHAT = [{"role": "system", "content": "You speak in verse."}, {"role": "user", "content": "To be, or not to be?"}]


def test_completions_non_streaming_and_streaming_equal_llm_generate_greedy(server, reference):
    c = client(server)
    prompts = PROMPTS[:6]
    want = greedy(reference, prompts, max_tokens=24)
    pieces = 0
    for prompt, text in zip(prompts, want):
        r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        assert r.choices[0].text == text
        assert r.object == "text_completion" and r.model == MODEL
        assert r.usage.prompt_tokens == len(reference.tokenizer.encode(prompt))
        assert r.usage.completion_tokens == 24 == r.usage.total_tokens - r.usage.prompt_tokens
        deltas = [ch.choices[0].text for ch in
                  c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True)]
        assert "".join(deltas) == text
        pieces += len([d for d in deltas if d])
    assert pieces > 2 * len(prompts)  # it really streamed (a tail of partial UTF-8 bytes comes out at once)


def test_chat_non_streaming_and_streaming_equal_llm_chat_greedy(server, reference):
    c = client(server)
    want = reference.chat(CHAT, SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    r = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.completion_tokens == len(want.token_ids)
    chunks = list(c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [want.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert all(ch.usage is None for ch in chunks[:-1])
    # max_completion_tokens is the newer name of max_tokens; text parts are joined
    parts = [dict(m, content=[{"type": "text", "text": m["content"][:5]}, {"type": "text", "text": m["content"][5:]}])
             for m in CHAT]
    r2 = c.chat.completions.create(model=MODEL, messages=parts, max_completion_tokens=20, temperature=0)
    assert r2.choices[0].message.content == want.text


def test_streaming_completion_usage_in_final_chunk_and_done_marker(server, reference):
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": "Bearer sk-kiln-test"},
                      json={"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 12, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in resp.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    import json

    events = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == {
        "prompt_tokens": len(reference.tokenizer.encode(PROMPTS[2])), "completion_tokens": 12, "total_tokens":
        len(reference.tokenizer.encode(PROMPTS[2])) + 12}
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == greedy(reference, [PROMPTS[2]], max_tokens=12)[0]


def test_sampling_options_pass_through_exactly(server, reference):
    """n, seed, temperature, top_p, top_k, min_p, penalties and stop reach the engine unchanged."""
    c = client(server)
    prompt = PROMPTS[15]
    sp = dict(n=3, temperature=2.0, top_p=0.99, top_k=100, min_p=0.001, presence_penalty=0.5, frequency_penalty=0.3,
              repetition_penalty=1.1, seed=1234, max_tokens=16)
    want = [o.text for o in reference.generate(prompt, SamplingParams(**sp))[0].outputs]
    r = c.completions.create(model=MODEL, prompt=prompt, n=3, temperature=2.0, top_p=0.99, seed=1234,
                             presence_penalty=0.5, frequency_penalty=0.3, max_tokens=16,
                             extra_body={"top_k": 100, "min_p": 0.001, "repetition_penalty": 1.1})
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [ch.text for ch in r.choices] == want
    assert len(set(want)) > 1  # seeded sampling, not greedy
    assert r.usage.completion_tokens == 48
    # the same, streamed: per-choice deltas reassemble into the same texts
    got = ["", "", ""]
    for ch in c.completions.create(model=MODEL, prompt=prompt, n=3, temperature=2.0, top_p=0.99, seed=1234,
                                   presence_penalty=0.5, frequency_penalty=0.3, max_tokens=16, stream=True,
                                   extra_body={"top_k": 100, "min_p": 0.001, "repetition_penalty": 1.1}):
        for choice in ch.choices:
            got[choice.index] += choice.text
    assert got == want
    # stop strings: the engine's rule (the stop string is cut and never leaks into a delta)
    full = greedy(reference, [PROMPTS[10]], max_tokens=24)[0]
    stop = full[10:13]
    want_stop = reference.generate(PROMPTS[10], SamplingParams(temperature=0, max_tokens=24, stop=[stop]))[0].outputs[0]
    assert want_stop.finish_reason == "stop" and want_stop.text and len(want_stop.text) < len(full)
    r = c.completions.create(model=MODEL, prompt=PROMPTS[10], max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == want_stop.text and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt=PROMPTS[10], max_tokens=24, temperature=0, stop=[stop], stream=True))
    assert streamed == want_stop.text and stop not in streamed


def test_multiple_prompts_and_token_id_prompts(server, reference):
    c = client(server)
    prompts = PROMPTS[3:6]
    want = greedy(reference, prompts, max_tokens=10)
    r = c.completions.create(model=MODEL, prompt=prompts, max_tokens=10, temperature=0, n=2)
    assert [ch.index for ch in r.choices] == list(range(6))
    assert [ch.text for ch in r.choices] == [w for w in want for _ in range(2)]
    ids = reference.tokenizer.encode(prompts[0])
    r = c.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0)
    assert r.choices[0].text == want[0] and r.usage.prompt_tokens == len(ids)
    r = c.completions.create(model=MODEL, prompt=[ids, reference.tokenizer.encode(prompts[1])], max_tokens=10,
                             temperature=0)
    assert [ch.text for ch in r.choices] == want[:2]


def test_logprobs_match_the_engine(server, reference):
    c = client(server)
    want = reference.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, logprobs=3))[0].outputs[0]
    r = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 8 and len(lp.top_logprobs) == 8
    assert lp.token_logprobs == pytest.approx([e[t].logprob for t, e in zip(want.token_ids, want.logprobs)],
                                              abs=1e-4)
    for top, tid, entry in zip(lp.top_logprobs, want.token_ids, want.logprobs):
        expect: dict[str, float] = {}
        for e in sorted((e for e in entry.values() if e.rank <= 3), key=lambda e: e.rank):
            expect.setdefault(e.decoded_token, e.logprob)
        assert top == pytest.approx(expect, abs=1e-4) and 1 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(entry[tid].logprob, abs=1e-4)  # greedy: the top-1 was sampled
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # streamed logprobs cover each token exactly once
    streamed = []
    for ch in c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=3,
                                   stream=True):
        streamed += ch.choices[0].logprobs.token_logprobs
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-6)
    r = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                  top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5) for t in content)  # greedy: top-1


def test_models_health_and_metrics_endpoints(server, reference):
    c = client(server)
    models = c.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert c.models.retrieve(MODEL).id == MODEL
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    before = scrape(server)
    c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0)
    after = scrape(server)
    key = dict(endpoint="/v1/completions", status="200")
    assert metric(after, "kiln_requests_total", **key) == metric(before, "kiln_requests_total", **key) + 1
    assert (metric(after, "kiln_generation_tokens_total") - metric(before, "kiln_generation_tokens_total")) == 5
    assert (metric(after, "kiln_prompt_tokens_total") - metric(before, "kiln_prompt_tokens_total")
            == len(reference.tokenizer.encode(PROMPTS[0])))
    assert metric(after, "kiln_kv_blocks_total") == server.state.engine.get_stats()["kv_blocks_total"] > 0
