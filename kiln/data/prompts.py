"""Prompts through ``torch.utils.data``: a map-style dataset from a list or JSONL file, an IterableDataset that
streams JSONL, ``ConcatDataset`` to mix sources and ``Subset`` for an evaluation split.

Every item is a dict with one of ``"prompt"`` (text), ``"prompt_token_ids"`` (list of ints) or ``"messages"``
(a chat, rendered with the model's chat template by the consumer); other keys are kept. A JSONL line may be such
an object or a bare JSON string (taken as the prompt text).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable, Iterator

from torch.utils.data import ConcatDataset, Dataset, IterableDataset, Subset, get_worker_info

PROMPT_KEYS = ("prompt", "prompt_token_ids", "messages")


def normalize_prompt(item, where: str = "prompt", key: str = "prompt") -> dict:
    """Validate one prompt item and return it as a dict with a ``prompt``/``prompt_token_ids``/``messages`` key."""
    if isinstance(item, str):
        item = {"prompt": item}
    elif isinstance(item, (list, tuple)) and item and all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in item):
        item = {"prompt_token_ids": list(item)}
    elif isinstance(item, dict):
        item = dict(item)
        if key != "prompt" and key in item:
            item["prompt"] = item.pop(key)
    else:
        raise ValueError(f"{where}: expected text, token ids or a dict, got {type(item).__name__}")
    found = [k for k in PROMPT_KEYS if k in item]
    if not found:
        raise ValueError(f"{where}: needs one of {', '.join(PROMPT_KEYS)} (keys: {sorted(item)})")
    if "prompt" in item and (not isinstance(item["prompt"], str) or not item["prompt"]):
        raise ValueError(f"{where}: 'prompt' must be non-empty text, got {item['prompt']!r}")
    if "prompt_token_ids" in item:
        ids = item["prompt_token_ids"]
        if (not isinstance(ids, list) or not ids
                or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)):
            raise ValueError(f"{where}: 'prompt_token_ids' must be a non-empty list of non-negative ints")
    if "messages" in item:
        msgs = item["messages"]
        if (not isinstance(msgs, list) or not msgs
                or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs)):
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} dicts")
    return item


def _read_jsonl(path: Path, key: str) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            yield normalize_prompt(obj, f"{path}:{lineno}", key)


class PromptDataset(Dataset):
    """Map-style prompts from a list (texts, token-id lists or dicts) or a JSONL file."""

    def __init__(self, source: Iterable | str | Path, key: str = "prompt"):
        if isinstance(source, (str, Path)):
            path = Path(source)
            if not path.exists():
                raise FileNotFoundError(f"prompt file {path} does not exist")
            self.items = list(_read_jsonl(path, key))
            origin = str(path)
        else:
            self.items = [normalize_prompt(x, f"prompt {i}", key) for i, x in enumerate(source)]
            origin = "the list"
        if not self.items:
            raise ValueError(f"no prompts in {origin}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class JsonlPromptStream(IterableDataset):
    """Prompts streamed from one or more JSONL files, line by line (``repeat=True`` cycles forever).

    With DataLoader workers each worker reads every ``num_workers``-th line, so no prompt is seen twice per pass.
    """

    def __init__(self, paths: str | Path | Iterable[str | Path], key: str = "prompt", repeat: bool = False):
        self.paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("JsonlPromptStream needs at least one file")
        for p in self.paths:
            if not p.exists():
                raise FileNotFoundError(f"prompt file {p} does not exist")
        self.key = key
        self.repeat = repeat

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        while True:
            n = 0
            for path in self.paths:
                for item in _read_jsonl(path, self.key):
                    if n % nw == wid:
                        yield item
                    n += 1
            if not self.repeat:
                return
            if n == 0:
                raise ValueError(f"no prompts in {', '.join(map(str, self.paths))}")


def mix(*datasets: Dataset) -> ConcatDataset:
    """Concatenate map-style prompt sources (``torch.utils.data.ConcatDataset``)."""
    if not datasets:
        raise ValueError("mix() needs at least one dataset")
    return ConcatDataset(list(datasets))


def train_eval_split(dataset: Dataset, eval_size: int | float, seed: int = 0) -> tuple[Subset, Subset]:
    """Random disjoint ``(train, eval)`` Subsets; ``eval_size`` is a count or a fraction in (0, 1)."""
    n = len(dataset)
    k = int(round(eval_size * n)) if isinstance(eval_size, float) and 0 < eval_size < 1 else int(eval_size)
    if not 0 < k < n:
        raise ValueError(f"eval_size={eval_size} must leave both splits non-empty (dataset has {n} prompts)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return Subset(dataset, sorted(order[k:])), Subset(dataset, sorted(order[:k]))
