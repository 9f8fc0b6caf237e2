"""Fused Triton decode step of the LoLCATs hybrid (Hedgehog linear attention + sliding-window softmax, one
normalizer): one launch per layer per token.

    o = (sum_window gamma exp(q.k * scale - m) v + phi(q) S) / (sum_window gamma exp(q.k * scale - m) + phi(q) z),

with m the max window score, as torch_recurrent.py does. The two sums are independent until the division, so the
launch runs two kinds of program:
- per state head, `SPLITS` state programs, each owning a slice of the value columns: the token leaving the window
  (index pos - W, ring slot (pos - W) % R) goes into the linear state, its key's feature map phi(k_old) computed
  here from the stored post-RoPE key, S += phi(k_old) v_old^T, and the query heads that share the state read out
  phi(q) S for their columns. The first split also moves z += phi(k_old) and reads out phi(q) z (no other program
  reads z).
- per KV head, `NW` window programs over its query heads: the window weights over the W newest ring rows (gathered
  by index), their weighted values and sum, with tensor-core products (fused_utils.softmax_block). The first writes
  the new token's key/value into ring slot pos % R.
Each writes its partial numerators / denominators to the fp32 scratch `opart`; the last program of the KV head to
finish (an atomic ticket, `oticket`) adds them up and writes o. In one program (as before), the window's
temporaries next to the state tiles took 255 registers a thread with spills, and the step 164 us at batch 64 on
the H100 against 109 us for Hedgehog's step with the same state bytes; apart, 140 us, and 72 instead of 104 us with
GQA-shared states; with the window's products on the tensor cores, 117.4 and 55.5 us.
The ring has R = W + 1 slots, so the evicted row (read by the state programs) and the written row are different
slots: no program reads what another writes, except the scratch, read by the last one after its ticket.

Matches kernels/step_torch.py:lolcats_step_torch.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # transformers' remote-code import check skips try blocks; ops.py falls back to PyTorch
    raise

from ..fused_utils import (TUNE, advance_pos, check_state, contig, feature_chunk, group_block, group_features,
                           last_to_arrive, p2, ring_block, ring_softmax, row_features, sms, value_splits,
                           window_lowp, window_query)
from ..utils import DEN_EPS


@triton.jit
def _window_part(q, k, v, gamma, win_k, win_v, win_valid, part, b64, hkv, h0, writer, p, ok_new, scale,
                 W: tl.constexpr, R: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr,
                 DV: tl.constexpr, GW: tl.constexpr, BGD: tl.constexpr, BD: tl.constexpr, BRB: tl.constexpr,
                 BDV: tl.constexpr, LOWP: tl.constexpr):
    """A window program of KV head hkv: for query heads h0 .. h0 + GW - 1 (rows of a tensor-core tile, padded to
    BGD >= 16), gamma sum_window exp(s - m) v into opart[..., DV:2DV] and gamma sum_window exp(s - m) into
    opart[..., 2DV + 1], with m the window max (the final max of the online softmax); the writer puts the new token
    into ring slot p % R."""
    og, od, ov = tl.arange(0, BGD), tl.arange(0, BD), tl.arange(0, BDV)
    mg, md, mv = og < GW, od < DK, ov < DV
    qt, kn = window_query(q, k, win_k, b64, h0, hkv, og, mg, od, md, H, HKV, DK, LOWP)
    vn = tl.load(v + (b64 * HKV + hkv) * DV + ov, mask=mv, other=0.0)
    m, den, acc = ring_softmax(qt, kn, vn, win_k, win_v, win_valid, ok_new, b64, hkv, p, scale, od, md, ov, mv, W, R,
                               HKV, DK, DV, BRB, LOWP)
    gam = tl.load(gamma + h0 + og, mask=mg, other=0.0).to(tl.float32)
    prow = part + (b64 * H + h0 + og) * (2 * DV + 2)
    tl.store(prow + 2 * DV + 1, den * gam, mask=mg)
    tl.store(prow[:, None] + DV + ov[None, :], acc * gam[:, None], mask=mg[:, None] & mv[None, :])
    w_slot = p % R
    tl.store(win_v + ((b64 * R + w_slot) * HKV + hkv) * DV + ov, vn.to(win_v.dtype.element_ty),
             mask=tl.where(writer, mv, False))
    tl.store(win_k + ((b64 * R + w_slot) * HKV + hkv) * DK + od, kn.to(win_k.dtype.element_ty),
             mask=tl.where(writer, md, False))
    tl.store(win_valid + b64 * R + w_slot, ok_new, mask=writer & (hkv == 0))


@triton.jit
def _state_part(q, wq, wk, S, Z, win_k, win_v, win_valid, part, b64, hs, hkv, split, e_slot,
                R: tl.constexpr, H: tl.constexpr, HS: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr,
                FH: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr,
                BF: tl.constexpr, BFC: tl.constexpr, BKC: tl.constexpr, BV: tl.constexpr, SPLITS: tl.constexpr):
    """State program `split`: S += phi(k_old) v_old^T on its columns, phi(q) S into opart[..., :DV]; the first
    also z += phi(k_old) and phi(q) z into opart[..., 2DV]."""
    og, of, ov = tl.arange(0, BG), tl.arange(0, BF), tl.arange(0, BV)
    mg, mf = og < G, of < FH
    h0 = hs * G
    ok_old = tl.load(win_valid + b64 * R + e_slot) != 0  # zero features if the slot is empty or padding
    kp, kn = row_features(win_k + ((b64 * R + e_slot) * HKV + hkv) * DK, wk, hs, of, DK, FH, BF, BD, BKC)
    okf = ok_old.to(tl.float32)
    kp = kp * okf
    kn = kn * okf
    qp_all, qn_all = group_features(q + (b64 * H + h0) * DK, wq, h0, og, of, DK, FH, G, BG, BF, BD, BFC)
    prow = part + (b64 * H + h0 + og) * (2 * DV + 2)

    mz = tl.where(split == 0, mf, False)
    zb = (b64 * HS + hs) * (2 * FH)
    zp = tl.load(Z + zb + of, mask=mz, other=0.0) + kp
    zn = tl.load(Z + zb + FH + of, mask=mz, other=0.0) + kn
    tl.store(Z + zb + of, zp, mask=mz)
    tl.store(Z + zb + FH + of, zn, mask=mz)
    den = tl.sum(qp_all * zp[None, :], 1) + tl.sum(qn_all * zn[None, :], 1)
    tl.store(prow + 2 * DV, den, mask=tl.where(split == 0, mg, False))

    DVS: tl.constexpr = DV // SPLITS
    if SPLITS == 1:  # constant loop bounds: no spills at one 128-column tile (sm_90 compile)
        v_lo = 0
    else:
        v_lo = split * DVS
    sb = (b64 * HS + hs) * (2 * FH) * DV
    for v0 in range(v_lo, v_lo + DVS, BV):
        cv = v0 + ov
        mv = cv < v_lo + DVS
        m2 = mf[:, None] & mv[None, :]
        v_old = tl.load(win_v + ((b64 * R + e_slot) * HKV + hkv) * DV + cv, mask=mv, other=0.0).to(tl.float32)
        ptr_p = S + sb + of[:, None] * DV + cv[None, :]
        ptr_n = ptr_p + FH * DV
        sp = tl.load(ptr_p, mask=m2, other=0.0) + kp[:, None] * v_old[None, :]
        sn = tl.load(ptr_n, mask=m2, other=0.0) + kn[:, None] * v_old[None, :]
        tl.store(ptr_p, sp, mask=m2)
        tl.store(ptr_n, sn, mask=m2)
        num = tl.sum(qp_all[:, :, None] * sp[None, :, :], 1) + tl.sum(qn_all[:, :, None] * sn[None, :, :], 1)
        tl.store(prow[:, None] + cv[None, :], num, mask=mg[:, None] & mv[None, :])


@triton.jit
def _finish(o, part, oticket, pos, ticket, b, b64, hkv, p, eps, H: tl.constexpr, HS: tl.constexpr,
            HKV: tl.constexpr, DV: tl.constexpr, GW: tl.constexpr, BGW: tl.constexpr, BDV: tl.constexpr,
            SPLITS: tl.constexpr, NW: tl.constexpr):
    """The last of the KV head's programs (its state heads' splits and its NW window programs) adds up the parts
    of its GW query heads and writes o; the last of the row's KV heads to finish moves pos on (one atomic per
    program; the row's ticket only counts the KV heads)."""
    last = last_to_arrive(oticket + b64 * HKV + hkv, (HS // HKV) * SPLITS + NW)
    og, oc = tl.arange(0, BGW), tl.arange(0, BDV)
    mo = tl.where(last, (og < GW)[:, None] & (oc < DV)[None, :], False)
    md = tl.where(last, og < GW, False)
    prow = part + (b64 * H + hkv * GW + og) * (2 * DV + 2)
    # read past L1: the parts come from programs on other SMs
    num = (tl.load(prow[:, None] + oc[None, :], mask=mo, other=0.0, cache_modifier=".cg")
           + tl.load(prow[:, None] + DV + oc[None, :], mask=mo, other=0.0, cache_modifier=".cg"))
    den = (tl.load(prow + 2 * DV, mask=md, other=0.0, cache_modifier=".cg")
           + tl.load(prow + 2 * DV + 1, mask=md, other=0.0, cache_modifier=".cg"))
    rden = tl.where(den > eps, 1.0 / tl.maximum(den, eps), 0.0)  # no visible key (padding): 0
    tl.store(o + (b64 * H + hkv * GW + og[:, None]) * DV + oc[None, :], (num * rden[:, None]).to(o.dtype.element_ty),
             mask=mo)
    if last:  # every program of this KV head has read pos
        advance_pos(pos, ticket, b, p, HKV)


@triton.jit
def _lolcats_step(q, k, v, wq, wk, gamma, S, Z, win_k, win_v, win_valid, o, part, oticket, valid, pos, ticket,
                  scale, eps, W: tl.constexpr, R: tl.constexpr, H: tl.constexpr, HS: tl.constexpr,
                  HKV: tl.constexpr, DK: tl.constexpr, FH: tl.constexpr, DV: tl.constexpr, G: tl.constexpr,
                  BG: tl.constexpr, BGW: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BFC: tl.constexpr,
                  BKC: tl.constexpr, BV: tl.constexpr, BDV: tl.constexpr, SPLITS: tl.constexpr, NW: tl.constexpr,
                  BGD: tl.constexpr, BDD: tl.constexpr, BRB: tl.constexpr, BVD: tl.constexpr, LOWP: tl.constexpr,
                  HAS_VALID: tl.constexpr):
    # The programs of a KV head side by side, its window programs first: the latency-bound window programs run
    # among the memory-bound state programs rather than after them
    group: tl.constexpr = HS // HKV
    PER_KV: tl.constexpr = NW + group * SPLITS
    GW: tl.constexpr = G * group  # query heads of a KV head
    GN: tl.constexpr = GW // NW  # query heads of a window program
    pid = tl.program_id(0)
    r = pid % PER_KV
    hkv = (pid // PER_KV) % HKV
    b = pid // (PER_KV * HKV)
    b64 = b.to(tl.int64)
    p = tl.load(pos + b)
    if r < NW:
        if HAS_VALID:
            ok_new = tl.load(valid + b) != 0
        else:
            ok_new = p >= 0  # True
        _window_part(q, k, v, gamma, win_k, win_v, win_valid, part, b64, hkv, hkv * GW + r * GN, r == 0, p, ok_new,
                     scale, W, R, H, HKV, DK, DV, GN, BGD, BDD, BRB, BVD, LOWP)
    else:
        hs = hkv * group + (r - NW) // SPLITS
        _state_part(q, wq, wk, S, Z, win_k, win_v, win_valid, part, b64, hs, hkv, (r - NW) % SPLITS,
                    (p + (R - W)) % R, R, H, HS, HKV, DK, FH, DV, G, BG, BD, BF, BFC, BKC, BV, SPLITS)
    _finish(o, part, oticket, pos, ticket, b, b64, hkv, p, eps, H, HS, HKV, DV, GW, BGW, BDV, SPLITS, NW)


def fused_lolcats_step(qr, kr, v, wq, wk, gamma, scale, window, state, valid=None):
    """qr [B, H, Dk], kr [B, Hkv, Dk] (post-RoPE), v [B, Hkv, Dv]; wq [H, Dk, Fh], wk [Hs, Dk, Fh]; gamma [H];
    state with S [B, Hs, 2Fh, Dv], z [B, Hs, 2Fh] (fp32), win_k / win_v [B, R, Hkv, D], win_valid [B, R] (R > W:
    the evicted and the written slot must differ), pos [B], ticket [B], all updated in place, and the step's
    scratch oticket [B, Hkv] (int32, zero between steps) and opart [B, H, 2 Dv + 2] (fp32), allocated here if
    absent (the cache keeps them, so that a step allocates nothing). Returns o [B, H, Dv]."""
    qr, kr, v, wq, wk, gamma = contig(qr, kr, v, wq, wk, gamma)
    check_state(state, "S", "z", "win_k", "win_v", "win_valid", "pos", "ticket")
    b, h, dk = qr.shape
    hkv, dv = kr.shape[1], v.shape[2]
    hs, _, fh = wk.shape
    ring = state["win_k"].shape[1]
    if v.shape[1] != hkv or h % hs or hs % hkv or state["S"].shape != (b, hs, 2 * fh, dv) or ring <= window:
        raise ValueError(f"lolcats step: shapes q {tuple(qr.shape)} k {tuple(kr.shape)} v {tuple(v.shape)} "
                         f"wk {tuple(wk.shape)} S {tuple(state['S'].shape)} ring {ring} window {window} do not fit")
    oticket, opart = state.get("oticket"), state.get("opart")
    if oticket is None:
        oticket = torch.zeros(b, hkv, dtype=torch.int32, device=v.device)
    if opart is None:
        opart = torch.empty(b, h, 2 * dv + 2, dtype=torch.float32, device=v.device)
    g = h // hs
    bg, bf, bd = group_block(g, 1), p2(fh), p2(dk)
    # Launch settings measured on the H100 (8B heads: bench/results/generate.md). One window program per KV head:
    # with tensor-core products it is short (batch 64, state per query head: 117.4 us against 118.5 with two and
    # 123.7 with four; batch 4: 10.5 against 13.8 with one per query head). Many rows (batch 16 and up): state
    # programs of 32 value columns with 4 warps for a state per query head (117.4 against 118.9 with 2 warps, 119.0
    # with 64 columns at 4 warps), 16 columns with 2 warps for 4-row query tiles (GQA-shared states: 55.5 against
    # 62.2 with 4 warps and 32 columns). Few rows (batch 1): the value dim split over 2 (state per query head) or 8
    # programs.
    gw = h // hkv  # query heads per KV head
    few = b * hs < 2 * sms(qr.device)
    if few:
        bv, nw = min(dv, 64 if bg == 1 else 16), 4
    else:
        bv, nw = min(dv, 32 if bg == 1 else 16), 4 if bg == 1 else 2
    n_win = 1
    bv, nw, n_win = TUNE["bv"] or bv, TUNE["num_warps"] or nw, TUNE["window_programs"] or n_win
    if gw % n_win:
        raise ValueError(f"lolcats step: {n_win} window programs per KV head do not divide its {gw} query heads")
    splits = 1
    if TUNE["splits"] or few:
        splits = value_splits(dv, bv, b * hs, qr.device)
        splits = splits if dv % (splits * bv) == 0 else 1
    o = torch.empty(b, h, dv, dtype=v.dtype, device=v.device)
    # tl.dot tiles >= 16
    _lolcats_step[(b * (hs * splits + hkv * n_win),)](
        qr, kr, v, wq, wk, gamma, state["S"], state["z"], state["win_k"], state["win_v"], state["win_valid"], o,
        opart, oticket, valid.contiguous() if valid is not None else o, state["pos"], state["ticket"], float(scale),
        DEN_EPS, W=window, R=ring, H=h, HS=hs, HKV=hkv, DK=dk, FH=fh, DV=dv, G=g, BG=bg, BGW=p2(gw), BD=bd, BF=bf,
        BFC=feature_chunk(bd, bg, bf), BKC=feature_chunk(bd, 1, bf), BV=bv, BDV=p2(dv), SPLITS=splits, NW=n_win,
        BGD=max(16, p2(gw // n_win)), BDD=max(16, bd), BRB=ring_block(window),
        BVD=max(16, p2(dv)), LOWP=window_lowp(qr, state), HAS_VALID=valid is not None, num_warps=nw,
    )
    return o
