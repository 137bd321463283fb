"""One model, every dense-path backend: the same loss and the same gradients.

The model's config picks the attention / Group LayerNorm implementation (``attention_backend``);
``auto`` is Triton on CUDA and the fused C++ kernel (``cpp``) on the CPU. Here the same weights run
the same batch through each backend and must agree with ``reference``: the loss, the scenario
scores and the gradient of every parameter (embedding tables included). The ``triton`` case runs the Triton
kernels (attention forward and backward, Group LayerNorm forward and backward) in the Triton
interpreter on CPU tensors, so it needs ``TRITON_INTERPRET=1`` (``make test`` sets it); on a GPU
machine the CUDA test below runs the compiled kernels.
"""

from __future__ import annotations

import os
from typing import Dict, Tuple

import pytest
import torch
from model_helpers import make_model

from mtfm_rec.data.batch import Batch
from mtfm_rec.model import MTFM
from mtfm_rec.model.examples import random_batch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _loss_scores_grads(
    model: MTFM, batch: Batch
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, out = model(batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), {k: v.detach() for k, v in out.items()}, grads


def _assert_backend_matches_reference(schema, backend: str, device: str, rtol: float, atol: float) -> None:
    # long enough sequences for several 16-token tiles per sample (some tiles get skipped)
    batch = random_batch(schema, 5, seq_len=(0, 24), exposures=(0, 6), seed=21).to(torch.device(device))
    results = {}
    for name in ("reference", backend):
        # one block of (1 target : 1 full) layers: both kernel variants, stacked
        model = make_model(schema, seed=3, attention_backend=name).train().to(device)
        with torch.no_grad():  # non-trivial per-group norm parameters, so the group gather matters
            gen = torch.Generator().manual_seed(5)
            for pname, p in model.named_parameters():
                if "norm" in pname:
                    p.add_((0.2 * torch.randn(p.shape, generator=gen)).to(device))
        results[name] = _loss_scores_grads(model, batch)
    (ref_loss, ref_out, ref_grads), (loss, out, grads) = results["reference"], results[backend]
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    for key in ref_out:
        torch.testing.assert_close(out[key], ref_out[key], rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys()
    attention_grads = [n for n in ref_grads if ".f1." in n or "norm" in n]
    assert attention_grads, "the dense path's parameters got no gradient"
    for name, ref_grad in ref_grads.items():
        torch.testing.assert_close(
            grads[name], ref_grad, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.skipif(
    not INTERPRET, reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (make test sets it)"
)
def test_triton_path_matches_reference_loss_and_every_gradient_interpreted(schema) -> None:
    _assert_backend_matches_reference(schema, "triton", "cpu", rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["blocksparse", "prefix", "cpp"])
def test_cpu_paths_match_reference_loss_and_every_gradient(schema, backend: str) -> None:
    _assert_backend_matches_reference(schema, backend, "cpu", rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_path_matches_reference_on_gpu(schema) -> None:
    # TF32 tensor-core matmuls inside the kernels: a looser tolerance than fp32 on the CPU.
    _assert_backend_matches_reference(schema, "triton", "cuda", rtol=5e-3, atol=5e-4)


def test_auto_is_triton_on_cuda_and_the_cpp_kernel_elsewhere() -> None:
    from mtfm_rec.kernels.hstu_attention import resolve as resolve_attention_backend
    from mtfm_rec.model.attention import norm_backend

    assert resolve_attention_backend("auto", torch.device("cuda", 0)) == "triton"
    assert resolve_attention_backend("auto", torch.device("cpu")) == "cpp"
    assert resolve_attention_backend("reference", torch.device("cuda")) == "reference"
    # the norm that goes with each: the C++ CPU norm with cpp; prefix keeps the reference norm
    assert [norm_backend(b) for b in ("cpp", "prefix", "triton", "reference")] == [
        "cpp",
        "auto",
        "triton",
        "reference",
    ]


def test_unknown_backend_is_refused_by_the_config() -> None:
    from mtfm_rec.model import ModelConfig

    with pytest.raises(ValueError, match="attention_backend='flash' unknown; choose one of"):
        ModelConfig(attention_backend="flash")
