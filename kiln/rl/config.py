"""PPOConfig: TRL's field names and defaults (``trl.experimental.ppo.PPOConfig``, trl 1.12.0).

Fields that TRL inherits from ``transformers.TrainingArguments`` (learning_rate, per_device_train_batch_size,
gradient_accumulation_steps, num_train_epochs, seed, adam_*, lr_scheduler_type, logging_steps, save_steps,
output_dir) keep their names; the defaults are TRL's where TRL overrides them (learning_rate=3e-6,
logging_steps=10). Where kiln differs it says so in the field's comment:

- ``gradient_checkpointing`` and ``bf16`` default to False (TRL: True), so that training is plain fp32 unless
  asked; the bench sets both sides the same.
- Adaptive KL control (``adap_kl_ctrl``, ``init_kl_coef``, ``target``, ``horizon``) comes from TRL's earlier
  PPOConfig (the controller of Ziegler et al. 2019); off by default, which gives TRL 1.12's fixed ``kl_coef``.
- ``fsdp`` is kiln's: TRL takes FSDP from accelerate's launch config; kiln reads it here (PyTorch FSDP2 under
  torchrun, DDP otherwise).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal


@dataclass
class PPOConfig:
    # ---- optimisation (TrainingArguments names, TRL defaults)
    learning_rate: float = 3e-6
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 3.0
    lr_scheduler_type: Literal["linear", "constant"] = "linear"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = None      # TRL's PPO loop does not clip; set a number to clip
    seed: int = 42
    gradient_checkpointing: bool = False    # TRL: True
    bf16: bool = False                      # TRL: True (autocast of the training forwards)
    # TrainingArguments' name: torch.compile the trained policy + value forward (dynamic shapes: one compile for
    # every prompt length). A small model's training step is bound by Python and kernel launches, which the
    # compiled graph removes; the first iterations pay the compile
    torch_compile: bool = False
    # kiln: on CUDA (one process, no torch_compile, no gradient checkpointing) replay each training micro-step
    # (forward, losses, backward) from a CUDA graph captured once per padded shape (kiln/rl/graphs.py); a model
    # that cannot be captured falls back to eager with a warning. False: always eager
    cuda_graphs: bool = True
    # kiln: with cuda_graphs, training tensors are padded (masked tokens) to a multiple of this many positions on
    # each side of the prompt / response boundary, so a run needs a few graphs rather than one per prompt length
    cuda_graph_bucket: int = 16
    logging_steps: int = 10
    save_steps: int | None = None           # checkpoint every N iterations into output_dir (None: only save_model)
    output_dir: str | None = None
    report_plot: bool = True                # write ppo_curves.png into output_dir at the end of train()
    # kiln: the rollout engine's dtype. "auto" = the training dtype (bf16 under bf16=True, else the policy's
    # weights' dtype, fp32 by default), so rollouts sample the distribution whose log-probs PPO trains on
    rollout_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # kiln (TRL gets FSDP from accelerate's config): under torchrun, shard the trained policy + value model and the
    # reference with FSDP2 (fully_shard per transformer block, then the root) instead of replicating them with DDP,
    # for models whose weights, grads and Adam state do not fit one device. One process: ignored, with a warning
    fsdp: bool = False

    # ---- PPO (trl.experimental.ppo.PPOConfig names and defaults)
    num_mini_batches: int = 1
    total_episodes: int | None = None
    local_rollout_forward_batch_size: int = 64
    num_sample_generations: int = 10
    response_length: int = 53
    stop_token: Literal["eos"] | None = None
    stop_token_id: int | None = None
    temperature: float = 0.7
    missing_eos_penalty: float | None = None
    num_ppo_epochs: int = 4
    whiten_rewards: bool = False
    kl_coef: float = 0.05
    kl_estimator: Literal["k1", "k3"] = "k1"
    cliprange: float = 0.2
    vf_coef: float = 0.1
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95

    # ---- adaptive KL (TRL's earlier PPOConfig names and defaults; off = fixed kl_coef as in TRL 1.12)
    adap_kl_ctrl: bool = False
    init_kl_coef: float | None = None       # None: start from kl_coef
    target: float = 6.0
    horizon: int = 10000

    # ---- derived (filled by resolve(); TRL's names)
    world_size: int = field(default=1, init=False)
    local_batch_size: int = field(default=0, init=False)
    micro_batch_size: int = field(default=0, init=False)
    batch_size: int = field(default=0, init=False)
    mini_batch_size: int = field(default=0, init=False)
    local_mini_batch_size: int = field(default=0, init=False)
    num_total_batches: int = field(default=0, init=False)

    def __post_init__(self):
        positive_int = ("per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches",
                        "local_rollout_forward_batch_size", "response_length", "num_ppo_epochs", "horizon")
        for name in positive_int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("learning_rate", "temperature", "cliprange", "cliprange_value", "target"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("kl_coef", "vf_coef", "weight_decay", "num_train_epochs"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")
        if self.stop_token is not None and self.stop_token != "eos":
            raise ValueError(f"stop_token must be None or 'eos', got {self.stop_token!r}")
        if self.stop_token and self.stop_token_id is not None:
            raise ValueError("set stop_token or stop_token_id, not both")
        if self.rollout_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"rollout_dtype must be auto, float32, bfloat16 or float16, got {self.rollout_dtype!r}")
        if not isinstance(self.torch_compile, bool):
            raise ValueError(f"torch_compile must be True or False, got {self.torch_compile!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be True or False, got {self.cuda_graphs!r}")
        if isinstance(self.cuda_graph_bucket, bool) or not isinstance(self.cuda_graph_bucket, int) \
                or self.cuda_graph_bucket < 1:
            raise ValueError(f"cuda_graph_bucket must be a positive int, got {self.cuda_graph_bucket!r}")
        if not isinstance(self.fsdp, bool):
            raise ValueError(f"fsdp must be True or False, got {self.fsdp!r}")
        if self.lr_scheduler_type not in ("linear", "constant"):
            raise ValueError(f"lr_scheduler_type must be 'linear' or 'constant', got {self.lr_scheduler_type!r}")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ValueError(f"missing_eos_penalty must be >= 0, got {self.missing_eos_penalty}")
        if self.total_episodes is not None and self.total_episodes < 1:
            raise ValueError(f"total_episodes must be >= 1, got {self.total_episodes}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.init_kl_coef is not None and self.init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {self.init_kl_coef}")
        self.resolve(None)

    def resolve(self, dataset_len: int | None) -> "PPOConfig":
        """Fill TRL's derived batch sizes; ``dataset_len`` (None for a stream) sets total_episodes by default."""
        self.local_batch_size = self.per_device_train_batch_size * self.gradient_accumulation_steps
        self.micro_batch_size = self.per_device_train_batch_size * self.world_size
        self.batch_size = self.local_batch_size * self.world_size
        if self.batch_size % self.num_mini_batches:
            raise ValueError(f"batch_size ({self.batch_size} = per_device_train_batch_size x "
                             f"gradient_accumulation_steps) must be a multiple of num_mini_batches "
                             f"({self.num_mini_batches})")
        self.mini_batch_size = self.batch_size // self.num_mini_batches
        self.local_mini_batch_size = self.local_batch_size // self.num_mini_batches
        if self.whiten_rewards and self.local_mini_batch_size < 8:
            raise ValueError(f"whiten_rewards needs a mini-batch of at least 8, got {self.local_mini_batch_size}")
        episodes = self.total_episodes
        if episodes is None and dataset_len is not None:
            episodes = int(self.num_train_epochs * dataset_len)
        self.num_total_batches = math.ceil(episodes / self.batch_size) if episodes else 0
        return self

    @property
    def train_micro_batch_size(self) -> int:
        """Rows per training forward/backward: per_device_train_batch_size, capped by the mini-batch."""
        return min(self.per_device_train_batch_size, self.local_mini_batch_size)

    def to_dict(self) -> dict:
        return asdict(self)
