"""VoxelBackBone8x (SECOND / CenterPoint 3D backbone): subm 16, strided 32, 64, 64, out 128.

Built from a module namespace ``sp`` (default ``kiln.sparse``), so the same code builds spconv's version
(``sp=spconv.pytorch``) and both load one state_dict — the benchmark and the parity tests do exactly that.
"""

from __future__ import annotations

from functools import partial

from torch import nn


def _block(sp, cin, cout, k, indice_key, stride=1, padding=0, conv_type="subm", norm=None):
    if conv_type == "subm":
        conv = sp.SubMConv3d(cin, cout, k, bias=False, indice_key=indice_key)
    elif conv_type == "spconv":
        conv = sp.SparseConv3d(cin, cout, k, stride=stride, padding=padding, bias=False, indice_key=indice_key)
    else:
        raise ValueError(f"conv_type must be 'subm' or 'spconv', got {conv_type!r}")
    return sp.SparseSequential(conv, norm(cout), nn.ReLU())


class VoxelBackBone8x(nn.Module):
    """Input: SparseConvTensor with ``in_channels`` features on a [41, Y, X] grid. Output: the 8x-downsampled
    SparseConvTensor (128 channels, [2, Y/8, X/8]) and the multi-scale features."""

    def __init__(self, in_channels: int = 4, sp=None):
        super().__init__()
        if sp is None:
            import kiln.sparse as sp
        norm = partial(nn.BatchNorm1d, eps=1e-3, momentum=0.01)
        blk = partial(_block, sp, norm=norm)
        self.conv_input = sp.SparseSequential(
            sp.SubMConv3d(in_channels, 16, 3, padding=1, bias=False, indice_key="subm1"), norm(16), nn.ReLU())
        self.conv1 = sp.SparseSequential(blk(16, 16, 3, padding=1, indice_key="subm1"))
        self.conv2 = sp.SparseSequential(
            blk(16, 32, 3, stride=2, padding=1, indice_key="spconv2", conv_type="spconv"),
            blk(32, 32, 3, padding=1, indice_key="subm2"), blk(32, 32, 3, padding=1, indice_key="subm2"))
        self.conv3 = sp.SparseSequential(
            blk(32, 64, 3, stride=2, padding=1, indice_key="spconv3", conv_type="spconv"),
            blk(64, 64, 3, padding=1, indice_key="subm3"), blk(64, 64, 3, padding=1, indice_key="subm3"))
        self.conv4 = sp.SparseSequential(
            blk(64, 64, 3, stride=2, padding=(0, 1, 1), indice_key="spconv4", conv_type="spconv"),
            blk(64, 64, 3, padding=1, indice_key="subm4"), blk(64, 64, 3, padding=1, indice_key="subm4"))
        self.conv_out = sp.SparseSequential(
            sp.SparseConv3d(64, 128, (3, 1, 1), stride=(2, 1, 1), padding=0, bias=False,
                            indice_key="spconv_down2"),
            norm(128), nn.ReLU())

    def forward(self, x):
        x = self.conv_input(x)
        x1 = self.conv1(x)
        x2 = self.conv2(x1)
        x3 = self.conv3(x2)
        x4 = self.conv4(x3)
        out = self.conv_out(x4)
        return out, {"x_conv1": x1, "x_conv2": x2, "x_conv3": x3, "x_conv4": x4}
