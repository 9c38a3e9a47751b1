"""Shared test setup.

Without a GPU the Triton kernels run under Triton's interpreter, which must be switched on before any kernel is
defined, i.e. before kiln.ops is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kiln.ops._dispatch import triton_available  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_report_header(config):
    return (f"kiln tests on {DEVICE}; triton {'available' if triton_available() else 'missing'}; "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return DEVICE


requires_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
