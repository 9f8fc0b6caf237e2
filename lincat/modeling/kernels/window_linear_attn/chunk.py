"""Triton form of the LoLCATs sliding-window hybrid: forward and backward as one autograd Function.

Queries come in chunks of C tokens. A chunk sees, exactly, its band of P + 1 key chunks (P = ceil((W - 1) / C)): each
pair there is either in the window (softmax term) or older (linear term). Everything before the band is older for all
queries of the chunk and lives in a linear state S = sum kf v^T, z = sum kf (fp32), carried from chunk to chunk inside
one program. The softmax terms keep their own running max and sums (online softmax), because the window max m_i shifts
the softmax terms against the linear ones: it is part of the function, and its gradient is taken (through the argmax).

Parallelism: one program per (value block, segment, batch x state head). Long sequences are cut into segments of
SEG chunks, each started from the state left by the segments before it; those states come from a cheap pre-pass
(one outer-product sum per segment, then a cumulative sum). The backward runs one pass forward in time (dq, dqf, with
the state) and one backward in time (dk, dv, dkf, with the reverse state dS = sum qf dnum^T), segmented the same way.
"""

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # transformers' remote-code import check skips try blocks; ops.py falls back to PyTorch
    raise

from ..utils import DEN_EPS

# Knobs for tests and benchmarks. seg_chunks: chunks per segment (None: enough segments to fill the GPU).
# split_bwd: the reverse pass as two launches (dk, dkf | dv) with smaller states instead of one.
TUNE = {"seg_chunks": None, "programs": None, "split_bwd": False, "num_warps": None, "num_stages": None, "fwd_bd": None}


def _p2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _prec(dtype) -> str:
    # fp32 inputs get exact fp32 products; 16-bit inputs use the tensor cores either way
    return "ieee" if dtype == torch.float32 else "tf32"


def _programs(device) -> int:
    if TUNE["programs"]:
        return TUNE["programs"]
    if device.type != "cuda":
        return 1
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _segment_chunks(n_chunks: int, parallel: int, device) -> int:
    """Chunks per segment: one segment when (batch x heads x blocks) already fills the GPU."""
    if TUNE["seg_chunks"]:
        return TUNE["seg_chunks"]
    want = triton.cdiv(_programs(device), max(parallel, 1))
    return max(triton.cdiv(n_chunks, want), min(n_chunks, 8))


def _warps(elems: int) -> int:
    return TUNE["num_warps"] or (8 if elems >= 128 * 64 else 4)


def _launch_opts(elems: int) -> dict:
    opts = {"num_warps": _warps(elems)}
    if TUNE["num_stages"]:
        opts["num_stages"] = TUNE["num_stages"]
    return opts


# ----------------------------------------------------------------------------------------------------------------------
# Triton helpers


@triton.jit
def _ptrs(base, b, h, t, x, T, lim, NH: tl.constexpr, X: tl.constexpr):
    """Pointers to rows t / columns x of head h in a contiguous [B, T, NH, X] tensor; rows at or past lim are masked."""
    ptr = base + ((b * T + t[:, None]).to(tl.int64) * NH + h) * X + x[None, :]
    return ptr, (t[:, None] < lim) & (t[:, None] >= 0) & (x[None, :] < X)


@triton.jit
def _load(base, b, h, t, x, T, NH: tl.constexpr, X: tl.constexpr):
    ptr, mask = _ptrs(base, b, h, t, x, T, T, NH, X)
    return tl.load(ptr, mask=mask, other=0.0)


