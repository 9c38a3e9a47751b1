import subprocess
import sys

import kiln
from kiln.cli import main


def test_version_and_help(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert kiln.__version__ in capsys.readouterr().out
    assert main([]) == 0
    assert "doctor" in capsys.readouterr().out


def test_doctor_passes_on_this_machine():
    out = subprocess.run([sys.executable, "-m", "kiln.cli", "doctor"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 failed" in out.stdout
    for op in ("rms_norm", "rotary", "silu_and_mul", "store_kv"):
        assert op in out.stdout


def test_doctor_exits_1_on_a_failing_op(monkeypatch, capsys):
    from kiln.ops import selfcheck

    monkeypatch.setitem(selfcheck.CHECKS, "broken_op", lambda device, dtype, g: (float("nan"), "ref"))
    monkeypatch.setenv("KILN_OPS", "ref")
    assert main(["doctor", "--device", "cpu"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_public_api_reexports():
    assert kiln.LLM.__name__ == "LLM" and kiln.SamplingParams.__name__ == "SamplingParams"
    assert kiln.SparseConvTensor.__name__ == "SparseConvTensor"
    assert callable(kiln.quantize_) and kiln.PPOConfig.__name__ == "PPOConfig"
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kiln.nope
