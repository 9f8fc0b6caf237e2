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

from ..fused_utils import (TUNE, add_weighted, advance_pos, check_state, contig, group_block, p2, ring_block,
                           ring_block_scores, ring_block_values, ring_slots, ring_softmax, sms, value_splits,
                           window_lowp, window_query)
from ..utils import DEN_EPS


@triton.jit
def _liger_step(q, k, qr, kr, v, S, win_k, win_v, win_valid, o, valid, pos, ticket, scale, inv_gate_norm, mix, eps,
                R: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                G: tl.constexpr, BG: tl.constexpr, BGD: tl.constexpr, BD: tl.constexpr, BRB: tl.constexpr,
                BV: tl.constexpr, BVP: tl.constexpr, NDV: tl.constexpr, LOWP: tl.constexpr,
                HAS_VALID: tl.constexpr):
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

    # window softmax over the ring with tensor-core products: the post-RoPE queries as rows of a tile padded to
    # BGD >= 16 (fused_utils.softmax_block), the new token taken in its slot. A ring of one block (the 64-token
    # default): its weights once, then the weighted values per column block below. Longer rings: the online softmax
    # over all the program's columns first, then each column block picked out of it (exact: sums of zeros).
    ogd = tl.arange(0, BGD)
    qt, kn = window_query(qr, kr, win_k, b64, h0, hkv, ogd, ogd < G, od, md, H, HKV, DK, LOWP)
    DVP: tl.constexpr = DV // NDV
    if R <= BRB:
        orr = ring_slots(p, 0, R, R, BRB)
        s = ring_block_scores(qt, kn, win_k, win_valid, ok_new, b64, hkv, orr, w_slot, scale, od, md, R, HKV, DK,
                              LOWP)
        m = tl.max(s, 1)
        e = tl.exp(s - tl.where(m == float("-inf"), 0.0, m)[:, None])
        den = tl.sum(e, 1)
    else:
        cw = j * DVP + tl.arange(0, BVP)
        mw = (tl.arange(0, BVP) < DVP) & (cw < DV)
        vw = tl.load(v + (b64 * HKV + hkv) * DV + cw, mask=mw, other=0.0)
        m, den, acc = ring_softmax(qt, kn, vw, win_k, win_v, win_valid, ok_new, b64, hkv, p, scale, od, md, cw, mw,
                                   R, R, HKV, DK, DV, BRB, LOWP)
    rden = tl.where(den > eps, 1.0 / tl.maximum(den, eps), 0.0)  # no visible key (padding): 0
    if R > BRB:
        acc = tl.where((ogd < BG)[:, None], acc * rden[:, None], 0.0)
        o_all = tl.reshape(tl.sum(tl.reshape(acc, [BGD // BG, BG, BVP]), 0), [BG, BVP // BV, BV])

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
        if R <= BRB:
            acc = add_weighted(tl.zeros([BGD, BV], tl.float32), e,
                               ring_block_values(vn, win_v, b64, hkv, orr, w_slot, cv, mv, R, HKV, DV), LOWP)
            # the tile's first BG rows, as the GLA readout's [BG, BV] (the padding rows zeroed and folded in)
            acc = tl.where((ogd < BG)[:, None], acc * rden[:, None], 0.0)
            o_swa = tl.sum(tl.reshape(acc, [BGD // BG, BG, BV]), 0)
        else:
            o_swa = tl.sum(tl.where((tl.arange(0, BVP // BV) == v0 // BV)[None, :, None], o_all, 0.0), 1)
        out = mix * o_gla + (1.0 - mix) * o_swa
        tl.store(o + (b64 * H + h0 + og[:, None]) * DV + cv[None, :], out.to(o.dtype.element_ty),
                 mask=mg[:, None] & mv[None, :])
        tl.store(win_v + ((b64 * R + w_slot) * HKV + hkv) * DV + cv, vn.to(win_v.dtype.element_ty), mask=mv)
    mk = tl.where(j == 0, md, False)
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
    bg, bd = group_block(g), p2(dk)
    # Launch settings measured on the H100 (8B heads, batch 64: bench/results/generate.md): 16 value columns with 2
    # warps at many rows (42.8 us against 44.6 with 4 warps x 32 columns, 69.4 with 8 warps x 16), 32 with 4 warps
    # when the rows do not fill the GPU twice over (batch 16: 10.9 us against 11.9). tl.dot's tiles: 16 and up.
    few = b * hkv < 2 * sms(v.device)
    bv = max(16, TUNE["bv"] or min(p2(dv), 32 if few else 16))
    ndv = value_splits(dv, bv, b * hkv, v.device)
    o = torch.empty(b, h, dv, dtype=v.dtype, device=v.device)
    _liger_step[(b * hkv * ndv,)](
        q, k, qr, kr, v, state["S"], state["win_k"], state["win_v"], state["win_valid"], o,
        valid.contiguous() if valid is not None else o, state["pos"], state["ticket"], float(scale), 1.0 / float(gate_norm),
        float(mix), DEN_EPS, R=ring, H=h, HKV=hkv, DK=dk, DV=dv, G=g, BG=bg, BGD=max(16, bg), BD=max(16, bd),
        BRB=ring_block(ring), BV=bv, BVP=max(bv, p2(dv // ndv)), NDV=ndv,
        LOWP=window_lowp(qr, state), HAS_VALID=valid is not None, num_warps=TUNE["num_warps"] or (4 if few else 2),
    )
    return o
