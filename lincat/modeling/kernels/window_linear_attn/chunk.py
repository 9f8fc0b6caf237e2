"""Triton form of the LoLCATs sliding-window hybrid: forward and backward as one autograd Function.

Queries come in chunks of C tokens. A chunk sees, exactly, its band of P + 1 key chunks (P = ceil((W - 1) / C)): each
pair there is either in the window (softmax term) or older (linear term). Everything before the band is older for all
queries of the chunk and lives in a linear state S = sum kf v^T, z = sum kf (fp32), carried from chunk to chunk inside
one program. The softmax terms keep their own running max (online softmax) because the window max m_i weighs the
softmax terms against the linear ones: it is part of the function, and its gradient is taken (through the argmax).

Forward: one fused kernel, one program per (value block, segment, batch x query head). Long sequences are cut into
segments of SEG chunks, each started from the state left by the segments before it; those states come from a cheap
pre-pass (one outer-product sum per segment, then a cumulative sum).
Backward: the softmax part needs no state, so it runs flash-attention style (one program per query chunk for dq, one
per key chunk and k/v head for dk and its share of dv). The linear part runs with the state: forward in time for dqf,
backward in time for dkf and dv (reverse state dS = sum qf dnum^T), segmented like the forward.
"""

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # transformers' remote-code import check skips try blocks; ops.py falls back to PyTorch
    raise

from ..utils import DEN_EPS, batch_to_varlen, varlen_to_batch, varlen_valid
from ..chunk_utils import check_size, dot_precision, keys_ok, launch_opts, load, p2, row_ptrs, segment_chunks, store
# the linear state's pieces are the Hedgehog op's: its pre-passes take P > 0 and END = T - W here
from ..linear_attn.chunk import _kv_chunk, _q_chunk, _segment_states_bwd, _segment_states_fwd, _state_ptrs

# Knobs for tests and benchmarks. seg_chunks: chunks per segment (None: from a cost model); programs: SM count that
# model assumes (None: the device's); fwd_bd: value block of the forward; bwd_block: feature / value block of
# the backward passes and the segment pre-passes.
TUNE = {
    "seg_chunks": None, "programs": None, "num_warps": None, "num_stages": None, "fwd_bd": None, "bwd_block": None,
}


# ----------------------------------------------------------------------------------------------------------------------
# Triton helpers


# Never tl.trans a tl.dot result: Triton 3.4 to 3.7.0 miscompiles that on Hopper (fla issue 640). Products that need
# a transposed result are formed transposed instead (tl.dot(k, tl.trans(q)) rather than tl.trans(tl.dot(q, ...))),
# and the passes that multiply by S^T carry S^T. Transposing loaded tiles is fine.


# ----------------------------------------------------------------------------------------------------------------------
# Segment pre-passes: outer-product sums over token ranges, turned into per-segment start states by a cumsum.


