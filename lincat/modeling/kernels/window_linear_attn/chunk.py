"""Triton form of the LoLCATs sliding-window hybrid: forward and backward as one autograd Function.

Queries come in chunks of C tokens. A chunk sees, exactly, its band of P + 1 key chunks (P = ceil((W - 1) / C)): each
pair there is either in the window (softmax term) or older (linear term). Everything before the band is older for all
queries of the chunk and comes from the linear state entering the band, h_{n-P} = sum kf v^T (z likewise). The
softmax terms keep their own running max (online softmax) because the window max m_i weighs the softmax terms against
the linear ones: it is part of the function, and its gradient is taken (through the argmax).

Two passes, as in the Hedgehog op (linear_attn/chunk.py), whose state passes this op uses as they are: the states
are stored first (the only serial loop; TUNE["state_tokens"] apart, 128 by default), then every chunk runs on its
own, one program per (chunk, batch x query head, value block), from the last stored state at or before its band,
the keys between joining as older pairs.
Grids: the softmax dk / dv pass puts the batch x head index first and the chunk second; the others (output, dq and
dqf, linear dkf / dv) the chunk first, the batch x head index second and the column block last. On the H100 (T = 8K,
B = 4, bf16; bench/results/kernels.md): 5.31 against 5.72 ms forward+backward with 8 KV heads, 5.85 against 5.96
with 32, for the same programs in the previous grids; the dq pass, once it also formed dqf, 4.88 against 4.93 ms
chunk first. Why the grid's shape matters this much is not understood (for the linear passes the programs' linear
order is unchanged); the swa passes, in the same experiment, were up to 1.75x slower in other orders, and keep theirs.
Backward: the softmax part needs no state and runs flash-attention style: one program per query chunk for dq (which
goes on to the linear part's dqf, from the stored states), one per key chunk and k/v head for dk and the softmax share
of dv. The linear dkf and dv read the reverse states (dh = sum over the queries after a point of qf dnum^T, stored as
far apart as the forward's): key chunk kc takes the first one past its band's reach, and the query chunks between
explicitly, as older pairs.
"""

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # transformers' remote-code import check skips try blocks; ops.py falls back to PyTorch
    raise

from ..utils import DEN_EPS, batch_to_varlen, varlen_to_batch, varlen_valid
from ..chunk_utils import band_query_tiles, check_size, dot_precision, keys_ok, load, p2, row_ptrs, store
# the linear state's passes are the Hedgehog op's (the forward one with END = T - W)
from ..linear_attn.chunk import _state_ptrs, bwd_states, fit, fwd_states, o_opts

# Knobs for tests and benchmarks: fwd_bd, value block of the forward (None: all of D while F x D <= 128 x 128, 1.3x
# faster than 64 on the H100); bwd_block, feature / value block of the linear part's backward; num_warps of the chunk
# passes; chunk, the chunk when the caller gives none (64: with a 64-token window, a band of two 128-token chunks is
# 1.8x slower); state_tokens, tokens between stored linear states, a power of two up to 128 (128 with 64-token
# chunks: the state pass writes, and the output pass reads, half the states of one per chunk, for one more chunk of
# older pairs in odd chunks; 1.18x / 1.09x faster forward / forward+backward on the H100 than 64); fuse_dkv, the
# linear part's dkf and dv in one pass (while F x D <= 128 x 128 and each k/v head has one state head), which reads
# each query chunk's qf and do once for both (6.45 against 6.51 ms forward+backward at T = 8K); fuse_dq, the linear
# dqf in the softmax dq pass (while F fits one block); win_queries, rows of the query tiles in the softmax dk / dv
# pass (at most the chunk); merge_band, the forward's band from its last key chunk to its first, whose older pairs
# then share one product with v with its window pairs (1.156 against 1.177 ms forward at T = 8K, 1.030 against 1.067
# with 8 KV heads, on the H100; bf16 and fp32 inputs only: in fp16, gamma e falls below fp16's normal range for small
# gamma and the softmax terms lose precision). The state passes' knobs are linear_attn/chunk.py's TUNE.
TUNE = {"fwd_bd": None, "bwd_block": None, "num_warps": None, "chunk": 64, "state_tokens": 128,
        "fuse_dkv": True, "fuse_dq": True, "win_queries": 32, "merge_band": True}


