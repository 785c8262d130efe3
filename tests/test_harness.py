"""examples/distill_digits.py --quick: accuracy parity of the fused backend against the
reference on real data (sklearn digits). Runs the harness once (about a minute on 2 cores)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "distill_digits.py")
METHODS = ("lsh", "nd", "ofd", "sp")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the fused backend of a CPU machine: the C++ kernels
    env.pop("KDKERNELS_BACKEND", None)
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(out), "--allow-missing"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    return proc, out


def test_harness_exits_zero_and_writes_outputs(harness):
    proc, out = harness
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("results.json", "loss_curves.png", "accuracy.png", "teacher.pt"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert {"teacher_acc", "student_acc", "methods"} <= set(res)
    assert set(res["methods"]) == set(METHODS)
    assert res["teacher_acc"] >= 95.0  # digits is easy: a working teacher
    for name, m in res["methods"].items():
        assert {"reference_acc", "kdkernels_acc", "max_rel_loss_diff_50", "seconds_reference",
                "seconds_kdkernels"} <= set(m), name
        assert m["reference_acc"] >= 80.0, (name, m)
    assert "method" in proc.stdout and "criteria:" in proc.stdout  # the table


@pytest.mark.parametrize("method", METHODS)
def test_parity(harness, method):
    proc, out = harness
    m = json.loads((out / "results.json").read_text())["methods"][method]
    if m["status"] == "not implemented":
        pytest.skip(f"{method}: the fused kernel is not written yet ({m.get('error')})")
    assert m["status"] == "ok", m
    assert abs(m["kdkernels_acc"] - m["reference_acc"]) <= 0.5 + 1e-9
    assert m["max_rel_loss_diff_50"] <= 1e-3
    assert m["max_rel_loss_diff_same_inputs_50"] <= 1e-5  # the kernels alone, on the same inputs
    assert m["seconds_kdkernels"] > 0


def test_failing_parity_exits_nonzero(harness, tmp_path):
    """The criteria can fail: a 'fused' SP loss that is 1% off makes the harness exit 1.
    (Both runs use the reference; every call after the first run's 19 steps is scaled.)"""
    import shutil

    shutil.copy(harness[1] / "teacher.pt", tmp_path / "teacher.pt")  # same --quick teacher: no retraining
    code = f"""
import runpy, sys
import kdkernels
sys.argv = ["distill_digits.py", "--quick", "--out", {str(tmp_path)!r}, "--methods", "sp", "--epochs", "1",
            "--backend", "reference"]
real, calls = kdkernels.SPLoss.forward, [0]
def off_by_one_percent(self, a, b):
    calls[0] += 1
    return real(self, a, b) * (1.01 if calls[0] > 19 else 1.0)
kdkernels.SPLoss.forward = off_by_one_percent
runpy.run_path({SCRIPT!r}, run_name="__main__")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "FAILED parity: sp" in proc.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["methods"]["sp"]["status"] == "parity failed" and res["passed"] is False
    assert res["methods"]["sp"]["max_rel_loss_diff_50"] > 1e-3
