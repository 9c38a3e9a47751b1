"""SparseConvTensor behaviour (dense / from_dense / replace_feature / indice_dict), pooling vs dense pooling, and
bad input -> ValueError naming the problem."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings

import kiln.sparse as sp

from .helpers import at_sites, make_tensor, rel_err, sparse_coords

SETTINGS = dict(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_dense_from_dense_roundtrip_and_channels_last():
    d = torch.zeros(2, 4, 5, 6, 3)
    d[0, 1, 2, 3] = torch.tensor([1.0, 2.0, 3.0])
    d[1, 3, 4, 5, 1] = -4.0
    x = sp.SparseConvTensor.from_dense(d)
    assert x.indices.dtype == torch.int32 and x.indices.tolist() == [[0, 1, 2, 3], [1, 3, 4, 5]]
    assert x.spatial_shape == [4, 5, 6] and x.batch_size == 2
    assert torch.equal(x.dense(channels_first=False), d)
    assert torch.equal(x.dense(), d.permute(0, 4, 1, 2, 3))


def test_replace_feature_shares_indice_dict_and_rulebook_is_cached():
    x = make_tensor(torch.tensor([[0, 1, 1, 1], [0, 1, 2, 1], [1, 0, 0, 0]], dtype=torch.int32), [3, 3, 3], 2, 2)
    conv = sp.SubMConv3d(2, 2, 3, indice_key="k")
    y = conv(x)
    assert "k" in x.indice_dict and y.indice_dict is x.indice_dict
    rb = x.indice_dict["k"].rulebook
    z = sp.SubMConv3d(2, 2, 3, indice_key="k")(y.replace_feature(y.features * 2))
    assert z.indice_dict["k"].rulebook is rb, "second subm layer with the key reuses the rulebook"
    pairs, num = x.indice_dict["k"].indice_pairs, x.indice_dict["k"].indice_pair_num
    assert pairs.shape == (2, 27, int(num.max())) and int(num.sum()) == 3 + 2  # 3 centres + the adjacent pair
    with pytest.raises(ValueError, match="replace_feature"):
        y.replace_feature(torch.zeros(5, 2))


@settings(**SETTINGS)
@given(data=sparse_coords())
def test_max_and_avg_pool_match_dense_pooling(data):
    idx, shape, batch = data
    x = make_tensor(idx, shape, batch, 3)
    k, s, p = 2, 2, 0
    if any(d < k for d in shape):
        k, s = 1, 1
    ymax = sp.SparseMaxPool3d(k, s, p)(x)
    yavg = sp.SparseAvgPool3d(k, s, p)(x)
    mask = torch.zeros(batch, 1, *shape)
    mask[idx[:, 0].long(), 0, idx[:, 1].long(), idx[:, 2].long(), idx[:, 3].long()] = 1
    dense = x.dense().detach()
    filled = torch.where(mask.bool(), dense, torch.full_like(dense, float("-inf")))
    ref_max = F.max_pool3d(filled, k, s, p)
    ref_avg = F.avg_pool3d(dense, k, s, p) / F.avg_pool3d(mask, k, s, p).clamp_min(1e-12)
    assert rel_err(ymax.features, at_sites(ref_max, ymax.indices)) <= 1e-6
    assert rel_err(yavg.features, at_sites(ref_avg, yavg.indices)) <= 1e-5
    # gradients: max routes to the argmax, avg spreads 1/count
    (ymax.features.sum() + yavg.features.sum()).backward()
    xf = x.features.detach().clone().requires_grad_()
    dd = sp.SparseConvTensor(xf, idx, shape, batch).dense()
    f2 = torch.where(mask.bool(), dd, torch.full_like(dd, float("-inf")))
    valid = torch.isfinite(F.max_pool3d(f2.detach(), k, s, p))
    (F.max_pool3d(f2, k, s, p)[valid].sum() + (F.avg_pool3d(dd, k, s, p) /
     F.avg_pool3d(mask, k, s, p).clamp_min(1e-12))[valid].sum()).backward()
    assert rel_err(x.features.grad, xf.grad) <= 1e-5


def _good():
    return torch.randn(3, 2), torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1], [1, 2, 2, 2]], dtype=torch.int32)


@pytest.mark.parametrize("mutate, match", [
    (lambda f, i: (f, i.long()), "int32"),
    (lambda f, i: (f, i[:, :3].contiguous()), r"indices must be \[N, 4\]"),
    (lambda f, i: (f[:2], i), "length mismatch"),
    (lambda f, i: (f, torch.cat([i[:2], torch.tensor([[0, -1, 0, 0]], dtype=torch.int32)])), "negative"),
    (lambda f, i: (f, torch.cat([i[:2], torch.tensor([[0, 3, 0, 0]], dtype=torch.int32)])), "outside"),
    (lambda f, i: (f, torch.cat([i[:2], torch.tensor([[2, 0, 0, 0]], dtype=torch.int32)])), "outside"),
    (lambda f, i: (f, torch.cat([i[:2], i[1:2]])), "duplicate"),
    (lambda f, i: (f[:, 0], i), r"features must be \[N, C\]"),
    (lambda f, i: (f.int(), i), "float32"),
])
def test_bad_sparse_tensor_input_raises_value_error_naming_it(mutate, match):
    f, i = mutate(*_good())
    with pytest.raises(ValueError, match=match):
        sp.SparseConvTensor(f, i, [3, 3, 3], 2)


def test_bad_layer_usage_raises_value_error():
    f, i = _good()
    x = sp.SparseConvTensor(f, i, [3, 3, 3], 2)
    with pytest.raises(ValueError, match="unknown indice_key 'nope'"):
        sp.SparseInverseConv3d(2, 2, 3, indice_key="nope")(x)
    with pytest.raises(ValueError, match="input channels"):
        sp.SubMConv3d(5, 2, 3)(x)
    with pytest.raises(ValueError, match="spatial_shape"):
        sp.SparseConvTensor(f, i, [3, 0, 3], 2)
    with pytest.raises(ValueError, match="stride 1"):
        sp.SubMConv3d(2, 2, 3, stride=2)
    with pytest.raises(ValueError, match="groups"):
        sp.SparseConv3d(2, 2, 3, groups=2)
    sp.SubMConv3d(2, 2, 3, indice_key="s")(x)
    with pytest.raises(ValueError, match="kernel size"):
        sp.SubMConv3d(2, 2, 5, indice_key="s")(x)  # subm reuse validated as spconv does
    with pytest.raises(ValueError, match="submanifold"):
        sp.SparseInverseConv3d(2, 2, 3, indice_key="s")(x)
    with pytest.raises(ValueError, match="too small"):
        sp.SparseConv3d(2, 2, 5)(x)
    y = sp.SparseConv3d(2, 2, 3, stride=2, padding=1, indice_key="d")(x)
    with pytest.raises(ValueError, match="kernel size"):
        sp.SparseInverseConv3d(2, 2, 2, indice_key="d")(y)
    with pytest.raises(ValueError, match="voxels"):
        sp.SubMConv3d(2, 2, 3, indice_key="s")(sp.SparseConvTensor(f[:2], i[:2], [3, 3, 3], 2,
                                                                   indice_dict=x.indice_dict))


def test_functional_sparse_conv_checks_its_inputs_once_for_the_kernels():
    """``functional.sparse_conv`` validates what its kernels (forward and backward, which skip their own checks)
    rely on: a mismatch is a ValueError naming it, never a kernel reading out of bounds."""
    from kiln.sparse import functional as Fsp
    from kiln.sparse.rulebook import build_subm

    f, i = _good()
    rb = build_subm(i, [3, 3, 3], [3, 3, 3], [1, 1, 1])
    w = torch.randn(4, 3, 3, 3, 2)  # KRSC: Cout 4, Cin 2
    assert Fsp.sparse_conv(f, w, rb, krsc=True).shape == (3, 4)
    for args, kw, match in [((f, w[..., :1], rb), {"krsc": True}, "input channels"),
                            ((f, w[:, :2], rb), {"krsc": True}, "kernel offsets"),
                            ((f, w.double(), rb), {"krsc": True}, "dtype"),
                            ((f[:, 0], w, rb), {"krsc": True}, "features must have 2 dims"),
                            ((f[:2], w, rb), {"krsc": True}, "rows"),
                            ((f, w, rb), {"krsc": True, "bias": torch.zeros(3)}, "bias"),
                            ((f, torch.randn(27, 3, 4), rb), {}, "input channels")]:
        with pytest.raises(ValueError, match=match):
            Fsp.sparse_conv(*args, **kw)
