"""Bad requests: each kind gets the right status and an OpenAI-shaped error naming the problem, while good
streaming requests keep flowing; a full queue answers 503 with Retry-After; a dead engine answers 503."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from .conftest import API_KEY, MODEL, PROMPTS, client, greedy, start_server, wait_for

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _via_client(kind: str, **kwargs):
    return ("client", kind, kwargs)


def _raw(method: str, path: str, content=None, json=None, headers=AUTH):
    return ("raw", method, path, content, json, headers)


def _cases(server, long_prompt: str):
    ok = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=4)
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    # (name, request, status, words the message must contain, param)
    return [
        ("unknown model", _via_client("completions", **dict(ok, model="gpt-9")), 404, ["gpt-9", "does not exist"],
         "model"),
        ("unknown model (chat)", _via_client("chat", **dict(chat, model="nope")), 404, ["nope"], "model"),
        ("unknown model (models/{id})", _raw("GET", "/v1/models/other-model"), 404, ["other-model"], "model"),
        ("wrong API key", _via_client("completions", api_key="sk-wrong", **ok), 401, ["incorrect API key"], None),
        ("missing API key", _raw("POST", "/v1/completions", json=ok, headers={}), 401, ["missing API key"], None),
        ("negative temperature", _via_client("completions", **dict(ok, temperature=-1)), 400, ["temperature"],
         "temperature"),
        ("top_p above 1", _via_client("completions", **dict(ok, top_p=1.5)), 400, ["top_p"], "top_p"),
        ("top_k below -1", _via_client("completions", **dict(ok, extra_body={"top_k": -5})), 400, ["top_k"],
         "top_k"),
        ("min_p above 1", _via_client("completions", **dict(ok, extra_body={"min_p": 2.0})), 400, ["min_p"],
         "min_p"),
        ("presence_penalty out of range", _via_client("chat", **dict(chat, presence_penalty=3)), 400,
         ["presence_penalty"], "presence_penalty"),
        ("frequency_penalty out of range", _via_client("completions", **dict(ok, frequency_penalty=-2.5)), 400,
         ["frequency_penalty"], "frequency_penalty"),
        ("repetition_penalty zero", _via_client("completions", **dict(ok, extra_body={"repetition_penalty": 0})),
         400, ["repetition_penalty"], "repetition_penalty"),
        ("n zero", _via_client("completions", **dict(ok, n=0)), 400, ["n must be"], "n"),
        ("max_tokens zero", _via_client("completions", **dict(ok, max_tokens=0)), 400, ["max_tokens"],
         "max_tokens"),
        ("max_tokens not a number", _via_client("chat", **dict(chat, extra_body={"max_tokens": "ten"})), 400,
         ["max_tokens", "str"], "max_tokens"),
        ("min_tokens above max_tokens", _via_client("completions", **dict(ok, extra_body={"min_tokens": 9})), 400,
         ["min_tokens", "max_tokens"], "min_tokens"),
        ("seed not an integer", _via_client("completions", **dict(ok, extra_body={"seed": "abc"})), 400, ["seed"],
         "seed"),
        ("stop not strings", _via_client("completions", **dict(ok, extra_body={"stop": [1, 2]})), 400, ["stop"],
         "stop"),
        ("stop_token_ids negative", _via_client("completions", **dict(ok, extra_body={"stop_token_ids": [-3]})),
         400, ["stop_token_ids"], "stop_token_ids"),
        ("logprobs above 20", _via_client("completions", **dict(ok, logprobs=99)), 400, ["logprobs", "20"],
         "logprobs"),
        ("top_logprobs without logprobs", _via_client("chat", **dict(chat, top_logprobs=2)), 400,
         ["top_logprobs", "logprobs"], "top_logprobs"),
        ("prompt longer than the context", _via_client("completions", **dict(ok, prompt=long_prompt)), 400,
         ["maximum context length", "256"], "prompt"),
        ("prompt + max_tokens over the context", _via_client("completions", **dict(ok, max_tokens=255)), 400,
         ["maximum context length", "max_tokens"], "max_tokens"),
        ("empty prompt", _via_client("completions", **dict(ok, prompt="")), 400, ["prompt", "empty"], "prompt"),
        ("token id outside the vocabulary", _via_client("completions", **dict(ok, prompt=[5, 99999])), 400,
         ["99999", "vocabulary"], "prompt"),
        ("prompt of the wrong type", _raw("POST", "/v1/completions", json=dict(ok, prompt={"a": 1})), 400,
         ["prompt must be"], "prompt"),
        ("missing prompt", _raw("POST", "/v1/completions", json={"model": MODEL}), 400, ["prompt is required"],
         "prompt"),
        ("missing model", _raw("POST", "/v1/completions", json={"prompt": "x"}), 400, ["model is required"],
         "model"),
        ("empty messages", _via_client("chat", **dict(chat, messages=[])), 400, ["messages"], "messages"),
        ("bad message role", _via_client("chat", **dict(chat, messages=[{"role": "wizard", "content": "x"}])), 400,
         ["role", "wizard"], "messages[0].role"),
        ("image content part", _via_client("chat", **dict(chat, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}])), 400, ["text"], "messages[0].content"),
        ("stream not a boolean", _raw("POST", "/v1/completions", json=dict(ok, stream="yes")), 400,
         ["stream", "boolean"], "stream"),
        ("stream_options without stream", _via_client("completions", **dict(
            ok, stream_options={"include_usage": True})), 400, ["stream_options"], "stream_options"),
        ("suffix (unsupported)", _via_client("completions", **dict(ok, suffix="end")), 400, ["suffix"], "suffix"),
        ("tools (unsupported)", _raw("POST", "/v1/chat/completions", json=dict(chat, tools=[{"type": "function"}])),
         400, ["tools"], "tools"),
        ("invalid JSON", _raw("POST", "/v1/completions", content=b'{"model": "tiny-llama", "prompt": '), 400,
         ["valid JSON"], None),
        ("JSON that is not an object", _raw("POST", "/v1/completions", json=[1, 2, 3]), 400, ["JSON object"],
         None),
        ("empty body", _raw("POST", "/v1/chat/completions", content=b""), 400, ["empty"], None),
        ("body over the size limit", _raw("POST", "/v1/completions", json=dict(ok, prompt="x" * 70_000)), 413,
         ["exceeds the limit", "65536"], None),
        ("unknown route", _raw("POST", "/v1/embeddings", json=ok), 404, ["no route", "/v1/embeddings"], None),
        ("wrong method", _raw("GET", "/v1/completions"), 405, ["GET", "/v1/completions"], None),
    ]


def _send(server, req):
    """-> (status, error dict, headers)"""
    if req[0] == "raw":
        _, method, path, content, json, headers = req
        r = httpx.request(method, server.url + path, content=content, json=json, headers=headers, timeout=30)
        return r.status_code, r.json()["error"], r.headers
    _, kind, kwargs = req
    kwargs = dict(kwargs)
    c = client(server, api_key=kwargs.pop("api_key", API_KEY))
    try:
        (c.completions if kind == "completions" else c.chat.completions).create(**kwargs)
    except openai.APIStatusError as exc:
        return exc.status_code, exc.body, exc.response.headers
    raise AssertionError(f"{kwargs} was accepted")


class _GoodStreams:
    """Streaming requests running in threads the whole time: they must all finish with the right text."""

    def __init__(self, server, reference, clients=3):
        self.server, self.prompts = server, PROMPTS[:clients]
        self.want = greedy(reference, self.prompts, max_tokens=40)
        self.stop = threading.Event()
        self.results: list[tuple[str, str]] = []
        self.chunk_times: list[float] = []
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, i):
        c = client(self.server)
        try:
            while not self.stop.is_set():
                text = ""
                for ch in c.completions.create(model=MODEL, prompt=self.prompts[i], max_tokens=40, temperature=0,
                                               stream=True):
                    text += ch.choices[0].text
                    self.chunk_times.append(time.monotonic())
                self.results.append((self.want[i], text))
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(120)


def test_bad_requests_get_right_status_and_message_while_good_requests_stream(server, reference):
    long_prompt = " ".join(["question"] * 400)
    assert len(reference.tokenizer.encode(long_prompt)) > 256
    cases = _cases(server, long_prompt)
    assert len({c[2] for c in cases}) == 5 and len(cases) >= 20
    failures = []
    with _GoodStreams(server, reference) as good:
        assert good.stop.wait(0.3) is False
        t0 = time.monotonic()
        for name, req, status, must, param in cases:
            got, err, _ = _send(server, req)
            problems = []
            if got != status:
                problems.append(f"status {got} != {status}")
            if set(err) != {"message", "type", "param", "code"}:
                problems.append(f"error keys {sorted(err)}")
            missing = [w for w in must if w not in err.get("message", "")]
            if missing:
                problems.append(f"message lacks {missing}")
            if param is not None and err.get("param") != param:
                problems.append(f"param {err.get('param')!r} != {param!r}")
            if problems:
                failures.append(f"{name}: {problems} -> {err}")
        t1 = time.monotonic()
        time.sleep(0.2)
    assert not failures, "\n".join(failures)
    assert not good.errors, good.errors
    assert good.results and all(want == got for want, got in good.results)
    during = [t for t in good.chunk_times if t0 <= t <= t1]
    assert len(during) > 5, "good streams stalled while bad requests were answered"
    # the server is still healthy and nothing leaked
    # a request leaves the in-flight count after its response is sent: give a loaded machine time to get there
    def drained():
        stats = server.state.async_engine.stats
        return server.state.in_flight == 0 and stats["num_running"] == 0 and stats["kv_blocks_used"] == 0

    assert wait_for(drained), (server.state.in_flight, server.state.async_engine.stats)


def test_full_queue_answers_503_with_retry_after(model_path, reference):
    srv = start_server(model_path, max_num_seqs=1, max_queue=1)
    try:
        c = client(srv)
        long = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=200, temperature=0, stream=True,
                    extra_body={"ignore_eos": True})
        running = c.completions.create(**long)
        next(iter(running))                          # running: has produced a token
        queued = c.completions.create(**long)        # admitted (headers arrived), waiting for the one slot
        with pytest.raises(openai.APIStatusError) as info:
            c.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=4)
        assert info.value.status_code == 503
        assert info.value.response.headers["retry-after"] == "1"
        assert "queue is full" in info.value.body["message"] and info.value.body["code"] == "queue_full"
        running.close()
        queued.close()
        assert wait_for(lambda: srv.state.in_flight == 0)  # disconnects release their slots
        # capacity is back: the next request is served
        r = c.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=4, temperature=0)
        assert r.choices[0].text == greedy(reference, [PROMPTS[1]], max_tokens=4)[0]
    finally:
        srv.stop()


def test_dead_engine_answers_503_and_health_says_so(model_path):
    srv = start_server(model_path, api_key=None)
    try:
        assert httpx.get(srv.url + "/health").status_code == 200
        srv.state.async_engine.shutdown()
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 503 and h.headers["retry-after"] == "1"
        with pytest.raises(openai.APIStatusError) as info:
            client(srv).completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert info.value.status_code == 503 and "not running" in info.value.body["message"]
        assert info.value.response.headers["retry-after"] == "1"
    finally:
        srv.stop()
