"""Dense-path ops of MTFM, installed as ``mtfm_rec.kernels``.

Each op lives in its own folder: ``reference.py`` (plain PyTorch, the ground truth),
``triton.py`` (the GPU kernel) and ``__init__.py`` (a small dispatcher choosing between them:
Triton for CUDA tensors, the reference on the CPU, overridable with ``backend=``).
"""
