"""The Triton kernels compile for Hopper (sm_90) with the real GPU compiler, without a GPU.

Runs ``compile_sm90.py --first`` in a subprocess (the test process may be in interpreter mode),
one autotune config per kernel, bf16 and fp32. Skipped when Triton's NVIDIA backend or its
bundled ``ptxas`` is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_sm90.py")


def _ptxas_available() -> bool:
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return False
    return (Path(nvidia.__file__).parent / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend / ptxas not installed")
def test_kernels_compile_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--first"], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "all compiled for sm_90" in proc.stdout
    # fwd, dkdv, dq x 2 dtypes + 2 group-norm kernels x 2 dtypes + the mask kernel.
    assert proc.stdout.count("shared") == 11, proc.stdout
