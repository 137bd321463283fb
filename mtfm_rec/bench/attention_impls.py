"""What the attention benchmark times (``mtfm_rec.bench.kernels``): its batches and contenders.

Batches follow the MTFM layout (H oldest, then R by ts, then T; per sample N tokens,
H : R : T = 2 : 1 : 1), in full (queries = all tokens) and target (queries = T) variants. The
contenders are the HSTU attention backends and, as *softmax* reference points with the same mask,
SDPA with a boolean mask and FlexAttention with a ``mask_mod``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch

from mtfm_rec.kernels.hstu_attention import dynamic_mask_padded, hstu_attention
from mtfm_rec.kernels.jagged import KeySet, QuerySet, TokenKind

SOFTMAX = "PyTorch attention, same mask, softmax"


def attention_batch(
    n: int, batch: int, heads: int, kv_heads: int, dim: int, target: bool, device: str, dtype: torch.dtype
) -> Dict[str, Any]:
    """The ``hstu_attention`` keyword arguments of ``batch`` samples of ``n`` tokens (seeded by n)."""
    lh, lr = n // 2, n // 4
    lt = n - lh - lr
    gen = torch.Generator().manual_seed(n)
    # History spans [0, 2 lh), real-time [n, n + lr) by ts, exposures among the real-time tail.
    exposure_ts = n + lr // 2 + torch.randint(0, lr, (lt,), generator=gen)
    ts = torch.cat([torch.arange(lh) * 2, n + torch.arange(lr), exposure_ts])
    kind = torch.cat(
        [
            torch.full((lh,), TokenKind.HISTORY),
            torch.full((lr,), TokenKind.REALTIME),
            torch.full((lt,), TokenKind.TARGET),
        ]
    ).to(torch.int8)
    kv_ts, kv_kind = ts.repeat(batch).to(device), kind.repeat(batch).to(device)
    kv_offsets = (torch.arange(batch + 1, dtype=torch.int64) * n).to(device)
    rows = torch.arange(batch * n, device=device)
    is_t = kv_kind == TokenKind.TARGET
    q_rows = rows[is_t] if target else rows
    q_offsets = (torch.arange(batch + 1, dtype=torch.int64) * (lt if target else n)).to(device)
    q_self = torch.where(is_t[q_rows], q_rows, torch.full_like(q_rows, -1))
    args: Dict[str, Any] = {
        "q": torch.randn(q_rows.numel(), heads, dim, generator=gen) * 0.5,
        "k": torch.randn(batch * n, kv_heads, dim, generator=gen) * 0.5,
        "v": torch.randn(batch * n, kv_heads, dim, generator=gen),
    }
    args = {name: t.to(device, dtype) for name, t in args.items()}
    args["queries"] = QuerySet.create(q_offsets, kv_ts[q_rows], q_self, lt if target else n)
    args["keys"] = KeySet.create(kv_offsets, kv_kind, kv_ts, n)
    return args


# --------------------------------------------------------------------------- softmax reference points
def _padded(x: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    batch = offsets.numel() - 1
    return x.view(batch, max_len, *x.shape[1:])  # the bench batches are uniform


def _cpp(args: Dict[str, Any]) -> Callable[[Dict[str, Any]], torch.Tensor]:
    """The fused C++ kernel on the prefix encoding of the batch's mask (as the model builds it)."""
    queries = args["queries"].with_prefix(args["keys"])

    def run(a: Dict[str, Any]) -> torch.Tensor:
        return hstu_attention(a["q"], a["k"], a["v"], queries, a["keys"], backend="cpp")

    return run


def _sdpa(args: Dict[str, Any]) -> Callable[[Dict[str, Any]], torch.Tensor]:
    mask = dynamic_mask_padded(args["queries"], args["keys"])[:, None]  # [B, 1, Lq, Lk]

    def run(a: Dict[str, Any]) -> torch.Tensor:
        queries, keys = a["queries"], a["keys"]
        q = _padded(a["q"], queries.offsets, queries.max_len).transpose(1, 2)
        k = _padded(a["k"], keys.offsets, keys.max_len).transpose(1, 2)
        v = _padded(a["v"], keys.offsets, keys.max_len).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    return run


def _flex(args: Dict[str, Any]) -> Callable[[Dict[str, Any]], torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    queries, keys = args["queries"], args["keys"]
    batch = keys.batch_size
    lq, lk = queries.max_len, keys.max_len
    kind = keys.kind.view(batch, lk).to(torch.int32)
    kts = keys.ts.view(batch, lk)
    qts = queries.ts.view(batch, lq)
    self_local = (queries.self_rows - keys.offsets[:-1].repeat_interleave(lq)).view(batch, lq)
    history, realtime = int(TokenKind.HISTORY), int(TokenKind.REALTIME)

    def mask_mod(b, h, qi, kj):
        return (
            (kind[b, kj] == history)
            | ((kind[b, kj] == realtime) & (kts[b, kj] < qts[b, qi]))
            | (self_local[b, qi] == kj)
        )

    block_mask = create_block_mask(mask_mod, batch, None, lq, lk, device=args["q"].device)
    compiled = torch.compile(flex_attention)

    def run(a: Dict[str, Any]) -> torch.Tensor:
        q = _padded(a["q"], queries.offsets, lq).transpose(1, 2)
        k = _padded(a["k"], keys.offsets, lk).transpose(1, 2)
        v = _padded(a["v"], keys.offsets, lk).transpose(1, 2)
        return compiled(q, k, v, block_mask=block_mask, enable_gqa=True)

    return run


# --------------------------------------------------------------------------- the contenders
def attention_sizes(cuda: bool, quick: bool) -> List[int]:
    """The tokens per sample N the attention benchmark runs at."""
    if quick:
        return [256, 1024, 2048] if cuda else [256, 512]
    return [256, 512, 1024, 2048, 4096, 8192]


def attention_impls(args: Dict[str, Any], n: int, cuda: bool, quick: bool) -> Dict[str, Callable]:
    """Name -> callable on the args dict, for the implementations measured at this size."""
    score_bytes = args["keys"].batch_size * args["q"].shape[1] * args["queries"].max_len * n * 4
    dense_fits = score_bytes <= (4 << 30 if cuda else 1 << 30)  # the padded paths hold several [B,H,Lq,Lk]
    impls: Dict[str, Callable] = {}
    if dense_fits:
        impls["reference"] = lambda a: hstu_attention(**a, backend="reference")
    if cuda:
        impls["triton"] = lambda a: hstu_attention(**a, backend="triton")
    else:
        impls["cpp"] = _cpp(args)
        impls["blocksparse"] = lambda a: hstu_attention(**a, backend="blocksparse")
        if not quick and n <= 1024:
            from mtfm_rec.bench.flex_attention import hstu_attention_compiled

            impls["compiled (torch.compile, padded)"] = lambda a: hstu_attention_compiled(**a)
    if dense_fits:
        impls[f"SDPA bool mask ({SOFTMAX})"] = _sdpa(args)
    if cuda:
        try:
            impls[f"FlexAttention ({SOFTMAX})"] = _flex(args)
        except Exception as exc:  # noqa: BLE001 - a reference point only
            print(f"[bench] flex unavailable: {exc}")
    return impls
