"""Every Triton kernel at every shipped config compiles for sm_80 and sm_90 (no GPU needed),
within shared memory and without register spills."""
import os
import subprocess
import sys

from conftest import needs_triton


@needs_triton
def test_aot_compile_all_kernels_sm80_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-m", "sorsa_kernels.kernels.aot_check"], env=env,
                         capture_output=True, text=True, timeout=1200)
    print(out.stdout[-5000:], out.stderr[-3000:])
    assert out.returncode == 0, "\n".join(l for l in out.stdout.splitlines() if not l.startswith("ok")) + out.stderr[-2000:]
    assert "compiled within limits" in out.stdout
