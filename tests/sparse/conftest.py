"""The dense references run with oneDNN off: torch 2.13's CPU ``conv3d`` through oneDNN segfaults on some of the tiny
shapes hypothesis draws (reproduced: input [3, 3, 2, 2, 1], a 1x1x1 kernel whose weight strides also read as
channels-last, a bias, stride 2, padding 1, dilation 2), which took the whole test run down now and then. The
native ``slow_conv3d`` gives the same values on these sizes; kiln's own sparse ops do not go through oneDNN."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _dense_reference_without_onednn():
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # (mkldnn.flags() would also touch oneDNN's TF32 switch, with a warning)
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before
