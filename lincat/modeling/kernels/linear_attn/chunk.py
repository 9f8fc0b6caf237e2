"""Triton form of normalized causal linear attention (Hedgehog): forward and backward as one autograd Function.

Queries come in chunks of C tokens. Within a chunk the pairs are formed exactly (causal mask); everything before the
chunk lives in a linear state S = sum kf v^T, z = sum kf (fp32), carried from chunk to chunk inside one program, so
qf, kf and v are read once and the state never goes through memory.

Parallelism: one program per (value block, segment, batch x state head). Long sequences are cut into segments of
SEG chunks, each started from the state left by the segments before it; those states come from a cheap pre-pass
(one outer-product sum per segment, then a cumulative sum). The backward runs one pass forward in time (dqf, with
the state) and one backward in time (dkf, dv, with the reverse state dS = sum qf dnum^T), segmented the same way.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # transformers' remote-code import check skips try blocks; ops.py falls back to PyTorch
    raise

from ..utils import DEN_EPS

# Knobs for tests and benchmarks. seg_chunks: chunks per segment (None: enough segments to fill the GPU).
# split_bwd: the reverse pass as two launches (dkf | dv) with smaller states instead of one.
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
def _fwd(qf, kf, v, valid, o, den, h0s, h0z, hts, htz, T, SEG, NSLOT, eps,
         H: tl.constexpr, HK: tl.constexpr, HV: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
         C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
         HAS_VALID: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, PREC: tl.constexpr):
    i_d, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = i_bh // HK, i_bh % HK
    G: tl.constexpr = H // HK
    hv = hk // (HK // HV)
    c = tl.arange(0, C)
    f = tl.arange(0, BF)
    d = i_d * BD + tl.arange(0, BD)
    causal = c[:, None] >= c[None, :]
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
        t = n * C + c
        if n > n0:  # the state must cover every chunk before this one
            kv, ks = _kv_chunk(kf, v, valid, b, hk, hv, t - C, T, T, f, d, PREC, HAS_VALID, HK, HV, F, D)
            S += kv
            z += ks
        ok = _keys_ok(valid, b, t, T, T, HAS_VALID)
        kt = tl.where(ok[:, None], _load(kf, b, hk, t, f, T, HK, F), 0.0)
        vt = _load(v, b, hv, t, d, T, HV, D)
        Sc = S.to(kt.dtype)
        for g in range(G):
            h = hk * G + g
            qt = _load(qf, b, h, t, f, T, H, F)
            a = tl.where(causal, tl.dot(qt, tl.trans(kt), input_precision=PREC), 0.0)
            acc = tl.dot(qt, Sc, input_precision=PREC)
            acc = tl.dot(a.to(vt.dtype), vt, acc=acc, input_precision=PREC)
            dl = tl.sum(qt.to(tl.float32) * z[None, :], 1) + tl.sum(a, 1)
            _store(o, acc / tl.maximum(dl, eps)[:, None], b, h, t, d, T, H, D)
            if i_d == 0:
                pr, mr = _row_ptrs(den, b, h, t, T, H)
                tl.store(pr, dl, mask=mr)
    if STORE_FINAL:  # one segment only
        if n1 > n0:
            kv, ks = _kv_chunk(kf, v, valid, b, hk, hv, (n1 - 1) * C + c, T, T, f, d, PREC, HAS_VALID,
                               HK, HV, F, D)
            S += kv
            z += ks
        ps, ms, pz, mz = _state_ptrs(hts, htz, b, hk, 0, 1, f, d, HK, F, D)
        tl.store(ps, S, mask=ms)
        if i_d == 0:
            tl.store(pz, z, mask=mz)


# ----------------------------------------------------------------------------------------------------------------------
# Backward, forward in time: dqf = dnum S^T + dden z + (intra-chunk part).


@triton.jit
def _bwd_dq(kf, v, valid, o, do, den, dqf, delta, h0s, h0z, T, SEG, NSLOT, eps,
            H: tl.constexpr, HK: tl.constexpr, HV: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
            C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
            HAS_VALID: tl.constexpr, HAS_H0: tl.constexpr, PREC: tl.constexpr):
    i_f, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = i_bh // HK, i_bh % HK
    G: tl.constexpr = H // HK
    hv = hk // (HK // HV)
    c = tl.arange(0, C)
    f = i_f * BF + tl.arange(0, BF)
    d = tl.arange(0, BD)
    causal = c[:, None] >= c[None, :]
    S = tl.zeros([BF, BD], tl.float32)
    z = tl.zeros([BF], tl.float32)
    if HAS_H0:
        ps, ms, pz, mz = _state_ptrs(h0s, h0z, b, hk, i_s, NSLOT, f, d, HK, F, D)
        S = tl.load(ps, mask=ms, other=0.0)
        z = tl.load(pz, mask=mz, other=0.0)
    n0 = i_s * SEG
    n1 = tl.minimum(n0 + SEG, tl.cdiv(T, C))
    for n in range(n0, n1):
        t = n * C + c
        if n > n0:
            kv, ks = _kv_chunk(kf, v, valid, b, hk, hv, t - C, T, T, f, d, PREC, HAS_VALID, HK, HV, F, D)
            S += kv
            z += ks
        ok = _keys_ok(valid, b, t, T, T, HAS_VALID)
        kt = tl.where(ok[:, None], _load(kf, b, hk, t, f, T, HK, F), 0.0)
        vt = _load(v, b, hv, t, d, T, HV, D)
        Sc = S.to(kt.dtype)
        for g in range(G):
            h = hk * G + g
            dot_ = _load(do, b, h, t, d, T, H, D).to(tl.float32)
            ot = _load(o, b, h, t, d, T, H, D).to(tl.float32)
            pr, mr = _row_ptrs(den, b, h, t, T, H)
            dn = tl.load(pr, mask=mr, other=1.0)
            rden = tl.where(dn >= eps, 1.0 / tl.maximum(dn, eps), 0.0)
            dl = tl.sum(dot_ * ot, 1)
            dden = tl.where(dn >= eps, -dl * rden, 0.0)
            dnum = (dot_ * rden[:, None]).to(kt.dtype)
            da = tl.dot(dnum, tl.trans(vt), input_precision=PREC) + dden[:, None]
            da = tl.where(causal, da, 0.0)
            dqt = tl.dot(dnum, tl.trans(Sc), input_precision=PREC) + dden[:, None] * z[None, :]
            dqt = tl.dot(da.to(kt.dtype), kt, acc=dqt, input_precision=PREC)
            _store(dqf, dqt, b, h, t, f, T, H, F)
            if i_f == 0:
                tl.store(_row_ptrs(delta, b, h, t, T, H)[0], dl, mask=mr)


# ----------------------------------------------------------------------------------------------------------------------
# Backward, backward in time: dkf = v dS^T + dz + (intra), dv = kf dS + (intra). dS covers the later chunks.


@triton.jit
def _bwd_dkv(qf, kf, v, valid, do, den, delta, dkf, dv, dhs, dhz, d0s, d0z, T, SEG, NSLOT, eps,
             H: tl.constexpr, HK: tl.constexpr, HV: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
             C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, DO_DKF: tl.constexpr, DO_DV: tl.constexpr,
             HAS_VALID: tl.constexpr, HAS_DH: tl.constexpr, STORE_D0: tl.constexpr, PREC: tl.constexpr):
    """DO_DKF needs BD = all of D, DO_DV needs BF = all of F; the block of the other one is program_id(0)."""
    i_x, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = i_bh // HK, i_bh % HK
    G: tl.constexpr = H // HK
    hv = hk // (HK // HV)
    c = tl.arange(0, C)
    if DO_DV:
        f = tl.arange(0, BF)
        d = i_x * BD + tl.arange(0, BD)
    else:
        f = i_x * BF + tl.arange(0, BF)
        d = tl.arange(0, BD)
    causal = c[:, None] >= c[None, :]
    dS = tl.zeros([BF, BD], tl.float32)
    dz = tl.zeros([BF], tl.float32)
    if HAS_DH:
        ps, ms, pz, mz = _state_ptrs(dhs, dhz, b, hk, i_s, NSLOT, f, d, HK, F, D)
        dS = tl.load(ps, mask=ms, other=0.0)
        dz = tl.load(pz, mask=mz, other=0.0)
    n0 = i_s * SEG
    n1 = tl.minimum(n0 + SEG, tl.cdiv(T, C))
    for i in range(0, n1 - n0):
        t = (n1 - 1 - i) * C + c
        if i > 0:
            for g in range(G):
                qs, zs = _q_chunk(qf, do, den, delta, b, hk * G + g, t + C, T, f, d, eps, PREC, H, F, D)
                dS += qs
                dz += zs
        ok = _keys_ok(valid, b, t, T, T, HAS_VALID)
        kt = tl.where(ok[:, None], _load(kf, b, hk, t, f, T, HK, F), 0.0)
        vt = _load(v, b, hv, t, d, T, HV, D)
        dSc = dS.to(kt.dtype)
        dkt = tl.zeros([C, BF], tl.float32)
        dvt = tl.zeros([C, BD], tl.float32)
        if DO_DKF:
            dkt = tl.dot(vt, tl.trans(dSc), input_precision=PREC) + dz[None, :]
        if DO_DV:
            dvt = tl.dot(kt, dSc, input_precision=PREC)
        for g in range(G):
            h = hk * G + g
            qt = _load(qf, b, h, t, f, T, H, F)
            dot_ = _load(do, b, h, t, d, T, H, D).to(tl.float32)
            pr, mr = _row_ptrs(den, b, h, t, T, H)
            dn = tl.load(pr, mask=mr, other=1.0)
            rden = tl.where(dn >= eps, 1.0 / tl.maximum(dn, eps), 0.0)
            dnum = (dot_ * rden[:, None]).to(kt.dtype)
            if DO_DKF:
                dl = tl.load(_row_ptrs(delta, b, h, t, T, H)[0], mask=mr, other=0.0)
                dden = tl.where(dn >= eps, -dl * rden, 0.0)
                da = tl.dot(dnum, tl.trans(vt), input_precision=PREC) + dden[:, None]
                da = tl.where(causal, da, 0.0)
                dkt = tl.dot(tl.trans(da).to(qt.dtype), qt, acc=dkt, input_precision=PREC)
            if DO_DV:
                a = tl.where(causal, tl.dot(qt, tl.trans(kt), input_precision=PREC), 0.0)
                dvt = tl.dot(tl.trans(a).to(kt.dtype), dnum, acc=dvt, input_precision=PREC)
        if DO_DKF:
            _store(dkf, tl.where(ok[:, None], dkt, 0.0), b, hk, t, f, T, HK, F)
        if DO_DV:
            _store(dv, dvt, b, hk, t, d, T, HK, D)
    if STORE_D0:  # one segment only: the initial state's gradient sums over every query
        if n1 > n0:
            for g in range(G):
                qs, zs = _q_chunk(qf, do, den, delta, b, hk * G + g, n0 * C + c, T, f, d, eps, PREC, H, F, D)
                dS += qs
                dz += zs
        ps, ms, pz, mz = _state_ptrs(d0s, d0z, b, hk, 0, 1, f, d, HK, F, D)
        tl.store(ps, dS, mask=ms)
        tl.store(pz, dz, mask=mz)


# ----------------------------------------------------------------------------------------------------------------------
# Host side


class _LinearAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qf, kf, v, valid, s0, z0, output_final_state, chunk):
        b, t, h, f = qf.shape
        hk, hv, d = kf.shape[2], v.shape[2], v.shape[-1]
        c = chunk
        n = triton.cdiv(t, c)
        bf, bd_all = _p2(f), _p2(d)
        bd = TUNE["fwd_bd"] or (bd_all if bf * bd_all <= 128 * 128 else max(16, 128 * 128 // bf))
        nbd = triton.cdiv(d, bd)
        seg = _segment_chunks(n, b * hk * nbd, qf.device)
        ns = triton.cdiv(n, seg)
        prec = _prec(v.dtype)
        f32 = dict(device=qf.device, dtype=torch.float32)
        vmask = valid if valid is not None else qf
        o = torch.empty(b, t, h, d, device=qf.device, dtype=v.dtype)
        den = torch.empty(b, t, h, **f32)

        h0s = h0z = None
        if ns > 1:  # start state of each segment; slot ns is the final state
            h0s, h0z = _segment_states_fwd(kf, v, valid, s0, z0, t, seg, 0, t, ns, c, prec)
        elif s0 is not None:
            h0s, h0z = s0.float().contiguous(), z0.float().contiguous()
        nslot = ns + 1 if ns > 1 else 1
        store_final = output_final_state and ns == 1
        hts = torch.empty(b, hk, f, d, **f32) if store_final else den
        htz = torch.empty(b, hk, f, **f32) if store_final else den
        _fwd[(nbd, ns, b * hk)](
            qf, kf, v, vmask, o, den, h0s if h0s is not None else den, h0z if h0z is not None else den, hts, htz,
            t, seg, nslot, DEN_EPS, H=h, HK=hk, HV=hv, F=f, D=d, C=c, BF=bf, BD=bd,
            HAS_VALID=valid is not None, HAS_H0=h0s is not None, STORE_FINAL=store_final, PREC=prec,
            **_launch_opts(bf * bd),
        )
        ctx.save_for_backward(qf, kf, v, valid, o, den, h0s, h0z)
        ctx.cfg = (c, seg, ns, nslot, s0 is not None, None if s0 is None else s0.dtype)
        ctx.set_materialize_grads(False)
        if not output_final_state:
            return o, None, None
        if store_final:
            return o, hts, htz
        return o, h0s[:, :, ns].contiguous(), h0z[:, :, ns].contiguous()

    @staticmethod
    def backward(ctx, do, dst, dzt):
        qf, kf, v, valid, o, den, h0s, h0z = ctx.saved_tensors
        c, seg, ns, nslot, has_s0, s0_dtype = ctx.cfg
        b, t, h, f = qf.shape
        hk, hv, d = kf.shape[2], v.shape[2], v.shape[-1]
        bf, bd = _p2(f), _p2(d)
        prec = _prec(v.dtype)
        f32 = dict(device=qf.device, dtype=torch.float32)
        do = do.contiguous()
        vmask = valid if valid is not None else qf
        common = dict(H=h, HK=hk, HV=hv, F=f, D=d, C=c, HAS_VALID=valid is not None, PREC=prec)

        dqf = torch.empty_like(qf)
        delta = torch.empty(b, t, h, **f32)
        bf_q = bf if bf * bd <= 128 * 128 else max(16, 128 * 128 // bd)
        _bwd_dq[(triton.cdiv(f, bf_q), ns, b * hk)](
            kf, v, vmask, o, do, den, dqf, delta, h0s if h0s is not None else den,
            h0z if h0z is not None else den, t, seg, nslot, DEN_EPS, BF=bf_q, BD=bd, HAS_H0=h0s is not None,
            **common, **_launch_opts(bf_q * bd))

        # reverse start state of each segment: the final state's gradient plus the queries after the segment
        dhs = dhz = tot_s = tot_z = None
        if ns > 1:
            dhs, dhz, tot_s, tot_z = _segment_states_bwd(qf, do, den, delta, t, seg, 0, ns, c, hk, prec)
        if dst is not None or dzt is not None:
            dst = torch.zeros(b, hk, f, d, **f32) if dst is None else dst.float()
            dzt = torch.zeros(b, hk, f, **f32) if dzt is None else dzt.float()
            if dhs is None:
                dhs, dhz = dst.contiguous(), dzt.contiguous()
            else:
                dhs, dhz = dhs + dst[:, :, None], dhz + dzt[:, :, None]
                tot_s, tot_z = tot_s + dst, tot_z + dzt
        need_d0 = has_s0 and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5])
        store_d0 = need_d0 and ns == 1
        d0s = torch.empty(b, hk, f, d, **f32) if store_d0 else den
        d0z = torch.empty(b, hk, f, **f32) if store_d0 else den

        shared_v = hk != hv  # several state heads write the same v head: fp32 partials, summed below
        dv = torch.empty(b, t, hk, d, **f32) if shared_v else torch.empty_like(v)
        dkf = torch.empty_like(kf)
        args = (qf, kf, v, vmask, do, den, delta, dkf, dv, dhs if dhs is not None else den,
                dhz if dhz is not None else den, d0s, d0z, t, seg, ns if ns > 1 else 1, DEN_EPS)
        has_dh = dhs is not None
        if TUNE["split_bwd"] or bf * bd > 128 * 128:
            bf_k = min(bf, 64)
            bd_v = min(bd, 64)
            _bwd_dkv[(triton.cdiv(f, bf_k), ns, b * hk)](
                *args, BF=bf_k, BD=bd, DO_DKF=True, DO_DV=False, HAS_DH=has_dh, STORE_D0=store_d0,
                **common, **_launch_opts(bf_k * bd))
            _bwd_dkv[(triton.cdiv(d, bd_v), ns, b * hk)](
                *args, BF=bf, BD=bd_v, DO_DKF=False, DO_DV=True, HAS_DH=has_dh, STORE_D0=False,
                **common, **_launch_opts(bf * bd_v))
        else:
            _bwd_dkv[(1, ns, b * hk)](
                *args, BF=bf, BD=bd, DO_DKF=True, DO_DV=True, HAS_DH=has_dh, STORE_D0=store_d0,
                **common, **_launch_opts(bf * bd))
        if shared_v:
            dv = dv.view(b, t, hv, hk // hv, d).sum(3).to(v.dtype)
        ds0 = dz0 = None
        if need_d0:
            ds0, dz0 = (d0s, d0z) if store_d0 else (tot_s, tot_z)
            ds0, dz0 = ds0.to(s0_dtype), dz0.to(s0_dtype)
        return dqf, dkf, dv, None, ds0, dz0, None, None


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


def chunk_linear_attn(qf, kf, v, valid=None, initial_state=None, output_final_state=False, chunk_size=64):
    """Same contract as `chunk_linear_attn_torch`: returns (o [B, T, H, D] in v.dtype, final state or None).

    initial_state / final state: (S [B, Hk, F, D], z [B, Hk, F]) fp32, the sums of kf v^T and kf over earlier tokens.
    Differentiable in qf, kf, v and the initial state.
    """
    dt = v.dtype
    qf, kf = qf.to(dt).contiguous(), kf.to(dt).contiguous()
    v = v.contiguous()
    c = chunk_size if chunk_size in (16, 32, 64, 128) else 64
    s0 = z0 = None
    if initial_state is not None:
        s0, z0 = initial_state
    vmask = None if valid is None else valid.to(torch.uint8).contiguous()
    o, fs, fz = _LinearAttn.apply(qf, kf, v, vmask, s0, z0, bool(output_final_state), c)
    return o, ((fs, fz) if output_final_state else None)
