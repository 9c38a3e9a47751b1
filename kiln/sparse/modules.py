"""SparseModule, SparseSequential, ToDense and small helpers (spconv 2.x names)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .tensor import SparseConvTensor


class SparseModule(nn.Module):
    """Base of modules that take and return a SparseConvTensor (SparseSequential passes them the tensor)."""


def is_spconv_module(module: nn.Module) -> bool:
    return isinstance(module, SparseModule)


class SparseSequential(SparseModule):
    """Like ``nn.Sequential``; plain modules (BatchNorm1d, ReLU, ...) are applied to the features only.

    Accepts modules positionally, as an ``OrderedDict``, or as keyword arguments (spconv's forms).
    """

    def __init__(self, *args, **kwargs):
        super().__init__()
        if len(args) == 1 and isinstance(args[0], OrderedDict):
            for name, m in args[0].items():
                self.add_module(name, m)
        else:
            for i, m in enumerate(args):
                self.add_module(str(i), m)
        for name, m in kwargs.items():
            if name in self._modules:
                raise ValueError(f"SparseSequential got module name {name!r} twice")
            self.add_module(name, m)

    def __getitem__(self, idx):
        mods = list(self._modules.values())
        if isinstance(idx, slice):
            return SparseSequential(OrderedDict(list(self._modules.items())[idx]))
        return mods[idx]

    def __len__(self):
        return len(self._modules)

    def add(self, module, name=None):
        self.add_module(str(len(self._modules)) if name is None else name, module)

    def forward(self, input):
        for module in self._modules.values():
            if is_spconv_module(module):
                input = module(input)
            elif isinstance(input, SparseConvTensor):
                if input.indices.shape[0] != 0:
                    input = input.replace_feature(module(input.features))
            else:
                input = module(input)
        return input


class ToDense(SparseModule):
    """SparseConvTensor -> dense [B, C, *spatial]."""

    def forward(self, x: SparseConvTensor) -> torch.Tensor:
        return x.dense()


class RemoveGrid(SparseModule):
    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        x.grid = None
        return x


class SparseIdentity(SparseModule):
    def forward(self, x):
        return x


class SparseReLU(SparseModule):
    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        return x.replace_feature(torch.relu_(x.features) if self.inplace else torch.relu(x.features))


class SparseBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the features of a SparseConvTensor."""

    def forward(self, x):
        if isinstance(x, SparseConvTensor):
            return x.replace_feature(super().forward(x.features))
        return super().forward(x)
