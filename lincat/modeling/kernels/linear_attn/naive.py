"""Quadratic reference for normalized causal linear attention (Hedgehog). Used by tests only."""

import torch

from ..utils import expand_heads, masked_keys, safe_div


def naive_linear_attn(qf, kf, v, valid=None):
    """o_i = sum_{j<=i} (qf_i . kf_j) v_j / sum_{j<=i} qf_i . kf_j.

    qf [B, T, H, F], kf [B, T, Hk, F], v [B, T, Hv, D], valid [B, T] (False for padding) -> o [B, T, H, D].
    """
    t, h = qf.shape[1], qf.shape[2]
    kf = expand_heads(masked_keys(kf.float(), valid), h)
    a = torch.einsum("bihf,bjhf->bhij", qf.float(), kf)
    a = a.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=qf.device).tril(), 0.0)
    num = torch.einsum("bhij,bjhd->bihd", a, expand_heads(v.float(), h))
    den = a.sum(-1).transpose(1, 2)
    return safe_div(num, den).to(v.dtype)