# ----------------------------------------------------------------------------------------------------------------------
# Triton helpers


# Never tl.trans a tl.dot result: Triton 3.4 to 3.7.0 miscompiles that on Hopper (fla issue 640). Products that need
# a transposed result are formed transposed instead (tl.dot(k, tl.trans(q)) rather than tl.trans(tl.dot(q, ...))),
# and the passes that multiply by S^T load it transposed. Transposing loaded tiles is fine, with one exception seen
# on the H100 (triton 3.6): a key tile used in one loop iteration both as is and transposed, each time as the left
# operand (tl.dot(kt, ...) and tl.dot(tl.trans(kt), ...)), made the compiled pass access memory out of bounds; a second
# load of the tile through transposed pointers did not.


@triton.jit
def _band_scores(qt, k, valid, b, hv, tq, p, T, W, scale, x, c, C: tl.constexpr, HKV: tl.constexpr,
                 DK: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr):
    """Scaled scores [queries, keys] of the query chunk at rows tq against key chunk p, -inf outside the window;
    with the key tile, the key rows and which of them are real keys (not past T, not padding)."""
    tk = p * C + c
    ok = keys_ok(valid, b, tk, T, T, HAS_VALID)
    rel = tk[None, :] - tq[:, None]
    kt = load(k, b, hv, tk, x, T, HKV, DK)
    s = tl.dot(qt, tl.trans(kt), input_precision=PREC) * scale
    return tl.where((rel <= 0) & (rel > -W) & ok[None, :], s, float("-inf")), kt, tk, ok


# ----------------------------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _running_max(s, p, m, idx, C: tl.constexpr, DESCENDING: tl.constexpr):
    """Key chunk p's scores s into the running max m (and its key, idx): the new max and key, exp(s - max) and the
    factor that rescales the terms so far. On a tie the earlier key wins, whichever way the band is walked."""
    mt = tl.max(s, 1)
    if DESCENDING:
        idx = tl.where(mt >= m, tl.argmax(s, 1).to(tl.int32) + p * C, idx)
    else:
        idx = tl.where(mt > m, tl.argmax(s, 1).to(tl.int32) + p * C, idx)
    mn = tl.maximum(m, mt)
    return mn, idx, tl.exp(s - mn[:, None]), tl.exp(m - mn)


@triton.jit
def _window_terms(qt, k, v, valid, b, hv, tq, p, T, W, scale, x, c, d, m, idx, acc, dw, C: tl.constexpr,
                  HKV: tl.constexpr, DK: tl.constexpr, D: tl.constexpr, DESCENDING: tl.constexpr,
                  HAS_VALID: tl.constexpr, PREC: tl.constexpr):
    """Key chunk p's window terms into the running max, the accumulator and their sum of exponentials."""
    s, kt, tk, _ = _band_scores(qt, k, valid, b, hv, tq, p, T, W, scale, x, c, C, HKV, DK, HAS_VALID, PREC)
    m, idx, e, alpha = _running_max(s, p, m, idx, C, DESCENDING)
    vt = load(v, b, hv, tk, d, T, HKV, D)
    acc = tl.dot(e.to(vt.dtype), vt, acc=acc * alpha[:, None], input_precision=PREC)
    return m, idx, acc, dw * alpha + tl.sum(e, 1)


