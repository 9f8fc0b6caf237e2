"""Triton form of normalized causal linear attention (Hedgehog): forward and backward as one autograd Function.

Queries come in chunks of C tokens. Within a chunk the pairs are formed exactly (causal mask); everything before the
chunk lives in a linear state S = sum kf v^T, z = sum kf (fp32), carried from chunk to chunk inside one program, so
qf, kf and v are read once and the state never goes through memory.

The forward and the backward's forward-in-time pass (dqf) run one program per (value or feature block, segment,
batch x query head); the backward-in-time passes (dkf, dv, with the reverse state dS = sum qf dnum^T) one per
(block, segment, batch x state head). Long sequences are cut into segments of SEG chunks, each started from the state
left by the segments before it; those states come from a cheap pre-pass (one outer-product sum per segment, then a
cumulative sum).
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # transformers' remote-code import check skips try blocks; ops.py falls back to PyTorch
    raise

from ..utils import DEN_EPS, batch_to_varlen, varlen_to_batch, varlen_valid
from ..chunk_utils import check_size, dot_precision, keys_ok, launch_opts, load, p2, row_ptrs, segment_chunks, store

# Knobs for tests and benchmarks. seg_chunks: chunks per segment (None: from a cost model); programs: SM count that
# model assumes (None: the device's); fwd_bd: value block of the forward; bwd_block: feature / value block of
# the backward passes and the segment pre-passes.
TUNE = {
    "seg_chunks": None, "programs": None, "num_warps": None, "num_stages": None, "fwd_bd": None, "bwd_block": None,
}


# ----------------------------------------------------------------------------------------------------------------------
# Triton helpers


@triton.jit
def _state_ptrs(hs, hz, b, hk, slot, NSLOT, f, d, HK: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
                TRANS: tl.constexpr = False):
    """States are [B, HK, NSLOT, F, D] / [B, HK, NSLOT, F] fp32 (NSLOT: one per segment start, +1 for the end).
    TRANS: the [D, F] view, for passes that multiply by S^T (loaded transposed rather than transposed in registers)."""
    base = ((b * HK + hk) * NSLOT + slot).to(tl.int64)
    if TRANS:
        ps, ms = hs + base * F * D + f[None, :] * D + d[:, None], (f[None, :] < F) & (d[:, None] < D)
    else:
        ps, ms = hs + base * F * D + f[:, None] * D + d[None, :], (f[:, None] < F) & (d[None, :] < D)
    return ps, ms, hz + base * F + f, f < F


# Never tl.trans a tl.dot result: Triton 3.4 to 3.7.0 miscompiles that on Hopper (fla issue 640). Products that need
# a transposed result are formed transposed instead (tl.dot(k, tl.trans(q)) rather than tl.trans(tl.dot(q, ...))),
# and the passes that multiply by S^T carry S^T. Transposing loaded tiles is fine.


@triton.jit
def _kv_chunk(kf, v, valid, b, hk, hv, t, lim, T, f, d, PREC: tl.constexpr, HAS_VALID: tl.constexpr,
              HK: tl.constexpr, HV: tl.constexpr, F: tl.constexpr, D: tl.constexpr, TRANS: tl.constexpr = False):
    """One chunk's share of the linear state: kf^T v (v^T kf with TRANS) and sum kf over its non-padding keys below
    lim."""
    ok = keys_ok(valid, b, t, lim, T, HAS_VALID)
    kt = load(kf, b, hk, t, f, T, HK, F)
    kt = tl.where(ok[:, None], kt, 0.0)
    vt = load(v, b, hv, t, d, T, HV, D)
    if TRANS:
        kv = tl.dot(tl.trans(vt), kt, input_precision=PREC)
    else:
        kv = tl.dot(tl.trans(kt), vt, input_precision=PREC)
    return kv, tl.sum(kt.to(tl.float32), 0)


@triton.jit
def _q_chunk(qf, do, den, delta, b, h, t, T, f, d, eps, PREC: tl.constexpr,
             H: tl.constexpr, F: tl.constexpr, D: tl.constexpr, TRANS: tl.constexpr = False):
    """One query chunk's share of the reverse state: qf^T dnum (dnum^T qf with TRANS) and sum qf dden
    (dnum = do / den, dden = -do.o / den)."""
    qt = load(qf, b, h, t, f, T, H, F)
    dot_ = load(do, b, h, t, d, T, H, D).to(tl.float32)
    pr, mr = row_ptrs(den, b, h, t, T, H)
    dn = tl.load(pr, mask=mr, other=1.0)
    dl = tl.load(row_ptrs(delta, b, h, t, T, H)[0], mask=mr, other=0.0)
    rden = tl.where(dn >= eps, 1.0 / tl.maximum(dn, eps), 0.0)
    dden = -dl * rden
    dnum = (dot_ * rden[:, None]).to(qt.dtype)
    if TRANS:
        qs = tl.dot(tl.trans(dnum), qt, input_precision=PREC)
    else:
        qs = tl.dot(tl.trans(qt), dnum, input_precision=PREC)
    return qs, tl.sum(qt.to(tl.float32) * dden[:, None], 0)


# ----------------------------------------------------------------------------------------------------------------------
# Segment pre-passes: outer-product sums over token ranges, turned into per-segment start states by a cumsum.


@triton.jit
def _seg_kv(kf, v, valid, hs, hz, T, SEG, P, END, NS,
            HK: tl.constexpr, HV: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
            C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr):
    """Keys [cut_s, cut_{s+1}) with cut_s = (s SEG - P) C and the last cut END: here P = 0 and END = T (the form is
    shared with the sliding-window op, whose state stops P chunks before each segment and W tokens before the end)."""
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
def _seg_q(qf, do, den, delta, hs, hz, T, SEG, P, NS, S_OFF, eps,
           H: tl.constexpr, HK: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
           C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """Queries [qcut_s, qcut_{s+1}) with qcut_s = (s SEG + P) C (qcut_0 = 0, last = T), here with P = 0: segment s's
    reverse pass wants all queries after it."""
    i_f, i_s, i_bh = tl.program_id(0), tl.program_id(1) + S_OFF, tl.program_id(2)
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
# Forward and the backward's forward-in-time pass run one program per query head, each carrying the state of its
# head group: with several query heads per state, a loop over them in one program spills registers, while carrying
# the state per query head only repeats one of four products per chunk.


@triton.jit
def _fwd(qf, kf, v, valid, o, den, h0s, h0z, hts, htz, T, SEG, NSLOT, eps,
         H: tl.constexpr, HK: tl.constexpr, HV: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
         C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
         HAS_VALID: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, PREC: tl.constexpr):
    i_d, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = i_bh // H, i_bh % H
    hk = h // (H // HK)
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
        ok = keys_ok(valid, b, t, T, T, HAS_VALID)
        kt = tl.where(ok[:, None], load(kf, b, hk, t, f, T, HK, F), 0.0)
        vt = load(v, b, hv, t, d, T, HV, D)
        Sc = S.to(kt.dtype)
        qt = load(qf, b, h, t, f, T, H, F)
        a = tl.where(causal, tl.dot(qt, tl.trans(kt), input_precision=PREC), 0.0)
        acc = tl.dot(qt, Sc, input_precision=PREC)
        acc = tl.dot(a.to(vt.dtype), vt, acc=acc, input_precision=PREC)
        dl = tl.sum(qt.to(tl.float32) * z[None, :], 1) + tl.sum(a, 1)
        store(o, acc / tl.maximum(dl, eps)[:, None], b, h, t, d, T, H, D)
        if i_d == 0:
            pr, mr = row_ptrs(den, b, h, t, T, H)
            tl.store(pr, dl, mask=mr)
    if STORE_FINAL:  # one segment only; the group's first query head stores its state
        if h % (H // HK) == 0:
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
# Backward, forward in time: dqf = dnum S^T + dden z + (intra-chunk part). The program carries S^T.


@triton.jit
def _bwd_dq(kf, v, valid, o, do, den, dqf, delta, h0s, h0z, T, SEG, NSLOT, eps,
            H: tl.constexpr, HK: tl.constexpr, HV: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
            C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
            HAS_VALID: tl.constexpr, HAS_H0: tl.constexpr, PREC: tl.constexpr):
    i_f, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = i_bh // H, i_bh % H
    hk = h // (H // HK)
    hv = hk // (HK // HV)
    c = tl.arange(0, C)
    f = i_f * BF + tl.arange(0, BF)
    d = tl.arange(0, BD)
    causal = c[:, None] >= c[None, :]
    ST = tl.zeros([BD, BF], tl.float32)
    z = tl.zeros([BF], tl.float32)
    if HAS_H0:
        ps, ms, pz, mz = _state_ptrs(h0s, h0z, b, hk, i_s, NSLOT, f, d, HK, F, D, True)
        ST = tl.load(ps, mask=ms, other=0.0)
        z = tl.load(pz, mask=mz, other=0.0)
    n0 = i_s * SEG
    n1 = tl.minimum(n0 + SEG, tl.cdiv(T, C))
    for n in range(n0, n1):
        t = n * C + c
        if n > n0:
            kv, ks = _kv_chunk(kf, v, valid, b, hk, hv, t - C, T, T, f, d, PREC, HAS_VALID, HK, HV, F, D, True)
            ST += kv
            z += ks
        ok = keys_ok(valid, b, t, T, T, HAS_VALID)
        kt = tl.where(ok[:, None], load(kf, b, hk, t, f, T, HK, F), 0.0)
        vt = load(v, b, hv, t, d, T, HV, D)
        dot_ = load(do, b, h, t, d, T, H, D)
        pr, mr = row_ptrs(den, b, h, t, T, H)
        dn = tl.load(pr, mask=mr, other=1.0)
        rden = tl.where(dn >= eps, 1.0 / tl.maximum(dn, eps), 0.0)
        dl = tl.sum(dot_.to(tl.float32) * load(o, b, h, t, d, T, H, D).to(tl.float32), 1)
        dden = -dl * rden
        dnum = (dot_.to(tl.float32) * rden[:, None]).to(kt.dtype)
        da = tl.dot(dnum, tl.trans(vt), input_precision=PREC) + dden[:, None]
        da = tl.where(causal, da, 0.0)
        dqt = tl.dot(dnum, ST.to(kt.dtype), input_precision=PREC) + dden[:, None] * z[None, :]
        dqt = tl.dot(da.to(kt.dtype), kt, acc=dqt, input_precision=PREC)
        store(dqf, dqt, b, h, t, f, T, H, F)
        if i_f == 0:
            tl.store(row_ptrs(delta, b, h, t, T, H)[0], dl, mask=mr)


# ----------------------------------------------------------------------------------------------------------------------
# Backward, backward in time, as two launches: dkf = v dS^T + dz + (intra) carrying dS^T over a feature block, and
# dv = kf dS + (intra) carrying dS over a value block. dS covers the later chunks. Intra-chunk products are formed
# transposed, keys by queries. One flat loop over (chunk, query head of the group): the group's terms accumulate and
# the last head of the group stores them (nested loops carrying the accumulators spill registers).


@triton.jit
def _bwd_dkv(qf, kf, v, valid, do, den, delta, dkf, dv, dhs, dhz, d0s, d0z, T, SEG, NSLOT, eps,
             H: tl.constexpr, HK: tl.constexpr, HV: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
             C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, DO_DKF: tl.constexpr,
             HAS_VALID: tl.constexpr, HAS_DH: tl.constexpr, STORE_D0: tl.constexpr, PREC: tl.constexpr):
    """DO_DKF: program_id(0) is a feature block and BD covers all of D; else a value block and BF covers all of F."""
    i_x, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = i_bh // HK, i_bh % HK
    G: tl.constexpr = H // HK
    hv = hk // (HK // HV)
    c = tl.arange(0, C)
    if DO_DKF:
        f = i_x * BF + tl.arange(0, BF)
        d = tl.arange(0, BD)
        dS = tl.zeros([BD, BF], tl.float32)  # dS^T
        acc = tl.zeros([C, BF], tl.float32)
    else:
        f = tl.arange(0, BF)
        d = i_x * BD + tl.arange(0, BD)
        dS = tl.zeros([BF, BD], tl.float32)
        acc = tl.zeros([C, BD], tl.float32)
    causal_t = c[:, None] <= c[None, :]  # key row <= query column
    dz = tl.zeros([BF], tl.float32)
    if HAS_DH:
        ps, ms, pz, mz = _state_ptrs(dhs, dhz, b, hk, i_s, NSLOT, f, d, HK, F, D, DO_DKF)
        dS = tl.load(ps, mask=ms, other=0.0)
        dz = tl.load(pz, mask=mz, other=0.0)
    n0 = i_s * SEG
    n1 = tl.minimum(n0 + SEG, tl.cdiv(T, C))
    for it in range(0, (n1 - n0) * G):
        i = it // G
        g = it % G
        h = hk * G + g
        t = (n1 - 1 - i) * C + c
        if i > 0:  # the chunk after this one joins the reverse state, one query head at a time
            qs, zs = _q_chunk(qf, do, den, delta, b, h, t + C, T, f, d, eps, PREC, H, F, D, DO_DKF)
            dS += qs
            dz += zs
        ok = keys_ok(valid, b, t, T, T, HAS_VALID)
        kt = tl.where(ok[:, None], load(kf, b, hk, t, f, T, HK, F), 0.0)
        qt = load(qf, b, h, t, f, T, H, F)
        dot_ = load(do, b, h, t, d, T, H, D)
        pr, mr = row_ptrs(den, b, h, t, T, H)
        dn = tl.load(pr, mask=mr, other=1.0)
        rden = tl.where(dn >= eps, 1.0 / tl.maximum(dn, eps), 0.0)
        dnum = (dot_.to(tl.float32) * rden[:, None]).to(kt.dtype)
        acc = tl.where(g > 0, acc, 0.0)  # a new chunk starts with its group's first head
        if DO_DKF:
            vt = load(v, b, hv, t, d, T, HV, D)
            dden = -tl.load(row_ptrs(delta, b, h, t, T, H)[0], mask=mr, other=0.0) * rden
            da_t = tl.dot(vt, tl.trans(dnum), input_precision=PREC) + dden[None, :]
            da_t = tl.where(causal_t, da_t, 0.0)
            acc = tl.dot(da_t.to(qt.dtype), qt, acc=acc, input_precision=PREC)
            if g == G - 1:
                acc = tl.dot(vt, dS.to(vt.dtype), acc=acc, input_precision=PREC) + dz[None, :]
                store(dkf, tl.where(ok[:, None], acc, 0.0), b, hk, t, f, T, HK, F)
        else:
            a_t = tl.where(causal_t, tl.dot(kt, tl.trans(qt), input_precision=PREC), 0.0)
            acc = tl.dot(a_t.to(kt.dtype), dnum, acc=acc, input_precision=PREC)
            if g == G - 1:
                acc = tl.dot(kt, dS.to(kt.dtype), acc=acc, input_precision=PREC)
                store(dv, acc, b, hk, t, d, T, HK, D)
    if STORE_D0:  # one segment only: the initial state's gradient sums over every query
        if n1 > n0:
            for g in range(G):
                qs, zs = _q_chunk(qf, do, den, delta, b, hk * G + g, n0 * C + c, T, f, d, eps, PREC, H, F, D,
                                  DO_DKF)
                dS += qs
                dz += zs
        ps, ms, pz, mz = _state_ptrs(d0s, d0z, b, hk, 0, 1, f, d, HK, F, D, DO_DKF)
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
        bf, bd_all = p2(f), p2(d)
        bd = TUNE["fwd_bd"] or (bd_all if bf * bd_all <= 128 * 128 else max(16, 128 * 128 // bf))  # no spills
        nbd = triton.cdiv(d, bd)
        seg = segment_chunks(TUNE, n, b * h * nbd, qf.device)
        ns = triton.cdiv(n, seg)
        prec = dot_precision(v.dtype)
        f32 = dict(device=qf.device, dtype=torch.float32)
        vmask = valid if valid is not None else qf
        o = torch.empty(b, t, h, d, device=qf.device, dtype=v.dtype)
        den = torch.empty(b, t, h, **f32)

        h0s = h0z = None
        if ns > 1:  # start state of each segment; slot ns is the final state
            h0s, h0z = _segment_states_fwd(kf, v, valid, s0, z0, t, seg, 0, t, ns, c, prec, output_final_state)
        elif s0 is not None:
            h0s, h0z = s0.float().contiguous(), z0.float().contiguous()
        nslot = h0s.shape[2] if ns > 1 else 1
        store_final = output_final_state and ns == 1
        hts = torch.empty(b, hk, f, d, **f32) if store_final else den
        htz = torch.empty(b, hk, f, **f32) if store_final else den
        _fwd[(nbd, ns, b * h)](
            qf, kf, v, vmask, o, den, h0s if h0s is not None else den, h0z if h0z is not None else den, hts, htz,
            t, seg, nslot, DEN_EPS, H=h, HK=hk, HV=hv, F=f, D=d, C=c, BF=bf, BD=bd,
            HAS_VALID=valid is not None, HAS_H0=h0s is not None, STORE_FINAL=store_final, PREC=prec,
            **launch_opts(TUNE, bf * bd),
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
        bf, bd = p2(f), p2(d)
        prec = dot_precision(v.dtype)
        f32 = dict(device=qf.device, dtype=torch.float32)
        do = torch.zeros_like(o) if do is None else do.contiguous()  # only the final state was used
        vmask = valid if valid is not None else qf
        common = dict(H=h, HK=hk, HV=hv, F=f, D=d, C=c, HAS_VALID=valid is not None, PREC=prec)

        dqf = torch.empty_like(qf)
        delta = torch.empty(b, t, h, **f32)
        bf_q = TUNE["bwd_block"] or (bf if bf * bd <= 64 * 128 else max(16, 64 * 128 // bd))
        _bwd_dq[(triton.cdiv(f, bf_q), ns, b * h)](
            kf, v, vmask, o, do, den, dqf, delta, h0s if h0s is not None else den,
            h0z if h0z is not None else den, t, seg, nslot, DEN_EPS, BF=bf_q, BD=bd, HAS_H0=h0s is not None,
            **common, **launch_opts(TUNE, bf_q * bd))

        # reverse start state of each segment: the final state's gradient plus the queries after the segment
        need_d0 = has_s0 and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5])
        dhs = dhz = tot_s = tot_z = None
        if ns > 1:
            dhs, dhz, tot_s, tot_z = _segment_states_bwd(qf, do, den, delta, t, seg, 0, ns, c, hk, prec, need_d0)
        if dst is not None or dzt is not None:
            dst = torch.zeros(b, hk, f, d, **f32) if dst is None else dst.float()
            dzt = torch.zeros(b, hk, f, **f32) if dzt is None else dzt.float()
            if dhs is None:
                dhs, dhz = dst.contiguous(), dzt.contiguous()
            else:
                dhs, dhz = dhs + dst[:, :, None], dhz + dzt[:, :, None]
                tot_s, tot_z = tot_s + dst, tot_z + dzt
        store_d0 = need_d0 and ns == 1
        d0s = torch.empty(b, hk, f, d, **f32) if store_d0 else den
        d0z = torch.empty(b, hk, f, **f32) if store_d0 else den

        shared_v = hk != hv  # several state heads write the same v head: fp32 partials, summed below
        dv = torch.empty(b, t, hk, d, **f32) if shared_v else torch.empty_like(v)
        dkf = torch.empty_like(kf)
        has_dh = dhs is not None
        args = (qf, kf, v, vmask, do, den, delta, dkf, dv, dhs if dhs is not None else den,
                dhz if dhz is not None else den, d0s, d0z, t, seg, ns if ns > 1 else 1, DEN_EPS)
        bf_k, bd_v = TUNE["bwd_block"] or min(bf, 64), TUNE["bwd_block"] or min(bd, 64)
        _bwd_dkv[(triton.cdiv(f, bf_k), ns, b * hk)](
            *args, BF=bf_k, BD=bd, DO_DKF=True, HAS_DH=has_dh, STORE_D0=store_d0, **common,
            **launch_opts(TUNE, bf_k * bd))
        _bwd_dkv[(triton.cdiv(d, bd_v), ns, b * hk)](
            *args, BF=bf, BD=bd_v, DO_DKF=False, HAS_DH=has_dh, STORE_D0=False, **common,
            **launch_opts(TUNE, bf * bd_v))
        if shared_v:
            dv = dv.view(b, t, hv, hk // hv, d).sum(3).to(v.dtype)
        ds0 = dz0 = None
        if need_d0:
            ds0, dz0 = (d0s, d0z) if store_d0 else (tot_s, tot_z)
            ds0, dz0 = ds0.to(s0_dtype), dz0.to(s0_dtype)
        return dqf, dkf, dv, None, ds0, dz0, None, None


def _segment_states_fwd(kf, v, valid, s0, z0, t, seg, p, end, ns, c, prec, need_final, tune: dict = TUNE):
    """States entering each segment (slot s): s0 plus a cumsum of the segments' own sums; slot ns, the final state,
    only when asked for (the last segment's sum is not needed otherwise)."""
    b, _, hk, f = kf.shape
    hv, d = v.shape[2], v.shape[3]
    bf, bd = p2(f), p2(d)
    bf_s = tune["bwd_block"] or (min(bf, 64) if bf * bd > 64 * 128 else bf)
    nloc = ns if need_final else ns - 1
    loc_s = torch.empty(b, hk, ns, f, d, device=kf.device, dtype=torch.float32)
    loc_z = torch.empty(b, hk, ns, f, device=kf.device, dtype=torch.float32)
    _seg_kv[(triton.cdiv(f, bf_s), nloc, b * hk)](
        kf, v, valid if valid is not None else kf, loc_s, loc_z, t, seg, p, end, ns,
        HK=hk, HV=hv, F=f, D=d, C=c, BF=bf_s, BD=bd, HAS_VALID=valid is not None, PREC=prec,
        **launch_opts(tune, bf_s * bd, 3))
    hs = torch.zeros(b, hk, nloc + 1, f, d, device=kf.device, dtype=torch.float32)
    hz = torch.zeros(b, hk, nloc + 1, f, device=kf.device, dtype=torch.float32)
    torch.cumsum(loc_s[:, :, :nloc], 2, out=hs[:, :, 1:])
    torch.cumsum(loc_z[:, :, :nloc], 2, out=hz[:, :, 1:])
    if s0 is not None:
        hs += s0.float()[:, :, None]
        hz += z0.float()[:, :, None]
    return hs, hz


def _segment_states_bwd(qf, do, den, delta, t, seg, p, ns, c, hk, prec, need_total, tune: dict = TUNE):
    """Reverse start states: slot s holds the sum of qf dnum^T (and qf dden) over the queries that see all of
    segment s as older than their band, i.e. over the query ranges of the segments after s. With need_total, also
    the sum over all queries (the initial state's gradient), which needs the first segment's range too."""
    b, _, h, f = qf.shape
    d = do.shape[-1]
    bf, bd = p2(f), p2(d)
    bf_s = tune["bwd_block"] or (min(bf, 64) if bf * bd > 64 * 128 else bf)
    first = 0 if need_total else 1
    loc_s = torch.zeros(b, hk, ns, f, d, device=qf.device, dtype=torch.float32)
    loc_z = torch.zeros(b, hk, ns, f, device=qf.device, dtype=torch.float32)
    _seg_q[(triton.cdiv(f, bf_s), ns - first, b * hk)](
        qf, do, den, delta, loc_s, loc_z, t, seg, p, ns, first, DEN_EPS,
        H=h, HK=hk, F=f, D=d, C=c, BF=bf_s, BD=bd, PREC=prec, **launch_opts(tune, bf_s * bd, 3))
    after_s = loc_s.flip(2).cumsum(2).flip(2)  # slot s: segments >= s
    after_z = loc_z.flip(2).cumsum(2).flip(2)
    hs = torch.zeros_like(loc_s)
    hz = torch.zeros_like(loc_z)
    hs[:, :, :-1] = after_s[:, :, 1:]
    hz[:, :, :-1] = after_z[:, :, 1:]
    return hs, hz, after_s[:, :, 0], after_z[:, :, 0]


def chunk_linear_attn(qf, kf, v, valid=None, initial_state=None, output_final_state=False, chunk_size=64,
                      cu_seqlens=None):
    """Same contract as `chunk_linear_attn_torch`: returns (o [B, T, H, D] in v.dtype, final state or None).

    initial_state / final state: (S [B, Hk, F, D], z [B, Hk, F]) fp32, the sums of kf v^T and kf over earlier tokens.
    Differentiable in qf, kf, v and the initial state.
    cu_seqlens: optional [N + 1] boundaries of N sequences packed along T (B == 1); states are then per sequence
    ([N, ...]). They run as a left-padded batch (a gather and a scatter of the inputs and the output).
    """
    if cu_seqlens is not None:
        assert qf.shape[0] == 1, "cu_seqlens packs the sequences along T of a single row"
        rows, idx, (qf_, kf_, v_) = varlen_to_batch(cu_seqlens, qf, kf, v)
        o, st = chunk_linear_attn(qf_, kf_, v_, varlen_valid(valid, rows, idx), initial_state, output_final_state,
                                  chunk_size)
        return batch_to_varlen(o, rows, idx, qf.shape[1]), st
    dt = v.dtype
    qf, kf = qf.to(dt).contiguous(), kf.to(dt).contiguous()
    v = v.contiguous()
    check_size(qf, kf, v)
    c = chunk_size if chunk_size in (16, 32, 64, 128) else 64
    s0 = z0 = None
    if initial_state is not None:
        s0, z0 = initial_state
    vmask = None if valid is None else valid.to(torch.uint8).contiguous()
    o, fs, fz = _LinearAttn.apply(qf, kf, v, vmask, s0, z0, bool(output_final_state), c)
    return o, ((fs, fz) if output_final_state else None)
