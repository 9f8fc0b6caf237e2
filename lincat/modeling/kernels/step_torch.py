"""Graph-friendly PyTorch decode steps, one per attention kind: the fallback of the fused Triton steps
(kernels/<op>/fused_recurrent.py) and what the CPU runs.

Each takes the new token's q/k/v ([B, heads, D]), the kind's feature-map parameters and the layer's state dict
(see cache.py), and updates the state in place: the fp32 recurrent state, the ring buffer (and sinks), and `pos`,
the per-row count of tokens consumed. Ring slots come from `pos` on the device, so no Python int that changes from
step to step is involved: a step can be captured in a CUDA graph and replayed.

The math is that of the recurrent references in kernels/<op>/torch_recurrent.py (tests check they agree).
"""

import torch
import torch.nn.functional as F

from ..cache import sinks_of, update_sinks
from .gla.torch_recurrent import recurrent_gla_torch
from .linear_attn.torch_recurrent import recurrent_linear_attn_torch
from .utils import hedgehog_features, safe_div, safe_softmax_weights  # noqa: F401 (re-exported)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, h, D] -> [B, heads, D], each head repeated (heads % h == 0)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _slot_rows(slot: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] slot -> index [B, 1, ...] to gather/scatter one row of `like` ([B, R, ...]) along dim 1."""
    return slot.view(-1, *([1] * (like.dim() - 1))).expand(like.shape[0], 1, *like.shape[2:])


def _ring_write(state: dict, k: torch.Tensor, v: torch.Tensor, ok: torch.Tensor, slot: torch.Tensor):
    """Write one token per row (k, v [B, Hkv, D], ok [B]) into ring slot `slot` ([B])."""
    win_k, win_v = state["win_k"], state["win_v"]
    win_k.scatter_(1, _slot_rows(slot, win_k), k[:, None].to(win_k.dtype))
    win_v.scatter_(1, _slot_rows(slot, win_v), v[:, None].to(win_v.dtype))
    state["win_valid"].scatter_(1, slot[:, None], ok[:, None])


def _ring_read(state: dict, slot: torch.Tensor):
    """One ring row per row: (k, v [B, Hkv, D], valid [B])."""
    win_k, win_v = state["win_k"], state["win_v"]
    return (win_k.gather(1, _slot_rows(slot, win_k))[:, 0], win_v.gather(1, _slot_rows(slot, win_v))[:, 0],
            state["win_valid"].gather(1, slot[:, None])[:, 0])


def _ones(x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)


def hedgehog_step_torch(qr, kr, v, wq, wk, state, valid=None):
    """qr [B, H, D], kr [B, Hkv, D], v [B, Hkv, Dv]; wq [H, D, Fh], wk [Hs, D, Fh]; state S [B, Hs, 2Fh, Dv],
    z [B, Hs, 2Fh], pos [B]. Returns o [B, H, Dv]."""
    qf = hedgehog_features(qr, wq)
    kf = hedgehog_features(_heads(kr, wk.shape[0]), wk)
    o = recurrent_linear_attn_torch(qf, kf, v, (state["S"], state["z"]), valid)
    state["pos"].add_(1)
    return o


