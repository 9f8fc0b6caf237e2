"""Chunked PyTorch form of normalized linear attention: O(T C F + T F D / C) work, used for training and
prefill when Triton is not in use."""

import torch

from ..utils import expand_heads, masked_keys, pad_time, safe_div, shift_chunks


def chunk_linear_attn_torch(qf, kf, v, valid=None, initial_state=None, output_final_state=False, chunk_size=64):
    """Same result as `naive_linear_attn`, with an optional carried state.

    initial_state / final state: (S [B, Hk, F, D], z [B, Hk, F]) in fp32, the sums of kf v^T and kf over earlier tokens.
    """
    b, t, h, f = qf.shape
    hk, d = kf.shape[2], v.shape[-1]
    c = chunk_size
    q = pad_time(qf.float(), c)
    k = pad_time(masked_keys(kf.float(), valid), c)
    vv = pad_time(expand_heads(v.float(), hk), c)
    n = q.shape[1] // c
    q = q.view(b, n, c, hk, h // hk, f)
    k = k.view(b, n, c, hk, f)
    vv = vv.view(b, n, c, hk, d)

    kv = torch.einsum("bnchf,bnchd->bnhfd", k, vv)
    ksum = k.sum(2)
    if initial_state is None:
        s0 = q.new_zeros(b, hk, f, d)
        z0 = q.new_zeros(b, hk, f)
    else:
        s0, z0 = (x.float() for x in initial_state)
    s_before = s0[:, None] + shift_chunks(kv.cumsum(1), 1)  # state at the start of each chunk (exclusive sum)
    z_before = z0[:, None] + shift_chunks(ksum.cumsum(1), 1)

    num = torch.einsum("bnchgf,bnhfd->bnchgd", q, s_before)
    den = torch.einsum("bnchgf,bnhf->bnchg", q, z_before)
    a = torch.einsum("bnchgf,bnshf->bnhgcs", q, k)
    a = a.masked_fill(~torch.ones(c, c, dtype=torch.bool, device=q.device).tril(), 0.0)
    num = num + torch.einsum("bnhgcs,bnshd->bnchgd", a, vv)
    den = den + a.sum(-1).permute(0, 1, 4, 2, 3)
    o = safe_div(num, den).reshape(b, n * c, h, d)[:, :t].to(v.dtype)
    final = (s0 + kv.sum(1), z0 + ksum.sum(1)) if output_final_state else None
    return o, final
