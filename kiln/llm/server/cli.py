"""``kiln serve [MODEL_OR_ENGINE] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-queue N] ...``

``add_parsers(subparsers)`` adds the ``serve`` sub-command (kiln.llm.cli calls it); ``python -m
kiln.llm.server.cli serve ...`` runs the same thing without the top-level ``kiln`` command.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a Hugging Face checkpoint or kiln engine directory (default: the bundled model) over "
                    "OpenAI's /v1/completions, /v1/chat/completions and /v1/models, with /health and /metrics.")
    p.add_argument("model", nargs="?", default=None, help="checkpoint or engine directory (default: bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("KILN_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $KILN_API_KEY, else none)")
    p.add_argument("--max-queue", type=int, default=512,
                   help="requests that may wait beyond --max-num-seqs before new ones get 503 (default 512; "
                        "-1: unbounded)")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: directory name)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="larger request bodies get 413")
    g = p.add_argument_group("engine")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--device", default=None)
    g.add_argument("--dtype", default="auto")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=8192)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-kv-blocks", type=int, default=None, help="explicit KV pool size in blocks")
    g.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--no-chunked-prefill", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split the model over N GPUs: the server starts one worker process per extra GPU")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=serve)


def engine_kwargs(args) -> dict:
    return dict(device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                gpu_memory_utilization=args.gpu_memory_utilization,
                enable_prefix_caching=not args.no_prefix_caching,
                enable_chunked_prefill=not args.no_chunked_prefill, seed=args.seed,
                tensor_parallel_size=args.tensor_parallel_size)


def serve(args) -> int:
    from kiln.llm.engine import LLMEngine, default_model_path

    from .app import ServerConfig
    from .launch import make_server

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = Path(args.model) if args.model else default_model_path()
    if not path.is_dir():
        print(f"kiln serve: no model directory at {path}" +
              ("" if args.model else " (the bundled model is not in this install; pass a checkpoint directory)"),
              file=sys.stderr)
        return 2
    try:
        config = ServerConfig(model_name=args.served_model_name or path.name, api_key=args.api_key or None,
                              max_queue=None if args.max_queue < 0 else args.max_queue,
                              max_body_bytes=args.max_body_bytes)
        engine = LLMEngine(path, args.tokenizer, **engine_kwargs(args))
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"kiln serve: {exc}", file=sys.stderr)
        return 2
    server = make_server(engine, config, args.host, args.port, log_level=args.log_level)
    if args.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        print(f"kiln serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    print(f"kiln serve: {config.model_name!r} ({engine.device}, {engine.dtype}, max_model_len "
          f"{engine.max_model_len}, {engine.get_stats()['kv_blocks_total']} KV blocks) on "
          f"http://{args.host}:{args.port}/v1", flush=True)
    try:
        with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the SIGINT it handled, after shutting down
            server.run()
    finally:
        engine.shutdown()  # tensor-parallel workers
    print("kiln serve: shut down", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.llm.server.cli")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
