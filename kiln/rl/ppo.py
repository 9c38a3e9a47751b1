"""PPO for language models, TRL's algorithm (``trl.experimental.ppo``, 1.12.0) with kiln.llm rollouts.

One iteration (``PPOTrainer.step``):

1. sync the policy's current weights into the kiln.llm engine in memory (a cached plan of direct copies) and sample
   ``response_length`` tokens for a batch of prompts; the engine computes in the training dtype (``rollout_dtype``
   "auto"), so it samples the same distribution whose log-probabilities PPO trains on. As in TRL 1.12, a response
   runs through EOS tokens to ``response_length`` unless ``stop_token`` / ``stop_token_id`` is set, and then ends
   at that token only (the model's other EOS ids do not end it);
2. recompute, in the training model, the policy log-probabilities and values and the reference log-probabilities
   of the sampled tokens (logits divided by ``temperature``);
3. score each (prompt, response) with the reward function or model; ``missing_eos_penalty`` if no stop token;
4. per-token rewards ``-kl_coef * kl`` with the score added at the last response token (``compute_rewards``),
   optional whitening, GAE advantages and returns (``compute_advantages``);
5. ``num_ppo_epochs`` passes over shuffled mini-batches (``num_mini_batches``), each accumulated over micro-batches
   of ``per_device_train_batch_size`` rows: clipped policy loss + ``vf_coef`` x clipped value loss.

Masks: a response's tokens (the stop token included) are True, the padding after it False. Without a stop token
every response is ``response_length`` long and the two codes agree (barring a sampled pad token, which TRL takes
for the end of the response: ``first_true_indices(response == pad_token_id)``). With one, a response that stops early
differs: TRL 1.12 places the score one position past the stop token and trains that position's value too (its
``padding_mask_p1``); kiln places it on the last token, as TRL's earlier ``compute_rewards`` and the issue's spec
do. The stop token's advantage is then ``r + score - V`` in kiln and ``r + gamma*lam*score - V + gamma*(1-lam)*V'``
in TRL (``V'`` the value one past it): with ``gamma = 1`` they differ by ``(1-lam) * (score - V')`` (0 at lam = 1).

Under ``torchrun`` every rank samples its share of each global batch and trains on its share of every mini-batch:
with DDP (default) each rank holds the whole model; with ``PPOConfig.fsdp`` the trained model and the reference are
sharded with FSDP2, and every read of whole weights (engine sync, checkpoints) gathers them one tensor at a time.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from kiln.ops._dispatch import resolve_device

from .config import PPOConfig
from .graphs import MicroStepGraphs
from .kl import AdaptiveKLController, FixedKLController
from .rewards import check_scores, compute_rewards, masked_mean, masked_whiten, model_scores
from .value_head import PolicyAndValue

logger = logging.getLogger(__name__)

# SDPA backends for the training forward: not cuDNN's. Left-padded prompts give fully masked query rows, and
# cuDNN attention's backward (torch 2.11, H100, bf16) returns NaN gradients for them at some lengths (64 in
# scripts/gpu/ppo_graph_probe.py; 63 was fine). The memory-efficient kernel, which PyTorch picks next, gives zeros.
_TRAIN_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

__all__ = ["PPOTrainer", "compute_advantages", "policy_loss", "value_loss", "logprobs_from_logits",
           "entropy_from_logits", "plot_stats"]


# ----------------------------------------------------------------------------------------------- the formulas
def compute_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
                       whiten: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE: ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}`` (V and A are 0
    past the response), ``returns = A + V``; then A is whitened over the mask (``whiten``) and zeroed outside it.
    Returns ``(advantages, returns)``, both ``[B, T]``."""
    mask = mask.bool()
    values = values.masked_fill(~mask, 0.0)
    rewards = rewards.masked_fill(~mask, 0.0)
    steps = rewards.shape[1]
    next_values = torch.nn.functional.pad(values[:, 1:], (0, 1))
    delta = rewards + gamma * next_values - values
    # the backward recursion unrolled: A_t = sum_{s >= t} (gamma * lam)^(s - t) * delta_s, one matmul with an
    # upper-triangular discount matrix instead of a Python loop of `steps` small kernels
    idx = torch.arange(steps, device=delta.device)
    lag = idx.view(-1, 1) - idx.view(1, -1)  # [s, t] -> s - t
    discount = torch.where(lag >= 0, torch.tensor(gamma * lam, dtype=delta.dtype, device=delta.device)
                           .pow(lag.clamp(min=0).to(delta.dtype)), torch.zeros((), dtype=delta.dtype,
                                                                                device=delta.device))
    advantages = delta @ discount
    returns = advantages + values
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages.masked_fill(~mask, 0.0), returns.masked_fill(~mask, 0.0)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: ``mean_mask(max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c)))``, ``ratio = exp(lp - lp_old)``.

    Stats: ``clipfrac`` (share of tokens where the clipped term is larger), ``approxkl`` (``0.5 * mean(diff**2)``),
    ``ratio`` (mean)."""
    mask = mask.bool()
    diff = (logprobs - old_logprobs).masked_fill(~mask, 0.0)
    ratio = torch.exp(diff)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((pg_losses2 > pg_losses).float(), mask),
                 "approxkl": 0.5 * masked_mean(diff.square(), mask),
                 "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(vpred: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped critic loss: ``0.5 * mean_mask(max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2))``."""
    mask = mask.bool()
    vclipped = torch.clamp(vpred, old_values - cliprange_value, old_values + cliprange_value)
    losses1 = (vpred - returns).square()
    losses2 = (vclipped - returns).square()
    loss = 0.5 * masked_mean(torch.max(losses1, losses2), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((losses2 > losses1).float(), mask)}
    return loss, stats


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., token]`` in fp32: ``[B, T, V], [B, T] -> [B, T]``."""
    logits = logits.float()
    return torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def _disable_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def _vocab(tokenizer) -> dict | None:
    if tokenizer is None:
        return None
    if hasattr(tokenizer, "get_vocab"):
        return tokenizer.get_vocab()
    inner = getattr(tokenizer, "tok", None)  # kiln.llm.Tokenizer
    return inner.get_vocab(with_added_tokens=True) if inner is not None else None


def _model_dir(model: nn.Module) -> Path | None:
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return Path(name) if name and Path(name).is_dir() else None


def _load_tokenizer_at(path: Path | None):
    if path is None or not (path / "tokenizer.json").exists():
        return None
    from kiln.llm.tokenizer import Tokenizer

    return Tokenizer(path)


# ----------------------------------------------------------------------------------------------- rollouts
class Rollout:
    """One batch of sampled responses and everything PPO needs about them (tensors on the training device)."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    query_responses: torch.Tensor   # [B, C + T] prompt (left-padded to C) then response (right-padded to T)
    attention_mask: torch.Tensor    # [B, C + T]
    position_ids: torch.Tensor      # [B, C + T]
    context_length: int             # C
    responses: torch.Tensor         # [B, T]
    mask: torch.Tensor              # [B, T] bool, True on response tokens
    prompts: list[str]
    texts: list[str]
    finish_reasons: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]

    def rows(self, start: int, stop: int) -> "Rollout":
        """Rows ``[start, stop)`` with the same padding (this rank's share of a gathered global batch)."""
        sl = slice(start, stop)
        return Rollout(query_responses=self.query_responses[sl], attention_mask=self.attention_mask[sl],
                       position_ids=self.position_ids[sl], context_length=self.context_length,
                       responses=self.responses[sl], mask=self.mask[sl], prompts=self.prompts[sl],
                       texts=self.texts[sl], finish_reasons=self.finish_reasons[sl], prompt_ids=self.prompt_ids[sl],
                       response_ids=self.response_ids[sl])


