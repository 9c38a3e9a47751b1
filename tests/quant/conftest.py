"""A trained fp32 DigitsCNN shared by the quantization tests (trained once per session, seeded)."""

import copy

import pytest
import torch


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
