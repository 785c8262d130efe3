"""kdkernels works without triton: importing it, the CPU backend and the reference
never import triton; only backend='triton' reports that triton is missing."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCKER = textwrap.dedent("""
    import importlib.abc, sys

    class BlockTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ImportError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, BlockTriton())
    for mod in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        del sys.modules[mod]
""")


def _run(body: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("KDKERNELS_BACKEND",)}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_INTERPRET"] = "1"
    code = BLOCKER + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def test_import_and_reference_without_triton():
    proc = _run("""
        import sys
        import torch
        import kdkernels as kdk
        import kdkernels.triton as kt
        assert "triton" not in sys.modules, "importing kdkernels imported triton"
        assert kt.available() is False
        s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        m = -torch.rand(3)
        loss = kdk.ofd_loss(s, t, m, backend="reference")
        assert torch.isfinite(loss)
        print("OK")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout


def test_cpu_backend_does_not_need_triton():
    proc = _run("""
        import sys
        import torch
        import kdkernels as kdk
        from kdkernels import _cpu
        if not _cpu.available():
            print("SKIP")
            raise SystemExit(0)
        s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        try:
            kdk.ofd_loss(s, t, -torch.rand(3), backend="cpu")
        except NotImplementedError:
            pass  # a C++ kernel not written yet is not a triton problem
        assert "triton" not in sys.modules
        print("OK")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout or "SKIP" in proc.stdout


def test_triton_backend_says_triton_is_missing():
    proc = _run("""
        import torch
        import kdkernels as kdk
        import kdkernels.triton as kt
        s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        for call in (lambda: kt.ofd_none(s, t, torch.zeros(3)),
                     lambda: kdk.ofd_loss(s, t, -torch.rand(3), backend="triton")):
            try:
                call()
            except ImportError as exc:
                msg = str(exc)
                assert "triton" in msg and "pip install" in msg, msg
            else:
                raise AssertionError("no error without triton")
        print("OK")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout
