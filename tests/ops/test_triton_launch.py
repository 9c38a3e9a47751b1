"""TunedLauncher: an autotuned kernel's first call per key tunes; later calls skip the autotuner with its config.
DirectLauncher: repeated launches skip Triton's JIT dispatch, and never reuse a variant compiled for another
specialization."""

import pytest
import torch

from kiln.ops import _triton
from kiln.ops._triton import DirectLauncher, TunedLauncher, direct, tl, triton
from tests.conftest import DEVICE, requires_triton


@triton.jit
def _scale_kernel(X, Y, N, factor, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    tl.store(Y + i, tl.load(X + i, mask=ok) * factor, mask=ok)


@requires_triton
def test_tuned_launcher_tunes_once_per_key_then_launches_with_the_remembered_config(monkeypatch):
    tuned = triton.autotune(configs=[triton.Config({"BLOCK": 32}, num_warps=1)], key=["N"])(_scale_kernel)
    launch = TunedLauncher(tuned)
    calls = []
    real_run = tuned.run
    monkeypatch.setattr(tuned, "run", lambda *a, **k: calls.append(1) or real_run(*a, **k))

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK"]),)

    for n, factor in [(70, 2.0), (70, 3.0), (33, 4.0)]:
        x = torch.randn(n, device=DEVICE)
        y = torch.empty_like(x)
        launch(("f32", n), grid, x, y, n, factor)
        torch.testing.assert_close(y, x * factor)
    assert len(calls) == 2  # n = 70 tuned once, then launched directly; n = 33 is a new key
    assert launch.best[("f32", 70)]["BLOCK"] == 32 and launch.best[("f32", 70)]["num_warps"] == 1


@triton.jit
def _axpy_kernel(X, Y, Out, N, a, stride, BLOCK: tl.constexpr, ADD: tl.constexpr = True):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    v = tl.load(X + i * stride, mask=ok) * a
    if ADD:
        v += tl.load(Y + i * stride, mask=ok)
    tl.store(Out + i * stride, v, mask=ok)


@requires_triton
def test_direct_launcher_matches_the_jit_launch_across_specializations():
    """Launch after launch, each result equals the plain computation: 16-aligned and misaligned pointers (a view
    starting one element in), a stride of 1 (Triton makes it a constant) and of 2, N divisible by 16 or not, a
    constexpr left at its default or given, a grid as a callable. Under the interpreter this is Triton's own path."""
    launch = direct(_axpy_kernel)
    assert direct(_axpy_kernel) is launch
    base = torch.randn(3, 130, device=DEVICE)
    for n, stride, offset, add in [(64, 1, 0, True), (64, 1, 1, True), (50, 2, 0, True), (64, 1, 0, False),
                                   (48, 2, 1, False), (64, 1, 0, True), (50, 2, 0, True)]:
        x, y = base[0, offset:], base[1, offset:]
        out = torch.zeros(130 - offset, device=DEVICE)
        kwargs = {} if add else {"ADD": False}
        launch[lambda meta: (triton.cdiv(meta["N"], meta["BLOCK"]),)](x, y, out, n, 0.5, stride, BLOCK=32, **kwargs)
        want = x[: n * stride: stride] * 0.5 + (y[: n * stride: stride] if add else 0)
        torch.testing.assert_close(out[: n * stride: stride], want)
    if DEVICE.type == "cuda" and _triton.DIRECT_LAUNCH:
        # five distinct specializations (alignment, stride 1 vs 2, N % 16, ADD): the repeats reused theirs
        assert len(launch.cache) == 5


@pytest.mark.gpu
def test_direct_launch_takes_the_jit_path_under_launch_hooks():
    """A profiler's launch hook must see every launch, so the direct path steps aside while one is set."""
    from triton import knobs
    seen = []
    x = torch.randn(64, device="cuda")
    out = torch.empty_like(x)
    launch = DirectLauncher(_axpy_kernel)
    for _ in range(2):
        launch[(2,)](x, x, out, 64, 2.0, 1, BLOCK=32)
    hook = lambda meta: seen.append(1)  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        launch[(2,)](x, x, out, 64, 2.0, 1, BLOCK=32)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    launch[(2,)](x, x, out, 64, 2.0, 1, BLOCK=32)
    torch.cuda.synchronize()
    assert seen == [1] and len(launch.cache) == 1
    torch.testing.assert_close(out, 3 * x)


def test_pdl_launch_args_follow_kiln_pdl_and_an_explicit_choice(monkeypatch):
    """Every PDL-capable launch takes its ``PDL`` constexpr and Triton's ``launch_pdl`` from one place: off under the
    interpreter or with KILN_PDL=0, forced on by a caller that knows its producer used PDL; bad values are named."""

    from kiln.ops import _dispatch

    monkeypatch.setenv("KILN_PDL", "0")
    assert _dispatch.pdl_launch_args() == {"PDL": False}
    assert _dispatch.pdl_launch_args(True) == {"PDL": True, "launch_pdl": True}
    assert _dispatch.pdl_launch_args(False) == {"PDL": False}
    monkeypatch.setenv("KILN_PDL", "1")
    monkeypatch.setattr(_dispatch, "interpreting", lambda: False)
    assert _dispatch.pdl_launch_args() == {"PDL": True, "launch_pdl": True}
    monkeypatch.setenv("KILN_PDL", "sometimes")
    with pytest.raises(ValueError, match="KILN_PDL"):
        _dispatch.pdl_launch_args()


@requires_triton
@pytest.mark.parametrize("n", [0, 1, 2, 3, 15, 16, 17, 1000, 1024, 1025, 2**33 + 5])
def test_host_cdiv_and_next_power_of_2_equal_tritons(n):
    """The plain-Python host helpers (Triton 3.6's are ConstexprFunctions, microseconds a call) give Triton's
    answers."""
    assert _triton.next_power_of_2(n) == triton.next_power_of_2(n)
    for d in (1, 3, 16, 64):
        assert _triton.cdiv(n, d) == triton.cdiv(n, d)
    with pytest.raises(ValueError, match="negative"):
        _triton.next_power_of_2(-1)
