"""Fused Triton decode step of the LoLCATs hybrid (Hedgehog linear attention + sliding-window softmax, one
normalizer): one launch per layer per token.

One program per (row, state head, value split):
1. the token leaving the window (index pos - W, ring slot (pos - W) % R) goes into the linear state: its key's
   feature map phi(k_old) (computed here from the stored post-RoPE key) and S += phi(k_old) v_old^T, z += phi(k_old);
2. the new token's key/value are written to ring slot pos % R (by the first state head of each KV head group);
3. the G query heads that share the state read out, over the W newest ring rows (gathered by index)
   o = (sum_window gamma exp(q.k * scale - m) v + phi(q) S) / (sum_window gamma exp(q.k * scale - m) + phi(q) z),
   with m the max window score, as torch_recurrent.py does.
The ring has R = W + 1 slots, so the evicted row (read by every program of the row) and the written row are
different slots: no program reads what another writes. The new token's row is taken from registers.
With few rows (batch 1) the value dim is split over programs, each owning its columns of S; they all read z and
compute the same update, which the last of them to finish writes (a per-state atomic ticket, `zticket`), so no
program reads a z that another has already moved on.

Matches kernels/step_torch.py:lolcats_step_torch.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # transformers' remote-code import check skips try blocks; ops.py falls back to PyTorch
    raise

from ..fused_utils import (BUDGET, TUNE, advance_pos, check_state, contig, feature_chunk, group_block, group_features,
                           last_to_arrive, p2, ring_scores, ring_values, row_features, sms, value_block, value_splits)
from ..utils import DEN_EPS


@triton.jit
def _lolcats_step(q, k, v, wq, wk, gamma, S, Z, zticket, win_k, win_v, win_valid, o, valid, pos, ticket, scale, eps,
                  W: tl.constexpr, R: tl.constexpr, H: tl.constexpr, HS: tl.constexpr, HKV: tl.constexpr,
                  DK: tl.constexpr, FH: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, BG: tl.constexpr,
                  BD: tl.constexpr, BF: tl.constexpr, BR: tl.constexpr, BDC: tl.constexpr, BFC: tl.constexpr,
                  BKC: tl.constexpr, BV: tl.constexpr, SPLITS: tl.constexpr, HAS_VALID: tl.constexpr):
    pid, split = tl.program_id(0), tl.program_id(1)
    b = pid // HS
    hs = pid % HS
    group = HS // HKV
    hkv = hs // group
    writer = (hs % group) == 0
    b64 = b.to(tl.int64)
    od = tl.arange(0, BD)
    of = tl.arange(0, BF)
    og = tl.arange(0, BG)
    ov = tl.arange(0, BV)
    md, mf, mg = od < DK, of < FH, og < G
    DVS: tl.constexpr = DV // SPLITS  # this program's value columns: [v_lo, v_hi)
    v_lo = split * DVS
    v_hi = v_lo + DVS
    p = tl.load(pos + b)
    w_slot = p % R
    e_slot = (p + (R - W)) % R
    # The window is the W newest ring rows, tokens p, p - 1, ..., p - W + 1: gathered by index, so the tiles are
    # W wide rather than the R = W + 1 slots padded to a power of two (twice W), and the evicted slot is never among
    # them. Lanes past W point past the ring (masked).
    jr = tl.arange(0, BR)
    orr = tl.where(jr < W, (p - jr + R) % R, R)
    if HAS_VALID:
        ok_new = tl.load(valid + b) != 0
    else:
        ok_new = p >= 0  # True

    # 1. the evicted token's features (zero if its slot is empty or padding)
    ok_old = tl.load(win_valid + b64 * R + e_slot) != 0
    kp, kn = row_features(win_k + ((b64 * R + e_slot) * HKV + hkv) * DK, wk, hs, of, DK, FH, BF, BD, BKC)
    okf = ok_old.to(tl.float32)
    kp = kp * okf
    kn = kn * okf
    zb = (b64 * HS + hs) * (2 * FH)
    zp = tl.load(Z + zb + of, mask=mf, other=0.0) + kp
    zn = tl.load(Z + zb + FH + of, mask=mf, other=0.0) + kn

    # 3a. window weights: the ring minus the evicted slot, with the new token in the written slot
    h0 = hs * G
    s = ring_scores(q, win_k, k, b64, h0, hkv, og, orr, w_slot, scale, H, HKV, DK, R, G, BG, BR, BD, BDC)
    okw = tl.load(win_valid + b64 * R + orr, mask=(orr < R) & (orr != w_slot), other=0) != 0
    okw = tl.where(orr == w_slot, ok_new, okw)
    s = tl.where(okw[None, :], s, float("-inf"))
    m = tl.max(s, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    gam = tl.load(gamma + h0 + og, mask=mg, other=0.0).to(tl.float32)
    a = tl.exp(s - m[:, None]) * gam[:, None]

    # 3b. linear part: the queries' features
    qp_all, qn_all = group_features(q + (b64 * H + h0) * DK, wq, h0, og, of, DK, FH, G, BG, BF, BD, BFC)
    den = tl.sum(a, 1) + tl.sum(qp_all * zp[None, :], 1) + tl.sum(qn_all * zn[None, :], 1)
    rden = tl.where(den > eps, 1.0 / tl.maximum(den, eps), 0.0)  # no visible key (padding): 0

    sb = (b64 * HS + hs) * (2 * FH) * DV
    for v0 in range(v_lo, v_hi, BV):
        cv = v0 + ov
        mv = cv < v_hi
        m2 = mf[:, None] & mv[None, :]
        v_old = tl.load(win_v + ((b64 * R + e_slot) * HKV + hkv) * DV + cv, mask=mv, other=0.0).to(tl.float32)
        ptr_p = S + sb + of[:, None] * DV + cv[None, :]
        ptr_n = ptr_p + FH * DV
        sp = tl.load(ptr_p, mask=m2, other=0.0) + kp[:, None] * v_old[None, :]
        sn = tl.load(ptr_n, mask=m2, other=0.0) + kn[:, None] * v_old[None, :]
        tl.store(ptr_p, sp, mask=m2)
        tl.store(ptr_n, sn, mask=m2)
        vw = ring_values(win_v, v, b64, hkv, orr, cv, mv, w_slot, R, HKV, DV)
        if BR == BF:  # one reduction instead of three (the window's rows and the features line up: W = Fh = 64)
            num = tl.sum(a[:, :, None] * vw[None, :, :] + qp_all[:, :, None] * sp[None, :, :]
                         + qn_all[:, :, None] * sn[None, :, :], 1)
        else:
            num = tl.sum(a[:, :, None] * vw[None, :, :], 1)
            num += tl.sum(qp_all[:, :, None] * sp[None, :, :], 1) + tl.sum(qn_all[:, :, None] * sn[None, :, :], 1)
        tl.store(o + (b64 * H + h0 + og[:, None]) * DV + cv[None, :], (num * rden[:, None]).to(o.dtype.element_ty),
                 mask=mg[:, None] & mv[None, :])
        # 2. the new value's columns (one writer per KV head)
        vn = tl.load(v + (b64 * HKV + hkv) * DV + cv, mask=mv, other=0.0)
        tl.store(win_v + ((b64 * R + w_slot) * HKV + hkv) * DV + cv, vn.to(win_v.dtype.element_ty),
                 mask=tl.where(writer, mv, False))
    # 2. the new key and its validity (by the first split)
    mk = tl.where(writer & (split == 0), md, False)
    kx = tl.load(k + (b64 * HKV + hkv) * DK + od, mask=mk, other=0.0)
    tl.store(win_k + ((b64 * R + w_slot) * HKV + hkv) * DK + od, kx.to(win_k.dtype.element_ty), mask=mk)
    tl.store(win_valid + b64 * R + w_slot, ok_new, mask=(hs == 0) & (split == 0))
    # 1. z moves on only once every split of this state has read it: the last one to get here writes it
    if SPLITS == 1:
        last = split == 0
    else:
        last = last_to_arrive(zticket + b64 * HS + hs, SPLITS)
    mz = tl.where(last, mf, False)
    tl.store(Z + zb + of, zp, mask=mz)
    tl.store(Z + zb + FH + of, zn, mask=mz)
    advance_pos(pos, ticket, b, p, HS * SPLITS)


def fused_lolcats_step(qr, kr, v, wq, wk, gamma, scale, window, state, valid=None):
    """qr [B, H, Dk], kr [B, Hkv, Dk] (post-RoPE), v [B, Hkv, Dv]; wq [H, Dk, Fh], wk [Hs, Dk, Fh]; gamma [H];
    state with S [B, Hs, 2Fh, Dv], z [B, Hs, 2Fh] (fp32), win_k / win_v [B, R, Hkv, D], win_valid [B, R] (R > W:
    the evicted and the written slot must differ), pos [B], ticket [B] and optionally zticket [B, Hs] (int32 zeros:
    with it, few programs split the value dim), all updated in place. Returns o [B, H, Dv]."""
    qr, kr, v, wq, wk, gamma = contig(qr, kr, v, wq, wk, gamma)
    check_state(state, "S", "z", "win_k", "win_v", "win_valid", "pos", "ticket")
    b, h, dk = qr.shape
    hkv, dv = kr.shape[1], v.shape[2]
    hs, _, fh = wk.shape
    ring = state["win_k"].shape[1]
    if v.shape[1] != hkv or h % hs or hs % hkv or state["S"].shape != (b, hs, 2 * fh, dv) or ring <= window:
        raise ValueError(f"lolcats step: shapes q {tuple(qr.shape)} k {tuple(kr.shape)} v {tuple(v.shape)} "
                         f"wk {tuple(wk.shape)} S {tuple(state['S'].shape)} ring {ring} window {window} do not fit")
    g = h // hs
    bg, bf, br, bd = group_block(g, 1), p2(fh), p2(window), p2(dk)
    zticket = state.get("zticket")
    # Launch settings measured on the H100 (8B heads, bench/results/generate.md). Many programs (batch 64: 2048 with a
    # state per query head, 512 shared): 32-column value tiles, 2 warps for 1-row query tiles (1.8x faster than 8
    # warps over 128 columns), 4 for 4-row tiles. Few (batch 1) with a zticket: the value dim split over programs,
    # 32 columns and 4 warps each for 1-row tiles (12.5 vs 14.7 us unsplit), 16 and 8 warps for 4-row tiles (19.0 vs
    # 29.3 us unsplit, which still takes 8 warps over 64+ columns).
    many = b * hs >= 2 * sms(qr.device)
    vb = value_block(dv, max(br, bf), bg)
    if many:
        bv, nw = min(32, vb), 2 if bg == 1 else 4
    elif zticket is not None:
        bv, nw = (min(16, vb), 8) if bg > 1 else (min(32, vb), 4)
    else:
        bv, nw = (min(p2(dv), max(64, vb)) if bg <= 4 else vb), 8
    bv, nw = TUNE["bv"] or bv, TUNE["num_warps"] or nw
    splits = 1
    if zticket is not None and (TUNE["splits"] or not many):
        splits = value_splits(dv, bv, b * hs, qr.device)
        splits = splits if dv % (splits * bv) == 0 else 1
    # BUDGET-sized temporaries even at 2 warps: they spill there (255 registers, ncu), yet tiles sized to the warps
    # (32 registers a thread) ran 1.1x (a state per query head) to 1.75x (shared) slower at batch 64 on the H100
    bdc = max(1, min(bd, BUDGET // (bg * br)))
    o = torch.empty(b, h, dv, dtype=v.dtype, device=v.device)
    _lolcats_step[(b * hs, splits)](
        qr, kr, v, wq, wk, gamma, state["S"], state["z"], zticket if zticket is not None else state["ticket"],
        state["win_k"], state["win_v"], state["win_valid"], o,
        valid.contiguous() if valid is not None else o, state["pos"], state["ticket"], float(scale), DEN_EPS,
        W=window, R=ring, H=h, HS=hs, HKV=hkv, DK=dk, FH=fh, DV=dv, G=g, BG=bg, BD=bd, BF=bf, BR=br, BDC=bdc,
        BFC=feature_chunk(bd, bg, bf), BKC=feature_chunk(bd, 1, bf), BV=bv, SPLITS=splits,
        HAS_VALID=valid is not None, num_warps=nw,
    )
    return o
