"""Chunked PyTorch form of the LoLCATs sliding-window hybrid.

Each chunk of C queries sees, quadratically, its own chunk and the P = ceil((W - 1) / C) chunks before it; per
pair the key is either in the window (softmax term) or older (linear term). Every key before those chunks is older
than the window for all queries of the chunk, so it lives in the linear state. Work is O(T (P + 1) C d + T F D).
"""

import math

import torch

from ..utils import expand_heads, masked_keys, pad_time, safe_div, shift_chunks, valid_or_ones


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
    p_prev = math.ceil((window - 1) / c) if window > 1 else 0
    keys = valid_or_ones(valid, b, t, q.device)
    kf_m = masked_keys(kf.float(), keys)
    v_k = expand_heads(v.float(), hk)

    qc = pad_time(q.float(), c).view(b, -1, c, hkv, h // hkv, dk)
    qfc = pad_time(qf.float(), c).view(b, -1, c, hk, h // hk, f)
    n = qc.shape[1]
    kc = pad_time(k.float(), c).view(b, n, c, hkv, dk)
    vc = pad_time(v.float(), c).view(b, n, c, hkv, d)
    kfc = pad_time(kf_m, c).view(b, n, c, hk, f)
    okc = pad_time(keys, c).view(b, n, c)
    gam = gamma.float()[None, None, :, None, None]

    # Key block `back` chunks behind the query chunk: its pairs, by j - i, are in the window or older.
    blocks = []
    for back in range(p_prev, -1, -1):
        rel = torch.arange(c, device=q.device)[None, :] - torch.arange(c, device=q.device)[:, None] - back * c
        in_win, older = (rel <= 0) & (rel > -window), rel <= -window
        ok = shift_chunks(okc, back)[:, :, None, None, :]
        s = torch.einsum("bnchgd,bnlhd->bnhgcl", qc, shift_chunks(kc, back)).reshape(b, n, h, c, c) * scale
        s = s.masked_fill(~(in_win & ok), float("-inf"))
        lin = None
        if older.any():
            lin = torch.einsum("bnchgf,bnlhf->bnhgcl", qfc, shift_chunks(kfc, back)).reshape(b, n, h, c, c) * older
        blocks.append((back, s, lin))
    m = torch.stack([s.amax(-1) for _, s, _ in blocks]).amax(0, keepdim=False)[..., None]
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))

    num = vc.new_zeros(b, n, c, h, d)
    den = vc.new_zeros(b, n, c, h)
    g_kv = h // hkv
    for back, s, lin in blocks:
        a = gam * torch.exp(s - m)
        if lin is not None:
            a = a + lin
        num = num + torch.einsum("bnhgcl,bnlhd->bnchgd", a.view(b, n, hkv, g_kv, c, c),
                                 shift_chunks(vc, back)).reshape(b, n, c, h, d)
        den = den + a.sum(-1).transpose(2, 3)

    # Linear state before the band of chunk n: all chunks < n - p_prev.
    kv = torch.einsum("bnchf,bnchd->bnhfd", kfc, pad_time(v_k, c).view(b, n, c, hk, d))
    ks = kfc.sum(2)
    if initial_state is None:
        s0 = q.new_zeros(b, hk, f, d, dtype=torch.float32)
        z0 = q.new_zeros(b, hk, f, dtype=torch.float32)
    else:
        s0, z0 = (x.float() for x in initial_state)
    s_lin = s0[:, None] + shift_chunks(kv.cumsum(1), p_prev + 1)
    z_lin = z0[:, None] + shift_chunks(ks.cumsum(1), p_prev + 1)
    num = num + torch.einsum("bnchgf,bnhfd->bnchgd", qfc, s_lin).reshape(b, n, c, h, d)
    den = den + torch.einsum("bnchgf,bnhf->bnchg", qfc, z_lin).reshape(b, n, c, h)
    o = safe_div(num, den).reshape(b, n * c, h, d)[:, :t].to(v.dtype)

    final = None
    if output_final_state:
        old = max(t - window, 0)
        final = (
            s0 + torch.einsum("bthf,bthd->bhfd", kf_m[:, :old], v_k[:, :old]),
            z0 + kf_m[:, :old].sum(1),
        )
    return o, final
