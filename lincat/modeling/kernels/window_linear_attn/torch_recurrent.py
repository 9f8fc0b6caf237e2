"""Recurrent PyTorch form of the LoLCATs sliding-window hybrid: one decode step over a ring buffer of the last W
keys/values plus the linear state of everything older."""

import torch

from ..utils import safe_div


def recurrent_window_linear_attn_torch(q, k, v, qf, kf_evicted, gamma, scale, state, slot, valid=None):
    """One token at ring slot `slot` (its absolute index mod W).

    q [B, H, Dk], k [B, Hkv, Dk], v [B, Hkv, Dv], qf [B, H, F]; kf_evicted [B, Hk, F] are the features of the key
    now leaving the window (the one in `slot`). state: dict with S [B, Hk, F, Dv], z [B, Hk, F] (fp32) and the ring
    win_k [B, W, Hkv, Dk], win_v [B, W, Hkv, Dv], win_valid [B, W]; all updated in place. Returns o [B, H, Dv].
    """
    s, z = state["S"], state["z"]
    win_k, win_v, win_valid = state["win_k"], state["win_v"], state["win_valid"]
    b, h, dk = q.shape
    hkv, hk, f = k.shape[1], kf_evicted.shape[1], kf_evicted.shape[-1]

    # The evicted token becomes "older than the window": move it into the linear state.
    old = kf_evicted.float() * win_valid[:, slot, None, None]
    v_old = win_v[:, slot].float().repeat_interleave(hk // hkv, dim=1)
    s.add_(old[..., None] * v_old[:, :, None, :])
    z.add_(old)
    win_k[:, slot] = k
    win_v[:, slot] = v
    win_valid[:, slot] = True if valid is None else valid

    sc = torch.einsum("bhgd,bwhd->bhgw", q.float().view(b, hkv, h // hkv, dk), win_k.float()) * scale
    sc = sc.masked_fill(~win_valid[:, None, None, :], float("-inf"))
    m = sc.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    a = torch.exp(sc - m) * gamma.float().view(1, hkv, h // hkv, 1)
    num = torch.einsum("bhgw,bwhd->bhgd", a, win_v.float()).reshape(b, h, -1)
    den = a.sum(-1).reshape(b, h)
    qg = qf.float().view(b, hk, h // hk, f)
    num = num + torch.einsum("bhgf,bhfd->bhgd", qg, s).reshape(b, h, -1)
    den = den + torch.einsum("bhgf,bhf->bhg", qg, z).reshape(b, h)
    return safe_div(num, den).to(v.dtype)
