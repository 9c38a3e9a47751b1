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



def test_pdl_launch_args_follow_kiln_pdl_and_an_explicit_choice(monkeypatch):
    """Every PDL-capable launch takes its ``PDL`` constexpr and Triton's ``launch_pdl`` from one place: off under the
    interpreter or with KILN_PDL=0, forced on by a caller that knows its producer used PDL; bad values are named."""
    import pytest

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
