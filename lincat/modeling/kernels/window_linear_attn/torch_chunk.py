"""Chunked PyTorch form of the LoLCATs sliding-window hybrid.

Each chunk of C queries sees, quadratically, its own chunk and the P = ceil((W - 1) / C) chunks before it; per
pair the key is either in the window (softmax term) or older (linear term). Every key before that band is older
than the window for all queries of the chunk, so it lives in the linear state. Work is O(T (P + 1) C d + T F D).
"""

import math

import torch

from ..utils import DEN_EPS, bands, expand_heads, masked_keys, pad_time, valid_or_ones


def chunk_window_linear_attn_torch(
    q, k, v, qf, kf, gamma, window, scale, valid=None, initial_state=None, output_final_state=False, chunk_size=64
):
    """Same result as `naive_window_linear_attn`, with an optional carried linear state.

    initial_state: (S [B, Hk, F, D], z [B, Hk, F]) for tokens that every query here treats as older than its window
    (callers prepend the last W cached tokens to q/k/v so this holds). The final state covers every token except
    the last `window`, which are the ones a next query still sees through its window.
    """
    b, t, h, dk = q.shape
    hkv, hk, f, d = k.shape[2], kf.shape[2], kf.shape[-1], v.shape[-1]
    c = chunk_size
    p = math.ceil((window - 1) / c) if window > 1 else 0
    keys = valid_or_ones(valid, b, t, q.device)
    kf_m = masked_keys(kf.float(), keys)
    v_k = expand_heads(v.float(), hk)

    qp = pad_time(q.float(), c).view(b, -1, c, hkv, h // hkv, dk)
    qfp = pad_time(qf.float(), c).view(b, -1, c, hk, h // hk, f)
    n = qp.shape[1]
    front = p * c
    k_band = bands(pad_time(k.float(), c, front), c, p)  # [B, N, L, Hkv, Dk]
    v_band = bands(pad_time(v.float(), c, front), c, p)
    kf_band = bands(pad_time(kf_m, c, front), c, p)  # [B, N, L, Hk, F]
    ok_band = bands(pad_time(keys, c, front), c, p)  # [B, N, L]

    # Position of band key l relative to query c of the same chunk: j - i = l - p*C - c.
    rel = torch.arange((p + 1) * c, device=q.device)[None, :] - front - torch.arange(c, device=q.device)[:, None]
    in_win = (rel <= 0) & (rel > -window)
    older = rel <= -window

    s = torch.einsum("bnchgd,bnlhd->bnhgcl", qp, k_band).reshape(b, n, h, c, -1) * scale
    win = in_win[None, None, None] & ok_band[:, :, None, None, :]
    s = s.masked_fill(~win, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    a = gamma.float()[None, None, :, None, None] * torch.exp(s - m)
    a_lin = torch.einsum("bnchgf,bnlhf->bnhgcl", qfp, kf_band).reshape(b, n, h, c, -1)
    a = a + a_lin * older

    # Linear state before the band of chunk n: all chunks < n - p.
    kv = torch.einsum("bnchf,bnchd->bnhfd", pad_time(kf_m, c).view(b, n, c, hk, f), pad_time(v_k, c).view(b, n, c, hk, d))
    ks = pad_time(kf_m, c).view(b, n, c, hk, f).sum(2)
    if initial_state is None:
        s0 = q.new_zeros(b, hk, f, d, dtype=torch.float32)
        z0 = q.new_zeros(b, hk, f, dtype=torch.float32)
    else:
        s0, z0 = (x.float() for x in initial_state)
    kv_cum = torch.cat([kv.new_zeros(b, p + 1, hk, f, d), kv.cumsum(1)], dim=1)[:, : n]
    ks_cum = torch.cat([ks.new_zeros(b, p + 1, hk, f), ks.cumsum(1)], dim=1)[:, : n]
    s_lin = s0[:, None] + kv_cum  # sum over chunks < n - p
    z_lin = z0[:, None] + ks_cum

    g_kv = h // hkv
    num = torch.einsum("bnhgcl,bnlhd->bnchgd", a.view(b, n, hkv, g_kv, c, -1), v_band).reshape(b, n, c, h, d)
    den = a.sum(-1).permute(0, 1, 3, 2)  # [B, N, C, H]
    num = num + torch.einsum("bnchgf,bnhfd->bnchgd", qfp, s_lin).reshape(b, n, c, h, d)
    den = den + torch.einsum("bnchgf,bnhf->bnchg", qfp, z_lin).reshape(b, n, c, h)
    o = (num / den.clamp_min(DEN_EPS)[..., None]).reshape(b, n * c, h, d)[:, :t].to(v.dtype)

    final = None
    if output_final_state:
        old = max(t - window, 0)
        final = (
            s0 + torch.einsum("bthf,bthd->bhfd", kf_m[:, :old], v_k[:, :old]),
            z0 + kf_m[:, :old].sum(1),
        )
    return o, final
