"""Recurrent PyTorch form of sliding-window softmax attention with sinks: one decode step over a ring buffer."""

import torch

from ..utils import safe_div, safe_softmax_weights


def recurrent_swa_torch(q, k, v, scale, state, slot, pos, valid=None, sinks=None):
    """One token at absolute index `pos` written to ring slot `slot` (pos mod W).

    q [B, H, D], k and v [B, Hkv, D]; state: dict with the ring win_k / win_v [B, W, Hkv, D] and win_valid [B, W],
    updated in place. sinks: optional (sink_k, sink_v [B, S, Hkv, D], sink_pos [B, S] absolute, sink_valid [B, S]);
    a sink counts only once it has left the window. Returns o [B, H, D].
    """
    win_k, win_v, win_valid = state["win_k"], state["win_v"], state["win_valid"]
    window = win_k.shape[1]
    b, h, d = q.shape
    hkv = k.shape[1]
    win_k[:, slot] = k
    win_v[:, slot] = v
    win_valid[:, slot] = True if valid is None else valid
    keys, vals, ok = win_k, win_v, win_valid
    if sinks is not None:
        sk, sv, spos, sok = sinks
        keys = torch.cat([keys, sk.to(keys.dtype)], 1)
        vals = torch.cat([vals, sv.to(vals.dtype)], 1)
        ok = torch.cat([ok, sok & (spos <= pos - window)], 1)
    sc = torch.einsum("bhgd,bwhd->bhgw", q.float().view(b, hkv, h // hkv, d), keys.float()) * scale
    e, den = safe_softmax_weights(sc.masked_fill(~ok[:, None, None, :], float("-inf")))
    o = safe_div(torch.einsum("bhgw,bwhd->bhgd", e, vals.float()), den[..., 0])
    return o.reshape(b, h, -1).to(v.dtype)
