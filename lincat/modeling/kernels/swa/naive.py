"""Quadratic reference for sliding-window softmax attention with optional attention sinks. Tests only."""

import torch

from ..utils import expand_heads, safe_div, safe_softmax_weights, window_mask


def naive_swa(q, k, v, window, scale, sinks=0, valid=None):
    """Softmax over the last `window` tokens, plus the first `sinks` real tokens of the sequence.

    q [B, T, H, D], k and v [B, T, Hkv, D], valid [B, T] -> o [B, T, H, D].
    """
    b, t, h, _ = q.shape
    keys = torch.ones(b, t, dtype=torch.bool, device=q.device) if valid is None else valid
    in_win, _ = window_mask(t, t, window, 0, q.device)
    visible = in_win[None].expand(b, t, t)
    if sinks:
        rank = keys.long().cumsum(1) - 1
        is_sink = keys & (rank < sinks)
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        visible = visible | (is_sink[:, None, :] & causal[None])
    visible = visible & keys[:, None, :]
    s = torch.einsum("bihd,bjhd->bhij", q.float(), expand_heads(k.float(), h)) * scale
    s = s.masked_fill(~visible[:, None], float("-inf"))
    e, den = safe_softmax_weights(s)
    p = safe_div(e, den[..., 0])  # rows with no visible key (padding) give 0
    return torch.einsum("bhij,bjhd->bihd", p, expand_heads(v.float(), h)).to(v.dtype)