@triton.jit
def _fwd(q, k, v, qf, kf, gamma, valid, o, den, mx, amax, hs, hz, T, W, P, NS, scale, eps,
         H: tl.constexpr, HKV: tl.constexpr, HK: tl.constexpr, DK: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
         C: tl.constexpr, RS: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
         MERGE: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr):
    """One program per (chunk, batch x query head, value block). The NS stored states are one per RS chunks.
    MERGE: the band runs from its last key chunk to its first, so that the max is final at the first one, whose older
    pairs then join its window pairs in one product with v (one product and one v tile fewer a program)."""
    n, i_bh, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = i_bh // H, i_bh % H
    hk = h // (H // HK)
    hv = hk // (HK // HKV)  # the k/v head of every query head of this state
    c = tl.arange(0, C)
    f = tl.arange(0, BF)
    d = i_d * BD + tl.arange(0, BD)
    x = tl.arange(0, BK)
    gm = tl.load(gamma + h)
    tq = n * C + c
    p0 = tl.maximum(n - P, 0)
    # softmax terms first, with their running max; one accumulator serves both kinds of term, so the linear
    # terms join it only once the window max is final
    qt = load(q, b, h, tq, x, T, H, DK)
    m = tl.full([C], -1e30, tl.float32)
    idx = tl.full([C], -1, tl.int32)
    acc = tl.zeros([C, BD], tl.float32)
    dw = tl.zeros([C], tl.float32)
    if MERGE:
        for i in range(0, n - p0):
            m, idx, acc, dw = _window_terms(qt, k, v, valid, b, hv, tq, n - i, T, W, scale, x, c, d, m, idx, acc, dw,
                                            C, HKV, DK, D, True, HAS_VALID, PREC)
        # the band's first chunk: the max is final here, so its older pairs (none when n < P, unless the window
        # reaches past a chunk boundary) share the window pairs' product with v
        qft = load(qf, b, h, tq, f, T, H, F)
        s, _, tk, ok = _band_scores(qt, k, valid, b, hv, tq, p0, T, W, scale, x, c, C, HKV, DK, HAS_VALID, PREC)
        m, idx, e, alpha = _running_max(s, p0, m, idx, C, True)
        dw = dw * alpha + tl.sum(e, 1)
        a = tl.dot(qft, tl.trans(load(kf, b, hk, tk, f, T, HK, F)), input_precision=PREC)
        a = tl.where((tk[None, :] - tq[:, None] <= -W) & ok[None, :], a, 0.0)
        vt = load(v, b, hv, tk, d, T, HKV, D)
        acc = tl.dot((gm * e + a).to(vt.dtype), vt, acc=acc * (gm * alpha)[:, None], input_precision=PREC)
        dl = gm * dw + tl.sum(a, 1)
    else:
        for p in range(p0, n + 1):
            m, idx, acc, dw = _window_terms(qt, k, v, valid, b, hv, tq, p, T, W, scale, x, c, d, m, idx, acc, dw,
                                            C, HKV, DK, D, False, HAS_VALID, PREC)
        qft = load(qf, b, h, tq, f, T, H, F)
        acc = acc * gm
        dl = gm * dw
    # the last stored linear state at or before the band: every key before the band is older than the window for
    # every query here, so the keys between that state and the band join as older pairs
    js = p0 // RS
    ps, ms, pz, mz = _state_ptrs(hs, hz, b, hk, js, NS, f, d, HK, F, D)
    S = tl.load(ps, mask=ms, other=0.0).to(qft.dtype)
    z = tl.load(pz, mask=mz, other=0.0)
    acc = tl.dot(qft, S, acc=acc, input_precision=PREC)
    dl += tl.sum(qft.to(tl.float32) * z[None, :], 1)
    for p in range(js * RS, n + 1):
        # some pairs of this key chunk are older than the window (with MERGE, the band's first chunk's are in)
        if (n * C + C - 1 - p * C >= W) and ((not MERGE) or (p != p0)):
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


# ----------------------------------------------------------------------------------------------------------------------
# Backward. With dA_ij = (do_i . v_j - do_i . o_i) / den_i for every visible pair:
#   softmax pairs: ds_ij = gamma e_ij dA_ij, plus dm_i = -sum_j ds_ij at the argmax (m_i moves with that score);
#   older pairs: dqf_i += dA_ij kf_j, dkf_j += dA_ij qf_i, dv_j += (qf_i . kf_j) dnum_i.
# Every pass runs one program per chunk: the softmax part needs no state, the linear part reads the stored ones.


