"""Prompt data through torch.utils.data: list / JSONL map-style, JSONL stream, ConcatDataset mix, Subset split."""

from __future__ import annotations

import json

import pytest
from torch.utils.data import ConcatDataset, DataLoader, Subset

from kiln.data.prompts import JsonlPromptStream, PromptDataset, mix, normalize_prompt, train_eval_split


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path


def test_map_style_from_list_and_jsonl(tmp_path):
    ds = PromptDataset(["a", [5, 6], {"messages": [{"role": "user", "content": "hi"}]}])
    assert len(ds) == 3 and ds[0] == {"prompt": "a"} and ds[1] == {"prompt_token_ids": [5, 6]}
    f = write_jsonl(tmp_path / "p.jsonl", [{"text": "one", "id": 1}, {"text": "two"}])
    ds2 = PromptDataset(f, key="text")
    assert [x["prompt"] for x in ds2] == ["one", "two"] and ds2[0]["id"] == 1
    bare = tmp_path / "bare.jsonl"
    bare.write_text('"just text"\n')
    assert PromptDataset(bare)[0] == {"prompt": "just text"}


@pytest.mark.parametrize("item, message", [
    ({"other": 1}, "needs one of"), ({"prompt": ""}, "non-empty"), ({"prompt_token_ids": [1, -2]}, "non-negative"),
    ({"messages": [{"role": "user"}]}, "messages"), (3.5, "expected text"),
])
def test_bad_prompts_are_named(item, message):
    with pytest.raises(ValueError, match=message):
        normalize_prompt(item, "row 7")


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        PromptDataset(f)
    with pytest.raises(FileNotFoundError):
        PromptDataset(tmp_path / "missing.jsonl")


def test_stream_reads_lazily_and_shards_over_workers(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}"} for i in range(5)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}"} for i in range(4)])
    stream = JsonlPromptStream([a, b])
    assert [x["prompt"] for x in stream] == [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(4)]
    loader = DataLoader(stream, batch_size=3, collate_fn=list, num_workers=2)
    seen = sorted(x["prompt"] for batch in loader for x in batch)
    assert seen == sorted([f"a{i}" for i in range(5)] + [f"b{i}" for i in range(4)])  # each once
    looped = iter(JsonlPromptStream(a, repeat=True))
    assert [next(looped)["prompt"] for _ in range(7)] == ["a0", "a1", "a2", "a3", "a4", "a0", "a1"]


def test_mix_and_split():
    both = mix(PromptDataset(["x", "y"]), PromptDataset(["z"]))
    assert isinstance(both, ConcatDataset) and [d["prompt"] for d in both] == ["x", "y", "z"]
    ds = PromptDataset([str(i) for i in range(20)])
    train, evals = train_eval_split(ds, 0.25, seed=1)
    assert isinstance(train, Subset) and len(train) == 15 and len(evals) == 5
    assert not set(train.indices) & set(evals.indices)
    assert train_eval_split(ds, 5, seed=1)[1].indices == evals.indices  # same seed, same split
    with pytest.raises(ValueError, match="eval_size"):
        train_eval_split(ds, 20)
