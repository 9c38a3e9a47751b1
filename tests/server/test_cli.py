"""``kiln serve`` as a command: the sub-parser the lead's CLI mounts, and a real process serving and shutting down."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.serve_load import free_port
from kiln.llm.server.cli import add_parsers

from .conftest import greedy

ROOT = Path(__file__).resolve().parents[2]


def test_add_parsers_adds_serve_with_safe_defaults(monkeypatch):
    monkeypatch.delenv("KILN_API_KEY", raising=False)
    parser = argparse.ArgumentParser(prog="kiln")
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve"])
    assert args.model is None and args.host == "127.0.0.1" and args.port == 8000 and args.api_key is None
    assert callable(args.func) and args.max_queue == 512
    args = parser.parse_args(["serve", "/m", "--port", "9", "--api-key", "k", "--max-queue", "3",
                              "--num-kv-blocks", "40"])
    assert (args.model, args.port, args.api_key, args.max_queue, args.num_kv_blocks) == ("/m", 9, "k", 3, 40)


def test_serve_missing_model_dir_exits_2_with_message(tmp_path):
    parser = argparse.ArgumentParser(prog="kiln")
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", str(tmp_path / "nope")])
    assert args.func(args) == 2


def test_serve_process_answers_and_shuts_down_on_sigint(model_path, reference):
    port = free_port()
    # keep the caller's PYTHONPATH (the GPU runs install the server extras there)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               KILN_API_KEY="cli-key")
    proc = subprocess.Popen([sys.executable, "-m", "kiln.llm.server.cli", "serve", str(model_path), "--port",
                             str(port), "--dtype", "float32", "--device", "cpu", "--served-model-name", "m",
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401  # the key came from $KILN_API_KEY
        r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer cli-key"}, timeout=60,
                       json={"model": "m", "prompt": "To be, or not", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == greedy(reference, ["To be, or not"], max_tokens=8)[0]
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "on http://127.0.0.1:%d/v1" % port in out and "shut down" in out
