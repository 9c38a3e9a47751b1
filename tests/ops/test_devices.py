"""resolve_device: the one place every subsystem turns a user's device argument into a torch.device."""

import pytest
import torch

from kiln.ops._dispatch import resolve_device


def test_default_is_the_gpu_when_one_is_visible():
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu", 0)) == torch.device("cpu", 0)


@pytest.mark.parametrize("device, message", [
    ("tpu", "'tpu' is not a device name"),
    ("cuda:x", "'cuda:x' is not a device name"),
    ("mps", "kiln runs on 'cpu' or 'cuda', not 'mps'"),
    ("meta", "kiln runs on 'cpu' or 'cuda', not 'meta'"),
])
def test_bad_names_and_unsupported_types(device, message):
    with pytest.raises(ValueError, match=message):
        resolve_device(device)


def test_a_gpu_that_is_not_visible():
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    message = "asks for a GPU, but" if n == 0 else rf"is not one of the {n} visible GPU\(s\) \(cuda:0 \.\. cuda:{n - 1}\)"
    with pytest.raises(ValueError, match=message):
        resolve_device(f"cuda:{n}")
    if n == 0:
        with pytest.raises(ValueError, match="use device='cpu'"):
            resolve_device("cuda")