@triton.jit
def _bwd_win_dq(q, k, v, kf, gamma, valid, o, do, den, mx, amax, dq, dqf, delta, rsum, dmx, hs, hz, T, W, P, NS,
                scale, eps, H: tl.constexpr, HKV: tl.constexpr, HK: tl.constexpr, DK: tl.constexpr, F: tl.constexpr,
                D: tl.constexpr, C: tl.constexpr, RS: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr,
                BD: tl.constexpr, LIN: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr):
    """Softmax part of dq, per (query chunk, batch x query head); also stores delta = do . o, r = sum_j e_ij dA_ij
    (dgamma) and dm. LIN: then the linear part's dqf as _bwd_dq forms it (all of F in one block), from the do tile
    already loaded (4.92 against 5.07 ms forward+backward at T = 8K on the H100, bench/results/kernels.md)."""
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
        s, kt, tk, _ = _band_scores(qt, k, valid, b, hv, tq, p, T, W, scale, x, c, C, HKV, DK, HAS_VALID, PREC)
        e = tl.exp(s - m[:, None])
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
    if LIN:
        f = tl.arange(0, BF)
        dqt = _older_dq(v, kf, valid, dnum, -dl * rden, hs, hz, b, h // (H // HK), hv, n, tq, c, f, d, T, W, P, NS,
                        HKV, HK, F, D, C, RS, HAS_VALID, PREC)
        store(dqf, dqt, b, h, tq, f, T, H, F)


@triton.jit
def _bwd_win_dkv(q, k, v, gamma, valid, do, den, mx, amax, delta, dmx, dk, dvw, T, W, P, scale, eps,
                 H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
                 CQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr):
    """Softmax part of dk and dv, per key chunk and k/v head, summed over the query heads that read it. Scores are
    formed keys by queries, so that dk = ds^T q needs no transpose of a product. The queries come in tiles of
    CQ <= C rows: with 32 of a 64-token chunk the loop's tiles no longer spill at 4 warps (this pass 0.87 against
    1.64 ms at T = 8K on the H100, forward+backward 4.92 against 5.67 with 64, bench/results/kernels.md)."""
    i_bh, kc = tl.program_id(0), tl.program_id(1)
    b, hv = i_bh // HKV, i_bh % HKV
    G: tl.constexpr = H // HKV
    c = tl.arange(0, CQ)
    x = tl.arange(0, BK)
    d = tl.arange(0, BD)
    tk = kc * C + tl.arange(0, C)
    ok = keys_ok(valid, b, tk, T, T, HAS_VALID)
    kt = load(k, b, hv, tk, x, T, HKV, DK)
    vt = load(v, b, hv, tk, d, T, HKV, D)
    dkt = tl.zeros([C, BK], tl.float32)
    dvt = tl.zeros([C, BD], tl.float32)
    # one flat loop over (query tile, query head): nested loops carrying the accumulators spill registers
    q0, n_q = band_query_tiles(kc, T, W, C, CQ)
    for it in range(0, n_q * G):
        qn = q0 + it // G
        h = hv * G + it % G
        tq = qn * CQ + c
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
def _older_dq(v, kf, valid, dnum, dden, hs, hz, b, hk, hv, n, tq, c, f, d, T, W, P, NS, HKV: tl.constexpr,
              HK: tl.constexpr, F: tl.constexpr, D: tl.constexpr, C: tl.constexpr, RS: tl.constexpr,
              HAS_VALID: tl.constexpr, PREC: tl.constexpr):
    """Query chunk n's linear dqf (columns f): dnum h^T + dden z with the forward's stored state (one per RS chunks)
    at or before the band, plus the older pairs after it."""
    js = tl.maximum(n - P, 0) // RS
    ps, ms, pz, mz = _state_ptrs(hs, hz, b, hk, js, NS, f, d, HK, F, D, True)
    ST = tl.load(ps, mask=ms, other=0.0).to(dnum.dtype)
    z = tl.load(pz, mask=mz, other=0.0)
    dqt = tl.dot(dnum, ST, input_precision=PREC) + dden[:, None] * z[None, :]
    for p in range(js * RS, n + 1):
        if n * C + C - 1 - p * C >= W:  # some pairs of this key chunk are older than the window
            tk = p * C + c
            ok = keys_ok(valid, b, tk, T, T, HAS_VALID)
            vt = load(v, b, hv, tk, d, T, HKV, D)
            da = tl.dot(dnum, tl.trans(vt), input_precision=PREC) + dden[:, None]
            da = tl.where(tk[None, :] - tq[:, None] <= -W, da, 0.0)
            kft = tl.where(ok[:, None], load(kf, b, hk, tk, f, T, HK, F), 0.0)
            dqt = tl.dot(da.to(kft.dtype), kft, acc=dqt, input_precision=PREC)
    return dqt


