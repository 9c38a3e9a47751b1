"""scikit-learn's digits (8x8 grey images of 0-9, 1,797 samples, shipped inside the package: no download).

``digits_tensors`` returns a seeded, stratified train/test split as float tensors [N, 1, 8, 8] scaled to [0, 1]
(pixel values are 0..16) and int64 labels; ``digits_loaders`` wraps them in DataLoaders.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset


def digits_tensors(test_fraction: float = 0.3, seed: int = 0):
    """((x_train, y_train), (x_test, y_test)); stratified by class, reproducible for a given seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from exc
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr, te = torch.cat(train_idx), torch.cat(test_idx)
    tr = tr[torch.randperm(len(tr), generator=g)]
    return (x[tr], y[tr]), (x[te], y[te])


def digits_loaders(batch_size: int = 64, test_fraction: float = 0.3, seed: int = 0):
    """(train_loader shuffled with a seeded generator, test_loader in order)."""
    (xtr, ytr), (xte, yte) = digits_tensors(test_fraction, seed)
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=batch_size, shuffle=True, generator=g)
    test = DataLoader(TensorDataset(xte, yte), batch_size=256, shuffle=False)
    return train, test
