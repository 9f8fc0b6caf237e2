"""Chunked PyTorch form of gated linear attention.

Inside a chunk the pairwise decay exp(b_i - b_j) is formed explicitly per feature (b = in-chunk cumulative log
gate), masked before the exp so nothing overflows; that costs O(C^2 F) per chunk, so chunks are small (16).
Across chunks the state is carried exactly: S <- exp(b_C) * S + sum_j (kf_j * exp(b_C - b_j)) v_j^T.
"""

import torch

from ..utils import expand_heads, masked_keys, pad_time


def chunk_gla_torch(qf, kf, v, g, valid=None, initial_state=None, output_final_state=False, chunk_size=16):
    """Same result as `naive_gla`, with an optional carried state S [B, Hk, F, D] (fp32)."""
    b, t, h, f = qf.shape
    hk, d = kf.shape[2], v.shape[-1]
    c = chunk_size
    q = pad_time(qf.float(), c)
    n = q.shape[1] // c
    q = q.view(b, n, c, hk, h // hk, f)
    k = pad_time(masked_keys(kf.float(), valid), c).view(b, n, c, hk, f)
    gg = pad_time(masked_keys(g.float(), valid), c).view(b, n, c, hk, f)
    vv = pad_time(expand_heads(v.float(), hk), c).view(b, n, c, hk, d)

    cum = gg.cumsum(2)  # [B, N, C, Hk, F]
    last = cum[:, :, -1:]  # decay over the whole chunk
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()[None, None, :, :, None, None]
    decay = torch.exp((cum[:, :, :, None] - cum[:, :, None, :]).masked_fill(~causal, float("-inf")))
    a = torch.einsum("bnchgf,bnshf,bncshf->bnhgcs", q, k, decay)
    o = torch.einsum("bnhgcs,bnshd->bnchgd", a, vv)

    kv = torch.einsum("bnchf,bnchd->bnhfd", k * torch.exp(last - cum), vv)  # chunk's own contribution
    state = q.new_zeros(b, hk, f, d) if initial_state is None else initial_state.float()
    qd = q * torch.exp(cum)[:, :, :, :, None]
    inter = []
    for i in range(n):  # N = T / 16 small matmuls; the state recurrence itself is sequential
        inter.append(torch.einsum("bchgf,bhfd->bchgd", qd[:, i], state))
        state = state * torch.exp(last[:, i, 0])[..., None] + kv[:, i]
    o = o + torch.stack(inter, 1)
    o = o.reshape(b, n * c, h, d)[:, :t].to(v.dtype)
    return o, (state if output_final_state else None)