# ----------------------------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd(q, k, v, qf, kf, gamma, valid, o, den, mx, amax, h0s, h0z, hts, htz,
         T, W, P, SEG, NSLOT, scale, eps,
         H: tl.constexpr, HKV: tl.constexpr, HK: tl.constexpr, DK: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
         C: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
         HAS_VALID: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, PREC: tl.constexpr):
    """One program per query head, carrying its group's state (a loop over the group's heads would spill)."""
    i_d, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = i_bh // H, i_bh % H
    hk = h // (H // HK)
    hv = hk // (HK // HKV)  # the k/v head of every query head of this state
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
    gm = tl.load(gamma + h)
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
        # softmax terms first, with their running max; one accumulator serves both kinds of term, so the linear
        # terms join it only once the window max is final
        qt = load(q, b, h, tq, x, T, H, DK)
        m = tl.full([C], -1e30, tl.float32)
        idx = tl.full([C], -1, tl.int32)
        acc = tl.zeros([C, BD], tl.float32)
        dw = tl.zeros([C], tl.float32)
        for p in range(tl.maximum(n - P, 0), n + 1):
            tk = p * C + c
            ok = keys_ok(valid, b, tk, T, T, HAS_VALID)
            rel = tk[None, :] - tq[:, None]
            kt = load(k, b, hv, tk, x, T, HKV, DK)
            s = tl.dot(qt, tl.trans(kt), input_precision=PREC) * scale
            s = tl.where((rel <= 0) & (rel > -W) & ok[None, :], s, float("-inf"))
            mt = tl.max(s, 1)
            idx = tl.where(mt > m, tl.argmax(s, 1).to(tl.int32) + p * C, idx)
            mn = tl.maximum(m, mt)
            e = tl.exp(s - mn[:, None])
            alpha = tl.exp(m - mn)
            vt = load(v, b, hv, tk, d, T, HKV, D)
            acc = tl.dot(e.to(vt.dtype), vt, acc=acc * alpha[:, None], input_precision=PREC)
            dw = dw * alpha + tl.sum(e, 1)
            m = mn
        qft = load(qf, b, h, tq, f, T, H, F)
        acc = tl.dot(qft, S.to(qft.dtype), acc=acc * gm, input_precision=PREC)
        dl = gm * dw + tl.sum(qft.to(tl.float32) * z[None, :], 1)
        for p in range(tl.maximum(n - P, 0), n + 1):
            if n * C + C - 1 - p * C >= W:  # some pairs of this band chunk are older than the window
                tk = p * C + c
                ok = keys_ok(valid, b, tk, T, T, HAS_VALID)
                kft = tl.where(ok[:, None], load(kf, b, hk, tk, f, T, HK, F), 0.0)
                a = tl.dot(qft, tl.trans(kft), input_precision=PREC)
                a = tl.where(tk[None, :] - tq[:, None] <= -W, a, 0.0)
                vt = load(v, b, hv, tk, d, T, HKV, D)
                acc = tl.dot(a.to(vt.dtype), vt, acc=acc, input_precision=PREC)
                dl += tl.sum(a, 1)
        store(o, acc / tl.maximum(dl, eps)[:, None], b, h, tq, d, T, H, D)
        if i_d == 0:
            pr, mr = row_ptrs(den, b, h, tq, T, H)
            tl.store(pr, dl, mask=mr)
            tl.store(row_ptrs(mx, b, h, tq, T, H)[0], tl.where(m > -1e30, m, 0.0), mask=mr)
            tl.store(row_ptrs(amax, b, h, tq, T, H)[0], idx, mask=mr)
    if STORE_FINAL:
        # one segment only; the group's first query head stores the state, which covers all tokens but the last W
        if h % (H // HK) == 0:
            end = T - W
            for p in range(tl.maximum(n_chunks - P - 1, 0), tl.cdiv(tl.maximum(end, 0), C)):
                kv, ks = _kv_chunk(kf, v, valid, b, hk, hv, p * C + c, end, T, f, d, PREC, HAS_VALID,
                                   HK, HKV, F, D)
                S += kv
                z += ks
            ps, ms, pz, mz = _state_ptrs(hts, htz, b, hk, 0, 1, f, d, HK, F, D)
            tl.store(ps, S, mask=ms)
            if i_d == 0:
                tl.store(pz, z, mask=mz)


# ----------------------------------------------------------------------------------------------------------------------
# Backward. With dA_ij = (do_i . v_j - do_i . o_i) / den_i for every visible pair:
#   softmax pairs: ds_ij = gamma e_ij dA_ij, plus dm_i = -sum_j ds_ij at the argmax (m_i moves with that score);
#   older pairs: dqf_i += dA_ij kf_j, dkf_j += dA_ij qf_i, dv_j += (qf_i . kf_j) dnum_i.
# The softmax part needs no state: it runs flash-attention style, one program per chunk. The linear part runs with
# the state, forward in time for dqf and backward in time for dkf / dv.


@triton.jit
def _bwd_win_dq(q, k, v, gamma, valid, o, do, den, mx, amax, dq, delta, rsum, dmx, T, W, P, scale, eps,
                H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
                BK: tl.constexpr, BD: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr):
    """Softmax part of dq, per query chunk; also stores delta = do . o, r = sum_j e_ij dA_ij (dgamma) and dm."""
    n, i_bh = tl.program_id(0), tl.program_id(1)
    b, h = i_bh // H, i_bh % H
    hv = h // (H // HKV)
    c = tl.arange(0, C)
    x = tl.arange(0, BK)
    d = tl.arange(0, BD)
    tq = n * C + c
    dot_ = load(do, b, h, tq, d, T, H, D)
    pr, mr = row_ptrs(den, b, h, tq, T, H)
    dn = tl.load(pr, mask=mr, other=1.0)
    rden = tl.where(dn >= eps, 1.0 / tl.maximum(dn, eps), 0.0)
    dl = tl.sum(dot_.to(tl.float32) * load(o, b, h, tq, d, T, H, D).to(tl.float32), 1)
    dnum = (dot_.to(tl.float32) * rden[:, None]).to(dot_.dtype)
    m = tl.load(row_ptrs(mx, b, h, tq, T, H)[0], mask=mr, other=0.0)
    qt = load(q, b, h, tq, x, T, H, DK)
    dqa = tl.zeros([C, BK], tl.float32)
    r = tl.zeros([C], tl.float32)
    for p in range(tl.maximum(n - P, 0), n + 1):
        tk = p * C + c
        ok = keys_ok(valid, b, tk, T, T, HAS_VALID)
        rel = tk[None, :] - tq[:, None]
        kt = load(k, b, hv, tk, x, T, HKV, DK)
        s = tl.dot(qt, tl.trans(kt), input_precision=PREC) * scale
        e = tl.exp(tl.where((rel <= 0) & (rel > -W) & ok[None, :], s, float("-inf")) - m[:, None])
        vt = load(v, b, hv, tk, d, T, HKV, D)
        ed = e * (tl.dot(dnum, tl.trans(vt), input_precision=PREC) - (dl * rden)[:, None])
        r += tl.sum(ed, 1)
        dqa = tl.dot(ed.to(kt.dtype), kt, acc=dqa, input_precision=PREC)
    gm = tl.load(gamma + h)
    dm = -gm * r
    am = tl.load(row_ptrs(amax, b, h, tq, T, H)[0], mask=mr, other=-1)
    dqa = gm * dqa + dm[:, None] * load(k, b, hv, am, x, T, HKV, DK).to(tl.float32)
    store(dq, dqa * scale, b, h, tq, x, T, H, DK)
    tl.store(row_ptrs(delta, b, h, tq, T, H)[0], dl, mask=mr)
    tl.store(row_ptrs(rsum, b, h, tq, T, H)[0], r, mask=mr)
    tl.store(row_ptrs(dmx, b, h, tq, T, H)[0], dm, mask=mr)


@triton.jit
def _bwd_win_dkv(q, k, v, gamma, valid, do, den, mx, amax, delta, dmx, dk, dvw, T, W, P, scale, eps,
                 H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
                 BK: tl.constexpr, BD: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr):
    """Softmax part of dk and dv, per key chunk and k/v head, summed over the query heads that read it. Scores are
    formed keys by queries, so that dk = ds^T q needs no transpose of a product."""
    kc, i_bh = tl.program_id(0), tl.program_id(1)
    b, hv = i_bh // HKV, i_bh % HKV
    G: tl.constexpr = H // HKV
    c = tl.arange(0, C)
    x = tl.arange(0, BK)
    d = tl.arange(0, BD)
    tk = kc * C + c
    ok = keys_ok(valid, b, tk, T, T, HAS_VALID)
    kt = load(k, b, hv, tk, x, T, HKV, DK)
    vt = load(v, b, hv, tk, d, T, HKV, D)
    dkt = tl.zeros([C, BK], tl.float32)
    dvt = tl.zeros([C, BD], tl.float32)
    # one flat loop over (query chunk, query head): nested loops carrying the accumulators spill registers
    n_q = tl.minimum(kc + P, tl.cdiv(T, C) - 1) + 1 - kc
    for it in range(0, n_q * G):
        qn = kc + it // G
        h = hv * G + it % G
        tq = qn * C + c
        rel = tk[:, None] - tq[None, :]
        win = (rel <= 0) & (rel > -W) & ok[:, None]
        pr, mr = row_ptrs(den, b, h, tq, T, H)
        dn = tl.load(pr, mask=mr, other=1.0)
        rden = tl.where(dn >= eps, 1.0 / tl.maximum(dn, eps), 0.0)
        dl = tl.load(row_ptrs(delta, b, h, tq, T, H)[0], mask=mr, other=0.0)
        m = tl.load(row_ptrs(mx, b, h, tq, T, H)[0], mask=mr, other=0.0)
        dm = tl.load(row_ptrs(dmx, b, h, tq, T, H)[0], mask=mr, other=0.0)
        am = tl.load(row_ptrs(amax, b, h, tq, T, H)[0], mask=mr, other=-1)
        gm = tl.load(gamma + h)
        qt = load(q, b, h, tq, x, T, H, DK)
        dot_ = load(do, b, h, tq, d, T, H, D)
        dnum = (dot_.to(tl.float32) * rden[:, None]).to(dot_.dtype)
        s_t = tl.dot(kt, tl.trans(qt), input_precision=PREC) * scale
        a_t = gm * tl.exp(tl.where(win, s_t, float("-inf")) - m[None, :])
        dvt = tl.dot(a_t.to(dnum.dtype), dnum, acc=dvt, input_precision=PREC)
        ds_t = a_t * (tl.dot(vt, tl.trans(dnum), input_precision=PREC) - (dl * rden)[None, :])
        ds_t += tl.where(am[None, :] == tk[:, None], dm[None, :], 0.0)
        dkt = tl.dot(ds_t.to(qt.dtype), qt, acc=dkt, input_precision=PREC)
    store(dk, dkt * scale, b, hv, tk, x, T, HKV, DK)
    store(dvw, dvt, b, hv, tk, d, T, HKV, D)


@triton.jit
def _bwd_dq(v, kf, valid, do, den, delta, dqf, h0s, h0z, T, W, P, SEG, NSLOT, eps,
            H: tl.constexpr, HKV: tl.constexpr, HK: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
            C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
            HAS_VALID: tl.constexpr, HAS_H0: tl.constexpr, PREC: tl.constexpr):
    """Linear part of dqf, forward in time, one program per query head carrying S^T: dnum S^T + dden z, plus the
    older pairs inside the band."""
    i_f, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = i_bh // H, i_bh % H
    hk = h // (H // HK)
    hv = hk // (HK // HKV)
    c = tl.arange(0, C)
    f = i_f * BF + tl.arange(0, BF)
    d = tl.arange(0, BD)
    ST = tl.zeros([BD, BF], tl.float32)  # S^T
    z = tl.zeros([BF], tl.float32)
    if HAS_H0:
        ps, ms, pz, mz = _state_ptrs(h0s, h0z, b, hk, i_s, NSLOT, f, d, HK, F, D, True)
        ST = tl.load(ps, mask=ms, other=0.0)
        z = tl.load(pz, mask=mz, other=0.0)
    n0 = i_s * SEG
    n1 = tl.minimum(n0 + SEG, tl.cdiv(T, C))
    for n in range(n0, n1):
        if (n > n0) & (n - P - 1 >= 0):
            kv, ks = _kv_chunk(kf, v, valid, b, hk, hv, (n - P - 1) * C + c, T, T, f, d, PREC, HAS_VALID,
                               HK, HKV, F, D, True)
            ST += kv
            z += ks
        tq = n * C + c
        dot_ = load(do, b, h, tq, d, T, H, D)
        pr, mr = row_ptrs(den, b, h, tq, T, H)
        dn = tl.load(pr, mask=mr, other=1.0)
        rden = tl.where(dn >= eps, 1.0 / tl.maximum(dn, eps), 0.0)
        dden = -tl.load(row_ptrs(delta, b, h, tq, T, H)[0], mask=mr, other=0.0) * rden
        dnum = (dot_.to(tl.float32) * rden[:, None]).to(dot_.dtype)
        dqt = tl.dot(dnum, ST.to(dnum.dtype), input_precision=PREC) + dden[:, None] * z[None, :]
        for p in range(tl.maximum(n - P, 0), n + 1):
            if n * C + C - 1 - p * C >= W:
                tk = p * C + c
                ok = keys_ok(valid, b, tk, T, T, HAS_VALID)
                vt = load(v, b, hv, tk, d, T, HKV, D)
                da = tl.dot(dnum, tl.trans(vt), input_precision=PREC) + dden[:, None]
                da = tl.where(tk[None, :] - tq[:, None] <= -W, da, 0.0)
                kft = tl.where(ok[:, None], load(kf, b, hk, tk, f, T, HK, F), 0.0)
                dqt = tl.dot(da.to(kft.dtype), kft, acc=dqt, input_precision=PREC)
        store(dqf, dqt, b, h, tq, f, T, H, F)


@triton.jit
def _bwd_dkv(qf, kf, v, valid, do, den, delta, dvw, dkf, dv, dhs, dhz, d0s, d0z, T, W, P, SEG, NSLOT, eps,
             H: tl.constexpr, HKV: tl.constexpr, HK: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
             C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, DO_DKF: tl.constexpr, ADD_DVW: tl.constexpr,
             HAS_VALID: tl.constexpr, HAS_DH: tl.constexpr, STORE_D0: tl.constexpr, PREC: tl.constexpr):
    """Linear part of dkf (DO_DKF: program_id(0) is a feature block, BD covers D, the program carries dS^T) or of dv
    (else: a value block, BF covers F, it carries dS), backward in time. dS covers the queries of chunks >= kc + P + 1,
    which see key chunk kc as older than their whole band; the band's own older pairs are added explicitly, formed
    keys by queries. One flat loop over (key chunk, band query chunk, query head of the group) accumulates a key
    chunk's terms; its last step adds the state's and stores (nested loops carrying the accumulators spill).
    ADD_DVW: one state head per k/v head, so this pass adds the softmax part and stores the final dv."""
    i_x, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = i_bh // HK, i_bh % HK
    G: tl.constexpr = H // HK
    hv = hk // (HK // HKV)
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
    dz = tl.zeros([BF], tl.float32)
    if HAS_DH:
        ps, ms, pz, mz = _state_ptrs(dhs, dhz, b, hk, i_s, NSLOT, f, d, HK, F, D, DO_DKF)
        dS = tl.load(ps, mask=ms, other=0.0)
        dz = tl.load(pz, mask=mz, other=0.0)
    n_chunks = tl.cdiv(T, C)
    n0 = i_s * SEG
    n1 = tl.minimum(n0 + SEG, n_chunks)
    inner = (P + 1) * G
    for it in range(0, (n1 - n0) * inner):
        i = it // inner
        j = it % inner
        kc = n1 - 1 - i
        qn = kc + j // G
        h = hk * G + j % G
        if (j < G) & (i > 0) & (kc + P + 1 < n_chunks):  # query chunk kc + P + 1 joins the state, a head a step
            qs, zs = _q_chunk(qf, do, den, delta, b, hk * G + j, (kc + P + 1) * C + c, T, f, d, eps, PREC,
                              H, F, D, DO_DKF)
            dS += qs
            dz += zs
        tk = kc * C + c
        ok = keys_ok(valid, b, tk, T, T, HAS_VALID)
        acc = tl.where(j > 0, acc, 0.0)
        if (qn < n_chunks) & (qn * C + C - 1 - kc * C >= W):  # some pairs are older than the window
            tq = qn * C + c
            older_t = tk[:, None] - tq[None, :] <= -W
            qft = load(qf, b, h, tq, f, T, H, F)
            dot_ = load(do, b, h, tq, d, T, H, D)
            pr, mr = row_ptrs(den, b, h, tq, T, H)
            dn = tl.load(pr, mask=mr, other=1.0)
            rden = tl.where(dn >= eps, 1.0 / tl.maximum(dn, eps), 0.0)
            dnum = (dot_.to(tl.float32) * rden[:, None]).to(dot_.dtype)
            if DO_DKF:
                vt = load(v, b, hv, tk, d, T, HKV, D)
                dden = -tl.load(row_ptrs(delta, b, h, tq, T, H)[0], mask=mr, other=0.0) * rden
                da_t = tl.dot(vt, tl.trans(dnum), input_precision=PREC) + dden[None, :]
                da_t = tl.where(older_t, da_t, 0.0).to(qft.dtype)
                acc = tl.dot(da_t, qft, acc=acc, input_precision=PREC)
            else:
                kft = tl.where(ok[:, None], load(kf, b, hk, tk, f, T, HK, F), 0.0)
                a_t = tl.where(older_t, tl.dot(kft, tl.trans(qft), input_precision=PREC), 0.0)
                acc = tl.dot(a_t.to(dnum.dtype), dnum, acc=acc, input_precision=PREC)
        if j == inner - 1:
            if DO_DKF:
                vt = load(v, b, hv, tk, d, T, HKV, D)
                acc = tl.dot(vt, dS.to(vt.dtype), acc=acc, input_precision=PREC) + dz[None, :]
                store(dkf, tl.where(ok[:, None], acc, 0.0), b, hk, tk, f, T, HK, F)
            else:
                kft = tl.where(ok[:, None], load(kf, b, hk, tk, f, T, HK, F), 0.0)
                acc = tl.dot(kft, dS.to(kft.dtype), acc=acc, input_precision=PREC)
                if ADD_DVW:
                    acc += load(dvw, b, hv, tk, d, T, HKV, D)
                store(dv, acc, b, hk, tk, d, T, HK, D)
    if STORE_D0:
        # one segment only: the initial state's gradient sums over every query, the band ones too
        for it in range(0, tl.minimum(P + 1, n_chunks) * G):
            qs, zs = _q_chunk(qf, do, den, delta, b, hk * G + it % G, (it // G) * C + c, T, f, d, eps, PREC,
                              H, F, D, DO_DKF)
            dS += qs
            dz += zs
        ps, ms, pz, mz = _state_ptrs(d0s, d0z, b, hk, 0, 1, f, d, HK, F, D, DO_DKF)
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
        bk, bf, bd_all = p2(dk), p2(f), p2(d)
        bd = TUNE["fwd_bd"] or min(bd_all, 64)  # a 128-wide value block spills registers
        nbd = triton.cdiv(d, bd)
        seg = segment_chunks(TUNE, n, b * h * nbd, q.device)
        ns = triton.cdiv(n, seg)
        prec = dot_precision(v.dtype)
        dev = q.device
        f32 = dict(device=dev, dtype=torch.float32)
        vmask = valid if valid is not None else q
        o = torch.empty(b, t, h, d, device=dev, dtype=v.dtype)
        den = torch.empty(b, t, h, **f32)
        mx = torch.empty(b, t, h, **f32)
        amax = torch.empty(b, t, h, device=dev, dtype=torch.int32)

        h0s = h0z = None
        if ns > 1:  # start state of each segment; slot ns is the final state
            h0s, h0z = _segment_states_fwd(kf, v, valid, s0, z0, t, seg, p, max(t - window, 0), ns, c, prec,
                                           output_final_state, tune=TUNE)
        elif s0 is not None:
            h0s, h0z = s0.float().contiguous(), z0.float().contiguous()
        nslot = h0s.shape[2] if ns > 1 else 1
        store_final = output_final_state and ns == 1
        hts = torch.empty(b, hk, f, d, **f32) if store_final else den
        htz = torch.empty(b, hk, f, **f32) if store_final else den
        _fwd[(nbd, ns, b * h)](
            q, k, v, qf, kf, gamma, vmask, o, den, mx, amax,
            h0s if h0s is not None else den, h0z if h0z is not None else den, hts, htz,
            t, window, p, seg, nslot, scale, DEN_EPS,
            H=h, HKV=hkv, HK=hk, DK=dk, F=f, D=d, C=c, BK=bk, BF=bf, BD=bd,
            HAS_VALID=valid is not None, HAS_H0=h0s is not None, STORE_FINAL=store_final, PREC=prec,
            **launch_opts(TUNE, bf * bd),
        )
        ctx.save_for_backward(q, k, v, qf, kf, gamma, valid, o, den, mx, amax, h0s, h0z)
        ctx.cfg = (window, scale, c, p, seg, ns, nslot, s0 is not None, None if s0 is None else s0.dtype)
        ctx.set_materialize_grads(False)
        if not output_final_state:
            return o, None, None
        if store_final:
            return o, hts, htz
        return o, h0s[:, :, ns].contiguous(), h0z[:, :, ns].contiguous()

    @staticmethod
    def backward(ctx, do, dst, dzt):
        q, k, v, qf, kf, gamma, valid, o, den, mx, amax, h0s, h0z = ctx.saved_tensors
        window, scale, c, p, seg, ns, nslot, has_s0, s0_dtype = ctx.cfg
        b, t, h, dk = q.shape
        hkv, hk, f, d = k.shape[2], kf.shape[2], kf.shape[-1], v.shape[-1]
        n = triton.cdiv(t, c)
        bk, bf, bd = p2(dk), p2(f), p2(d)
        prec = dot_precision(v.dtype)
        f32 = dict(device=q.device, dtype=torch.float32)
        do = torch.zeros_like(o) if do is None else do.contiguous()  # only the final state was used
        vmask = valid if valid is not None else q
        win = dict(H=h, HKV=hkv, DK=dk, D=d, C=c, BK=bk, BD=bd, HAS_VALID=valid is not None, PREC=prec)
        lin = dict(H=h, HKV=hkv, HK=hk, F=f, D=d, C=c, HAS_VALID=valid is not None, PREC=prec)

        # softmax part: dq (and delta, which the linear part needs), then dk and the softmax share of dv
        dq = torch.empty_like(q)
        delta = torch.empty(b, t, h, **f32)
        rsum = torch.empty(b, t, h, **f32)
        dmx = torch.empty(b, t, h, **f32)
        _bwd_win_dq[(n, b * h)](q, k, v, gamma, vmask, o, do, den, mx, amax, dq, delta, rsum, dmx,
                                t, window, p, scale, DEN_EPS, **win, **launch_opts(TUNE, c * max(bk, bd)))
        dk_ = torch.empty_like(k)
        dvw = torch.empty(b, t, hkv, d, **f32)
        _bwd_win_dkv[(n, b * hkv)](q, k, v, gamma, vmask, do, den, mx, amax, delta, dmx, dk_, dvw,
                                   t, window, p, scale, DEN_EPS, **win, **launch_opts(TUNE, c * max(bk, bd)))

        # linear part, forward in time
        dqf = torch.empty_like(qf)
        bf_q = TUNE["bwd_block"] or (min(bf, 64) if bf * bd > 64 * 128 else bf)
        _bwd_dq[(triton.cdiv(f, bf_q), ns, b * h)](
            v, kf, vmask, do, den, delta, dqf, h0s if h0s is not None else den, h0z if h0z is not None else den,
            t, window, p, seg, nslot, DEN_EPS, BF=bf_q, BD=bd, HAS_H0=h0s is not None, **lin,
            **launch_opts(TUNE, bf_q * bd))

        # linear part, backward in time, from the reverse state of the queries after each segment
        need_d0 = has_s0 and (ctx.needs_input_grad[7] or ctx.needs_input_grad[8])
        dhs = dhz = tot_s = tot_z = None
        if ns > 1:
            dhs, dhz, tot_s, tot_z = _segment_states_bwd(qf, do, den, delta, t, seg, p, ns, c, hk, prec, need_d0,
                                                         tune=TUNE)
        store_d0 = need_d0 and ns == 1
        d0s = torch.empty(b, hk, f, d, **f32) if store_d0 else den
        d0z = torch.empty(b, hk, f, **f32) if store_d0 else den
        add_dvw = hk == hkv  # one state head per k/v head: it finishes dv; else fp32 partials summed below
        dv_ = torch.empty_like(v) if add_dvw else torch.empty(b, t, hk, d, **f32)
        dkf = torch.empty_like(kf)
        args = (qf, kf, v, vmask, do, den, delta, dvw, dkf, dv_, dhs if dhs is not None else den,
                dhz if dhz is not None else den, d0s, d0z, t, window, p, seg, ns if dhs is not None else 1, DEN_EPS)
        flags = dict(ADD_DVW=add_dvw, HAS_DH=dhs is not None, **lin)
        bf_k, bd_v = TUNE["bwd_block"] or min(bf, 64), TUNE["bwd_block"] or min(bd, 64)
        _bwd_dkv[(triton.cdiv(f, bf_k), ns, b * hk)](
            *args, BF=bf_k, BD=bd, DO_DKF=True, STORE_D0=store_d0, **flags, **launch_opts(TUNE, bf_k * bd))
        _bwd_dkv[(triton.cdiv(d, bd_v), ns, b * hk)](
            *args, BF=bf, BD=bd_v, DO_DKF=False, STORE_D0=False, **flags, **launch_opts(TUNE, bf * bd_v))
        if not add_dvw:
            dv_ = (dvw + dv_.view(b, t, hkv, hk // hkv, d).sum(3)).to(v.dtype)

        ds0 = dz0 = None
        if need_d0:
            ds0, dz0 = (d0s, d0z) if store_d0 else (tot_s, tot_z)
        if dst is not None or dzt is not None:
            # the final state holds s0 and every key but the last W: its gradient reaches those directly
            dkf, dv_, ds0, dz0 = _final_state_grad(kf, v, valid, dst, dzt, window, dkf, dv_, ds0, dz0, need_d0)
        dgamma = rsum.sum((0, 1)).to(gamma.dtype) if ctx.needs_input_grad[5] else None
        ds0 = ds0.to(s0_dtype) if need_d0 else None
        dz0 = dz0.to(s0_dtype) if need_d0 else None
        return dq, dk_, dv_, dqf, dkf, dgamma, None, ds0, dz0, None, None, None, None


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
    q, k, v, qf, kf, gamma, window, scale, valid=None, initial_state=None, output_final_state=False, chunk_size=64,
    cu_seqlens=None,
):
    """Same contract as `chunk_window_linear_attn_torch`: returns (o [B, T, H, D] in v.dtype, final state or None).

    initial_state / final state: (S [B, Hk, F, D], z [B, Hk, F]) fp32; the final state covers every token except the
    last `window`. Differentiable in q, k, v, qf, kf, gamma and the initial state.
    cu_seqlens: optional [N + 1] boundaries of N sequences packed along T (B == 1); states are then per sequence
    ([N, ...]). They run as a left-padded batch (a gather and a scatter of the inputs and the output).
    """
    if cu_seqlens is not None:
        assert q.shape[0] == 1, "cu_seqlens packs the sequences along T of a single row"
        rows, idx, xs = varlen_to_batch(cu_seqlens, q, k, v, qf, kf)
        o, st = chunk_window_linear_attn(*xs, gamma, window, scale, varlen_valid(valid, rows, idx), initial_state,
                                         output_final_state, chunk_size)
        return batch_to_varlen(o, rows, idx, q.shape[1]), st
    dt = v.dtype
    q, k, qf, kf = (x.to(dt).contiguous() for x in (q, k, qf, kf))
    v = v.contiguous()
    check_size(q, k, v, qf, kf)
    c = chunk_size if chunk_size in (16, 32, 64, 128) else 64
    s0 = z0 = None
    if initial_state is not None:
        s0, z0 = initial_state
    vmask = None if valid is None else valid.to(torch.uint8).contiguous()
    o, fs, fz = _WindowLinearAttn.apply(q, k, v, qf, kf, gamma.float().contiguous(), vmask, s0, z0, int(window),
                                        float(scale), bool(output_final_state), c)
    return o, ((fs, fz) if output_final_state else None)
