"""Quadratic reference for gated linear attention (Liger's GLA branch). Used by tests only."""

import torch

from ..utils import expand_heads, masked_keys


def naive_gla(qf, kf, v, g, valid=None):
    """S_t = diag(exp(g_t)) S_{t-1} + kf_t v_t^T,  o_t = qf_t S_t  (no normalizer).

    qf [B, T, H, F], kf and g [B, T, Hk, F] (g = log decay <= 0), v [B, T, Hv, D] -> o [B, T, H, D].
    Padding tokens neither write nor decay the state.
    """
    t, h = qf.shape[1], qf.shape[2]
    kf = expand_heads(masked_keys(kf.float(), valid), h)
    g = expand_heads(masked_keys(g.float(), valid), h)
    cum = g.cumsum(1)  # [B, T, H, F]
    diff = cum[:, :, None] - cum[:, None, :]  # [B, i, j, H, F]: log decay from j to i
    causal = torch.ones(t, t, dtype=torch.bool, device=qf.device).tril()[None, :, :, None, None]
    decay = torch.exp(diff.masked_fill(~causal, float("-inf")))
    a = torch.einsum("bihf,bjhf,bijhf->bhij", qf.float(), kf, decay)
    return torch.einsum("bhij,bjhd->bihd", a, expand_heads(v.float(), h)).to(v.dtype)
