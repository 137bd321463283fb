"""The MTFM dynamic mask (paper 3.2.2, Figure 2), materialised: plain PyTorch reference.

The attention kernels never need it (they rebuild it per tile in registers); this op is for the
places that still want a padded boolean mask ([B, Lq, Lk]: debugging, PyTorch's own attention as
a reference point, export). It is exactly
:func:`mtfm_rec.kernels.hstu_attention.reference.dynamic_mask_padded`, whose rules are

    key j visible to query i (same sample) iff kind[j] == H, or kind[j] == R and ts[j] < q_ts[i],
    or j == q_self[i]; rows past a sample's query length and columns past its key length are False.
"""

from __future__ import annotations

from mtfm_rec.kernels.hstu_attention.reference import dynamic_mask_padded

dynamic_mask_reference = dynamic_mask_padded

__all__ = ["dynamic_mask_reference"]
