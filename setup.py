"""mtfm_rec: multi-scenario recommendation foundation models (MTFM) on TorchRec.

``kernels/`` is installed as ``mtfm_rec.kernels``: a top-level package named ``kernels``
would collide with an unrelated package on PyPI.
"""

from setuptools import find_packages, setup

_packages = find_packages(include=["mtfm_rec", "mtfm_rec.*"])
_kernel_packages = ["mtfm_rec.kernels"] + [
    "mtfm_rec.kernels." + name for name in find_packages(where="kernels")
]

setup(
    name="mtfm_rec",
    version="0.1.0",
    description="Train and serve multi-scenario recommendation foundation models (MTFM) on TorchRec",
    python_requires=">=3.10",
    packages=_packages + _kernel_packages,
    package_dir={"mtfm_rec": "mtfm_rec", "mtfm_rec.kernels": "kernels"},
    # The pinned stack lives in requirements-lock.txt (+ requirements-nodeps.txt for torchrec,
    # whose declared fbgemm-gpu dependency would pull a CUDA build); see docs/INSTALL.md.
    install_requires=[],
    # cli, not main: main returns the metrics (a console script exits with what it returns)
    entry_points={"console_scripts": ["mtfm-train=mtfm_rec.train:cli"]},
)