@triton.jit
def _bwd_dq(v, kf, valid, do, den, delta, dqf, hs, hz, T, W, P, NS, eps,
            H: tl.constexpr, HKV: tl.constexpr, HK: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
            C: tl.constexpr, RS: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, HAS_VALID: tl.constexpr,
            PREC: tl.constexpr):
    """Linear part of dqf, per (query chunk, batch x query head, feature block), when the softmax dq pass does not
    form it (F wider than one block)."""
    n, i_bh, i_f = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = i_bh // H, i_bh % H
    hk = h // (H // HK)
    hv = hk // (HK // HKV)
    c = tl.arange(0, C)
    f = i_f * BF + tl.arange(0, BF)
    d = tl.arange(0, BD)
    tq = n * C + c
    dot_ = load(do, b, h, tq, d, T, H, D)
    pr, mr = row_ptrs(den, b, h, tq, T, H)
    dn = tl.load(pr, mask=mr, other=1.0)
    rden = tl.where(dn >= eps, 1.0 / tl.maximum(dn, eps), 0.0)
    dden = -tl.load(row_ptrs(delta, b, h, tq, T, H)[0], mask=mr, other=0.0) * rden
    dnum = (dot_.to(tl.float32) * rden[:, None]).to(dot_.dtype)
    dqt = _older_dq(v, kf, valid, dnum, dden, hs, hz, b, hk, hv, n, tq, c, f, d, T, W, P, NS, HKV, HK, F, D, C, RS,
                    HAS_VALID, PREC)
    store(dqf, dqt, b, h, tq, f, T, H, F)