def _init_distributed(device: str | torch.device | None = None) -> tuple[int, int]:
    """(rank, world size): joins the process group ``torchrun`` describes unless the caller already did; (0, 1)
    outside torchrun. NCCL for GPU training, gloo for the CPU: where ``device`` asks for the CPU on a GPU machine
    too (NCCL cannot reduce CPU tensors)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        try:
            on_cpu = device is not None and torch.device(device).type == "cpu"
        except (RuntimeError, TypeError):  # not a device name: the trainer's resolve_device says so next
            on_cpu = False
        dist.init_process_group("nccl" if torch.cuda.is_available() and not on_cpu else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _dtensor_type() -> type | tuple:
    """``DTensor`` (what FSDP2 turns parameters into), or ``()`` where torch has no distributed support."""
    if not dist.is_available():
        return ()
    from torch.distributed.tensor import DTensor

    return DTensor


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP-sharded parameter (an all-gather: every rank must ask, in the same order);
    plain tensors pass through."""
    return t.full_tensor() if isinstance(t, _dtensor_type()) else t


def _transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one, outermost only: the classes a Hugging Face model lists in
    ``_no_split_modules`` (LlamaDecoderLayer, GPT2Block, ...), else classes named ``*DecoderLayer`` or ``*Block``.
    One all-gather per block keeps only one block's whole weights alive at a time."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for m in model.modules():  # pre-order: an outer block comes before anything nested in it
        if id(m) in inside:
            continue
        cls = type(m).__name__
        if (cls in names) if names else cls.endswith(("DecoderLayer", "Block")):
            blocks.append(m)
            inside.update(id(c) for c in m.modules())
    return blocks


def _fully_shard(model: nn.Module, mesh, frozen: bool = False) -> int:
    """FSDP2 in place over ``mesh``: each transformer block, then the root (embeddings, final norm, LM head, value
    head; tied weights stay tied). Parameter names do not change. The trained model keeps its root gathered from
    forward to backward (FSDP2's default); a ``frozen`` one has no backward, so its root reshards after every
    forward too. Returns the number of blocks."""
    from torch.distributed.fsdp import fully_shard

    blocks = _transformer_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=True if frozen else None)
    return len(blocks)


