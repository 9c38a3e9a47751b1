"""OpenAI request parsing (to SamplingParams and prompts) and response shaping.

Bodies are parsed by hand rather than through pydantic models so that every rejection is a 400 in OpenAI's error
shape whose message and ``param`` name the offending field (pydantic would answer 422 with its own shape).
vLLM's extra sampling fields (top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids,
include_stop_str_in_output, skip_special_tokens) are accepted too, as the ``openai`` client's ``extra_body``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from kiln.llm.outputs import CompletionOutput, Logprob
from kiln.llm.sampling_params import MAX_LOGPROBS, SamplingParams


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 499: "client_closed_request",
             500: "internal_server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "api_error"),
                          "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


# Fields passed straight to SamplingParams when present (OpenAI's plus vLLM's extras).
_SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                    "frequency_penalty", "seed", "stop", "stop_token_ids", "include_stop_str_in_output",
                    "ignore_eos", "min_tokens", "skip_special_tokens")
_BOOL_FIELDS = ("stream", "include_stop_str_in_output", "ignore_eos", "skip_special_tokens", "echo")
_UNSUPPORTED = {"suffix": "suffix (insertion) is not supported", "tools": "tools / function calling is not supported",
                "functions": "function calling is not supported", "echo": "echo is not supported",
                "logit_bias": "logit_bias is not supported", "best_of": "best_of other than n is not supported"}
_PARAM_RE = re.compile(r"^(\w+)")


@dataclass
class ParsedRequest:
    prompts: list[tuple[str | None, list[int] | None]]  # (text, token ids); ids None until tokenized
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    extra: dict = field(default_factory=dict)


def _check_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got a JSON {type(body).__name__}")
    return body


def _check_unsupported(body: dict) -> None:
    for name, message in _UNSUPPORTED.items():
        value = body.get(name)
        if name == "best_of" and value is not None and value == body.get("n", 1):
            continue
        if name == "echo" and value is False:
            continue
        if value not in (None, {}, [], ""):
            raise bad(message, param=name)


def _check_bools(body: dict) -> None:
    for name in _BOOL_FIELDS:
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            raise bad(f"{name} must be a boolean, got {type(value).__name__} {value!r}", param=name)


def _stream_options(body: dict, stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not stream:
        raise bad("stream_options is only allowed when stream is true", param="stream_options")
    if not isinstance(opts, dict):
        raise bad(f"stream_options must be an object, got {type(opts).__name__}", param="stream_options")
    usage = opts.get("include_usage", False)
    if not isinstance(usage, bool):
        raise bad("stream_options.include_usage must be a boolean", param="stream_options.include_usage")
    return usage


def _sampling_params(body: dict, max_tokens: Any, logprobs: int | None) -> SamplingParams:
    kwargs = {name: body[name] for name in _SAMPLING_FIELDS if body.get(name) is not None}
    kwargs["max_tokens"] = max_tokens
    kwargs["logprobs"] = logprobs
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        m = _PARAM_RE.match(message)
        param = m.group(1) if m and (m.group(1) in kwargs or m.group(1) == "max_tokens") else None
        raise bad(message, param=param) from None


def parse_completion(body: Any) -> ParsedRequest:
    body = _check_object(body)
    _check_bools(body)
    _check_unsupported(body)
    if "prompt" not in body or body["prompt"] is None:
        raise bad("prompt is required", param="prompt")
    prompt = body["prompt"]
    prompts: list[tuple[str | None, list[int] | None]]
    if isinstance(prompt, str):
        prompts = [(prompt, None)]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [(None, list(prompt))]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [(p, None) for p in prompt]
    elif (isinstance(prompt, list) and prompt
          and all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt)):
        prompts = [(None, list(p)) for p in prompt]
    elif isinstance(prompt, list) and not prompt:
        raise bad("prompt is empty (an empty list)", param="prompt")
    else:
        raise bad("prompt must be a string, a list of strings, a list of token ids or a list of token-id lists",
                  param="prompt")
    for text, ids in prompts:
        if text == "":
            raise bad("prompt is empty", param="prompt")
        if ids is not None and not ids:
            raise bad("prompt is empty (no token ids)", param="prompt")
    logprobs = body.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        raise bad(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] for completions, got {logprobs!r}",
                  param="logprobs")
    stream = bool(body.get("stream", False))
    max_tokens = body.get("max_tokens", 16)
    params = _sampling_params(body, 16 if max_tokens is None else max_tokens, logprobs)
    return ParsedRequest(prompts, params, stream, _stream_options(body, stream), logprobs)


_ROLES = ("system", "developer", "user", "assistant", "tool")


def _message_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content[{j}] must be a text part {{'type': 'text', 'text': ...}}; "
                          "this model reads text only", param=f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise bad(f"messages[{i}].content must be a string or a list of text parts, got {type(content).__name__}",
              param=f"messages[{i}].content")


def parse_chat(body: Any) -> tuple[ParsedRequest, list[dict]]:
    body = _check_object(body)
    _check_bools(body)
    _check_unsupported(body)
    messages = body.get("messages")
    if messages is None:
        raise bad("messages is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {'role', 'content'} objects", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object with 'role' and 'content'", param=f"messages[{i}]")
        role = m.get("role")
        if role not in _ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {role!r}",
                      param=f"messages[{i}].role")
        clean.append({"role": role, "content": _message_text(m.get("content"), i)})
    for name in ("logprobs",):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise bad(f"{name} must be a boolean for chat completions, got {body[name]!r}", param=name)
    top = body.get("top_logprobs")
    if top is not None:
        if not _is_int(top) or not 0 <= top <= MAX_LOGPROBS:
            raise bad(f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {top!r}", param="top_logprobs")
        if not body.get("logprobs"):
            raise bad("top_logprobs requires logprobs to be true", param="top_logprobs")
    logprobs = (top or 0) if body.get("logprobs") else None
    rf = body.get("response_format")
    if rf is not None and (not isinstance(rf, dict) or rf.get("type") != "text"):
        raise bad("response_format other than {'type': 'text'} is not supported", param="response_format")
    stream = bool(body.get("stream", False))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    params = _sampling_params(body, max_tokens, logprobs)
    return ParsedRequest([], params, stream, _stream_options(body, stream), logprobs), clean


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ------------------------------------------------------------------------------------------------ responses
def _top(entry: dict[int, Logprob], k: int) -> list[Logprob]:
    return sorted((lp for lp in entry.values() if lp.rank <= k), key=lambda lp: lp.rank)[:k]


def _token_str(lp: Logprob | None, token_id: int) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return f"token_id:{token_id}"


def completion_logprobs(c: CompletionOutput, start: int, k: int, text_offset: int) -> dict:
    """The legacy completions logprobs object for tokens ``start:`` of ``c``."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for tid, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
        lp = entry.get(tid)
        s = _token_str(lp, tid)
        tokens.append(s)
        token_logprobs.append(lp.logprob if lp is not None else None)
        top: dict[str, float] = {}
        for t in _top(entry, k):  # two ids can decode to one string (partial bytes): keep the likelier
            top.setdefault(_token_str(t, 0), t.logprob)
        top_logprobs.append(top)
        offsets.append(text_offset)
        text_offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def chat_logprobs(c: CompletionOutput, start: int, k: int) -> dict:
    content = []
    for tid, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
        lp = entry.get(tid)
        s = _token_str(lp, tid)
        content.append({"token": s, "logprob": lp.logprob if lp is not None else None,
                        "bytes": list(s.encode("utf-8")),
                        "top_logprobs": [{"token": _token_str(t, 0), "logprob": t.logprob,
                                          "bytes": list(_token_str(t, 0).encode("utf-8"))} for t in _top(entry, k)]})
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