@triton.jit
def _bwd_dkv(qf, kf, v, valid, do, den, delta, dvw, dkf, dv, dhs, dhz, T, W, P, NC, NS, eps,
             H: tl.constexpr, HKV: tl.constexpr, HK: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
             C: tl.constexpr, RS: tl.constexpr, R: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
             DKF: tl.constexpr, DV: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr):
    """Linear part of dkf (DKF) and / or of dv (DV), per key chunk kc and batch x group of R state heads (that share a
    k/v head); with only one of them, program_id(2) is a block of its columns (BF of F for dkf, BD of D for dv) and
    the other dim is covered whole. The queries of chunks after kc + P see all of kc as older than their band: their
    share is the reverse state stored at or after them (one per RS chunks: NS of them, the one for the queries from
    chunk RS * (js + 1) on, js = (kc + P) // RS), and the query chunks between kc + P and that state are added
    explicitly, as are the band's own older pairs, formed keys by queries, in one flat loop over (query chunk, query
    head of the state head). With DV, R is every state head of a k/v head: the pass sums their share of dv, adds the
    softmax pass's and stores dv (4.43 against 4.82 ms forward+backward at T = 8K with 8 KV heads and a state per
    query head on the H100, where fp32 partials per state head were summed in PyTorch: 0.43 ms of reductions)."""
    kc, i_bh, i_x = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NG: tl.constexpr = HK // R
    b, hg = i_bh // NG, i_bh % NG
    G: tl.constexpr = H // HK
    hv = hg * R // (HK // HKV)
    c = tl.arange(0, C)
    f = tl.arange(0, BF)
    d = tl.arange(0, BD)
    if DKF and not DV:
        f = i_x * BF + f
    if DV and not DKF:
        d = i_x * BD + d
    tk = kc * C + c
    ok = keys_ok(valid, b, tk, T, T, HAS_VALID)
    if DKF:
        vt = load(v, b, hv, tk, d, T, HKV, D)
    if DV:
        acc_v = tl.zeros([C, BD], tl.float32)
    js = (kc + P) // RS
    # the state heads of the group one after the other (unrolled): dv sums over them in one accumulator
    for r in tl.static_range(R):
        hk = hg * R + r
        if DKF:
            acc_k = tl.zeros([C, BF], tl.float32)
        if DV:
            kft = tl.where(ok[:, None], load(kf, b, hk, tk, f, T, HK, F), 0.0)
        for j in range(0, (RS * (js + 1) - kc) * G):
            qn = kc + j // G
            h = hk * G + j % G
            if (qn < NC) & (qn * C + C - 1 - kc * C >= W):  # some pairs are older than the window
                tq = qn * C + c
                older_t = tk[:, None] - tq[None, :] <= -W
                qft = load(qf, b, h, tq, f, T, H, F)
                dot_ = load(do, b, h, tq, d, T, H, D)
                pr, mr = row_ptrs(den, b, h, tq, T, H)
                dn = tl.load(pr, mask=mr, other=1.0)
                rden = tl.where(dn >= eps, 1.0 / tl.maximum(dn, eps), 0.0)
                dnum = (dot_.to(tl.float32) * rden[:, None]).to(dot_.dtype)
                if DKF:
                    dden = -tl.load(row_ptrs(delta, b, h, tq, T, H)[0], mask=mr, other=0.0) * rden
                    da_t = tl.dot(vt, tl.trans(dnum), input_precision=PREC) + dden[None, :]
                    da_t = tl.where(older_t, da_t, 0.0).to(qft.dtype)
                    acc_k = tl.dot(da_t, qft, acc=acc_k, input_precision=PREC)
                if DV:
                    a_t = tl.where(older_t, tl.dot(kft, tl.trans(qft), input_precision=PREC), 0.0)
                    acc_v = tl.dot(a_t.to(dnum.dtype), dnum, acc=acc_v, input_precision=PREC)
        # dkf alone multiplies by dS^T: it loads the [D, F] view rather than transposing
        ps, ms, pz, mz = _state_ptrs(dhs, dhz, b, hk, tl.minimum(js, NS - 1), NS, f, d, HK, F, D, DKF and not DV)
        live = js < NS  # else no query reaches past what the loop covered: nothing to add
        dS = tl.where(live, tl.load(ps, mask=ms, other=0.0), 0.0).to(qf.dtype.element_ty)
        if DKF:
            dz = tl.where(live, tl.load(pz, mask=mz, other=0.0), 0.0)
            if DV:
                acc_k = tl.dot(vt, tl.trans(dS), acc=acc_k, input_precision=PREC) + dz[None, :]
            else:
                acc_k = tl.dot(vt, dS, acc=acc_k, input_precision=PREC) + dz[None, :]
            store(dkf, tl.where(ok[:, None], acc_k, 0.0), b, hk, tk, f, T, HK, F)
        if DV:
            acc_v = tl.dot(kft, dS, acc=acc_v, input_precision=PREC)
    if DV:
        store(dv, acc_v + load(dvw, b, hv, tk, d, T, HKV, D), b, hg, tk, d, T, NG, D)


# ----------------------------------------------------------------------------------------------------------------------
# Host side


