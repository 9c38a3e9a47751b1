"""TunedLauncher: an autotuned kernel's first call per key tunes; later calls skip the autotuner with its config."""

import torch

from kiln.ops._triton import TunedLauncher, tl, triton
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

