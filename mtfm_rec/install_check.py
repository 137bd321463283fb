"""Fail fast, with the fix, when the installed stack is not the pinned CPU one.

The classic TorchRec trap: ``pip install torchrec`` pulls the CUDA ``fbgemm-gpu`` build, whose
import then fails on a CPU-only machine (or an ABI-mismatched ``fbgemm-gpu-cpu``). Run as
``python -m mtfm_rec.install_check``; ``make install`` runs it after installing.
"""

from __future__ import annotations

import importlib
import sys


def check() -> list[str]:
    """Returns a list of problems (empty when the stack imports and works)."""
    problems: list[str] = []
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - report any import failure verbatim
        return [f"torch does not import: {exc!r}"]
    try:
        import fbgemm_gpu  # noqa: F401

        # Loading the operator library is where an ABI mismatch shows up.
        torch.ops.fbgemm.asynchronous_complete_cumsum(torch.tensor([1, 2], dtype=torch.int64))
    except Exception as exc:  # noqa: BLE001
        problems.append(
            f"fbgemm_gpu does not work with torch {torch.__version__}: {exc!r}. "
            "On a CPU machine install fbgemm-gpu-cpu==1.8.0 (not fbgemm-gpu, not 1.9.0); "
            "see docs/INSTALL.md."
        )
    for name in ("torchrec", "torchx", "triton", "pyarrow", "fsspec"):
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{name} does not import: {exc!r}")
    return problems


def main() -> None:
    problems = check()
    if problems:
        print("mtfm_rec install check FAILED:", *problems, sep="\n  ", file=sys.stderr)
        sys.exit(1)
    import torch
    import torchrec

    print(f"mtfm_rec install check ok: torch {torch.__version__}, torchrec {torchrec.__version__}")


if __name__ == "__main__":
    main()
