"""Recurrent PyTorch form of gated linear attention: one decode step."""

import torch


def recurrent_gla_torch(qf, kf, v, g, state, valid=None):
    """One token. qf [B, H, F], kf and g [B, Hk, F], v [B, Hv, D]; state S [B, Hk, F, D] updated in place:
    S <- exp(g) * S + kf v^T, o = qf S. Padding tokens (valid False) leave S as it was."""
    b, h, f = qf.shape
    hk = kf.shape[1]
    kf, g = kf.float(), g.float()
    if valid is not None:
        kf = kf * valid[:, None, None]
        g = g * valid[:, None, None]
    vk = v.float().repeat_interleave(hk // v.shape[1], dim=1)
    state.mul_(torch.exp(g)[..., None]).add_(kf[..., None] * vk[:, :, None, :])
    o = torch.einsum("bhgf,bhfd->bhgd", qf.float().view(b, hk, h // hk, f), state)
    return o.reshape(b, h, -1).to(v.dtype)
