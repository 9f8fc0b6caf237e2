"""Quadratic reference for the LoLCATs sliding-window hybrid. Used by tests only."""

import torch

from ..utils import expand_heads, masked_keys, safe_div, window_mask


def naive_window_linear_attn(q, k, v, qf, kf, gamma, window, scale, valid=None):
    """Softmax over the last `window` tokens plus linear attention over everything older, one normalizer.

    For query i, window keys are i - window < j <= i with weight gamma_h * exp(q_i.k_j * scale - m_i), where m_i
    is the max score over the window; older keys j <= i - window weigh qf_i . kf_j.
    q [B, T, H, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv], qf [B, T, H, F], kf [B, T, Hk, F], gamma [H].
    """
    b, t, h, _ = q.shape
    in_win, older = window_mask(t, t, window, 0, q.device)
    keys = torch.ones(b, t, dtype=torch.bool, device=q.device) if valid is None else valid
    win = in_win[None, None] & keys[:, None, None, :]
    s = torch.einsum("bihd,bjhd->bhij", q.float(), expand_heads(k.float(), h)) * scale
    s = s.masked_fill(~win, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    a_win = gamma.float()[None, :, None, None] * torch.exp(s - m)
    kf = expand_heads(masked_keys(kf.float(), valid), h)
    a_lin = torch.einsum("bihf,bjhf->bhij", qf.float(), kf) * older
    a = a_win + a_lin
    num = torch.einsum("bhij,bjhd->bihd", a, expand_heads(v.float(), h))
    den = a.sum(-1).transpose(1, 2)
    return safe_div(num, den).to(v.dtype)
