"""Tokenizer: Hugging Face's ``tokenizer.json`` through ``tokenizers``, the checkpoint's jinja chat template,
and incremental detokenisation that never emits half a multi-byte character."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json")


def _token_text(tok) -> str | None:
    if tok is None or isinstance(tok, str):
        return tok
    return tok.get("content")


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            raise FileNotFoundError(f"{path} has no tokenizer.json")
        self.path = path
        self.tok = HFTokenizer.from_file(str(tok_file))
        cfg_file = path / "tokenizer_config.json"
        self.config = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.bos_token_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self.tok.token_to_id(self.eos_token) if self.eos_token else None
        self.add_bos_token = bool(self.config.get("add_bos_token", False))
        self.chat_template = self._load_chat_template(path)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def _load_chat_template(self, path: Path) -> str | None:
        if (path / "chat_template.jinja").exists():
            return (path / "chat_template.jinja").read_text()
        if (path / "chat_template.json").exists():
            return json.loads((path / "chat_template.json").read_text()).get("chat_template")
        tpl = self.config.get("chat_template")
        if isinstance(tpl, list):  # named templates: take "default"
            tpl = next((t["template"] for t in tpl if t.get("name") == "default"), tpl[0]["template"])
        return tpl

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        if (add_special_tokens and self.add_bos_token and self.bos_token_id is not None
                and (not ids or ids[0] != self.bos_token_id)):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None, **extra) -> str:
        template = chat_template or self.chat_template
        if not template:
            raise ValueError(f"the tokenizer in {self.path} has no chat template; pass chat_template=...")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in messages):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(message):
            raise ValueError(f"chat template error: {message}")

        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                                    **extra)
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template failed to render: {exc}") from exc


def detokenize_incrementally(tokenizer: Tokenizer, token_ids: list[int], prefix_offset: int, read_offset: int,
                             skip_special_tokens: bool = True) -> tuple[str, int, int]:
    """New text made complete by the latest tokens: (delta, new_prefix_offset, new_read_offset).

    Decodes a short window before the unread tokens so merges and leading spaces come out as in a full decode,
    and waits while the tail is an incomplete UTF-8 sequence (decoded as U+FFFD).
    """
    prefix_text = tokenizer.decode(token_ids[prefix_offset:read_offset], skip_special_tokens)
    new_text = tokenizer.decode(token_ids[prefix_offset:], skip_special_tokens)
    if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
        return new_text[len(prefix_text):], read_offset, len(token_ids)
    return "", prefix_offset, read_offset
