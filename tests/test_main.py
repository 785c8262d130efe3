"""`python -m kdkernels`: backend list and the self-check against the reference."""
import subprocess
import sys

import kdkernels.__main__ as main_module


def test_self_check_passes(capsys):
    assert main_module.main(["--no-timing"]) == 0
    out = capsys.readouterr().out
    assert "Backends:" in out and "self-check: all backends agree" in out
    for loss in ("lsh", "nd", "ofd", "sp"):
        assert f"\n{loss} " in out
    assert "MISMATCH" not in out and "not implemented" not in out


def test_self_check_flags_a_wrong_backend(monkeypatch, capsys):
    """The self-check can fail: a backend that returns a wrong loss is reported."""
    from kdkernels import reference

    real = reference.ofd_loss
    monkeypatch.setattr(main_module.kdk, "ofd_loss", lambda *a, backend, **k: real(*a, **k) * (1.01 if backend != "reference" else 1.0))
    assert main_module.main(["--no-timing"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "kdkernels", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "self-check" in proc.stdout
