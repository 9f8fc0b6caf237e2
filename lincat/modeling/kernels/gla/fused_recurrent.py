"""Fused Triton decode step of Liger attention (gated linear attention averaged with sliding-window softmax): one
launch per layer per token.

One program per (row, KV head, value split). It computes the GLA features in place (softmax over the head dim of the
pre-RoPE q and k, gates log a = logsigmoid(k) / gate_norm), updates its columns of the fp32 state,
S <- diag(a) S + phi(k) v^T, and reads out the G query heads of the group, o_gla = phi(q) S; then the window branch:
softmax of the post-RoPE queries over the ring (the new token taken from registers), o_swa; and writes
mix * o_gla + (1 - mix) * o_swa. The state is read and written once per step and shared by the query heads of a group
(Liger's states are per KV head). GLA has no normalizer, so the value dim can be split over programs when the batch is
too small to fill the GPU; each split owns its columns of S and of the ring's new value, the first split writes the
new key, and the last program of the row to finish advances `pos`.

Matches kernels/step_torch.py:liger_step_torch.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # transformers' remote-code import check skips try blocks; ops.py falls back to PyTorch
    raise

from ..fused_utils import (BUDGET, advance_pos, check_state, contig, group_block, p2, ring_scores, ring_values,
                           value_block, value_splits, warps)
from ..utils import DEN_EPS


@triton.jit
def _liger_step(q, k, qr, kr, v, S, win_k, win_v, win_valid, o, valid, pos, ticket, scale, inv_gate_norm, mix, eps,
                R: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                G: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, BDC: tl.constexpr,
                BV: tl.constexpr, NDV: tl.constexpr, HAS_VALID: tl.constexpr):
    pid = tl.program_id(0)
    j = pid % NDV
    bh = pid // NDV
    b = bh // HKV
    hkv = bh % HKV
    b64 = b.to(tl.int64)
    p = tl.load(pos + b)
    w_slot = p % R
    od = tl.arange(0, BD)
    og = tl.arange(0, BG)
    orr = tl.arange(0, BR)
    ov = tl.arange(0, BV)
    md, mg = od < DK, og < G
    if HAS_VALID:
        ok_new = tl.load(valid + b) != 0
    else:
        ok_new = p >= 0  # True

    # GLA features of the pre-RoPE key and queries, and the key's gates
    kx = tl.load(k + (b64 * HKV + hkv) * DK + od, mask=md, other=0.0).to(tl.float32)
    km = tl.where(md, kx, float("-inf"))
    ke = tl.exp(km - tl.max(km, 0))
    okf = ok_new.to(tl.float32)
    kf = ke / tl.sum(ke, 0) * okf
    logsig = tl.minimum(kx, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(kx)))
    decay = tl.exp(logsig * inv_gate_norm * okf)
    h0 = hkv * G
    qx = tl.load(q + (b64 * H + h0 + og[:, None]) * DK + od[None, :], mask=mg[:, None] & md[None, :],
                 other=0.0).to(tl.float32)
    qm = tl.where(md[None, :], qx, float("-inf"))
    qe = tl.exp(qm - tl.max(qm, 1)[:, None])
    qf = qe / tl.sum(qe, 1)[:, None]

    # window softmax weights over the ring, the new token in its slot
    s = ring_scores(qr, win_k, kr, win_valid, ok_new, b64, h0, hkv, og, orr, w_slot, scale, H, HKV, DK, R, G, BG, BR,
                    BD, BDC)
    m = tl.max(s, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    e = tl.exp(s - m[:, None])
    den = tl.sum(e, 1)
    rden = tl.where(den > eps, 1.0 / tl.maximum(den, eps), 0.0)  # no visible key (padding): 0

    DVP: tl.constexpr = DV // NDV
    sb = (b64 * HKV + hkv) * DK * DV
    for v0 in range(0, DVP, BV):
        cv = j * DVP + v0 + ov
        mv = (v0 + ov < DVP) & (cv < DV)
        m2 = md[:, None] & mv[None, :]
        vn = tl.load(v + (b64 * HKV + hkv) * DV + cv, mask=mv, other=0.0)
        vf = vn.to(tl.float32)
        ptr = S + sb + od[:, None] * DV + cv[None, :]
        st = tl.load(ptr, mask=m2, other=0.0) * decay[:, None] + kf[:, None] * vf[None, :]
        tl.store(ptr, st, mask=m2)
        o_gla = tl.sum(qf[:, :, None] * st[None, :, :], 1)
        vw = ring_values(win_v, v, b64, hkv, orr, cv, mv, w_slot, R, HKV, DV)
        o_swa = tl.sum(e[:, :, None] * vw[None, :, :], 1) * rden[:, None]
        out = mix * o_gla + (1.0 - mix) * o_swa
        tl.store(o + (b64 * H + h0 + og[:, None]) * DV + cv[None, :], out.to(o.dtype.element_ty),
                 mask=mg[:, None] & mv[None, :])
        tl.store(win_v + ((b64 * R + w_slot) * HKV + hkv) * DV + cv, vn.to(win_v.dtype.element_ty), mask=mv)
    mk = tl.where(j == 0, md, False)
    kn = tl.load(kr + (b64 * HKV + hkv) * DK + od, mask=mk, other=0.0)
    tl.store(win_k + ((b64 * R + w_slot) * HKV + hkv) * DK + od, kn.to(win_k.dtype.element_ty), mask=mk)
    tl.store(win_valid + b64 * R + w_slot, ok_new, mask=(j == 0) & (hkv == 0))
    advance_pos(pos, ticket, b, p, HKV * NDV)


def fused_liger_step(q, k, qr, kr, v, gate_norm, mix, scale, state, valid=None):
    """q/k [B, H|Hkv, D] before RoPE, qr/kr after, v [B, Hkv, Dv]; state with S [B, Hkv, D, Dv] (fp32), the ring
    win_k / win_v [B, R, Hkv, D], win_valid [B, R], pos [B], ticket [B], all updated in place. Returns o [B, H, Dv]."""
    q, k, qr, kr, v = contig(q, k, qr, kr, v)
    check_state(state, "S", "win_k", "win_v", "win_valid", "pos", "ticket")
    b, h, dk = q.shape
    hkv, dv = k.shape[1], v.shape[2]
    ring = state["win_k"].shape[1]
    if v.shape[1] != hkv or h % hkv or state["S"].shape != (b, hkv, dk, dv):
        raise ValueError(f"liger step: shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)} "
                         f"S {tuple(state['S'].shape)} do not fit")
    g = h // hkv
    bg, bd, br = group_block(g), p2(dk), p2(ring)
    bv = value_block(dv, max(br, bd), bg)
    bdc = max(1, min(bd, BUDGET // (bg * br)))
    ndv = value_splits(dv, bv, b * hkv, v.device)
    o = torch.empty(b, h, dv, dtype=v.dtype, device=v.device)
    _liger_step[(b * hkv * ndv,)](
        q, k, qr, kr, v, state["S"], state["win_k"], state["win_v"], state["win_valid"], o,
        valid.contiguous() if valid is not None else o, state["pos"], state["ticket"], float(scale), 1.0 / float(gate_norm),
        float(mix), DEN_EPS, R=ring, H=h, HKV=hkv, DK=dk, DV=dv, G=g, BG=bg, BD=bd, BR=br, BDC=bdc, BV=bv, NDV=ndv,
        HAS_VALID=valid is not None, num_warps=warps(bg * max(br, bd) * bv),
    )
    return o
