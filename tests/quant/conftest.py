"""A trained fp32 DigitsCNN shared by the quantization tests (trained once per session, seeded)."""

import copy

import pytest
import torch
from torch import nn


@pytest.fixture(scope="session")
def digits_fp32():
    pytest.importorskip("sklearn")
    from kiln.quant.examples import accuracy, train_digits_cnn

    torch.manual_seed(0)
    model, train_loader, test_loader = train_digits_cnn(epochs=10, seed=0)
    return model, train_loader, test_loader, accuracy(model, test_loader)


@pytest.fixture
def fresh_fp32(digits_fp32):
    """A copy of the trained model the test may modify, plus loaders and the fp32 accuracy."""
    model, tr, te, acc = digits_fp32
    return copy.deepcopy(model), tr, te, acc


def fresh_gen():
    """A CPU generator on a fresh seed (each run draws new weights)."""
    return torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())


def make_linear(K, N, bias, g, dtype=torch.float32):
    """An nn.Linear [N, K] with small random weights (and bias) from ``g``, cast to ``dtype``."""
    lin = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(N, generator=g))
    return lin.to(dtype)
