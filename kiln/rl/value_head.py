"""Value functions for PPO: a zero-initialised scalar head on the policy's last hidden state, or a separate model.

``PolicyAndValue`` runs the policy once and reads values from the same hidden states (shared backbone, as TRL's
old ``AutoModelForCausalLMWithValueHead``); with a separate ``value_model`` it runs that model's backbone too
(TRL 1.12's ``PolicyAndValueWrapper``). Either way ``forward`` returns ``(logits [B, L, V], values [B, L])``.
"""

from __future__ import annotations

import torch
from torch import nn


class ValueHead(nn.Module):
    """``Linear(hidden_size, 1)`` with zero weight and bias: every value starts at exactly 0."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden_states.to(self.summary.weight.dtype)).squeeze(-1)


def hidden_size_of(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        if cfg is not None and isinstance(getattr(cfg, name, None), int):
            return getattr(cfg, name)
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__}; it needs a config with hidden_size")


class ValueModel(nn.Module):
    """A separate critic: a Hugging Face model (causal LM or sequence classifier) plus a scalar head.

    A model with a ``score`` head (``AutoModelForSequenceClassification`` with ``num_labels=1``, TRL's layout) keeps
    it and runs only its ``base_model_prefix`` backbone; any other model gets a zero-initialised ``ValueHead`` on its
    last hidden state.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        prefix = getattr(model, "base_model_prefix", None)
        self._backbone_name = prefix if (hasattr(model, "score") and prefix and hasattr(model, prefix)) else None
        self.head = None if self._backbone_name else ValueHead(hidden_size_of(model))

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        if self._backbone_name:
            out = getattr(self.model, self._backbone_name)(input_ids=input_ids, attention_mask=attention_mask,
                                                           position_ids=position_ids, output_hidden_states=True,
                                                           return_dict=True, use_cache=False)
            return self.model.score(out.hidden_states[-1]).squeeze(-1).float()
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         output_hidden_states=True, return_dict=True, use_cache=False)
        return self.head(out.hidden_states[-1]).float()


class PolicyAndValue(nn.Module):
    """The trained module: the policy plus either a ``ValueHead`` (shared backbone) or a ``ValueModel``."""

    def __init__(self, policy: nn.Module, value_model: nn.Module | None = None):
        super().__init__()
        self.policy = policy
        if value_model is None:
            self.value_head = ValueHead(hidden_size_of(policy))
            self.value_model = None
        else:
            self.value_head = None
            self.value_model = value_model if isinstance(value_model, ValueModel) else ValueModel(value_model)

    def value_parameters(self):
        return (self.value_head or self.value_model).parameters()

    def value_state_dict(self) -> dict[str, torch.Tensor]:
        return (self.value_head or self.value_model).state_dict()

    def forward(self, input_ids, attention_mask, position_ids) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          output_hidden_states=self.value_head is not None, return_dict=True, use_cache=False)
        if self.value_head is not None:
            values = self.value_head(out.hidden_states[-1]).float()
        else:
            values = self.value_model(input_ids, attention_mask, position_ids)
        return out.logits, values
