"""``kiln.ops.host_copy``: word copies by a kernel between pinned host memory and the GPU (under the interpreter on
a CPU-only machine: plain CPU tensors)."""

import pytest
import torch

from kiln.ops import host_copy
from tests.conftest import DEVICE, requires_triton

CUDA = DEVICE.type == "cuda"


def _host(t):
    return t.pin_memory() if CUDA else t


@requires_triton
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.uint8])
def test_copy_words_both_ways_and_into_slices(dtype):
    n = 4100 if dtype != torch.uint8 else 4100 * 4  # more than one program of words
    src = _host((torch.arange(n) % 251).to(dtype))
    dev = torch.zeros(n + 8, dtype=dtype, device=DEVICE)
    host_copy.copy_words(dev[4:4 + n], src)
    assert torch.equal(dev[4:4 + n].cpu(), src.cpu()) and not dev[:4].any() and not dev[4 + n:].any()
    back = _host(torch.zeros(n, dtype=dtype))
    host_copy.copy_words(back, dev[4:4 + n])
    if CUDA:
        torch.cuda.synchronize()
    assert torch.equal(back, src)


@requires_triton
def test_copy_words_rejects_what_it_cannot_copy():
    a = torch.zeros(6, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="must match"):
        host_copy.copy_words(a, torch.zeros(5, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="must match"):
        host_copy.copy_words(a, torch.zeros(6, dtype=torch.float32, device=DEVICE))
    with pytest.raises(ValueError, match="whole 4-byte words"):
        host_copy.copy_words(torch.zeros(6, dtype=torch.uint8, device=DEVICE), torch.zeros(6, dtype=torch.uint8,
                                                                                             device=DEVICE))
    with pytest.raises(ValueError, match="whole 4-byte words"):
        host_copy.copy_words(a[::2], torch.zeros(3, dtype=torch.int32, device=DEVICE))


def test_host_copy_is_for_cuda_devices():
    assert not host_copy.host_copy_supported(torch.device("cpu"))
    assert host_copy.whole_words(torch.zeros(3, dtype=torch.int32))
    assert host_copy.whole_words(torch.zeros(8, dtype=torch.uint8))
    assert not host_copy.whole_words(torch.zeros(6, dtype=torch.uint8))
    assert not host_copy.whole_words(torch.zeros(4, 2, dtype=torch.int32).t())


@pytest.mark.gpu
def test_pinned_memory_reaches_the_gpu_by_kernel():
    """The engine's decode steps take this path on the GPU (the runner's staged inputs, the sampler's tokens); a
    pageable host tensor is refused with a clear error."""
    assert host_copy.host_copy_supported(DEVICE)
    with pytest.raises(ValueError, match="pinned host memory"):
        host_copy.copy_words(torch.zeros(4, dtype=torch.int32, device=DEVICE), torch.zeros(4, dtype=torch.int32))
    # a pinned buffer stays allocated until the kernel that writes it has run (the host allocator cannot see it)
    src = torch.arange(4, dtype=torch.int32, device=DEVICE)
    first = torch.zeros(4, dtype=torch.int32).pin_memory()
    host_copy.copy_words(first, src)
    assert any(t is first for _, t in host_copy._IN_USE)
    torch.cuda.synchronize()
    host_copy.copy_words(torch.zeros(4, dtype=torch.int32).pin_memory(), src)
    assert not any(t is first for _, t in host_copy._IN_USE) and first.tolist() == [0, 1, 2, 3]
    # a caller that guards its own persistent buffer skips the hold
    kept = torch.zeros(4, dtype=torch.int32).pin_memory()
    host_copy.copy_words(kept, src, hold=False)
    assert not any(t is kept for _, t in host_copy._IN_USE)
