"""Fused Triton decode step of sliding-window softmax attention with optional sink tokens: one launch per layer per
token.

One program per (row, KV head, value split): scores of the G query heads of the group against the ring (the new
token taken from registers in its slot pos % R) and against the sinks that have left the window (recorded position
<= pos - W), one online softmax over both, and the readout of its value columns, all with tensor-core products
(fused_utils.softmax_block). The same launch writes the new token to
the ring and, while a row has recorded fewer than S real tokens, to the next sink row (its position is pos, so no
reader of this step can see it; readers also skip rows at or past the row's sink count, which only the last program
of the row updates, together with `pos`).

Matches kernels/step_torch.py:swa_step_torch.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # transformers' remote-code import check skips try blocks; ops.py falls back to PyTorch
    raise

from ..fused_utils import (TUNE, check_state, contig, key_scores, last_to_arrive, p2, ring_block, ring_softmax,
                           softmax_block, value_splits, window_lowp, window_query)
from ..utils import DEN_EPS


@triton.jit
def _swa_step(qr, kr, v, win_k, win_v, win_valid, sink_k, sink_v, sink_pos, sink_valid, n_valid, o, valid, pos,
              ticket, scale, eps,
              R: tl.constexpr, NS: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr,
              DV: tl.constexpr, G: tl.constexpr, BGD: tl.constexpr, BD: tl.constexpr, BRB: tl.constexpr,
              BS: tl.constexpr, BV: tl.constexpr, NDV: tl.constexpr, LOWP: tl.constexpr, HAS_VALID: tl.constexpr,
              HAS_SINKS: tl.constexpr, W: tl.constexpr):
    pid = tl.program_id(0)
    j = pid % NDV
    bh = pid // NDV
    b = bh // HKV
    hkv = bh % HKV
    b64 = b.to(tl.int64)
    p = tl.load(pos + b)
    w_slot = p % R
    og, od = tl.arange(0, BGD), tl.arange(0, BD)
    mg, md = og < G, od < DK
    DVP: tl.constexpr = DV // NDV
    cv = j * DVP + tl.arange(0, BV)
    mv = (tl.arange(0, BV) < DVP) & (cv < DV)
    if HAS_VALID:
        ok_new = tl.load(valid + b) != 0
    else:
        ok_new = p >= 0  # True
    h0 = hkv * G
    # the group's query heads (rows of a tensor-core tile, padded to BGD >= 16) over every ring slot, then the sinks
    qt, kn = window_query(qr, kr, win_k, b64, h0, hkv, og, mg, od, md, H, HKV, DK, LOWP)
    vn = tl.load(v + (b64 * HKV + hkv) * DV + cv, mask=mv, other=0.0)
    m, den, acc = ring_softmax(qt, kn, vn, win_k, win_v, win_valid, ok_new, b64, hkv, p, scale, od, md, cv, mv, R, R,
                               HKV, DK, DV, BRB, LOWP)
    if HAS_SINKS:
        osn = tl.arange(0, BS)
        nv = tl.load(n_valid + b)
        spos = tl.load(sink_pos + b64 * (NS + 1) + osn, mask=osn < NS, other=0)
        sok = tl.load(sink_valid + b64 * (NS + 1) + osn, mask=osn < NS, other=0) != 0
        vis = (osn < nv) & sok & (spos <= p - W)
        srow = (b64 * (NS + 1) + osn[:, None]) * HKV + hkv
        kt = tl.load(sink_k + srow * DK + od[None, :], mask=vis[:, None] & md[None, :], other=0.0)
        vt = tl.load(sink_v + srow * DV + cv[None, :], mask=vis[:, None] & mv[None, :], other=0.0)
        m, den, acc = softmax_block(key_scores(qt, kt, vis, scale, LOWP), vt, m, den, acc, LOWP)
        rec = ok_new & (nv < NS)  # this token becomes sink number nv
        tl.store(sink_v + ((b64 * (NS + 1) + nv) * HKV + hkv) * DV + cv, vn.to(sink_v.dtype.element_ty),
                 mask=tl.where(rec, mv, False))
    rden = tl.where(den > eps, 1.0 / tl.maximum(den, eps), 0.0)  # no visible key (padding): 0
    tl.store(o + (b64 * H + h0 + og[:, None]) * DV + cv[None, :], (acc * rden[:, None]).to(o.dtype.element_ty),
             mask=mg[:, None] & mv[None, :])
    tl.store(win_v + ((b64 * R + w_slot) * HKV + hkv) * DV + cv, vn.to(win_v.dtype.element_ty), mask=mv)
    mk = tl.where(j == 0, md, False)
    tl.store(win_k + ((b64 * R + w_slot) * HKV + hkv) * DK + od, kn.to(win_k.dtype.element_ty), mask=mk)
    first = (j == 0) & (hkv == 0)
    tl.store(win_valid + b64 * R + w_slot, ok_new, mask=first)
    if HAS_SINKS:
        tl.store(sink_k + ((b64 * (NS + 1) + nv) * HKV + hkv) * DK + od, kn.to(sink_k.dtype.element_ty),
                 mask=tl.where(rec, mk, False))
        tl.store(sink_pos + b64 * (NS + 1) + nv, p, mask=first & rec)
        tl.store(sink_valid + b64 * (NS + 1) + nv, ok_new, mask=first & rec)
    # the last program of the row: pos (and the sink count) move on; every program has read them by now
    last = last_to_arrive(ticket + b, HKV * NDV)
    tl.store(pos + b, p + 1, mask=last)
    if HAS_SINKS:
        tl.store(n_valid + b, nv + ok_new.to(nv.dtype), mask=last)


def fused_swa_step(qr, kr, v, scale, window, state, valid=None):
    """qr [B, H, D], kr [B, Hkv, D] (post-RoPE), v [B, Hkv, Dv]; state with the ring win_k / win_v [B, R, Hkv, D],
    win_valid [B, R], pos [B], ticket [B] and, for sinks, sink_k / sink_v [B, S + 1, Hkv, D], sink_pos / sink_valid
    [B, S + 1], n_valid [B] (the last row is update_sinks' spare: unused here); all updated in place.
    Returns o [B, H, Dv]."""
    qr, kr, v = contig(qr, kr, v)
    check_state(state, "win_k", "win_v", "win_valid", "pos", "ticket")
    b, h, dk = qr.shape
    hkv, dv = kr.shape[1], v.shape[2]
    ring = state["win_k"].shape[1]
    if v.shape[1] != hkv or h % hkv:
        raise ValueError(f"swa step: shapes q {tuple(qr.shape)} k {tuple(kr.shape)} v {tuple(v.shape)} do not fit")
    sinks = "sink_k" in state
    ns = state["sink_k"].shape[1] - 1 if sinks else 0
    if sinks:
        check_state(state, "sink_k", "sink_v", "sink_pos", "sink_valid", "n_valid")
    g = h // hkv
    # one tile of value columns per program; split over programs only to fill the GPU at small batch
    ndv = value_splits(dv, TUNE["bv"] or 16, b * hkv, v.device)
    o = torch.empty(b, h, dv, dtype=v.dtype, device=v.device)
    sk = [state[n] for n in ("sink_k", "sink_v", "sink_pos", "sink_valid", "n_valid")] if sinks else [o] * 5
    # tl.dot tiles >= 16
    _swa_step[(b * hkv * ndv,)](
        qr, kr, v, state["win_k"], state["win_v"], state["win_valid"], *sk, o, valid.contiguous() if valid is not None else o,
        state["pos"], state["ticket"], float(scale), DEN_EPS, R=ring, NS=ns, H=h, HKV=hkv, DK=dk, DV=dv, G=g,
        BGD=max(16, p2(g)), BD=max(16, p2(dk)), BRB=ring_block(ring),
        BS=max(16, p2(ns)), BV=max(16, p2(dv // ndv)), NDV=ndv, LOWP=window_lowp(qr, state), HAS_VALID=valid is not None,
        HAS_SINKS=sinks, W=window, num_warps=TUNE["num_warps"] or 4,
    )
    return o