def _full_state_dict(module: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` whole and on the CPU, FSDP shards gathered one tensor at a time (every rank must
    call it); only ranks with ``keep`` hold the result. A tensor under two names (tied embeddings) stays one
    tensor, so ``save_pretrained`` recognises the tie."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, torch.Tensor | None] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            full = _full(t.detach())
            seen[id(t)] = full.cpu() if keep else None
        if keep:
            out[name] = seen[id(t)]
    return out


class PPOTrainer:
    """Train a causal LM with PPO against a reward; rollouts by kiln.llm, updates in torch.

    Args mirror TRL's ``PPOTrainer`` where they overlap:
        args: ``PPOConfig``.
        model: a Hugging Face causal LM, or a checkpoint directory to load one from (fp32). Its directory (or
            ``model_path``) also builds the kiln.llm rollout engine, unless ``llm`` is given.
        reward_model: a Python function ``fn(prompts: list[str], responses: list[str]) -> list[float]`` or a
            ``torch.nn.Module`` scoring token ids (TRL's reward-model layout or any model with ``logits``).
        train_dataset: map-style or iterable prompts (see ``kiln.data.prompts``).
        ref_model: frozen reference; default a copy of the policy, or the adapter-disabled policy with peft.
        value_model: a separate critic (HF causal LM or sequence classifier); default a zero-initialised value head
            on the policy's last hidden state.
        processing_class: the tokenizer; default the engine's (kiln.llm.Tokenizer).
        value_processing_class: the value model's tokenizer, checked against the policy's (else read from the value
            model's directory when it has one).
        peft_config: a ``peft.LoraConfig`` to train LoRA adapters; the reference is then the policy with adapters
            disabled and the engine receives merged weights.
        engine_kwargs: extra ``kiln.llm.LLM`` options (block_size, max_num_seqs, num_kv_blocks, ...).
        callbacks: functions ``cb(trainer, stats)`` called after every iteration.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the trainer joins the process group and trains data-parallel: DDP, or
    FSDP2 with ``args.fsdp`` (the policy + value model and a separate reference are sharded; the reward model and
    the rollout engine stay whole on every rank). Then ``step``, ``train``, ``evaluate``, ``sync_weights`` and
    ``save_model`` are collective: every rank calls them.
    """

    def __init__(self, args: PPOConfig | None = None, *, model: nn.Module | str | Path,
                 reward_model: Callable | nn.Module, train_dataset: Dataset,
                 ref_model: nn.Module | None = None, value_model: nn.Module | None = None,
                 processing_class=None, value_processing_class=None, eval_dataset: Dataset | None = None,
                 peft_config=None, llm=None, model_path: str | Path | None = None, device: str | None = None,
                 engine_kwargs: dict | None = None, optimizers=(None, None),
                 callbacks: list[Callable[["PPOTrainer", dict], Any]] | None = None):
        self.args = args = args if args is not None else PPOConfig()
        if not isinstance(args, PPOConfig):
            raise TypeError(f"args must be a PPOConfig, got {type(args).__name__}")
        self.rank, self.world_size = _init_distributed(device)
        self.fsdp = args.fsdp and self.world_size > 1
        if args.fsdp and self.world_size == 1:
            logger.warning("fsdp=True in a single process: nothing to shard, training the unsharded model (launch "
                           "with torchrun --nproc-per-node N to shard)")
        if self.fsdp and peft_config is not None:
            raise ValueError("fsdp with peft_config is not supported: LoRA adapters are small enough for DDP "
                             "(fsdp=False), and merging them into sharded weights for the rollout engine is not "
                             "implemented")
        if self.fsdp and optimizers[0] is not None:
            raise ValueError("fsdp replaces the model's parameters with sharded ones, so the trainer must build the "
                             "optimizer: pass optimizers=(None, scheduler) or use fsdp=False")
        if device is None and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if self.world_size > 1 else "cuda"
        try:
            self.device = resolve_device(device or "cpu")
        except ValueError as exc:
            if self.world_size == 1:
                raise
            raise ValueError(f"{exc} (torchrun rank {self.rank} of {self.world_size}: start at most one process per "
                             "GPU, or pass device='cpu' to train on the CPU with gloo)") from None
        if self.device.type == "cuda" and self.world_size > 1:
            torch.cuda.set_device(self.device)
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)

        # ---- policy
        if isinstance(model, (str, Path)):
            model_path = Path(model)
            if not (model_path / "config.json").exists():
                raise FileNotFoundError(f"{model_path} is not a Hugging Face checkpoint directory (no config.json)")
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch module or a checkpoint directory, got {type(model).__name__}")
        if ref_model is not None and ref_model is model:
            raise ValueError("model and ref_model are the same object; pass a copy, or None to let the trainer copy "
                             "it (or to use the adapter-disabled policy with peft)")
        self.model_path = Path(model_path) if model_path is not None else _model_dir(model)
        if self.fsdp and _is_peft(model):
            raise ValueError("fsdp with a peft model is not supported (see peft_config); use fsdp=False")
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        self.is_peft_model = _is_peft(model)
        _disable_dropout(model)
        model.to(self.device)
        if args.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable()

        # ---- reference
        if ref_model is None and not self.is_peft_model:
            ref_model = copy.deepcopy(model)
        if ref_model is not None:
            ref_model = ref_model.to(self.device).eval()
            ref_model.requires_grad_(False)
            _disable_dropout(ref_model)
        self.ref_model = ref_model

        # ---- rollout engine and tokenizer
        if llm is None:
            if self.model_path is None:
                raise ValueError("cannot build the rollout engine: pass the model as a checkpoint directory, or "
                                 "model_path=, or llm=kiln.llm.LLM(...)")
            llm = self._build_engine(engine_kwargs or {}, model)
        self.llm = llm
        self.tokenizer = processing_class if processing_class is not None else llm.tokenizer
        if self.tokenizer is None:
            raise ValueError(f"{self.model_path} has no tokenizer.json; pass processing_class")
        self.max_model_len = llm.engine.max_model_len
        self.stop_token_id = self._resolve_stop_token()
        policy_vocab = _config_vocab(model)

        # ---- value function
        if value_model is not None:
            if _config_vocab(value_model) not in (None, policy_vocab):
                raise ValueError(f"value model vocabulary ({_config_vocab(value_model)} tokens) differs from the "
                                 f"policy's ({policy_vocab}); the value model must use the policy's tokenizer")
            vtok = value_processing_class if value_processing_class is not None else _load_tokenizer_at(
                _model_dir(value_model))
            if vtok is not None and _vocab(vtok) != _vocab(self.tokenizer):
                raise ValueError("the value model's tokenizer differs from the policy's (different vocabulary); "
                                 "PPO feeds both the same token ids, so they must share one tokenizer")
            _disable_dropout(value_model)
        self.model = PolicyAndValue(model, value_model).to(self.device)
        self.model.train()

        # ---- reward
        if isinstance(reward_model, nn.Module):
            if _config_vocab(reward_model) not in (None, policy_vocab):
                raise ValueError(f"reward model vocabulary ({_config_vocab(reward_model)} tokens) differs from the "
                                 f"policy's ({policy_vocab}); score with a Python function of texts instead")
            reward_model.to(self.device).eval().requires_grad_(False)
        elif not callable(reward_model):
            raise TypeError("reward_model must be a torch module or a function (prompts, responses) -> scores")
        self.reward_model = reward_model

        # ---- data
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        is_stream = isinstance(train_dataset, IterableDataset)
        if is_stream and args.total_episodes is None:
            raise ValueError("a streamed (iterable) train_dataset needs args.total_episodes")
        args.world_size = self.world_size
        args.resolve(None if is_stream else len(train_dataset))
        if args.num_total_batches < 1:
            raise ValueError("nothing to train: total_episodes / batch_size gives 0 iterations")
        if not is_stream:
            if len(train_dataset) < args.batch_size:
                raise ValueError(f"train_dataset has {len(train_dataset)} prompts, fewer than one batch "
                                 f"({args.batch_size} = per_device_train_batch_size x "
                                 f"gradient_accumulation_steps x {self.world_size} processes)")
            for i in range(len(train_dataset)):  # every prompt fits the context, before any training
                self._encode(train_dataset[i], f"train_dataset[{i}]")
        gen = torch.Generator().manual_seed(args.seed)
        # every rank draws the same global batches (same seed) and takes its share of each
        self.dataloader = DataLoader(train_dataset, batch_size=args.batch_size, shuffle=not is_stream,
                                     drop_last=True, collate_fn=list, generator=None if is_stream else gen)

        # ---- FSDP2: before the optimizer, which must see the sharded parameters
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh

            # the mesh on the training device: FSDP's default mesh takes CUDA whenever it exists, even for CPU ranks
            mesh = init_device_mesh(self.device.type, (self.world_size,))
            n_blocks = _fully_shard(self.model, mesh)
            if self.ref_model is not None:
                _fully_shard(self.ref_model, mesh, frozen=True)
            logger.info("FSDP2 over %d ranks: %d transformer blocks sharded one by one, then the root",
                        self.world_size, n_blocks)

        # ---- optimisation
        self.optimizer, self.lr_scheduler = optimizers
        if self.optimizer is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            # TRL's default optimizer (transformers' optim="adamw_torch_fused"): one fused AdamW kernel per step
            fused = self.device.type in ("cuda", "cpu") and all(p.is_floating_point() for p in params)
            self.optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                               eps=args.adam_epsilon, weight_decay=args.weight_decay,
                                               fused=fused or None)
        if self.lr_scheduler is None:
            total = args.num_total_batches
            factor = ((lambda i: 1.0 - i / total) if args.lr_scheduler_type == "linear" else (lambda i: 1.0))
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.kl_ctl = (AdaptiveKLController(args.init_kl_coef if args.init_kl_coef is not None else args.kl_coef,
                                            args.target, args.horizon)
                       if args.adap_kl_ctrl else FixedKLController(args.kl_coef))
        self.callbacks = list(callbacks or [])
        self.history: list[dict] = []
        self.samples: list[dict] = []
        self.iteration = 0
        self.episode = 0
        self._np_rng = np.random.default_rng(args.seed)
        self._data_iter: Iterator | None = None
        self._rollout_seed = args.seed * 1_000_003
        self._sync_plan = None  # built on the first sync_weights()
        self._compiled: nn.Module | None = None  # torch_compile: the compiled training module, built on first use
        self._graphs: MicroStepGraphs | None = None  # cuda_graphs: the training micro-step's graphs, built on first use
        # DDP: gradients are averaged across ranks; self.model stays the plain module (saving, scoring, syncing).
        # FSDP: self.model is itself the sharded module, which averages the gradients
        self.ddp_model: nn.Module | None = None
        if self.world_size > 1 and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # ------------------------------------------------------------------------------------------- setup helpers
    def _build_engine(self, engine_kwargs: dict, policy: nn.Module):
        from kiln.llm import LLM
        from kiln.llm.config import ModelConfig

        cfg = ModelConfig.from_file(self.model_path / "config.json")
        kw = dict(engine_kwargs)
        block = kw.get("block_size", 16)
        if not any(k in kw for k in ("num_kv_blocks", "kv_cache_memory_bytes", "gpu_memory_utilization")):
            # enough KV for a whole batch at full length, and no more: the trainer shares the device with it
            ctx = min(kw.get("max_model_len") or cfg.max_context, cfg.max_context)
            kw["num_kv_blocks"] = self.args.local_batch_size * -(-ctx // block) + 1
        kw.setdefault("max_num_seqs", max(self.args.local_batch_size, 1))
        # sample from the distribution PPO trains: the engine computes in the training dtype (fp32, or bf16 under
        # --bf16), not the engine's own default (bf16 on CUDA). A bf16 engine behind an fp32 policy samples from a
        # different, stale policy: the checkpoint's weights sit on the bf16 grid and small updates round back to it.
        kw.setdefault("dtype", self.args.rollout_dtype if self.args.rollout_dtype != "auto" else
                      _train_dtype(policy, self.args.bf16))
        return LLM(self.model_path, device=str(self.device), seed=self.args.seed, **kw)

    def _resolve_stop_token(self) -> int | None:
        a = self.args
        if a.stop_token == "eos":
            eos = getattr(self.tokenizer, "eos_token_id", None)
            if eos is None:
                raise ValueError("stop_token='eos' but the tokenizer has no eos token; set stop_token_id")
            return int(eos)
        return a.stop_token_id

    def _encode(self, item, where: str) -> tuple[str, list[int]]:
        from kiln.data.prompts import normalize_prompt

        item = normalize_prompt(item, where)
        if "prompt_token_ids" in item:
            ids = list(item["prompt_token_ids"])
            text = item.get("prompt") or self.tokenizer.decode(ids)
        elif "messages" in item:
            text = self.llm.tokenizer.apply_chat_template(item["messages"], True)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            text = item["prompt"]
            ids = self.tokenizer.encode(text)
        if not ids:
            raise ValueError(f"{where}: the prompt tokenizes to nothing")
        if len(ids) + self.args.response_length > self.max_model_len:
            raise ValueError(f"{where}: prompt has {len(ids)} tokens; with response_length="
                             f"{self.args.response_length} that exceeds the model's context ({self.max_model_len})")
        return text, ids

    def _next_batch(self) -> list:
        if self._data_iter is None:
            self._data_iter = self._repeat()
        return next(self._data_iter)

    def _repeat(self):
        while True:
            empty = True
            for batch in self.dataloader:
                empty = False
                L = self.args.local_batch_size
                yield batch[self.rank * L:(self.rank + 1) * L]
            if empty:
                raise ValueError("the train dataset yielded no full batch")

    # ------------------------------------------------------------------------------------------- weights
    def engine_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy's parameters under Hugging Face names (LoRA merged in when training adapters), whole: under
        FSDP each is gathered as it is yielded, so every rank must consume them in step."""
        for name, p in self._engine_params():
            yield name, _full(p)

    def _engine_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``engine_weights`` as the parameters themselves (FSDP shards not gathered)."""
        policy = self.model.policy
        if not self.is_peft_model:
            yield from policy.named_parameters()
            return
        base = policy.get_base_model()
        for name, p in base.named_parameters():
            if "lora_" in name or ".original_module." in name:
                continue
            yield name.replace(".base_layer.", ".").replace(".modules_to_save.default.", "."), p

    def sync_weights(self) -> None:
        """Copy the policy's current weights into the rollout engine (in memory).

        The first call maps every policy tensor to its destination in the engine (a parameter or a shard of a
        fused one) and later calls replay that plan as one batched ``copy_``; engines the plan cannot describe
        (tensor-parallel, quantized) go through ``llm.update_weights`` every time. Under FSDP the plan gathers one
        parameter at a time, so no rank holds a second whole copy of the model."""
        if self.fsdp:  # the root may still hold gathered weights from a no-grad forward: the plan reads the shards
            self.model.reshard()
        with torch.no_grad(), (self._merged() if self.is_peft_model else nullcontext()):
            if self._sync_plan is None:
                self._sync_plan = self._build_sync_plan() or False
            if self._sync_plan:
                dst, src = self._sync_plan
                if self.fsdp:
                    for d, t in zip(dst, src):
                        d.copy_(_full(t))
                else:
                    torch._foreach_copy_(dst, src)
                engine = getattr(self.llm, "engine", None)
                if engine is not None and hasattr(engine, "reset_prefix_cache"):
                    engine.reset_prefix_cache()  # cached prefixes hold KV computed with the old weights
            else:
                self.llm.update_weights(self.engine_weights())

    def _build_sync_plan(self):
        """``(engine tensors, policy tensors)`` for a direct copy, or None where only ``update_weights`` will do."""
        engine = getattr(self.llm, "engine", None)
        model = getattr(engine, "model", None)
        name_map = getattr(model, "map_hf_name", None)
        if model is None or name_map is None or getattr(engine, "workers", None) is not None:
            return None
        params = dict(model.named_parameters())
        if any(not p.is_floating_point() for p in params.values()) or any(
                getattr(getattr(m, "tp", None), "size", 1) > 1 for m in model.modules()):
            return None  # quantized tensors or tensor-parallel slices: the loader knows how to fill those
        dst, src, filled = [], [], set()
        for hf_name, tensor in self._engine_params():  # under FSDP, DTensors with the whole shape
            target = name_map(hf_name)
            if target is None:
                continue
            param = params.get(target.name)
            if param is None:
                return None
            dest = param.data
            if target.shard is not None:
                owner = model.get_submodule(target.name.rsplit(".", 1)[0]) if "." in target.name else model
                if target.shard not in getattr(owner, "shard_offsets", {}) or not hasattr(owner, "shard_view"):
                    return None
                dest = owner.shard_view(param, target.shard)
            if target.transpose:
                dest = dest.t()
            if tuple(dest.shape) != tuple(tensor.shape) or dest.device != tensor.device:
                return None
            dst.append(dest)
            src.append(tensor)  # the parameter itself: peft's merge may swap its .data
            filled.add((target.name, target.shard))
        covered = {n for n, _ in filled}
        if set(params) - covered:  # some engine parameter would never be refreshed
            return None
        # the first sync goes through the engine's own loader (which checks every tensor), the plan after it
        self.llm.update_weights(self.engine_weights())
        return dst, src

    @contextmanager
    def _merged(self):
        self.model.policy.merge_adapter()
        try:
            yield
        finally:
            self.model.policy.unmerge_adapter()

    @contextmanager
    def _reference(self):
        if self.ref_model is not None:
            yield self.ref_model
        else:
            with self.model.policy.disable_adapter():
                yield self.model.policy

    @contextmanager
    def _no_grad_sync(self, sync: bool):
        """Skip the cross-rank gradient reduction unless ``sync`` (the last micro-batch of a mini-batch): DDP's
        ``no_sync()``, FSDP2's ``set_requires_gradient_sync(False)``. The reduced sum is the same, once."""
        if sync or self.world_size == 1:
            yield
        elif self.fsdp:
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        else:
            with self.ddp_model.no_sync():
                yield

    def _train_module(self) -> nn.Module:
        """What the PPO epochs call: the DDP wrapper under torchrun, else the model; compiled once if asked."""
        module = self.ddp_model if self.ddp_model is not None else self.model
        if not self.args.torch_compile:
            return module
        if self._compiled is None:
            self._compiled = torch.compile(module, dynamic=True)
        return self._compiled

    def _autocast(self, cache: bool = True):
        """bf16 autocast if asked; ``cache=False`` where the region is captured into a CUDA graph (autocast's
        weight-cast cache must not outlive a capture)."""
        if not self.args.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=cache)

    # ------------------------------------------------------------------------------------------- rollout
    def generate(self, batch: list, temperature: float | None = None, seed: int | None = None) -> Rollout:
        """Sample one response per prompt with the engine (weights must be synced) and pack the tensors."""
        from kiln.llm import SamplingParams

        a = self.args
        encoded = [self._encode(item, f"prompt {i} of the batch") for i, item in enumerate(batch)]
        texts_in, prompt_ids = zip(*encoded)
        base_seed = self._rollout_seed if seed is None else seed
        stop = self.stop_token_id
        # token ids only (no per-token incremental detokenization in the engine); texts are decoded once below.
        # A response ends where TRL 1.12's do: TRL sets the policy's generation_config.eos_token_id to the stop
        # token (None unless stop_token / stop_token_id is set), so Hugging Face generate samples response_length
        # tokens through any EOS token, or stops at the stop token alone (truncate_response then cuts after its
        # first occurrence, which is where the engine stops). The model's own EOS ids (config.json,
        # generation_config.json) never end a rollout.
        params = [SamplingParams(temperature=a.temperature if temperature is None else temperature,
                                 max_tokens=a.response_length, seed=base_seed + i, ignore_eos=True,
                                 stop_token_ids=[stop] if stop is not None else None,
                                 detokenize=False) for i in range(len(batch))]
        outs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids], params)
        responses = [list(o.outputs[0].token_ids) for o in outs]
        return self._pack(list(texts_in), [list(p) for p in prompt_ids], responses, self._decode(responses),
                          [o.outputs[0].finish_reason for o in outs])

    def _decode(self, responses: list[list[int]]) -> list[str]:
        """Response texts (special tokens skipped) in one batched call of the rollout engine's tokenizer."""
        tok = getattr(self.llm, "tokenizer", None) or self.tokenizer
        inner = getattr(tok, "tok", None)  # kiln.llm.Tokenizer wraps a `tokenizers.Tokenizer`
        if inner is not None and hasattr(inner, "decode_batch"):
            return list(inner.decode_batch(responses, skip_special_tokens=True))
        if hasattr(tok, "batch_decode"):
            return list(tok.batch_decode(responses, skip_special_tokens=True))
        return [tok.decode(r, skip_special_tokens=True) for r in responses]

    def _pack(self, texts_in: list[str], prompt_ids: list[list[int]], responses: list[list[int]], texts: list[str],
              finish_reasons: list[str]) -> Rollout:
        """Left-pad the prompts and right-pad the responses of a batch into the Rollout tensors."""
        ctx = max(len(p) for p in prompt_ids)
        T = max(len(r) for r in responses)
        B = len(prompt_ids)
        rows = [[0] * (ctx - len(p)) + list(p) + list(r) + [0] * (T - len(r)) for p, r in zip(prompt_ids, responses)]
        lens = [(ctx - len(p), ctx + len(r)) for p, r in zip(prompt_ids, responses)]
        qr = torch.tensor(rows, dtype=torch.long).view(B, ctx + T)
        col = torch.arange(ctx + T)
        bounds = torch.tensor(lens, dtype=torch.long).view(B, 2)
        attn = ((col >= bounds[:, :1]) & (col < bounds[:, 1:])).long()
        resp = qr[:, ctx:].clone()
        mask = attn[:, ctx:].bool()
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        dev = self.device
        nb = dev.type == "cuda"
        return Rollout(query_responses=qr.to(dev, non_blocking=nb), attention_mask=attn.to(dev, non_blocking=nb),
                       position_ids=pos.to(dev, non_blocking=nb), context_length=ctx,
                       responses=resp.to(dev, non_blocking=nb), mask=mask.to(dev, non_blocking=nb), prompts=list(texts_in),
                       texts=list(texts), finish_reasons=list(finish_reasons), prompt_ids=prompt_ids,
                       response_ids=responses)

    # ------------------------------------------------------------------------------------------- data parallel
    def _gather_rollout(self, ro: Rollout) -> Rollout:
        """Every rank's responses, in rank order, packed as one global batch (identical on every rank, padded as a
        single process would pad it)."""
        parts = [None] * self.world_size
        dist.all_gather_object(parts, (ro.prompts, ro.prompt_ids, ro.response_ids, ro.texts, ro.finish_reasons))
        return self._pack(*(sum((list(p[i]) for p in parts), []) for i in range(5)))

    def _gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's rows (same trailing shape everywhere) in rank order."""
        if self.world_size == 1:
            return x
        out = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    def score(self, ro: Rollout) -> torch.Tensor:
        """Scores ``[B]`` (validated: right count, finite) from the reward function or model."""
        if isinstance(self.reward_model, nn.Module):
            last = ro.context_length + ro.mask.sum(1) - 1
            scores = model_scores(self.reward_model, ro.query_responses, ro.attention_mask, last)
            return check_scores(scores, len(ro.texts), "reward model").to(self.device)
        raw = self.reward_model(list(ro.prompts), list(ro.texts))
        return check_scores(raw, len(ro.texts), f"reward function {getattr(self.reward_model, '__name__', '')}"
                            .rstrip()).to(self.device)

    def _forward(self, module, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, ctx: int,
                 with_values: bool):
        """Response-position logits (divided by the temperature) and, ``with_values``, values of ``[rows, ctx + T]``
        query-responses whose first response token sits at ``ctx``."""
        if with_values:
            logits, values = module(ids, attn, pos)
            values = values[:, ctx - 1:-1]
        else:
            logits = module(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).logits
            values = None
        logits = logits[:, ctx - 1:-1].float() / self.args.temperature
        return logits, values

    def _train_inputs(self, ro: Rollout, logprobs, values, advantages, returns, bucket: int) -> dict:
        """The tensors the PPO epochs read, ``[B, ...]``; with ``bucket > 1`` the prompts are left-padded and the
        responses right-padded (masked, attention off) to multiples of it, so the shapes repeat across iterations."""
        ctx, T = ro.context_length, ro.responses.shape[1]
        left, right = -ctx % bucket, -T % bucket

        def pad(t: torch.Tensor, sides: tuple[int, int]) -> torch.Tensor:
            return torch.nn.functional.pad(t, sides) if any(sides) else t

        both, resp = (left, right), (0, right)
        return {"ids": pad(ro.query_responses, both), "attn": pad(ro.attention_mask, both),
                "pos": pad(ro.position_ids, both), "responses": pad(ro.responses, resp),
                "mask": pad(ro.mask, resp), "logprobs": pad(logprobs, resp), "values": pad(values, resp),
                "advantages": pad(advantages, resp), "returns": pad(returns, resp)}

    def _micro_step(self, module, inputs: dict, idx: torch.Tensor, scale, sync: bool = True) -> torch.Tensor:
        """Forward, clipped policy + value loss and backward (scaled by ``scale``) of rows ``idx``; returns the
        stats ``[approxkl, pg_clipfrac, pg_loss, vf_loss, vf_clipfrac, entropy, ratio]``. Eager, or the body of
        a CUDA graph (then ``scale`` is a tensor and nothing here may read a value on the host)."""
        a = self.args
        ids = inputs["ids"][idx]
        ctx = ids.shape[1] - inputs["responses"].shape[1]
        with self._autocast(cache=False), self._no_grad_sync(sync), sdpa_kernel(_TRAIN_ATTENTION):
            logits, vpred = self._forward(module, ids, inputs["attn"][idx], inputs["pos"][idx], ctx, True)
        m = inputs["mask"][idx]
        new_logprobs = logprobs_from_logits(logits, inputs["responses"][idx])
        pg, pg_stats = policy_loss(new_logprobs, inputs["logprobs"][idx], inputs["advantages"][idx], m, a.cliprange)
        vf, vf_stats = value_loss(vpred.float(), inputs["values"][idx], inputs["returns"][idx], m,
                                  a.cliprange_value)
        loss = pg + a.vf_coef * vf
        with self._no_grad_sync(sync):
            (loss * scale).backward()
        with torch.no_grad():
            ent = masked_mean(entropy_from_logits(logits), m)
            return torch.stack([pg_stats["approxkl"], pg_stats["clipfrac"], pg.detach(), vf.detach(),
                                vf_stats["clipfrac"], ent, pg_stats["ratio"]]).float()

    def _micro_step_graphs(self) -> MicroStepGraphs | None:
        """The CUDA graphs of the training micro-step where they apply (see ``PPOConfig.cuda_graphs``), else None."""
        a = self.args
        if (not a.cuda_graphs or self.device.type != "cuda" or self.world_size > 1 or a.torch_compile
                or a.gradient_checkpointing):
            return None
        if self._graphs is None:
            self._graphs = MicroStepGraphs(lambda inputs, idx, scale: self._micro_step(self.model, inputs, idx, scale),
                                           list(self.model.parameters()))
        return None if self._graphs.failure is not None else self._graphs

    @torch.no_grad()
    def _score_rollout(self, ro: Rollout) -> dict[str, torch.Tensor]:
        a = self.args
        n = ro.responses.shape[0]
        logprobs, ref_logprobs, values = [], [], []
        for s in range(0, n, a.local_rollout_forward_batch_size):
            rows = slice(s, s + a.local_rollout_forward_batch_size)
            ids, attn, pos = ro.query_responses[rows], ro.attention_mask[rows], ro.position_ids[rows]
            with self._autocast():
                logits, v = self._forward(self.model, ids, attn, pos, ro.context_length, True)
            logprobs.append(logprobs_from_logits(logits, ro.responses[rows]))
            values.append(v.float())
            del logits
            with self._reference() as ref, self._autocast():
                ref_logits, _ = self._forward(ref, ids, attn, pos, ro.context_length, False)
            ref_logprobs.append(logprobs_from_logits(ref_logits, ro.responses[rows]))
            del ref_logits
        return {"logprobs": torch.cat(logprobs), "ref_logprobs": torch.cat(ref_logprobs), "values": torch.cat(values)}

    # ------------------------------------------------------------------------------------------- one iteration
    def step(self, batch: list | None = None) -> dict[str, float]:
        """One PPO iteration (rollout, scoring, advantages, updates); returns the TRL-named stats."""
        a = self.args
        t0 = time.perf_counter()
        batch = self._next_batch() if batch is None else batch
        if len(batch) != a.local_batch_size:
            raise ValueError(f"a batch must hold {a.local_batch_size} prompts, got {len(batch)}")
        self.model.eval()
        clock = _PhaseClock(self.device)
        self.sync_weights()
        clock.lap("sync")
        # each rank samples its share of the global batch, seeded by the prompt's place in the global batch
        ro = self.generate(batch, seed=self._rollout_seed + self.rank * a.local_batch_size)
        t_gen = clock.lap("rollout")
        self._rollout_seed += a.batch_size
        if self.world_size > 1:
            # one global batch on every rank: advantages are whitened and stats taken over all of it, exactly as
            # one process with the whole batch would; each rank scores and forwards only its own rows
            ro = self._gather_rollout(ro)
            own = ro.rows(self.rank * a.local_batch_size, (self.rank + 1) * a.local_batch_size)
            scores = self._gather_rows(self.score(own))
            fwd = {k: self._gather_rows(v) for k, v in self._score_rollout(own).items()}
        else:
            scores = self.score(ro)
            fwd = self._score_rollout(ro)
        mask = ro.mask
        logprobs = fwd["logprobs"].masked_fill(~mask, 0.0)
        ref_logprobs = fwd["ref_logprobs"].masked_fill(~mask, 0.0)
        values = fwd["values"].masked_fill(~mask, 0.0)

        lengths = mask.sum(1)
        stop_id = self.stop_token_id
        if stop_id is None:
            stop_id = getattr(self.tokenizer, "eos_token_id", None)
        stop_hits = (torch.zeros_like(mask) if stop_id is None else (ro.responses == stop_id) & mask)
        has_stop = stop_hits.any(1)
        if a.missing_eos_penalty is not None:
            scores = scores - a.missing_eos_penalty * (~has_stop).float()

        kl_coef = self.kl_ctl.value
        with torch.no_grad():
            rewards, non_score_reward, kl = compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef,
                                                            a.kl_estimator)
            if a.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False).masked_fill(~mask, 0.0)
            advantages, returns = compute_advantages(rewards, values, mask, a.gamma, a.lam)
        clock.lap("score")

        # ---- PPO epochs x mini-batches x micro-batches
        self.model.train()
        shape = (a.num_ppo_epochs, a.num_mini_batches)
        stat_names = ("approxkl", "pg_clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "ratio")
        # stats stay on the device until the iteration ends: no host sync per mini-batch
        acc_t = torch.zeros((len(stat_names),) + shape, device=self.device)
        micro = a.train_micro_batch_size
        B = a.batch_size
        train_module = self._train_module()
        graphs = self._micro_step_graphs()
        inputs = self._train_inputs(ro, logprobs, values, advantages, returns,
                                    a.cuda_graph_bucket if graphs is not None else 1)
        lm = a.local_mini_batch_size
        for epoch in range(a.num_ppo_epochs):
            # the same permutation on every rank; rank r trains on its slice of each global mini-batch, in the
            # micro-batches one process would use, and DDP (or FSDP) averages the gradients
            perm = torch.from_numpy(self._np_rng.permutation(B)).to(self.device)
            for mb_idx, mb_start in enumerate(range(0, B, a.mini_batch_size)):
                mb = perm[mb_start:mb_start + a.mini_batch_size][self.rank * lm:(self.rank + 1) * lm]
                chunks = [mb[i:i + micro] for i in range(0, len(mb), micro)]
                for n_chunk, idx in enumerate(chunks):
                    if graphs is not None:
                        stats = graphs.run(inputs, idx, 1.0 / len(chunks))
                    else:
                        stats = self._micro_step(train_module, inputs, idx, 1.0 / len(chunks),
                                                 sync=n_chunk == len(chunks) - 1)
                    acc_t[:, epoch, mb_idx] += stats / len(chunks)
                if a.max_grad_norm is not None:  # FSDP's DTensor grads: the norm is taken over all shards
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), a.max_grad_norm)
                self.optimizer.step()
                # graphs accumulate into the same .grad tensors every replay: zero them in place
                self.optimizer.zero_grad(set_to_none=graphs is None or not graphs.active)
        if self.world_size > 1:  # each rank averaged its micro-batches; the global mean averages the ranks
            dist.all_reduce(acc_t)
            acc_t /= self.world_size
        acc = dict(zip(stat_names, acc_t.cpu().unbind(0)))
        lr = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        clock.lap("train")

        # ---- stats (TRL's names)
        self.iteration += 1
        self.episode += B
        mean_kl = kl.sum(1).mean().item()
        n_tokens = int(lengths.sum())
        elapsed = time.perf_counter() - t0
        stats = {
            "objective/kl": mean_kl,
            "objective/entropy": (-logprobs * mask).sum(1).mean().item(),
            "objective/non_score_reward": non_score_reward.sum(1).mean().item(),
            "objective/rlhf_reward": non_score_reward.sum(1).mean().item() + scores.mean().item(),
            "objective/scores": scores.mean().item(),
            "objective/kl_coef": kl_coef,
            "policy/approxkl_avg": acc["approxkl"].mean().item(),
            "policy/clipfrac_avg": acc["pg_clipfrac"].mean().item(),
            "loss/policy_avg": acc["pg_loss"].mean().item(),
            "loss/value_avg": acc["vf_loss"].mean().item(),
            "val/clipfrac_avg": acc["vf_clipfrac"].mean().item(),
            "policy/entropy_avg": acc["entropy"].mean().item(),
            "val/ratio": acc["ratio"].mean().item(),
            "val/ratio_var": acc["ratio"].var().item() if acc["ratio"].numel() > 1 else 0.0,
            # tokens, not rows, as TRL counts them (TRL counts the tokenizer's EOS id even under another stop_token_id)
            "val/num_eos_tokens": int(stop_hits.sum()),
            "lr": lr,
            "eps": B / elapsed,
            "episode": self.episode,
            "iteration": self.iteration,
            "rollout/response_length": lengths.float().mean().item(),
            "rollout/tokens_per_s": n_tokens / max(t_gen, 1e-9),
            # where the iteration's time went: weight sync into the engine, sampling, scoring (reward, policy /
            # reference / value forwards, advantages), PPO updates; time/iteration_s also holds the stats
            "time/sync_s": clock.times["sync"],
            "time/rollout_s": t_gen,
            "time/score_s": clock.times["score"],
            "time/train_s": clock.times["train"],
            "time/iteration_s": elapsed,
        }
        self.kl_ctl.update(mean_kl, B)
        self.history.append(stats)
        freq = max(1, a.num_total_batches // a.num_sample_generations) if a.num_sample_generations > 0 else 0
        if freq and (self.iteration - 1) % freq == 0:
            self.samples.append({"iteration": self.iteration, "prompt": ro.prompts[0], "response": ro.texts[0],
                                 "score": scores[0].item()})
            logger.info("iteration %d sample (score %.3f): %r -> %r", self.iteration, scores[0].item(),
                        ro.prompts[0], ro.texts[0])
        if a.logging_steps and self.iteration % a.logging_steps == 0:
            logger.info("iteration %d: %s", self.iteration, {k: round(v, 4) for k, v in stats.items()})
        for cb in self.callbacks:
            cb(self, stats)
        return stats

    def train(self, progress: bool = True) -> list[dict]:
        """Run ``num_total_batches`` iterations with a progress bar; checkpoint and plot into ``output_dir``."""
        a = self.args
        bar = tqdm(range(self.iteration, a.num_total_batches), desc="ppo", disable=not progress or self.rank > 0)
        for _ in bar:
            stats = self.step()
            bar.set_postfix(score=f"{stats['objective/scores']:.3f}", kl=f"{stats['objective/kl']:.3f}")
            if a.output_dir and a.save_steps and self.iteration % a.save_steps == 0:
                self.save_model(Path(a.output_dir) / f"checkpoint-{self.iteration}")
        if a.output_dir:
            self.save_model(a.output_dir)
            if a.report_plot and self.history and self.rank == 0:
                try:
                    plot_stats(self.history, Path(a.output_dir) / "ppo_curves.png")
                except ImportError:
                    logger.warning("matplotlib is not installed: no ppo_curves.png")
        return self.history

    # ------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, dataset: Dataset | None = None, temperature: float | None = None, seed: int = 12345,
                 batch_size: int | None = None) -> dict[str, float]:
        """Mean score of responses to ``dataset`` (default eval_dataset) with the current policy.

        Prompt ``i`` is sampled with seed ``seed + i``. Under torchrun every rank must call it: each samples and
        scores a contiguous share of the prompts, and all ranks return the stats of the whole dataset."""
        dataset = dataset if dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs a dataset (or eval_dataset at construction)")
        self.sync_weights()
        n = len(dataset)
        lo, hi = self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size
        items = [dataset[i] for i in range(lo, hi)]
        bs = batch_size or max(self.args.local_batch_size, 1)
        scores: list[float] = []
        lengths: list[float] = []
        for s in range(0, len(items), bs):
            ro = self.generate(items[s:s + bs], temperature=temperature, seed=seed + lo + s)
            scores += self.score(ro).tolist()
            lengths += ro.mask.sum(1).float().tolist()
        if self.world_size > 1:
            parts = [None] * self.world_size
            dist.all_gather_object(parts, (scores, lengths))
            scores, lengths = sum((p[0] for p in parts), []), sum((p[1] for p in parts), [])
        scores_t, lengths_t = torch.tensor(scores), torch.tensor(lengths)
        return {"eval/scores": scores_t.mean().item(), "eval/scores_std": scores_t.std().item() if len(scores_t) > 1
                else 0.0, "eval/response_length": lengths_t.mean().item(), "eval/num_prompts": n}

    # ------------------------------------------------------------------------------------------- checkpoints
    def save_model(self, output_dir: str | Path) -> Path:
        """Write the policy (HF format; LoRA adapters with peft), the value head or value model, the tokenizer
        files, the config and the stats history. Rank 0 writes. Under FSDP every rank must call it: the shards are
        gathered, the files hold whole tensors that load without FSDP, and every rank returns once they exist."""
        out = Path(output_dir)
        if not self.fsdp:
            if self.rank == 0:  # DDP keeps every rank's weights identical: rank 0 writes them
                self._write_model(out)
            return out
        keep = self.rank == 0
        self.model.reshard()  # register the (current) shards, not weights gathered by an earlier no-grad forward
        policy_state = _full_state_dict(self.model.policy, keep)
        value_state = _full_state_dict(self.model.value_head or self.model.value_model, keep)
        if keep:
            self._write_model(out, policy_state, value_state)
        dist.barrier()
        return out

    def _write_model(self, out: Path, policy_state: dict | None = None, value_state: dict | None = None) -> None:
        """``save_model``'s files, from the modules or from given whole state dicts (FSDP)."""
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        self.model.policy.save_pretrained(out, safe_serialization=True,
                                          **({} if policy_state is None else {"state_dict": policy_state}))
        state = {k: v.detach().contiguous().cpu() for k, v in
                 (value_state if value_state is not None else self.model.value_state_dict()).items()}
        save_file(state, str(out / ("value_head.safetensors" if self.model.value_head is not None
                                    else "value_model.safetensors")))
        if self.model_path is not None:
            from kiln.llm.tokenizer import TOKENIZER_FILES

            for name in TOKENIZER_FILES:
                src = self.model_path / name
                if src.exists() and not (out / name).exists():
                    shutil.copy(src, out / name)
        (out / "trainer_state.json").write_text(json.dumps({
            "iteration": self.iteration, "episode": self.episode, "kl_coef": self.kl_ctl.value,
            "config": self.args.to_dict(), "history": self.history, "samples": self.samples}, indent=1))

    def load_value_head(self, path: str | Path) -> None:
        """Load a value head (or value model) saved by ``save_model``."""
        from safetensors.torch import load_file

        path = Path(path)
        name = "value_head.safetensors" if self.model.value_head is not None else "value_model.safetensors"
        target = self.model.value_head or self.model.value_model
        state = load_file(str(path / name if path.is_dir() else path), device=str(self.device))
        if self.fsdp:  # every rank read the whole file: each keeps its own shard, no communication
            from torch.distributed.tensor import distribute_tensor

            params = target.state_dict(keep_vars=True)
            state = {k: distribute_tensor(v, params[k].device_mesh, params[k].placements, src_data_rank=None)
                     if isinstance(params.get(k), _dtensor_type()) else v for k, v in state.items()}
        target.load_state_dict(state)


class _PhaseClock:
    """Wall time per phase of an iteration; on CUDA each lap waits for the queued work, so time is not billed to a
    later phase."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.times: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - self.last
        self.last = now
        return self.times[name]


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _train_dtype(policy: nn.Module, bf16: bool) -> str:
    """The dtype the training forwards compute in: bf16 under ``bf16`` (autocast), else the policy weights' dtype."""
    if bf16:
        return "bfloat16"
    dtype = next(policy.parameters()).dtype
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")


def _config_vocab(model) -> int | None:
    cfg = getattr(model, "config", None)
    v = getattr(cfg, "vocab_size", None)
    return int(v) if isinstance(v, int) else None


def plot_stats(history: list[dict], path: str | Path, title: str = "kiln PPO") -> Path:
    """Reward (``objective/scores``) and KL (``objective/kl``) per iteration, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("no stats to plot")
    it = [h.get("iteration", i + 1) for i, h in enumerate(history)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(it, [h["objective/scores"] for h in history], label="objective/scores")
    if any("eval/scores" in h for h in history):
        pts = [(h.get("iteration", i + 1), h["eval/scores"]) for i, h in enumerate(history) if "eval/scores" in h]
        ax1.plot(*zip(*pts), "o-", label="eval/scores")
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("reward")
    ax1.legend()
    ax2.plot(it, [h["objective/kl"] for h in history], color="tab:red", label="objective/kl")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("KL(policy || reference), nats / response")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
