"""``kiln build | generate | chat`` (and ``serve`` from kiln.llm.server); model arguments default to the bundled
model."""

from __future__ import annotations

import argparse
import sys


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF checkpoint or kiln engine directory (default: bundled model)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split the model over N GPUs (one worker process per GPU; gloo processes on the CPU)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _params(args):
    from kiln.llm import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=args.stop)


def _llm(args):
    from kiln.llm import LLM

    kwargs = {"max_model_len": args.max_model_len} if args.max_model_len else {}
    return LLM(args.model, dtype=args.dtype, device=args.device, tensor_parallel_size=args.tensor_parallel_size,
               **kwargs)


def _build(args) -> int:
    from kiln.llm.build import build_engine
    from kiln.llm.engine import default_model_path
    from kiln.llm.lora import parse_lora_arg

    checkpoint = args.checkpoint or str(default_model_path())
    loras = [parse_lora_arg(s) for s in args.lora or []]
    from kiln.llm.quantize import CalibrationConfig

    calib = CalibrationConfig(num_samples=args.calib_samples, seq_len=args.calib_seq_len,
                              text_files=tuple(args.calib_text or ()))
    out = build_engine(checkpoint, args.output, dtype=args.dtype, loras=loras, quant=args.quant,
                       group_size=args.group_size, kv_cache_dtype=args.kv_cache_dtype,
                       smoothquant_alpha=args.smoothquant_alpha, calibration=calib,
                       quantize_lm_head=args.quantize_lm_head, quantize_embedding=args.quantize_embedding)
    print(f"engine written to {out}")
    return 0


def _generate(args) -> int:
    params = _params(args)
    llm = _llm(args)
    if args.no_stream:
        print(args.prompt + llm.generate(args.prompt, params)[0].outputs[0].text)
        return 0
    sys.stdout.write(args.prompt)
    for delta in llm.stream(args.prompt, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _chat(args) -> int:
    params = _params(args)
    llm = _llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("kiln chat — empty line or Ctrl-D to quit")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": line})
        text = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        prompt = {"prompt": text, "prompt_token_ids": llm.tokenizer.encode(text, add_special_tokens=False)}
        sys.stdout.write("bot> ")
        reply = []
        for delta in llm.stream(prompt, params):
            reply.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply).strip()})


def add_parsers(sub) -> None:
    p = sub.add_parser("build", help="build an engine directory from a Hugging Face checkpoint (LoRA merged in)")
    p.add_argument("checkpoint", nargs="?", default=None, help="HF checkpoint directory (default: bundled model)")
    p.add_argument("-o", "--output", required=True, help="engine directory to write")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's) | float32 | float16 | bfloat16")
    p.add_argument("--lora", action="append", metavar="ADAPTER[:WEIGHT]",
                   help="peft LoRA adapter directory to merge, optionally weighted (repeatable)")
    p.add_argument("--quant", default=None, choices=["int8-wo", "int4-wo", "w8a8", "fp8"],
                   help="quantize the decoder linears: weight-only int8 per channel (W8A16) or grouped int4 "
                        "(W4A16); w8a8 = SmoothQuant int8 weights and per-token int8 activations; fp8 = e4m3 "
                        "weights and activations (compute capability >= 8.9); the weight-only modes quantize the LM "
                        "head too (see --no-quantize-lm-head)")
    p.add_argument("--group-size", type=int, default=None, help="int4-wo group size: 32 | 64 | 128 (default 128)")
    p.add_argument("--quantize-lm-head", action=argparse.BooleanOptionalAction, default=None,
                   help="int8-wo / int4-wo: quantize the LM head with the body's mode and group size (default on; "
                        "--no-quantize-lm-head keeps it in the float dtype)")
    p.add_argument("--quantize-embedding", action=argparse.BooleanOptionalAction, default=None,
                   help="int8-wo / int4-wo: store the input embedding quantized (default on): tied to a quantized "
                        "LM head it reads the head's table, otherwise int8 rows with a per-row scale; "
                        "--no-quantize-embedding keeps it in the float dtype")
    p.add_argument("--kv-cache-dtype", default=None,
                   help="int8 | fp8: quantized KV cache with calibrated static per-head scales")
    p.add_argument("--smoothquant-alpha", type=float, default=0.5,
                   help="w8a8 migration strength in [0, 1] (default 0.5)")
    p.add_argument("--calib-samples", type=int, default=8, help="calibration windows (w8a8, KV cache)")
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--calib-text", action="append", metavar="FILE",
                   help="calibration text file (repeatable; default: held-out Shakespeare)")
    p.set_defaults(func=_build)

    p = sub.add_parser("generate", help="complete a prompt (streams to stdout)")
    p.add_argument("prompt", nargs="?", default="ROMEO:")
    _model_args(p)
    _sampling_args(p)
    p.add_argument("--no-stream", action="store_true", help="print the whole completion at the end")
    p.set_defaults(func=_generate)

    p = sub.add_parser("chat", help="interactive streaming chat with the model's chat template")
    _model_args(p)
    _sampling_args(p)
    p.add_argument("--system", default=None, help="system message")
    p.set_defaults(func=_chat)

    try:
        from kiln.llm.server.cli import add_parsers as add_server_parsers
    except ModuleNotFoundError as exc:
        # `kiln serve` exists only where it works: it needs the [server] extra (fastapi, uvicorn, prometheus)
        if exc.name not in ("kiln.llm.server", "kiln.llm.server.cli", "fastapi", "uvicorn", "starlette",
                            "prometheus_client", "pydantic"):
            raise
    else:
        add_server_parsers(sub)