def lolcats_step_torch(qr, kr, v, wq, wk, gamma, scale, window, state, valid=None):
    """LoLCATs: hedgehog linear attention over tokens older than `window` plus softmax over the window, one
    normalizer. The ring has R >= window slots; the new token goes to slot pos % R and the token leaving the window
    (index pos - window, slot (pos - window) % R) moves into the linear state. gamma [H]. Returns o [B, H, Dv]."""
    s, z, pos = state["S"], state["z"], state["pos"]
    win_k, win_v = state["win_k"], state["win_v"]
    b, h, dk = qr.shape
    hkv, hs = kr.shape[1], wk.shape[0]
    ring = win_k.shape[1]
    ok_new = _ones(kr) if valid is None else valid
    w_slot, e_slot = pos % ring, (pos - window) % ring

    k_old, v_old, ok_old = _ring_read(state, e_slot)
    kf_old = hedgehog_features(_heads(k_old, hs), wk) * ok_old[:, None, None]
    s.add_(kf_old[..., None] * _heads(v_old.float(), hs)[:, :, None, :])
    z.add_(kf_old)
    _ring_write(state, kr, v, ok_new, w_slot)

    slots = torch.arange(ring, device=qr.device)
    ok = state["win_valid"] & ((slots[None] != e_slot[:, None]) | (e_slot == w_slot)[:, None])
    sc = torch.einsum("bhgd,bwhd->bhgw", qr.float().view(b, hkv, h // hkv, dk), win_k.float()) * scale
    sc = sc.masked_fill(~ok[:, None, None, :], float("-inf"))
    m = sc.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    a = torch.exp(sc - m) * gamma.float().view(1, hkv, h // hkv, 1)
    num = torch.einsum("bhgw,bwhd->bhgd", a, win_v.float()).reshape(b, h, -1)
    den = a.sum(-1).reshape(b, h)
    qf = hedgehog_features(qr, wq)
    qg = qf.view(b, hs, h // hs, -1)
    num = num + torch.einsum("bhgf,bhfd->bhgd", qg, s).reshape(b, h, -1)
    den = den + torch.einsum("bhgf,bhf->bhg", qg, z).reshape(b, h)
    pos.add_(1)
    return safe_div(num, den).to(v.dtype)


def _window_softmax(qr, state, scale, pos, window, sinks: bool):
    """Softmax attention of qr [B, H, D] over the ring (already holding the new token) and, optionally, the sinks
    that have left the window. Returns o [B, H, Dv] in fp32."""
    win_k, win_v = state["win_k"], state["win_v"]
    b, h, d = qr.shape
    hkv = win_k.shape[2]
    keys, vals, ok = win_k, win_v, state["win_valid"]
    if sinks:
        sk, sv, spos, sok = sinks_of(state)
        keys = torch.cat([keys, sk.to(keys.dtype)], 1)
        vals = torch.cat([vals, sv.to(vals.dtype)], 1)
        ok = torch.cat([ok, sok & (spos <= (pos - window)[:, None])], 1)
    sc = torch.einsum("bhgd,bwhd->bhgw", qr.float().view(b, hkv, h // hkv, d), keys.float()) * scale
    e, den = safe_softmax_weights(sc.masked_fill(~ok[:, None, None, :], float("-inf")))
    o = safe_div(torch.einsum("bhgw,bwhd->bhgd", e, vals.float()), den[..., 0])
    return o.reshape(b, h, -1)


def swa_step_torch(qr, kr, v, scale, window, state, valid=None):
    """Sliding-window softmax over a ring of R = window slots, plus sinks when the state has them (the first S real
    tokens, recorded here as they arrive). Returns o [B, H, Dv]."""
    pos = state["pos"]
    ok_new = _ones(kr) if valid is None else valid
    sinks = "sink_k" in state
    if sinks:
        update_sinks(state, kr[:, None], v[:, None], ok_new[:, None], pos)
    _ring_write(state, kr, v, ok_new, pos % state["win_k"].shape[1])
    o = _window_softmax(qr, state, scale, pos, window, sinks)
    pos.add_(1)
    return o.to(v.dtype)


def liger_step_torch(q, k, qr, kr, v, gate_norm, mix, scale, state, valid=None):
    """Liger: mix * GLA (softmax-over-head-dim features of the pre-RoPE q/k, gates logsigmoid(k) / gate_norm) +
    (1 - mix) * sliding-window softmax over the ring (post-RoPE qr/kr). Returns o [B, H, Dv]."""
    qf, kf = torch.softmax(q.float(), dim=-1), torch.softmax(k.float(), dim=-1)
    g = F.logsigmoid(k.float()) / gate_norm
    o_gla = recurrent_gla_torch(qf, kf, v, g, state["S"], valid)
    pos = state["pos"]
    _ring_write(state, kr, v, _ones(kr) if valid is None else valid, pos % state["win_k"].shape[1])
    o_swa = _window_softmax(qr, state, scale, pos, 0, False).to(v.dtype)
    pos.add_(1)
    return (mix * o_gla.float() + (1 - mix) * o_swa.float()).to(v.dtype)
