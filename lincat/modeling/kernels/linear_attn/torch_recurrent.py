"""Recurrent PyTorch form of normalized linear attention: one decode step, O(F D) per head."""

import torch

from ..utils import safe_div


def recurrent_linear_attn_torch(qf, kf, v, state, valid=None):
    """One token. qf [B, H, F], kf [B, Hk, F], v [B, Hv, D]; state (S [B, Hk, F, D], z [B, Hk, F]) is updated in
    place. Returns o [B, H, D]."""
    s, z = state
    b, h, f = qf.shape
    hk = kf.shape[1]
    kf = kf.float() if valid is None else kf.float() * valid[:, None, None]
    vk = v.float().repeat_interleave(hk // v.shape[1], dim=1)
    s.add_(kf[..., None] * vk[:, :, None, :])
    z.add_(kf)
    q = qf.float().view(b, hk, h // hk, f)
    num = torch.einsum("bhgf,bhfd->bhgd", q, s)
    den = torch.einsum("bhgf,bhf->bhg", q, z)
    return safe_div(num, den).reshape(b, h, -1).to(v.dtype)