@triton.jit
def _store(base, val, b, h, t, x, T, NH: tl.constexpr, X: tl.constexpr):
    ptr, mask = _ptrs(base, b, h, t, x, T, T, NH, X)
    tl.store(ptr, val.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _row_ptrs(base, b, h, t, T, NH: tl.constexpr):
    """Per-token scalars ([B, T, NH] tensors: den, max, ...)."""
    return base + (b * T + t).to(tl.int64) * NH + h, (t < T) & (t >= 0)


@triton.jit
def _keys_ok(valid, b, t, lim, T, HAS_VALID: tl.constexpr):
    """Keys that exist (t < lim) and are not padding."""
    ok = (t < lim) & (t >= 0)
    if HAS_VALID:
        ok = ok & (tl.load(valid + b * T + t, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _state_ptrs(hs, hz, b, hk, slot, NSLOT, f, d, HK: tl.constexpr, F: tl.constexpr, D: tl.constexpr):
    """States are [B, HK, NSLOT, F, D] / [B, HK, NSLOT, F] fp32 (NSLOT: one per segment start, +1 for the end)."""
    base = ((b * HK + hk) * NSLOT + slot).to(tl.int64)
    ps = hs + base * F * D + f[:, None] * D + d[None, :]
    pz = hz + base * F + f
    return ps, (f[:, None] < F) & (d[None, :] < D), pz, f < F


@triton.jit
def _kv_chunk(kf, v, valid, b, hk, hv, t, lim, T, f, d, PREC: tl.constexpr, HAS_VALID: tl.constexpr,
              HK: tl.constexpr, HV: tl.constexpr, F: tl.constexpr, D: tl.constexpr):
    """One chunk's share of the linear state: kf^T v and sum kf over its non-padding keys below lim."""
    ok = _keys_ok(valid, b, t, lim, T, HAS_VALID)
    kt = _load(kf, b, hk, t, f, T, HK, F)
    kt = tl.where(ok[:, None], kt, 0.0)
    vt = _load(v, b, hv, t, d, T, HV, D)
    return tl.dot(tl.trans(kt), vt, input_precision=PREC), tl.sum(kt.to(tl.float32), 0)


@triton.jit
def _q_chunk(qf, do, den, delta, b, h, t, T, f, d, eps, PREC: tl.constexpr,
             H: tl.constexpr, F: tl.constexpr, D: tl.constexpr):
    """One query chunk's share of the reverse state: qf^T dnum and sum qf dden (dnum = do / den, dden = -do.o / den)."""
    qt = _load(qf, b, h, t, f, T, H, F)
    dot_ = _load(do, b, h, t, d, T, H, D).to(tl.float32)
    pr, mr = _row_ptrs(den, b, h, t, T, H)
    dn = tl.load(pr, mask=mr, other=1.0)
    dl = tl.load(_row_ptrs(delta, b, h, t, T, H)[0], mask=mr, other=0.0)
    rden = tl.where(dn >= eps, 1.0 / tl.maximum(dn, eps), 0.0)
    dden = tl.where(dn >= eps, -dl * rden, 0.0)
    dnum = (dot_ * rden[:, None]).to(qt.dtype)
    return tl.dot(tl.trans(qt), dnum, input_precision=PREC), tl.sum(qt.to(tl.float32) * dden[:, None], 0)


# ----------------------------------------------------------------------------------------------------------------------
# Segment pre-passes: outer-product sums over token ranges, turned into per-segment start states by a cumsum.


@triton.jit
def _seg_kv(kf, v, valid, hs, hz, T, SEG, P, END, NS,
            HK: tl.constexpr, HV: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
            C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr):
    """Keys [cut_s, cut_{s+1}) with cut_s = (s SEG - P) C: segment s's forward pass wants all keys before its first
    band, and the last cut is END (= T - W: the final state leaves out the last W tokens)."""
    i_f, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = i_bh // HK, i_bh % HK
    hv = hk // (HK // HV)
    f = i_f * BF + tl.arange(0, BF)
    d = tl.arange(0, BD)
    c = tl.arange(0, C)
    lo = tl.maximum((i_s * SEG - P) * C, 0)
    hi = tl.where(i_s == NS - 1, END, tl.minimum(tl.maximum(((i_s + 1) * SEG - P) * C, 0), END))
    acc = tl.zeros([BF, BD], tl.float32)
    accz = tl.zeros([BF], tl.float32)
    for t0 in range(lo, hi, C):
        kv, ks = _kv_chunk(kf, v, valid, b, hk, hv, t0 + c, hi, T, f, d, PREC, HAS_VALID, HK, HV, F, D)
        acc += kv
        accz += ks
    ps, ms, pz, mz = _state_ptrs(hs, hz, b, hk, i_s, NS, f, d, HK, F, D)
    tl.store(ps, acc, mask=ms)
    tl.store(pz, accz, mask=mz)


@triton.jit
def _seg_q(qf, do, den, delta, hs, hz, T, SEG, P, NS, eps,
           H: tl.constexpr, HK: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
           C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """Queries [qcut_s, qcut_{s+1}) with qcut_s = (s SEG + P) C (qcut_0 = 0, last = T): segment s's reverse pass wants
    all queries that see its last key chunk as older than their band."""
    i_f, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = i_bh // HK, i_bh % HK
    G: tl.constexpr = H // HK
    f = i_f * BF + tl.arange(0, BF)
    d = tl.arange(0, BD)
    c = tl.arange(0, C)
    lo = tl.where(i_s == 0, 0, tl.minimum((i_s * SEG + P) * C, T))
    hi = tl.where(i_s == NS - 1, T, tl.minimum(((i_s + 1) * SEG + P) * C, T))
    acc = tl.zeros([BF, BD], tl.float32)
    accz = tl.zeros([BF], tl.float32)
    for t0 in range(lo, hi, C):
        t = t0 + c
        tm = tl.where(t < hi, t, T)  # rows past hi belong to the next segment: point them past the end
        for g in range(G):
            qs, zs = _q_chunk(qf, do, den, delta, b, hk * G + g, tm, T, f, d, eps, PREC, H, F, D)
            acc += qs
            accz += zs
    ps, ms, pz, mz = _state_ptrs(hs, hz, b, hk, i_s, NS, f, d, HK, F, D)
    tl.store(ps, acc, mask=ms)
    tl.store(pz, accz, mask=mz)


# ----------------------------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd(q, k, v, qf, kf, gamma, valid, o, den, mx, amax, h0s, h0z, hts, htz,
         T, W, P, SEG, NSLOT, scale, eps,
         H: tl.constexpr, HKV: tl.constexpr, HK: tl.constexpr, DK: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
         C: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
         HAS_VALID: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, PREC: tl.constexpr):
    i_d, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = i_bh // HK, i_bh % HK
    G: tl.constexpr = H // HK
    hv = hk // (HK // HKV)  # the k/v head of every query head this state serves
    c = tl.arange(0, C)
    f = tl.arange(0, BF)
    d = i_d * BD + tl.arange(0, BD)
    x = tl.arange(0, BK)
    S = tl.zeros([BF, BD], tl.float32)
    z = tl.zeros([BF], tl.float32)
    if HAS_H0:
        ps, ms, pz, mz = _state_ptrs(h0s, h0z, b, hk, i_s, NSLOT, f, d, HK, F, D)
        S = tl.load(ps, mask=ms, other=0.0)
        z = tl.load(pz, mask=mz, other=0.0)
    n_chunks = tl.cdiv(T, C)
    n0 = i_s * SEG
    n1 = tl.minimum(n0 + SEG, n_chunks)
    for n in range(n0, n1):
        # the state must cover every chunk before this chunk's band
        if (n > n0) & (n - P - 1 >= 0):
            kv, ks = _kv_chunk(kf, v, valid, b, hk, hv, (n - P - 1) * C + c, T, T, f, d, PREC, HAS_VALID,
                               HK, HKV, F, D)
            S += kv
            z += ks
        tq = n * C + c
        Sc = S.to(qf.dtype.element_ty)
        for g in range(G):
            h = hk * G + g
            qft = _load(qf, b, h, tq, f, T, H, F)
            qt = _load(q, b, h, tq, x, T, H, DK)
            acc = tl.dot(qft, Sc, input_precision=PREC)
            dl = tl.sum(qft.to(tl.float32) * z[None, :], 1)
            m = tl.full([C], -1e30, tl.float32)
            idx = tl.full([C], -1, tl.int32)
            accw = tl.zeros([C, BD], tl.float32)
            dw = tl.zeros([C], tl.float32)
            for p in range(tl.maximum(n - P, 0), n + 1):
                tk = p * C + c
                ok = _keys_ok(valid, b, tk, T, T, HAS_VALID)
                vt = _load(v, b, hv, tk, d, T, HKV, D)
                rel = tk[None, :] - tq[:, None]
                kt = _load(k, b, hv, tk, x, T, HKV, DK)
                s = tl.dot(qt, tl.trans(kt), input_precision=PREC) * scale
                s = tl.where((rel <= 0) & (rel > -W) & ok[None, :], s, float("-inf"))
                mt = tl.max(s, 1)
                idx = tl.where(mt > m, tl.argmax(s, 1).to(tl.int32) + p * C, idx)
                mn = tl.maximum(m, mt)
                e = tl.exp(s - mn[:, None])
                alpha = tl.exp(m - mn)
                accw = accw * alpha[:, None] + tl.dot(e.to(vt.dtype), vt, input_precision=PREC)
                dw = dw * alpha + tl.sum(e, 1)
                m = mn
                if n * C + C - 1 - p * C >= W:  # some pairs of this band chunk are older than the window
                    kft = _load(kf, b, hk, tk, f, T, HK, F)
                    kft = tl.where(ok[:, None], kft, 0.0)
                    a = tl.dot(qft, tl.trans(kft), input_precision=PREC)
                    a = tl.where(rel <= -W, a, 0.0)
                    acc = tl.dot(a.to(vt.dtype), vt, acc=acc, input_precision=PREC)
                    dl += tl.sum(a, 1)
            gm = tl.load(gamma + h)
            acc += gm * accw
            dl += gm * dw
            _store(o, acc / tl.maximum(dl, eps)[:, None], b, h, tq, d, T, H, D)
            if i_d == 0:
                pr, mr = _row_ptrs(den, b, h, tq, T, H)
                tl.store(pr, dl, mask=mr)
                tl.store(_row_ptrs(mx, b, h, tq, T, H)[0], tl.where(m > -1e30, m, 0.0), mask=mr)
                tl.store(_row_ptrs(amax, b, h, tq, T, H)[0], idx, mask=mr)
    if STORE_FINAL:
        # one segment only: the final state covers every token but the last W
        end = T - W
        for p in range(tl.maximum(n_chunks - P - 1, 0), tl.cdiv(tl.maximum(end, 0), C)):
            kv, ks = _kv_chunk(kf, v, valid, b, hk, hv, p * C + c, end, T, f, d, PREC, HAS_VALID, HK, HKV, F, D)
            S += kv
            z += ks
        ps, ms, pz, mz = _state_ptrs(hts, htz, b, hk, 0, 1, f, d, HK, F, D)
        tl.store(ps, S, mask=ms)
        if i_d == 0:
            tl.store(pz, z, mask=mz)


# ----------------------------------------------------------------------------------------------------------------------
# Backward, forward in time: dq (softmax part, with the argmax term) and dqf (linear part).


@triton.jit
def _bwd_dq(q, k, v, kf, gamma, valid, o, do, den, mx, amax, dq, dqf, delta, rsum, dmx, h0s, h0z,
            T, W, P, SEG, NSLOT, scale, eps,
            H: tl.constexpr, HKV: tl.constexpr, HK: tl.constexpr, DK: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
            C: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
            HAS_VALID: tl.constexpr, HAS_H0: tl.constexpr, PREC: tl.constexpr):
    i_f, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = i_bh // HK, i_bh % HK
    G: tl.constexpr = H // HK
    hv = hk // (HK // HKV)
    c = tl.arange(0, C)
    f = i_f * BF + tl.arange(0, BF)
    d = tl.arange(0, BD)
    x = tl.arange(0, BK)
    S = tl.zeros([BF, BD], tl.float32)
    z = tl.zeros([BF], tl.float32)
    if HAS_H0:
        ps, ms, pz, mz = _state_ptrs(h0s, h0z, b, hk, i_s, NSLOT, f, d, HK, F, D)
        S = tl.load(ps, mask=ms, other=0.0)
        z = tl.load(pz, mask=mz, other=0.0)
    n0 = i_s * SEG
    n1 = tl.minimum(n0 + SEG, tl.cdiv(T, C))
    for n in range(n0, n1):
        if (n > n0) & (n - P - 1 >= 0):
            kv, ks = _kv_chunk(kf, v, valid, b, hk, hv, (n - P - 1) * C + c, T, T, f, d, PREC, HAS_VALID,
                               HK, HKV, F, D)
            S += kv
            z += ks
        tq = n * C + c
        Sc = S.to(kf.dtype.element_ty)
        for g in range(G):
            h = hk * G + g
            dot_ = _load(do, b, h, tq, d, T, H, D).to(tl.float32)
            ot = _load(o, b, h, tq, d, T, H, D).to(tl.float32)
            pr, mr = _row_ptrs(den, b, h, tq, T, H)
            dn = tl.load(pr, mask=mr, other=1.0)
            m = tl.load(_row_ptrs(mx, b, h, tq, T, H)[0], mask=mr, other=0.0)
            rden = tl.where(dn >= eps, 1.0 / tl.maximum(dn, eps), 0.0)
            dl = tl.sum(dot_ * ot, 1)
            dden = tl.where(dn >= eps, -dl * rden, 0.0)
            dnum = (dot_ * rden[:, None]).to(Sc.dtype)
            dqft = tl.dot(dnum, tl.trans(Sc), input_precision=PREC) + dden[:, None] * z[None, :]
            qt = _load(q, b, h, tq, x, T, H, DK)
            gm = tl.load(gamma + h)
            dqa = tl.zeros([C, BK], tl.float32)
            r = tl.zeros([C], tl.float32)
            for p in range(tl.maximum(n - P, 0), n + 1):
                tk = p * C + c
                ok = _keys_ok(valid, b, tk, T, T, HAS_VALID)
                rel = tk[None, :] - tq[:, None]
                vt = _load(v, b, hv, tk, d, T, HKV, D)
                da = tl.dot(dnum, tl.trans(vt), input_precision=PREC) + dden[:, None]
                if i_f == 0:  # the softmax part does not depend on the feature block: one program does it
                    kt = _load(k, b, hv, tk, x, T, HKV, DK)
                    s = tl.dot(qt, tl.trans(kt), input_precision=PREC) * scale
                    s = tl.where((rel <= 0) & (rel > -W) & ok[None, :], s, float("-inf"))
                    ed = tl.exp(s - m[:, None]) * da
                    r += tl.sum(ed, 1)
                    dqa = tl.dot((gm * ed).to(kt.dtype), kt, acc=dqa, input_precision=PREC)
                if n * C + C - 1 - p * C >= W:
                    kft = _load(kf, b, hk, tk, f, T, HK, F)
                    kft = tl.where(ok[:, None], kft, 0.0)
                    dqft = tl.dot(tl.where(rel <= -W, da, 0.0).to(kft.dtype), kft, acc=dqft, input_precision=PREC)
            _store(dqf, dqft, b, h, tq, f, T, H, F)
            if i_f == 0:
                # a_ij = gamma exp(s_ij - m_i): m_i moves with the score at its argmax, with weight -sum_j ds_ij
                dm = -gm * r
                pa, _ = _row_ptrs(amax, b, h, tq, T, H)
                am = tl.load(pa, mask=mr, other=-1)
                kg = _load(k, b, hv, am, x, T, HKV, DK).to(tl.float32)
                dqa += dm[:, None] * kg
                _store(dq, dqa * scale, b, h, tq, x, T, H, DK)
                tl.store(_row_ptrs(delta, b, h, tq, T, H)[0], dl, mask=mr)
                tl.store(_row_ptrs(rsum, b, h, tq, T, H)[0], r, mask=mr)
                tl.store(_row_ptrs(dmx, b, h, tq, T, H)[0], dm, mask=mr)


# ----------------------------------------------------------------------------------------------------------------------
# Backward, backward in time: dk (softmax), dkf and dv. dS covers the queries of chunks >= kc + P + 1, which see key
# chunk kc as older than their whole band.


@triton.jit
def _bwd_dkv(q, k, v, qf, kf, gamma, valid, do, den, mx, amax, delta, dmx, dk, dv, dkf, dhs, dhz, d0s, d0z,
             T, W, P, SEG, NSLOT, scale, eps,
             H: tl.constexpr, HKV: tl.constexpr, HK: tl.constexpr, DK: tl.constexpr, F: tl.constexpr,
             D: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
             DO_DK: tl.constexpr, DO_DKF: tl.constexpr, DO_DV: tl.constexpr,
             HAS_VALID: tl.constexpr, HAS_DH: tl.constexpr, STORE_D0: tl.constexpr, PREC: tl.constexpr):
    """DO_DKF needs BD = all of D, DO_DV needs BF = all of F; the block of the other one is program_id(0)."""
    i_x, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = i_bh // HK, i_bh % HK
    G: tl.constexpr = H // HK
    hv = hk // (HK // HKV)
    c = tl.arange(0, C)
    x = tl.arange(0, BK)
    if DO_DV:
        f = tl.arange(0, BF)
        d = i_x * BD + tl.arange(0, BD)
    else:
        f = i_x * BF + tl.arange(0, BF)
        d = tl.arange(0, BD)
    first = i_x == 0  # the softmax dk does not depend on the block: one program does it
    dS = tl.zeros([BF, BD], tl.float32)
    dz = tl.zeros([BF], tl.float32)
    if HAS_DH:
        ps, ms, pz, mz = _state_ptrs(dhs, dhz, b, hk, i_s, NSLOT, f, d, HK, F, D)
        dS = tl.load(ps, mask=ms, other=0.0)
        dz = tl.load(pz, mask=mz, other=0.0)
    n_chunks = tl.cdiv(T, C)
    n0 = i_s * SEG
    n1 = tl.minimum(n0 + SEG, n_chunks)
    for i in range(0, n1 - n0):
        kc = n1 - 1 - i
        if (i > 0) & (kc + P + 1 < n_chunks):
            for g in range(G):
                qs, zs = _q_chunk(qf, do, den, delta, b, hk * G + g, (kc + P + 1) * C + c, T, f, d, eps, PREC,
                                  H, F, D)
                dS += qs
                dz += zs
        tk = kc * C + c
        ok = _keys_ok(valid, b, tk, T, T, HAS_VALID)
        vt = _load(v, b, hv, tk, d, T, HKV, D)
        kft = _load(kf, b, hk, tk, f, T, HK, F)
        kft = tl.where(ok[:, None], kft, 0.0)
        kt = _load(k, b, hv, tk, x, T, HKV, DK)
        dSc = dS.to(kft.dtype)
        dkft = tl.zeros([C, BF], tl.float32)
        dvt = tl.zeros([C, BD], tl.float32)
        dkt = tl.zeros([C, BK], tl.float32)
        if DO_DKF:
            dkft = tl.dot(vt, tl.trans(dSc), input_precision=PREC) + dz[None, :]
        if DO_DV:
            dvt = tl.dot(kft, dSc, input_precision=PREC)
        for qn in range(kc, tl.minimum(kc + P, n_chunks - 1) + 1):
            tq = qn * C + c
            rel = tk[None, :] - tq[:, None]
            older = qn * C + C - 1 - kc * C >= W
            for g in range(G):
                h = hk * G + g
                dot_ = _load(do, b, h, tq, d, T, H, D).to(tl.float32)
                pr, mr = _row_ptrs(den, b, h, tq, T, H)
                dn = tl.load(pr, mask=mr, other=1.0)
                rden = tl.where(dn >= eps, 1.0 / tl.maximum(dn, eps), 0.0)
                dnum = (dot_ * rden[:, None]).to(vt.dtype)
                gm = tl.load(gamma + h)
                qt = _load(q, b, h, tq, x, T, H, DK)
                m = tl.load(_row_ptrs(mx, b, h, tq, T, H)[0], mask=mr, other=0.0)
                s = tl.dot(qt, tl.trans(kt), input_precision=PREC) * scale
                s = tl.where((rel <= 0) & (rel > -W) & ok[None, :], s, float("-inf"))
                e = tl.exp(s - m[:, None])
                if DO_DV:
                    dvt = tl.dot(tl.trans(gm * e).to(vt.dtype), dnum, acc=dvt, input_precision=PREC)
                if DO_DKF or DO_DK:
                    dl = tl.load(_row_ptrs(delta, b, h, tq, T, H)[0], mask=mr, other=0.0)
                    dden = tl.where(dn >= eps, -dl * rden, 0.0)
                    da = tl.dot(dnum, tl.trans(vt), input_precision=PREC) + dden[:, None]
                    if DO_DK:
                        if first:
                            dm = tl.load(_row_ptrs(dmx, b, h, tq, T, H)[0], mask=mr, other=0.0)
                            am = tl.load(_row_ptrs(amax, b, h, tq, T, H)[0], mask=mr, other=-1)
                            ds = gm * e * da + tl.where(am[:, None] == tk[None, :], dm[:, None], 0.0)
                            dkt = tl.dot(tl.trans(ds).to(qt.dtype), qt, acc=dkt, input_precision=PREC)
                    if DO_DKF:
                        if older:
                            qft = _load(qf, b, h, tq, f, T, H, F)
                            dao = tl.where(rel <= -W, da, 0.0).to(qft.dtype)
                            dkft = tl.dot(tl.trans(dao), qft, acc=dkft, input_precision=PREC)
                if DO_DV:
                    if older:
                        qft = _load(qf, b, h, tq, f, T, H, F)
                        a = tl.dot(qft, tl.trans(kft), input_precision=PREC)
                        a = tl.where(rel <= -W, a, 0.0)
                        dvt = tl.dot(tl.trans(a).to(vt.dtype), dnum, acc=dvt, input_precision=PREC)
        if DO_DKF:
            _store(dkf, tl.where(ok[:, None], dkft, 0.0), b, hk, tk, f, T, HK, F)
        if DO_DV:
            _store(dv, dvt, b, hk, tk, d, T, HK, D)
        if DO_DK:
            if first:
                _store(dk, dkt * scale, b, hk, tk, x, T, HK, DK)
    if STORE_D0:
        # one segment only: the initial state's gradient sums over every query, the band ones too
        for qn in range(0, tl.minimum(P + 1, n_chunks)):
            for g in range(G):
                qs, zs = _q_chunk(qf, do, den, delta, b, hk * G + g, qn * C + c, T, f, d, eps, PREC, H, F, D)
                dS += qs
                dz += zs
        ps, ms, pz, mz = _state_ptrs(d0s, d0z, b, hk, 0, 1, f, d, HK, F, D)
        tl.store(ps, dS, mask=ms)
        tl.store(pz, dz, mask=mz)


# ----------------------------------------------------------------------------------------------------------------------
# Host side


def _band(window: int, c: int) -> int:
    return math.ceil((window - 1) / c) if window > 1 else 0


class _WindowLinearAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, qf, kf, gamma, valid, s0, z0, window, scale, output_final_state, chunk):
        b, t, h, dk = q.shape
        hkv, hk, f, d = k.shape[2], kf.shape[2], kf.shape[-1], v.shape[-1]
        c, p = chunk, _band(window, chunk)
        n = triton.cdiv(t, c)
        bk, bf, bd_all = _p2(dk), _p2(f), _p2(d)
        bd = TUNE["fwd_bd"] or bd_all
        nbd = triton.cdiv(d, bd)
        seg = _segment_chunks(n, b * hk * nbd, q.device)
        ns = triton.cdiv(n, seg)
        prec = _prec(v.dtype)
        dev = q.device
        f32 = dict(device=dev, dtype=torch.float32)
        vmask = valid if valid is not None else q
        o = torch.empty(b, t, h, d, device=dev, dtype=v.dtype)
        den = torch.empty(b, t, h, **f32)
        mx = torch.empty(b, t, h, **f32)
        amax = torch.empty(b, t, h, device=dev, dtype=torch.int32)

        # start state of each segment (slot ns is the final state)
        h0s = h0z = None
        if ns > 1:
            h0s, h0z = _segment_states_fwd(kf, v, valid, s0, z0, t, seg, p, max(t - window, 0), ns, c, prec)
        elif s0 is not None:
            h0s, h0z = s0.float().contiguous(), z0.float().contiguous()
        nslot = ns + 1 if ns > 1 else 1
        store_final = output_final_state and ns == 1
        hts = torch.empty(b, hk, f, d, **f32) if store_final else den
        htz = torch.empty(b, hk, f, **f32) if store_final else den
        _fwd[(nbd, ns, b * hk)](
            q, k, v, qf, kf, gamma, vmask, o, den, mx, amax,
            h0s if h0s is not None else den, h0z if h0z is not None else den, hts, htz,
            t, window, p, seg, nslot, scale, DEN_EPS,
            H=h, HKV=hkv, HK=hk, DK=dk, F=f, D=d, C=c, BK=bk, BF=bf, BD=bd,
            HAS_VALID=valid is not None, HAS_H0=h0s is not None, STORE_FINAL=store_final, PREC=prec,
            **_launch_opts(bf * bd),
        )
        final = None
        if output_final_state:
            final = (hts, htz) if store_final else (h0s[:, :, ns].contiguous(), h0z[:, :, ns].contiguous())
        ctx.save_for_backward(q, k, v, qf, kf, gamma, valid, o, den, mx, amax, h0s, h0z)
        ctx.cfg = (window, scale, c, p, seg, ns, nslot, s0 is not None)
        ctx.s0_dtype = s0.dtype if s0 is not None else None
        ctx.set_materialize_grads(False)
        if final is None:
            return o, None, None
        return o, final[0], final[1]

    @staticmethod
    def backward(ctx, do, dst, dzt):
        q, k, v, qf, kf, gamma, valid, o, den, mx, amax, h0s, h0z = ctx.saved_tensors
        window, scale, c, p, seg, ns, nslot, has_s0 = ctx.cfg
        b, t, h, dk = q.shape
        hkv, hk, f, d = k.shape[2], kf.shape[2], kf.shape[-1], v.shape[-1]
        bk, bf, bd = _p2(dk), _p2(f), _p2(d)
        prec = _prec(v.dtype)
        dev = q.device
        f32 = dict(device=dev, dtype=torch.float32)
        do = do.contiguous()
        vmask = valid if valid is not None else q
        common = dict(H=h, HKV=hkv, HK=hk, DK=dk, F=f, D=d, C=c, BK=bk, HAS_VALID=valid is not None, PREC=prec)

        dq = torch.empty_like(q)
        dqf = torch.empty_like(qf)
        delta = torch.empty(b, t, h, **f32)
        rsum = torch.empty(b, t, h, **f32)
        dmx = torch.empty(b, t, h, **f32)
        bf_q = min(bf, 128) if bf * bd > 128 * 128 else bf
        _bwd_dq[(triton.cdiv(f, bf_q), ns, b * hk)](
            q, k, v, kf, gamma, vmask, o, do, den, mx, amax, dq, dqf, delta, rsum, dmx,
            h0s if h0s is not None else den, h0z if h0z is not None else den,
            t, window, p, seg, nslot, scale, DEN_EPS, BF=bf_q, BD=bd, HAS_H0=h0s is not None,
            **common, **_launch_opts(bf_q * bd),
        )

        # reverse start state of each segment: the queries after it (plus the initial state's gradient at slot 0)
        dhs = dhz = tot_s = tot_z = None
        if ns > 1:
            dhs, dhz, tot_s, tot_z = _segment_states_bwd(qf, do, den, delta, t, seg, p, ns, c, hk, prec)
        need_d0 = has_s0 and (ctx.needs_input_grad[7] or ctx.needs_input_grad[8])
        store_d0 = need_d0 and ns == 1
        d0s = torch.empty(b, hk, f, d, **f32) if store_d0 else den
        d0z = torch.empty(b, hk, f, **f32) if store_d0 else den

        shared_kv = hk != hkv  # several state heads write the same k/v head: fp32 partials, summed below
        dk_ = torch.empty(b, t, hk, dk, **f32) if shared_kv else torch.empty_like(k)
        dv_ = torch.empty(b, t, hk, d, **f32) if shared_kv else torch.empty_like(v)
        dkf = torch.empty_like(kf)
        args = (q, k, v, qf, kf, gamma, vmask, do, den, mx, amax, delta, dmx, dk_, dv_, dkf,
                dhs if dhs is not None else den, dhz if dhz is not None else den, d0s, d0z,
                t, window, p, seg, ns if dhs is not None else 1, scale, DEN_EPS)
        has_dh = dhs is not None
        if TUNE["split_bwd"] or bf * bd > 128 * 128:
            bf_k = min(bf, 64)
            bd_v = min(bd, 64)
            _bwd_dkv[(triton.cdiv(f, bf_k), ns, b * hk)](
                *args, BF=bf_k, BD=bd, DO_DK=True, DO_DKF=True, DO_DV=False, HAS_DH=has_dh, STORE_D0=store_d0,
                **common, **_launch_opts(bf_k * bd))
            _bwd_dkv[(triton.cdiv(d, bd_v), ns, b * hk)](
                *args, BF=bf, BD=bd_v, DO_DK=False, DO_DKF=False, DO_DV=True, HAS_DH=has_dh, STORE_D0=False,
                **common, **_launch_opts(bf * bd_v))
        else:
            _bwd_dkv[(1, ns, b * hk)](
                *args, BF=bf, BD=bd, DO_DK=True, DO_DKF=True, DO_DV=True, HAS_DH=has_dh, STORE_D0=store_d0,
                **common, **_launch_opts(bf * bd))
        if shared_kv:
            dk_ = dk_.view(b, t, hkv, hk // hkv, dk).sum(3).to(k.dtype)
            dv_ = dv_.view(b, t, hkv, hk // hkv, d).sum(3).to(v.dtype)

        ds0 = dz0 = None
        if need_d0:
            ds0, dz0 = (d0s, d0z) if store_d0 else (tot_s, tot_z)
        if dst is not None or dzt is not None:
            # the final state holds s0 and every key but the last W: its gradient reaches those directly
            dkf, dv_, ds0, dz0 = _final_state_grad(kf, v, valid, dst, dzt, window, dkf, dv_, ds0, dz0, need_d0)
        dgamma = rsum.sum((0, 1)).to(gamma.dtype) if ctx.needs_input_grad[5] else None
        ds0 = ds0.to(ctx.s0_dtype) if need_d0 else None
        dz0 = dz0.to(ctx.s0_dtype) if need_d0 else None
        return dq, dk_, dv_, dqf, dkf, dgamma, None, ds0, dz0, None, None, None, None


def _segment_states_fwd(kf, v, valid, s0, z0, t, seg, p, end, ns, c, prec):
    """States at the start of each segment (slot s) and the final one (slot ns): s0 plus a cumsum of segment sums."""
    b, _, hk, f = kf.shape
    hv, d = v.shape[2], v.shape[3]
    bf, bd = _p2(f), _p2(d)
    bf_s = min(bf, 64) if bf * bd > 64 * 128 else bf
    loc_s = torch.empty(b, hk, ns, f, d, device=kf.device, dtype=torch.float32)
    loc_z = torch.empty(b, hk, ns, f, device=kf.device, dtype=torch.float32)
    _seg_kv[(triton.cdiv(f, bf_s), ns, b * hk)](
        kf, v, valid if valid is not None else kf, loc_s, loc_z, t, seg, p, end, ns,
        HK=hk, HV=hv, F=f, D=d, C=c, BF=bf_s, BD=bd, HAS_VALID=valid is not None, PREC=prec,
        **_launch_opts(bf_s * bd))
    hs = torch.zeros(b, hk, ns + 1, f, d, device=kf.device, dtype=torch.float32)
    hz = torch.zeros(b, hk, ns + 1, f, device=kf.device, dtype=torch.float32)
    torch.cumsum(loc_s, 2, out=hs[:, :, 1:])
    torch.cumsum(loc_z, 2, out=hz[:, :, 1:])
    if s0 is not None:
        hs += s0.float()[:, :, None]
        hz += z0.float()[:, :, None]
    return hs, hz


def _segment_states_bwd(qf, do, den, delta, t, seg, p, ns, c, hk, prec):
    """Reverse start states: slot s holds the sum of qf dnum^T (and qf dden) over the queries that see all of
    segment s as older than their band, i.e. over the query ranges of the segments after s. Also returns the sum
    over all queries, which is the initial state's gradient."""
    b, _, h, f = qf.shape
    d = do.shape[-1]
    bf, bd = _p2(f), _p2(d)
    bf_s = min(bf, 64) if bf * bd > 64 * 128 else bf
    loc_s = torch.empty(b, hk, ns, f, d, device=qf.device, dtype=torch.float32)
    loc_z = torch.empty(b, hk, ns, f, device=qf.device, dtype=torch.float32)
    _seg_q[(triton.cdiv(f, bf_s), ns, b * hk)](
        qf, do, den, delta, loc_s, loc_z, t, seg, p, ns, DEN_EPS,
        H=h, HK=hk, F=f, D=d, C=c, BF=bf_s, BD=bd, PREC=prec, **_launch_opts(bf_s * bd))
    after_s = loc_s.flip(2).cumsum(2).flip(2)  # slot s: segments >= s
    after_z = loc_z.flip(2).cumsum(2).flip(2)
    hs = torch.zeros_like(loc_s)
    hz = torch.zeros_like(loc_z)
    hs[:, :, :-1] = after_s[:, :, 1:]
    hz[:, :, :-1] = after_z[:, :, 1:]
    return hs, hz, after_s[:, :, 0], after_z[:, :, 0]


def _final_state_grad(kf, v, valid, dst, dzt, window, dkf, dv, ds0, dz0, need_d0):
    """Rare path (the final state is part of the loss): add its gradient to the keys it holds, in PyTorch."""
    b, t, hk, f = kf.shape
    old = max(t - window, 0)
    okf = kf[:, :old].float()
    if valid is not None:
        okf = okf * valid[:, :old, None, None]
    vk = v[:, :old].float().repeat_interleave(hk // v.shape[2], dim=2)
    dst = torch.zeros(b, hk, f, v.shape[-1], device=kf.device) if dst is None else dst.float()
    dzt = torch.zeros(b, hk, f, device=kf.device) if dzt is None else dzt.float()
    gk = torch.einsum("bthd,bhfd->bthf", vk, dst) + dzt[:, None]
    if valid is not None:
        gk = gk * valid[:, :old, None, None]
    dkf = dkf.clone()
    dkf[:, :old] += gk.to(dkf.dtype)
    gv = torch.einsum("bthf,bhfd->bthd", okf, dst)
    hv = v.shape[2]
    gv = gv.view(b, old, hv, hk // hv, -1).sum(3)
    dv = dv.clone()
    dv[:, :old] += gv.to(dv.dtype)
    if need_d0:
        ds0 = dst if ds0 is None else ds0 + dst
        dz0 = dzt if dz0 is None else dz0 + dzt
    return dkf, dv, ds0, dz0


def chunk_window_linear_attn(
    q, k, v, qf, kf, gamma, window, scale, valid=None, initial_state=None, output_final_state=False, chunk_size=64
):
    """Same contract as `chunk_window_linear_attn_torch`: returns (o [B, T, H, D] in v.dtype, final state or None).

    initial_state / final state: (S [B, Hk, F, D], z [B, Hk, F]) fp32; the final state covers every token except the
    last `window`. Differentiable in q, k, v, qf, kf, gamma and the initial state.
    """
    dt = v.dtype
    q, k, qf, kf = (x.to(dt).contiguous() for x in (q, k, qf, kf))
    v = v.contiguous()
    c = chunk_size if chunk_size in (16, 32, 64, 128) else 64
    s0 = z0 = None
    if initial_state is not None:
        s0, z0 = initial_state
    vmask = None if valid is None else valid.to(torch.uint8).contiguous()
    o, fs, fz = _WindowLinearAttn.apply(q, k, v, qf, kf, gamma.float().contiguous(), vmask, s0, z0, int(window),
                                        float(scale), bool(output_final_state), c)
    return o, ((fs, fz) if output_final_state else None)
