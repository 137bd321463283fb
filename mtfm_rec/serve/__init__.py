"""Serving what was trained (docs/SERVING.md): requests, scenario subgraphs, M-Falcon, exact
train/serve parity, bf16 and 2:4 variants, AOTInductor export, replay and the HTTP service.

``python -m mtfm_rec.serve {export,replay,http}``; the Python API is
:class:`mtfm_rec.serve.predictor.Predictor`.
"""
