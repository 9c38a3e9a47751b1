"""Servers for the HTTP tests: a tiny random Llama (fp32, CPU) behind uvicorn on 127.0.0.1 and a free port."""

from __future__ import annotations

import pytest

from tests.llm.conftest import make_checkpoint

MODEL = "tiny-llama"
API_KEY = "sk-kiln-test"
PROMPTS = ["To be, or not", "whether 'tis nobler", "the slings and arrows", "a sea of troubles", "émigré café",
           "Once upon", "outrageous fortune", "the question", "that is", "in the mind to suffer", "take arms",
           "Ünïcödé ✓", "日本語", "of outrageous", "against a sea", "nobler in the"]


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("server") / "llama"
    make_checkpoint(path, "llama", seed=0)
    return path


@pytest.fixture(scope="session")
def reference(model_path):
    """The offline API on the same weights: what the server must reproduce."""
    from kiln.llm import LLM

    return LLM(model_path, device="cpu", dtype="float32")


def start_server(model_path, api_key=API_KEY, **kwargs):
    from kiln.llm import LLMEngine
    from kiln.llm.server import ServerConfig, ServerThread

    server_kwargs = {k: kwargs.pop(k) for k in ("max_queue", "max_body_bytes") if k in kwargs}
    engine = LLMEngine(model_path, device="cpu", dtype="float32", **kwargs)
    return ServerThread(engine, ServerConfig(model_name=MODEL, api_key=api_key, **server_kwargs)).start()


@pytest.fixture(scope="session")
def server(model_path):
    srv = start_server(model_path, max_body_bytes=64 * 1024)
    yield srv
    srv.stop()


def client(srv, **kwargs):
    import openai

    return openai.OpenAI(base_url=srv.url + "/v1", api_key=kwargs.pop("api_key", API_KEY), max_retries=0,
                         timeout=kwargs.pop("timeout", 60), **kwargs)


def async_client(srv, **kwargs):
    import openai

    return openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120, **kwargs)


def scrape(srv) -> dict:
    """/metrics parsed with prometheus_client's parser: {(sample name, frozen labels): value}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(srv.url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def metric_sum(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def wait_for(predicate, timeout=10.0, interval=0.02):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def greedy(reference, prompts, **params):
    from kiln.llm import SamplingParams

    outs = reference.generate(prompts, SamplingParams(temperature=0, **params))
    return [o.outputs[0].text for o in outs]
