"""Chunked PyTorch form of sliding-window softmax attention with attention sinks: each chunk of queries sees its
own chunk and the ceil((W - 1) / C) chunks before it, plus a few sink keys. O(T (W + C) d)."""

import math

import torch

from ..utils import bands, pad_time, safe_div, safe_softmax_weights, valid_or_ones


def chunk_swa_torch(q, k, v, window, scale, valid=None, sinks=None, chunk_size=64):
    """Same result as `naive_swa`.

    sinks: optional (sink_k [B, S, Hkv, D], sink_v [B, S, Hkv, D], sink_pos [B, S], sink_valid [B, S]) with
    positions in this call's frame (query i is at position i; earlier tokens are negative). A sink is used by
    query i only once it has left the window (pos <= i - W); before that the window already covers it.
    """
    b, t, h, dk = q.shape
    hkv, d = k.shape[2], v.shape[-1]
    c = chunk_size
    p = math.ceil((window - 1) / c) if window > 1 else 0
    keys = valid_or_ones(valid, b, t, q.device)
    qp = pad_time(q.float(), c).view(b, -1, c, hkv, h // hkv, dk)
    n = qp.shape[1]
    front = p * c
    k_band = bands(pad_time(k.float(), c, front), c, p)
    v_band = bands(pad_time(v.float(), c, front), c, p)
    ok_band = bands(pad_time(keys, c, front), c, p)
    rel = torch.arange((p + 1) * c, device=q.device)[None, :] - front - torch.arange(c, device=q.device)[:, None]
    in_win = (rel <= 0) & (rel > -window)
    s = torch.einsum("bnchgd,bnlhd->bnhgcl", qp, k_band).reshape(b, n, h, c, -1) * scale
    s = s.masked_fill(~(in_win[None, None, None] & ok_band[:, :, None, None, :]), float("-inf"))

    if sinks is not None:
        sk, sv, spos, sok = sinks
        qpos = torch.arange(n * c, device=q.device).view(n, c)
        vis = sok[:, None, None, :] & (spos[:, None, None, :] <= qpos[None, :, :, None] - window)  # [B, N, C, S]
        ss = torch.einsum("bnchgd,bshd->bnhgcs", qp, sk.float()).reshape(b, n, h, c, -1) * scale
        ss = ss.masked_fill(~vis[:, :, None], float("-inf"))
        s = torch.cat([s, ss], dim=-1)
        v_band = torch.cat([v_band, sv.float()[:, None].expand(b, n, *sv.shape[1:])], dim=2)

    e, den = safe_softmax_weights(s)
    p_attn = safe_div(e, den[..., 0])
    o = torch.einsum("bnhgcl,bnlhd->bnchgd", p_attn.view(b, n, hkv, h // hkv, c, -1), v_band)
    return o.reshape(b, n * c, h, d)[:, :t].to(v.dtype)
