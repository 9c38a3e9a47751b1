"""A small CNN for scikit-learn's digits, trained in seconds on a CPU: the model the PTQ/QAT tests and the
``kiln quant`` demo use (``--arch kiln.quant.examples:DigitsCNN``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class DigitsCNN(nn.Module):
    """conv3x3(1->16) -> conv3x3(16->32) -> maxpool -> conv3x3(32->64) -> fc(1024->64) -> fc(64->10)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.fc1 = nn.Linear(4 * width * 16, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def train(model: nn.Module, loader, epochs: int = 10, lr: float = 3e-3, weight_decay: float = 0.0,
          params=None, seed: int = 0) -> nn.Module:
    """Adam + cross-entropy over ``loader`` for ``epochs`` (also the QAT fine-tuning loop)."""
    torch.manual_seed(seed)
    params = list(params) if params is not None else list(model.parameters())
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(loader)))
    device = next(model.parameters()).device
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


@torch.no_grad()
def predict(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted classes, labels) over a loader of (x, y)."""
    model.eval()
    device = next((b.device for b in model.buffers()), None) or next(model.parameters()).device
    preds, labels = [], []
    for x, y in loader:
        preds.append(model(x.to(device)).argmax(-1).cpu())
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def accuracy(model: nn.Module, loader) -> float:
    """Top-1 accuracy in percent."""
    p, y = predict(model, loader)
    return 100.0 * (p == y).float().mean().item()


def train_digits_cnn(epochs: int = 12, seed: int = 0, width: int = 16):
    """(trained DigitsCNN, train_loader, test_loader), all seeded."""
    from kiln.data.digits import digits_loaders

    torch.manual_seed(seed)
    model = DigitsCNN(width)
    train_loader, test_loader = digits_loaders(seed=seed)
    train(model, train_loader, epochs=epochs, seed=seed)
    return model, train_loader, test_loader
