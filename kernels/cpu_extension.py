"""Builds and loads the C++ CPU kernels (``kernels/*/csrc/*.cpp``) with the machine's compiler.

Each kernel is compiled on first use (``torch.utils.cpp_extension.load``, ``-O3 -fopenmp`` and
``-march=native``) into ``build/torch_extensions/cpu-<digest of the CPU's flags>/<module>/`` of
the checkout (``MTFM_EXTENSIONS_DIR`` overrides the root). ``make install`` runs this module once
(``python -m mtfm_rec.kernels.cpu_extension``), which builds every kernel, so training never waits
for the compiler.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
from typing import Any, Dict, Tuple

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (source relative to kernels/, what uses it: named in the error when the build fails)
KERNELS: Dict[str, Tuple[str, str]] = {
    "mtfm_hstu_cpu": ("hstu_attention/csrc/hstu_cpu.cpp", "attention backend 'cpp'"),
    "mtfm_group_norm_cpu": ("group_norm/csrc/group_norm_cpu.cpp", "group norm backend 'cpp'"),
}


def cpu_tag() -> str:
    """A digest of this CPU's model and instruction-set flags: the modules are built with
    ``-march=native``, so a checkout shared by machines of several CPU kinds keeps one build per
    kind instead of loading one that may use instructions another lacks (SIGILL)."""
    try:
        with open("/proc/cpuinfo") as fh:
            lines = [ln for ln in fh if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor(), platform.machine()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()[:12]


def build_dir() -> str:
    """Where this CPU kind's builds live (created if missing)."""
    root = os.environ.get("MTFM_EXTENSIONS_DIR") or os.path.join(_ROOT, "build", "torch_extensions")
    path = os.path.join(root, f"cpu-{cpu_tag()}")
    os.makedirs(path, exist_ok=True)
    return path


def _own_dir(name: str) -> str:
    # one directory per module: torch writes each build's build.ninja into its directory
    path = os.path.join(build_dir(), name)
    os.makedirs(path, exist_ok=True)
    return path


@functools.lru_cache(maxsize=None)
def load_extension(name: str) -> Any:
    """The compiled module ``name`` of :data:`KERNELS` (built on first call, then loaded)."""
    from torch.utils.cpp_extension import load

    source, user = KERNELS[name]
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), source)
    # torch looks for ninja on PATH; the venv's own (pip's ninja) is found even when the venv is not activated
    bin_dir = os.path.dirname(sys.executable)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    # 512-bit vectors for the inner loops (gcc prefers 256 on AVX-512 CPUs): ~10 % of the
    # attention's fwd+bwd here
    flags = ["-O3", "-fopenmp", "-march=native", "-ffast-math", "-mprefer-vector-width=512"]
    try:
        return load(
            name=name,
            sources=[source],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=_own_dir(name),
            verbose=False,
        )
    except Exception as exc:  # a missing compiler or ninja: say what to install, never fall back silently
        raise RuntimeError(
            f"{user}: building {source} failed ({type(exc).__name__}: {exc}); it needs "
            "g++ and ninja (pip install ninja; apt-get install g++), see docs/INSTALL.md"
        ) from exc


if __name__ == "__main__":  # make install: build once so the first training step does not compile
    for kernel in KERNELS:
        load_extension(kernel)
    print(f"mtfm_rec: built the C++ CPU kernels {', '.join(KERNELS)} in {build_dir()}")