def _state_every(c: int) -> int:
    """Chunks per stored linear state: TUNE["state_tokens"] apart (at most 128, the state pass's largest chunk),
    at least one chunk."""
    n = TUNE["state_tokens"]
    if n < 1 or n & (n - 1):
        raise ValueError(f"window_linear_attn: TUNE['state_tokens'] = {n} must be a power of two")
    return max(1, min(n, 128) // c)


def _band(window: int, c: int) -> int:
    return math.ceil((window - 1) / c) if window > 1 else 0


def _opts(c: int, rows: int, cols: int) -> dict:
    opts = o_opts(c, rows, cols)
    return {**opts, "num_warps": TUNE["num_warps"] or opts["num_warps"]}


class _WindowLinearAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, qf, kf, gamma, valid, s0, z0, window, scale, output_final_state, chunk):
        b, t, h, dk = q.shape
        hkv, hk, f, d = k.shape[2], kf.shape[2], kf.shape[-1], v.shape[-1]
        c, p = chunk, _band(window, chunk)
        nc = triton.cdiv(t, c)
        if max(nc, b * h) > 65535:  # the grids' y dimension holds one of them
            raise ValueError(f"window_linear_attn: {nc} chunks of {c} tokens and {b * h} batch x heads; each must stay "
                             "below 65536 (split the batch, or the sequence with initial_state)")
        bk, bf = p2(dk), p2(f)
        bd = fit(p2(d), bf, TUNE["fwd_bd"])
        prec = dot_precision(v.dtype)
        dev = q.device
        f32 = dict(device=dev, dtype=torch.float32)
        vmask = valid if valid is not None else q
        # states over the keys before T - W (the final state leaves out the window), one per rs chunks
        rs = _state_every(c)
        hs, hz, final = fwd_states(kf, v, valid, s0, z0, max(t - window, 0), c * rs, prec, output_final_state)
        o = torch.empty(b, t, h, d, device=dev, dtype=v.dtype)
        den = torch.empty(b, t, h, **f32)
        mx = torch.empty(b, t, h, **f32)
        amax = torch.empty(b, t, h, device=dev, dtype=torch.int32)
        _fwd[(nc, b * h, triton.cdiv(d, bd))](
            q, k, v, qf, kf, gamma, vmask, o, den, mx, amax, hs, hz, t, window, p, hs.shape[2], scale, DEN_EPS,
            H=h, HKV=hkv, HK=hk, DK=dk, F=f, D=d, C=c, RS=rs, BK=bk, BF=bf, BD=bd,
            MERGE=TUNE["merge_band"] and v.dtype != torch.float16, HAS_VALID=valid is not None, PREC=prec,
            **_opts(c, max(bk, bf), bd))
        ctx.save_for_backward(q, k, v, qf, kf, gamma, valid, o, den, mx, amax, hs, hz)
        ctx.cfg = (window, scale, c, p, rs, s0 is not None, None if s0 is None else s0.dtype)
        ctx.set_materialize_grads(False)
        if not output_final_state:
            return o, None, None
        return o, final[0], final[1]

    @staticmethod
    def backward(ctx, do, dst, dzt):
        q, k, v, qf, kf, gamma, valid, o, den, mx, amax, hs, hz = ctx.saved_tensors
        window, scale, c, p, rs, has_s0, s0_dtype = ctx.cfg
        b, t, h, dk = q.shape
        hkv, hk, f, d = k.shape[2], kf.shape[2], kf.shape[-1], v.shape[-1]
        n = triton.cdiv(t, c)
        bk, bf, bd = p2(dk), p2(f), p2(d)
        prec = dot_precision(v.dtype)
        f32 = dict(device=q.device, dtype=torch.float32)
        do = torch.zeros_like(o) if do is None else do.contiguous()  # only the final state was used
        vmask = valid if valid is not None else q
        win = dict(H=h, HKV=hkv, DK=dk, D=d, C=c, BK=bk, BD=bd, HAS_VALID=valid is not None, PREC=prec)
        lin = dict(H=h, HKV=hkv, HK=hk, F=f, D=d, C=c, RS=rs, HAS_VALID=valid is not None, PREC=prec)

        # softmax part: dq (and delta, which the linear part needs; with fuse_dq, dqf too), then dk and the softmax
        # share of dv
        dq = torch.empty_like(q)
        dqf = torch.empty_like(qf)
        delta = torch.empty(b, t, h, **f32)
        rsum = torch.empty(b, t, h, **f32)
        dmx = torch.empty(b, t, h, **f32)
        bf_q = fit(bf, bd, TUNE["bwd_block"])
        fuse_dq = TUNE["fuse_dq"] and bf_q >= f
        _bwd_win_dq[(n, b * h)](q, k, v, kf, gamma, vmask, o, do, den, mx, amax, dq, dqf, delta, rsum, dmx, hs, hz, t,
                                window, p, hs.shape[2], scale, DEN_EPS, HK=hk, F=f, RS=rs, BF=bf_q, LIN=fuse_dq, **win,
                                **_opts(c, max(bk, bf_q), bd))
        dk_ = torch.empty_like(k)
        dvw = torch.empty(b, t, hkv, d, **f32)
        _bwd_win_dkv[(b * hkv, n)](q, k, v, gamma, vmask, do, den, mx, amax, delta, dmx, dk_, dvw, t, window, p,
                                   scale, DEN_EPS, CQ=min(TUNE["win_queries"], c), **win, **_opts(c, bk, bd))

        # linear part: dqf from the stored states (unless fused above); dkf and dv from the reverse states (the final
        # state's gradient is added in PyTorch below, so none enters them)
        if not fuse_dq:
            _bwd_dq[(n, b * h, triton.cdiv(f, bf_q))](
                v, kf, vmask, do, den, delta, dqf, hs, hz, t, window, p, hs.shape[2], DEN_EPS, BF=bf_q, BD=bd, **lin,
                **_opts(c, bf_q, bd))
        need_d0 = has_s0 and (ctx.needs_input_grad[7] or ctx.needs_input_grad[8])
        dhs, dhz, d0 = bwd_states(qf, do, den, delta, hk, None, None, c * rs, prec, need_d0, hs)
        # dv: each program of the dv pass sums the linear share of a k/v head's r state heads and adds the softmax
        # share. With r > 1, dkf and dv run as two passes: the dv pass's loop over the state heads next to both
        # accumulators spills (4.70 against 4.43 ms forward+backward at T = 8K, 8 KV heads, a state per query head)
        r = hk // hkv
        dv_ = torch.empty_like(v)
        dkf = torch.empty_like(kf)
        args = (qf, kf, v, vmask, do, den, delta, dvw, dkf, dv_, dhs, dhz, t, window, p, n, dhs.shape[2], DEN_EPS)
        if TUNE["fuse_dkv"] and r == 1 and bf * bd <= 128 * 128:
            _bwd_dkv[(n, b * hk, 1)](*args, R=1, BF=bf, BD=bd, DKF=True, DV=True, **lin, **_opts(c, bf, bd))
        else:
            bd_v = fit(bd, bf, TUNE["bwd_block"])
            _bwd_dkv[(n, b * hk, triton.cdiv(f, bf_q))](
                *args, R=1, BF=bf_q, BD=bd, DKF=True, DV=False, **lin, **_opts(c, bf_q, bd))
            _bwd_dkv[(n, b * hkv, triton.cdiv(d, bd_v))](
                *args, R=r, BF=bf, BD=bd_v, DKF=False, DV=True, **lin, **_opts(c, bf, bd_v))

        ds0, dz0 = d0 if need_d0 else (None, None)
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
    gv = gv.view(b, old, hv, hk // hv, v.shape[-1]).sum(3)  # old is 0 when T <= W: no -1
    dv = dv.clone()
    dv[:, :old] += gv.to(dv.dtype)
    if need_d0:
        ds0 = dst if ds0 is None else ds0 + dst
        dz0 = dzt if dz0 is None else dz0 + dzt
    return dkf, dv, ds0, dz0


def chunk_window_linear_attn(
    q, k, v, qf, kf, gamma, window, scale, valid=None, initial_state=None, output_final_state=False, chunk_size=None,
    cu_seqlens=None,
):
    """Same contract as `chunk_window_linear_attn_torch`: returns (o [B, T, H, D] in v.dtype, final state or None).

    initial_state / final state: (S [B, Hk, F, D], z [B, Hk, F]) fp32; the final state covers every token except the
    last `window`. Differentiable in q, k, v, qf, kf, gamma and the initial state.
    chunk_size: 16, 32, 64 or 128 (None: TUNE["chunk"]); the result does not depend on it.
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
    c = chunk_size if chunk_size in (16, 32, 64, 128) else TUNE["chunk"]
    s0 = z0 = None
    if initial_state is not None:
        s0, z0 = (x.float().contiguous() for x in initial_state)
    vmask = None if valid is None else valid.to(torch.uint8).contiguous()
    o, fs, fz = _WindowLinearAttn.apply(q, k, v, qf, kf, gamma.float().contiguous(), vmask, s0, z0, int(window),
                                        float(scale), bool(output_final_state), c)
    return o, ((fs, fz) if output_final_state else None)
