"""Compiles the Triton kernels for a Hopper GPU (sm_90) ahead of time, without a GPU.

The interpreter runs the kernels' Python semantics but not Triton's GPU compiler, so errors of
the real lowering (layouts, ``tl.dot`` shapes, shared memory) would only show on a GPU. This
compiles each kernel to PTX and a cubin (Triton's bundled ``ptxas``) for sm_90:

    TRITON_INTERPRET=0 python tests/kernels/compile_sm90.py          # every autotune config
    TRITON_INTERPRET=0 python tests/kernels/compile_sm90.py --first  # one config per kernel

It prints one line per kernel x dtype x config with its static shared memory.
"""

from __future__ import annotations

import os
import sys
from typing import Dict

os.environ["TRITON_INTERPRET"] = "0"  # this script's own process only: real JIT functions

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler import compile as triton_compile  # noqa: E402

import mtfm_rec.kernels.dynamic_mask.triton as dm  # noqa: E402
import mtfm_rec.kernels.group_norm.triton as gn  # noqa: E402
import mtfm_rec.kernels.hstu_attention.triton as at  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def _jit(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def _compile(kernel, types: Dict[str, str], consts: Dict[str, object], num_warps: int, num_stages: int):
    fn = _jit(kernel)
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    constexprs = {(fn.arg_names.index(n),): v for n, v in consts.items()}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton_compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})


def main(first_only: bool) -> None:
    meta = {
        "q_offsets": "*i64",
        "kv_offsets": "*i64",
        "q_ts": "*i64",
        "q_self": "*i64",
        "kv_kind": "*i8",
        "kv_ts": "*i64",
    }
    for dt in ("bf16", "fp32"):
        att = {n: f"*{dt}" for n in ("Q", "K", "V", "Out", "DO", "DK", "DV_", "DQ")}
        att.update(meta, NVis="*fp32", Stats="*i32", alpha="fp32")
        jobs = [(at._hstu_fwd_kernel, at._fwd_configs(), dict(COUNT_TILES=False))]
        jobs += [(k, at._bwd_configs(), {}) for k in (at._hstu_bwd_dkdv_kernel, at._hstu_bwd_dq_kernel)]
        for kernel, configs, extra in jobs:
            for cfg in configs[:1] if first_only else configs:
                consts = dict(cfg.kwargs, HEADS_PER_GROUP=2, BLOCK_D=64, BLOCK_DV=64, UPCAST=False, **extra)
                k = _compile(kernel, att, consts, cfg.num_warps, cfg.num_stages)
                print(
                    f"{_jit(kernel).__name__} {dt} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}: "
                    f"shared {k.metadata.shared}"
                )
        gln = {n: f"*{dt}" for n in ("X", "W", "B", "Y", "DY", "DX")}
        gln.update(Group="*i64", Mean="*fp32", Rstd="*fp32", DW="*fp32", DB="*fp32", eps="fp32")
        for cfg in gn._configs()[:1] if first_only else gn._configs():
            for kernel in (gn._gln_fwd_kernel, gn._gln_bwd_kernel):
                k = _compile(kernel, gln, dict(cfg.kwargs, BLOCK_D=512), cfg.num_warps, 1)
                print(f"{_jit(kernel).__name__} {dt} {cfg.kwargs}: shared {k.metadata.shared}")
    for cfg in dm._configs()[:1] if first_only else dm._configs():
        k = _compile(dm._dynamic_mask_kernel, dict(meta, Mask="*i8"), dict(cfg.kwargs), cfg.num_warps, 1)
        print(f"_dynamic_mask_kernel {cfg.kwargs}: shared {k.metadata.shared}")
    print("all compiled for sm_90")


if __name__ == "__main__":
    main(first_only="--first" in sys.argv)
