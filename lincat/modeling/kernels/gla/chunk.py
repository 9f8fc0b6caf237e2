"""Triton form of gated linear attention (Liger's GLA branch): forward and backward as one autograd Function.

S_t = diag(exp(g_t)) S_{t-1} + kf_t v_t^T, o_t = qf_t S_t. Queries come in chunks of C tokens; lg is the in-chunk
cumulative log gate (<= 0, decreasing). Across chunks the state is carried exactly inside one program:
S <- exp(lg_C) S + (kf exp(lg_C - lg))^T v. Inside a chunk the pair weights qf_i . (kf_j exp(lg_i - lg_j)) factor as
(qf exp(lg)) (kf exp(-lg))^T, one matrix product, as long as the chunk's total decay stays below SAFE (exp(-lg) must
not overflow); a chunk that decays harder takes an exact, slower elementwise path. Both are exact up to rounding.

The forward and the backward's forward-in-time pass (dqf) run one program per (value or feature block, segment,
batch x query head); the backward-in-time passes (dkf with the gate gradient dg = reverse cumsum of qf dqf - kf dkf,
and dv) one per (block, segment, batch x state head). Segments start from states that a pre-pass computes
(per-segment sums, then a scan with the segments' decays). Short segments (4 chunks) keep the serial chain inside a
program short, which is what bounds these kernels; the Hedgehog and lolcats ops take the limit, one chunk per
program (linear_attn/chunk.py).
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # transformers' remote-code import check skips try blocks; ops.py falls back to PyTorch
    raise

from ..utils import batch_to_varlen, varlen_to_batch, varlen_valid
from ..chunk_utils import check_size, dot_precision, keys_ok, launch_opts, load, p2, store

# Knobs for tests and benchmarks. seg_chunks: chunks per segment (None: 4; on the H100 with 8 state heads 1.1-1.25x
# faster forward than a cost model that took fewer, longer segments at T = 2K and 8K, 7% slower at 32K, and faster
# than 1 or 2 everywhere); fwd_bd: value block of the forward; bwd_block: feature / value block of the backward
# passes and the segment pre-passes.
TUNE = {"seg_chunks": None, "num_warps": None, "num_stages": None, "fwd_bd": None, "bwd_block": None}


def _safe(dtype) -> float:
    """Largest in-chunk decay (in log units) that the factored path takes: exp(decay) must stay far from the
    operand dtype's overflow (fp16 tops out at 65504, bf16 / fp32 near 3e38)."""
    return 8.0 if dtype == torch.float16 else 60.0


# ----------------------------------------------------------------------------------------------------------------------
# Triton helpers


@triton.jit
def _gates(g, valid, bi, hk, t, T, f, HK: tl.constexpr, F: tl.constexpr, HAS_VALID: tl.constexpr):
    """In-chunk cumulative log decay lg [C, BF], the chunk's total (last row) and the key mask: padding and rows past
    the end neither decay nor write the state."""
    ok = keys_ok(valid, bi, t, T, T, HAS_VALID)
    gt = tl.where(ok[:, None], load(g, bi, hk, t, f, T, HK, F).to(tl.float32), 0.0)
    return tl.cumsum(gt, 0), tl.sum(gt, 0), ok


@triton.jit
def _key_row(kf, g, valid, bi, hk, t, T, f, HK: tl.constexpr, F: tl.constexpr, HAS_VALID: tl.constexpr):
    """Key features and log gate of the single token t (zeros past the end or on padding)."""
    tv = t + 0 * f  # a vector: Triton's interpreter mishandles scalar & vector masks
    ok = (tv < T) & (f < F)
    if HAS_VALID:
        ok = ok & (tl.load(valid + bi * T + tv, mask=tv < T, other=0) != 0)
    off = (bi.to(tl.int64) * T * HK + hk) * F + tv * HK * F + f
    return tl.load(kf + off, mask=ok, other=0.0).to(tl.float32), tl.load(g + off, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _col(x, c, j):
    """Column j of a register tile (register tiles cannot be indexed)."""
    return tl.sum(tl.where(c[None, :] == j, x, 0.0), 1)


@triton.jit
def _row(x, c, j):
    return tl.sum(tl.where(c[:, None] == j, x, 0.0), 0)


# The exact paths below take one key at a time, reading its row from memory, so that they hold no tile beyond those
# the factored path holds anyway (they sit in the same kernels and would otherwise raise their register use).


@triton.jit
def _intra_exact(qt, kf, g, valid, bi, hk, t0, T, f, lg, c, C: tl.constexpr, HK: tl.constexpr, F: tl.constexpr,
                 HAS_VALID: tl.constexpr, TRANS: tl.constexpr):
    """A_ij = sum_f q_if k_jf exp(lg_if - lg_jf) for j <= i (no factoring, no overflow); TRANS: A^T, keys by
    queries."""
    a = tl.zeros([C, C], tl.float32)
    lgj = tl.zeros(f.shape, tl.float32)
    for j in range(C):
        kj, gj = _key_row(kf, g, valid, bi, hk, t0 + j, T, f, HK, F, HAS_VALID)
        lgj += gj
        col = tl.sum(qt * (kj[None, :] * tl.exp(tl.minimum(lg - lgj[None, :], 0.0))), 1)
        if TRANS:
            a = tl.where(c[:, None] == j, col[None, :], a)
        else:
            a = tl.where(c[None, :] == j, col[:, None], a)
    if TRANS:
        keep = c[:, None] <= c[None, :]
    else:
        keep = c[:, None] >= c[None, :]
    return tl.where(keep, a, 0.0)


@triton.jit
def _dq_exact(da, kf, g, valid, bi, hk, t0, T, f, lg, c, C: tl.constexpr, HK: tl.constexpr, F: tl.constexpr,
              HAS_VALID: tl.constexpr):
    """sum_{j <= i} dA_ij k_j exp(lg_i - lg_j) (da already causal)."""
    out = tl.zeros(lg.shape, tl.float32)
    lgj = tl.zeros(f.shape, tl.float32)
    for j in range(C):
        kj, gj = _key_row(kf, g, valid, bi, hk, t0 + j, T, f, HK, F, HAS_VALID)
        lgj += gj
        out += _col(da, c, j)[:, None] * (kj[None, :] * tl.exp(tl.minimum(lg - lgj[None, :], 0.0)))
    return out


@triton.jit
def _dk_exact(da_t, qt, g, valid, bi, hk, t0, T, f, lg, c, C: tl.constexpr, HK: tl.constexpr, F: tl.constexpr,
              HAS_VALID: tl.constexpr):
    """sum_{i >= j} dA_ij q_i exp(lg_i - lg_j), from dA^T (keys by queries, already causal)."""
    out = tl.zeros(lg.shape, tl.float32)
    lgj = tl.zeros(f.shape, tl.float32)
    for j in range(C):
        _, gj = _key_row(g, g, valid, bi, hk, t0 + j, T, f, HK, F, HAS_VALID)
        lgj += gj
        rowj = tl.sum(_row(da_t, c, j)[:, None] * qt * tl.exp(tl.minimum(lg - lgj[None, :], 0.0)), 0)
        out = tl.where(c[:, None] == j, rowj[None, :], out)
    return out


@triton.jit
def _state_ptr(hs, bi, hk, slot, NSLOT, f, d, HK: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
               TRANS: tl.constexpr = False):
    """States are [B, HK, NSLOT, F, D] fp32; TRANS: the [D, F] view, for passes that multiply by S^T."""
    base = ((bi * HK + hk) * NSLOT + slot).to(tl.int64)
    if TRANS:
        ps, ms = hs + base * F * D + f[None, :] * D + d[:, None], (f[None, :] < F) & (d[:, None] < D)
    else:
        ps, ms = hs + base * F * D + f[:, None] * D + d[None, :], (f[:, None] < F) & (d[None, :] < D)
    return ps, ms


# Never tl.trans a tl.dot result: Triton 3.4 to 3.7.0 miscompiles that on Hopper (fla issue 640). Products that need
# a transposed result are formed transposed instead, and the passes that multiply by S^T carry S^T. Transposing
# loaded tiles (and tiles computed elementwise from them) is fine.


@triton.jit
def _vec_ptr(hz, bi, hk, slot, NSLOT, f, HK: tl.constexpr, F: tl.constexpr):
    """Per-feature vectors [B, HK, NSLOT, F] fp32 (log decays, gate-gradient carries)."""
    return hz + ((bi * HK + hk) * NSLOT + slot).to(tl.int64) * F + f, f < F


# ----------------------------------------------------------------------------------------------------------------------
# Segment pre-passes and the scan that chains segments


@triton.jit
def _seg_kv(kf, v, g, valid, hs, hg, T, SEG, NS,
            HK: tl.constexpr, HV: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
            C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr):
    """Each segment's own state (decayed to its end) and its total log decay."""
    i_f, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bi, hk = i_bh // HK, i_bh % HK
    hv = hk // (HK // HV)
    f = i_f * BF + tl.arange(0, BF)
    d = tl.arange(0, BD)
    c = tl.arange(0, C)
    acc = tl.zeros([BF, BD], tl.float32)
    tot = tl.zeros([BF], tl.float32)
    n0 = i_s * SEG
    for n in range(n0, tl.minimum(n0 + SEG, tl.cdiv(T, C))):
        t = n * C + c
        lg, last, ok = _gates(g, valid, bi, hk, t, T, f, HK, F, HAS_VALID)
        kt = tl.where(ok[:, None], load(kf, bi, hk, t, f, T, HK, F), 0.0)
        vt = load(v, bi, hv, t, d, T, HV, D)
        kl = (kt * tl.exp(last[None, :] - lg)).to(vt.dtype)
        acc = acc * tl.exp(last)[:, None] + tl.dot(tl.trans(kl), vt, input_precision=PREC)
        tot += last
    ps, ms = _state_ptr(hs, bi, hk, i_s, NS, f, d, HK, F, D)
    tl.store(ps, acc, mask=ms)
    pg, mg = _vec_ptr(hg, bi, hk, i_s, NS, f, HK, F)
    tl.store(pg, tot, mask=mg)


@triton.jit
def _seg_q(qf, do, g, valid, hs, T, SEG, NS, S_OFF,
           H: tl.constexpr, HK: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
           C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr):
    """Each segment's own reverse state sum_i (qf_i exp(lg_i)) do_i^T, decayed back to its start."""
    i_f, i_s, i_bh = tl.program_id(0), tl.program_id(1) + S_OFF, tl.program_id(2)
    bi, hk = i_bh // HK, i_bh % HK
    G: tl.constexpr = H // HK
    f = i_f * BF + tl.arange(0, BF)
    d = tl.arange(0, BD)
    c = tl.arange(0, C)
    acc = tl.zeros([BF, BD], tl.float32)
    n0 = i_s * SEG
    n1 = tl.minimum(n0 + SEG, tl.cdiv(T, C))
    for i in range(0, n1 - n0):
        t = (n1 - 1 - i) * C + c
        lg, last, ok = _gates(g, valid, bi, hk, t, T, f, HK, F, HAS_VALID)
        acc = acc * tl.exp(last)[:, None]
        for gi in range(G):
            h = hk * G + gi
            qt = load(qf, bi, h, t, f, T, H, F)
            dot_ = load(do, bi, h, t, d, T, H, D)
            qd = (qt * tl.exp(lg)).to(dot_.dtype)
            acc = tl.dot(tl.trans(qd), dot_, acc=acc, input_precision=PREC)
    ps, ms = _state_ptr(hs, bi, hk, i_s, NS, f, d, HK, F, D)
    tl.store(ps, acc, mask=ms)


@triton.jit
def _scan(loc, lgs, init, out, NS, HK: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
          BF: tl.constexpr, BD: tl.constexpr, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr):
    """out has NS + 1 slots. Forward: out[0] = init, out[s + 1] = exp(G_s) out[s] + loc[s] (states entering each
    segment, then the final state). Reverse: out[NS] = init, out[s] = exp(G_s) out[s + 1] + loc[s]."""
    i_f, i_d, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bi, hk = i_bh // HK, i_bh % HK
    f = i_f * BF + tl.arange(0, BF)
    d = i_d * BD + tl.arange(0, BD)
    h = tl.zeros([BF, BD], tl.float32)
    if HAS_INIT:
        pi, mi = _state_ptr(init, bi, hk, 0, 1, f, d, HK, F, D)
        h = tl.load(pi, mask=mi, other=0.0)
    po, mo = _state_ptr(out, bi, hk, NS if REVERSE else 0, NS + 1, f, d, HK, F, D)
    tl.store(po, h, mask=mo)
    for i in range(NS):
        s = NS - 1 - i if REVERSE else i
        pl, ml = _state_ptr(loc, bi, hk, s, NS, f, d, HK, F, D)
        pg, mg = _vec_ptr(lgs, bi, hk, s, NS, f, HK, F)
        h = h * tl.exp(tl.load(pg, mask=mg, other=0.0))[:, None] + tl.load(pl, mask=ml, other=0.0)
        po, mo = _state_ptr(out, bi, hk, s if REVERSE else s + 1, NS + 1, f, d, HK, F, D)
        tl.store(po, h, mask=mo)


# ----------------------------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd(qf, kf, v, g, valid, o, h0, ht, T, SEG, NSLOT,
         H: tl.constexpr, HK: tl.constexpr, HV: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
         C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
         HAS_VALID: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, PREC: tl.constexpr,
         SAFE: tl.constexpr):
    """One program per query head, carrying its group's state (a loop over the group's heads would spill)."""
    i_d, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bi, h = i_bh // H, i_bh % H
    hk = h // (H // HK)
    hv = hk // (HK // HV)
    c = tl.arange(0, C)
    f = tl.arange(0, BF)
    d = i_d * BD + tl.arange(0, BD)
    causal = c[:, None] >= c[None, :]
    S = tl.zeros([BF, BD], tl.float32)
    if HAS_H0:
        ps, ms = _state_ptr(h0, bi, hk, i_s, NSLOT, f, d, HK, F, D)
        S = tl.load(ps, mask=ms, other=0.0)
    n0 = i_s * SEG
    n1 = tl.minimum(n0 + SEG, tl.cdiv(T, C))
    for n in range(n0, n1):
        t = n * C + c
        lg, last, ok = _gates(g, valid, bi, hk, t, T, f, HK, F, HAS_VALID)
        safe = tl.max(-last, 0) <= SAFE
        kt = tl.where(ok[:, None], load(kf, bi, hk, t, f, T, HK, F), 0.0)
        vt = load(v, bi, hv, t, d, T, HV, D)
        Sc = S.to(vt.dtype)
        qt = load(qf, bi, h, t, f, T, H, F)
        qd = (qt * tl.exp(lg)).to(vt.dtype)
        acc = tl.dot(qd, Sc, input_precision=PREC)
        if safe:
            kd = (kt * tl.exp(tl.minimum(-lg, SAFE))).to(vt.dtype)
            a = tl.where(causal, tl.dot(qd, tl.trans(kd), input_precision=PREC), 0.0)
        else:
            a = _intra_exact(qt, kf, g, valid, bi, hk, n * C, T, f, lg, c, C, HK, F, HAS_VALID, False)
        acc = tl.dot(a.to(vt.dtype), vt, acc=acc, input_precision=PREC)
        store(o, acc, bi, h, t, d, T, H, D)
        kl = (kt * tl.exp(last[None, :] - lg)).to(vt.dtype)
        S = S * tl.exp(last)[:, None] + tl.dot(tl.trans(kl), vt, input_precision=PREC)
    if STORE_FINAL:  # the group's first query head stores the state
        if h % (H // HK) == 0:
            ps, ms = _state_ptr(ht, bi, hk, 0, 1, f, d, HK, F, D)
            tl.store(ps, S, mask=ms)


# ----------------------------------------------------------------------------------------------------------------------
# Backward, forward in time: dqf = exp(lg) (do S^T + dA kd) with dA = causal(do v^T). Also qf * dqf summed over the
# query heads of the state head (fp32), which the gate gradient needs.


@triton.jit
def _bwd_dq(kf, v, g, qf, valid, do, dq, qdq, h0, T, SEG, NSLOT,
            H: tl.constexpr, HK: tl.constexpr, HV: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
            C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
            HAS_VALID: tl.constexpr, HAS_H0: tl.constexpr, STORE_QDQ: tl.constexpr, PREC: tl.constexpr,
            SAFE: tl.constexpr):
    """One program per query head, carrying S^T; also stores qf * dqf in fp32 for the gate gradient."""
    i_f, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bi, h = i_bh // H, i_bh % H
    hk = h // (H // HK)
    hv = hk // (HK // HV)
    c = tl.arange(0, C)
    f = i_f * BF + tl.arange(0, BF)
    d = tl.arange(0, BD)
    causal = c[:, None] >= c[None, :]
    ST = tl.zeros([BD, BF], tl.float32)  # S^T
    if HAS_H0:
        ps, ms = _state_ptr(h0, bi, hk, i_s, NSLOT, f, d, HK, F, D, True)
        ST = tl.load(ps, mask=ms, other=0.0)
    n0 = i_s * SEG
    n1 = tl.minimum(n0 + SEG, tl.cdiv(T, C))
    for n in range(n0, n1):
        t = n * C + c
        lg, last, ok = _gates(g, valid, bi, hk, t, T, f, HK, F, HAS_VALID)
        safe = tl.max(-last, 0) <= SAFE
        kt = tl.where(ok[:, None], load(kf, bi, hk, t, f, T, HK, F), 0.0)
        vt = load(v, bi, hv, t, d, T, HV, D)
        STc = ST.to(vt.dtype)
        dot_ = load(do, bi, h, t, d, T, H, D)
        da = tl.where(causal, tl.dot(dot_, tl.trans(vt), input_precision=PREC), 0.0)
        dqt = tl.dot(dot_, STc, input_precision=PREC)
        if safe:
            kd = (kt * tl.exp(tl.minimum(-lg, SAFE))).to(vt.dtype)
            dqt = tl.dot(da.to(kd.dtype), kd, acc=dqt, input_precision=PREC) * tl.exp(lg)
        else:
            dqt = dqt * tl.exp(lg) + _dq_exact(da, kf, g, valid, bi, hk, n * C, T, f, lg, c, C, HK, F, HAS_VALID)
        store(dq, dqt, bi, h, t, f, T, H, F)
        if STORE_QDQ:
            store(qdq, load(qf, bi, h, t, f, T, H, F).to(tl.float32) * dqt, bi, h, t, f, T, H, F)
        kl = (kt * tl.exp(last[None, :] - lg)).to(vt.dtype)
        ST = ST * tl.exp(last)[None, :] + tl.dot(tl.trans(vt), kl, input_precision=PREC)


# ----------------------------------------------------------------------------------------------------------------------
# Backward, backward in time, as two launches. dS (relative to the end of the current chunk) covers the later chunks:
# dkf = exp(lg_C - lg) (v dS^T) + exp(-lg) (dA^T qd) over a feature block, carrying dS^T; with it the gate gradient
# dg = reverse cumsum of qf dqf - kf dkf, carried across chunks. dv = (kf exp(lg_C - lg)) dS + A^T do over a value
# block, carrying dS. Intra-chunk products are formed transposed, keys by queries.


@triton.jit
def _bwd_dkv(qf, kf, v, g, valid, do, qdq, dk, dv, dg, dh, carry, tot, d0, T, SEG, NSLOT, SLOT0,
             H: tl.constexpr, HK: tl.constexpr, HV: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
             C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, DO_DK: tl.constexpr,
             DO_DG: tl.constexpr, HAS_VALID: tl.constexpr, HAS_DH: tl.constexpr, HAS_CARRY: tl.constexpr,
             STORE_TOT: tl.constexpr, STORE_D0: tl.constexpr, PREC: tl.constexpr, SAFE: tl.constexpr):
    """DO_DK: program_id(0) is a feature block and BD covers all of D; else a value block and BF covers all of F.
    One flat loop over (chunk, query head of the group): a chunk's first step takes the state's terms, every step
    adds one head's, the last one stores (nested loops carrying the accumulators spill registers)."""
    i_x, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bi, hk = i_bh // HK, i_bh % HK
    G: tl.constexpr = H // HK
    hv = hk // (HK // HV)
    c = tl.arange(0, C)
    if DO_DK:
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
    if HAS_DH:
        ps, ms = _state_ptr(dh, bi, hk, i_s + SLOT0, NSLOT, f, d, HK, F, D, DO_DK)
        dS = tl.load(ps, mask=ms, other=0.0)
    run = tl.zeros([BF], tl.float32)  # sum of the gate gradient's summands over the later tokens
    if HAS_CARRY:
        pc, mc = _vec_ptr(carry, bi, hk, 0, 1, f, HK, F)
        run = tl.load(pc, mask=mc, other=0.0)
    dki = tl.zeros([C, BF], tl.float32)
    qsum = tl.zeros([C, BF], tl.float32)
    n0 = i_s * SEG
    n1 = tl.minimum(n0 + SEG, tl.cdiv(T, C))
    for it in range(0, (n1 - n0) * G):
        gi = it % G
        h = hk * G + gi
        t0 = (n1 - 1 - it // G) * C
        t = t0 + c
        lg, last, ok = _gates(g, valid, bi, hk, t, T, f, HK, F, HAS_VALID)
        safe = tl.max(-last, 0) <= SAFE
        kt = tl.where(ok[:, None], load(kf, bi, hk, t, f, T, HK, F), 0.0)
        vt = load(v, bi, hv, t, d, T, HV, D)
        if gi == 0:  # the state's terms use dS before this chunk's queries join it
            if DO_DK:
                acc = tl.dot(vt, dS.to(vt.dtype), input_precision=PREC) * tl.exp(last[None, :] - lg)
                dS = dS * tl.exp(last)[None, :]
            else:
                kl = (kt * tl.exp(last[None, :] - lg)).to(vt.dtype)
                acc = tl.dot(kl, dS.to(vt.dtype), input_precision=PREC)
                dS = dS * tl.exp(last)[:, None]
            dki = tl.zeros([C, BF], tl.float32)
            qsum = tl.zeros([C, BF], tl.float32)
        qt = load(qf, bi, h, t, f, T, H, F)
        dot_ = load(do, bi, h, t, d, T, H, D)
        qd = (qt * tl.exp(lg)).to(vt.dtype)
        if DO_DK:
            da_t = tl.where(causal_t, tl.dot(vt, tl.trans(dot_), input_precision=PREC), 0.0)
            if safe:
                dki = tl.dot(da_t.to(qd.dtype), qd, acc=dki, input_precision=PREC)
            else:
                acc += _dk_exact(da_t, qt, g, valid, bi, hk, t0, T, f, lg, c, C, HK, F, HAS_VALID)
            dS = tl.dot(tl.trans(dot_), qd, acc=dS, input_precision=PREC)
            if DO_DG:
                qsum += load(qdq, bi, h, t, f, T, H, F)
            if gi == G - 1:
                dkt = tl.where(ok[:, None], acc + dki * tl.exp(tl.minimum(-lg, SAFE)), 0.0)
                store(dk, dkt, bi, hk, t, f, T, HK, F)
                if DO_DG:
                    db = qsum - kt.to(tl.float32) * dkt
                    dgt = tl.cumsum(db, 0, reverse=True) + run[None, :]
                    run += tl.sum(db, 0)
                    store(dg, tl.where(ok[:, None], dgt, 0.0), bi, hk, t, f, T, HK, F)
        else:
            if safe:
                kd = (kt * tl.exp(tl.minimum(-lg, SAFE))).to(vt.dtype)
                a_t = tl.where(causal_t, tl.dot(kd, tl.trans(qd), input_precision=PREC), 0.0)
            else:
                a_t = _intra_exact(qt, kf, g, valid, bi, hk, t0, T, f, lg, c, C, HK, F, HAS_VALID, True)
            acc = tl.dot(a_t.to(vt.dtype), dot_, acc=acc, input_precision=PREC)
            dS = tl.dot(tl.trans(qd), dot_, acc=dS, input_precision=PREC)
            if gi == G - 1:
                store(dv, acc, bi, hk, t, d, T, HK, D)
    if STORE_TOT:
        pt, mt = _vec_ptr(tot, bi, hk, i_s, NSLOT - 1, f, HK, F)
        tl.store(pt, run, mask=mt)
    if STORE_D0:
        ps, ms = _state_ptr(d0, bi, hk, 0, 1, f, d, HK, F, D, DO_DK)
        tl.store(ps, dS, mask=ms)


@triton.jit
def _add_carry(dgl, carry, dg, valid, T, SEG, NS, HK: tl.constexpr, F: tl.constexpr, C: tl.constexpr,
               BF: tl.constexpr, HAS_VALID: tl.constexpr):
    """dg of a segment = its own reverse cumsum + the sum over all later segments."""
    i_f, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bi, hk = i_bh // HK, i_bh % HK
    f = i_f * BF + tl.arange(0, BF)
    c = tl.arange(0, C)
    pc, mc = _vec_ptr(carry, bi, hk, i_s, NS, f, HK, F)
    add = tl.load(pc, mask=mc, other=0.0)
    n0 = i_s * SEG
    for n in range(n0, tl.minimum(n0 + SEG, tl.cdiv(T, C))):
        t = n * C + c
        ok = keys_ok(valid, bi, t, T, T, HAS_VALID)
        x = load(dgl, bi, hk, t, f, T, HK, F) + add[None, :]
        store(dg, tl.where(ok[:, None], x, 0.0), bi, hk, t, f, T, HK, F)


# ----------------------------------------------------------------------------------------------------------------------
# Host side


def _blocks(bf, bd):
    """Feature / value blocks for the passes that need all of one of them: a state tile beyond 64 x 128 spills."""
    big = bf * bd > 64 * 128
    return (max(16, 64 * 128 // bd) if big else bf), (max(16, 64 * 128 // bf) if big else bd)


class _GLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qf, kf, v, g, valid, s0, output_final_state, chunk):
        b, t, h, f = qf.shape
        hk, hv, d = kf.shape[2], v.shape[2], v.shape[-1]
        c = chunk
        n = triton.cdiv(t, c)
        bf, bd_all = p2(f), p2(d)
        bd = TUNE["fwd_bd"] or _blocks(bf, bd_all)[1]
        nbd = triton.cdiv(d, bd)
        seg = TUNE["seg_chunks"] or 4
        ns = triton.cdiv(n, seg)
        prec = dot_precision(v.dtype)
        vmask = valid if valid is not None else qf
        o = torch.empty(b, t, h, d, device=qf.device, dtype=v.dtype)
        common = dict(HK=hk, HV=hv, F=f, D=d, C=c, HAS_VALID=valid is not None, PREC=prec, SAFE=_safe(v.dtype))

        h0 = s0.float().contiguous() if s0 is not None else None
        lgs = None
        if ns > 1:  # states entering each segment, then the final state (slot ns)
            h0, lgs = _segment_states_fwd(kf, v, g, valid, h0, t, seg, ns, c, prec, output_final_state)
        nslot = ns + 1 if ns > 1 else 1
        store_final = output_final_state and ns == 1
        ht = torch.empty(b, hk, f, d, device=qf.device, dtype=torch.float32) if store_final else o
        _fwd[(nbd, ns, b * h)](
            qf, kf, v, g, vmask, o, h0 if h0 is not None else o, ht, t, seg, nslot, H=h, BF=bf, BD=bd,
            HAS_H0=h0 is not None, STORE_FINAL=store_final, **common, **launch_opts(TUNE, bf * bd))
        final = None
        if output_final_state:
            final = ht if store_final else h0[:, :, ns].contiguous()
        ctx.save_for_backward(qf, kf, v, g, valid, h0, lgs, final)
        ctx.cfg = (c, seg, ns, nslot, None if s0 is None else s0.dtype)
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    def backward(ctx, do, dst):
        qf, kf, v, g, valid, h0, lgs, final = ctx.saved_tensors
        c, seg, ns, nslot, s0_dtype = ctx.cfg
        b, t, h, f = qf.shape
        hk, hv, d = kf.shape[2], v.shape[2], v.shape[-1]
        bf, bd = p2(f), p2(d)
        prec = dot_precision(v.dtype)
        dev = qf.device
        f32 = dict(device=dev, dtype=torch.float32)
        do = v.new_zeros(b, t, h, d) if do is None else do.contiguous()  # only the final state was used
        vmask = valid if valid is not None else qf
        common = dict(H=h, HK=hk, HV=hv, F=f, D=d, C=c, HAS_VALID=valid is not None, PREC=prec, SAFE=_safe(v.dtype))
        need_dg = ctx.needs_input_grad[3]

        dq = torch.empty_like(qf)
        qdq = torch.empty(b, t, h, f, **f32) if need_dg else dq
        bf_q = TUNE["bwd_block"] or _blocks(bf, bd)[0]
        _bwd_dq[(triton.cdiv(f, bf_q), ns, b * h)](
            kf, v, g, qf, vmask, do, dq, qdq, h0 if h0 is not None else dq, t, seg, nslot, BF=bf_q, BD=bd,
            HAS_H0=h0 is not None, STORE_QDQ=need_dg, **common, **launch_opts(TUNE, bf_q * bd))

        # reverse states entering each segment (slot s + 1), and the initial state's gradient (slot 0)
        need_d0 = ctx.needs_input_grad[5]
        dh = None
        if ns > 1:
            dh = _segment_states_bwd(qf, do, g, valid, lgs, dst, t, seg, ns, c, hk, prec, need_d0)
        elif dst is not None:
            dh = dst.float().contiguous()
        store_d0 = need_d0 and ns == 1
        d0 = torch.empty(b, hk, f, d, **f32) if store_d0 else do

        # the final state's gradient also reaches every gate through the state's decay: sum_d dS_T * S_T
        extra = None
        if dst is not None and need_dg:
            extra = (dst.float() * final).sum(-1).contiguous()
        carry = extra if ns == 1 else None
        shared_v = hk != hv
        dv = torch.empty(b, t, hk, d, **f32) if shared_v else torch.empty_like(v)
        dk = torch.empty_like(kf)
        dgl = torch.empty(b, t, hk, f, **f32) if (need_dg and ns > 1) else torch.empty_like(g)
        tot = torch.empty(b, hk, ns, f, **f32) if (need_dg and ns > 1) else do
        args = (qf, kf, v, g, vmask, do, qdq, dk, dv, dgl, dh if dh is not None else do,
                carry if carry is not None else do, tot, d0, t, seg, ns + 1 if ns > 1 else 1, 1 if ns > 1 else 0)
        flags = dict(HAS_DH=dh is not None, **common)
        bf_k, bd_v = TUNE["bwd_block"] or min(bf, 64), TUNE["bwd_block"] or min(bd, 64)
        _bwd_dkv[(triton.cdiv(f, bf_k), ns, b * hk)](
            *args, BF=bf_k, BD=bd, DO_DK=True, DO_DG=need_dg, HAS_CARRY=carry is not None,
            STORE_TOT=need_dg and ns > 1, STORE_D0=store_d0, **flags, **launch_opts(TUNE, bf_k * bd))
        _bwd_dkv[(triton.cdiv(d, bd_v), ns, b * hk)](
            *args, BF=bf, BD=bd_v, DO_DK=False, DO_DG=False, HAS_CARRY=False, STORE_TOT=False, STORE_D0=False,
            **flags, **launch_opts(TUNE, bf * bd_v))
        if shared_v:
            dv = dv.view(b, t, hv, hk // hv, d).sum(3).to(v.dtype)

        dg = None
        if need_dg:
            dg = dgl
            if ns > 1:
                # each segment's reverse cumsum still lacks the sum over the segments after it
                after = tot.flip(2).cumsum(2).flip(2)
                carry_s = torch.zeros_like(tot)
                carry_s[:, :, :-1] = after[:, :, 1:]
                if extra is not None:
                    carry_s += extra[:, :, None]
                dg = torch.empty_like(g)
                bf_g = min(bf, 64)
                _add_carry[(triton.cdiv(f, bf_g), ns, b * hk)](
                    dgl, carry_s, dg, vmask, t, seg, ns, HK=hk, F=f, C=c, BF=bf_g, HAS_VALID=valid is not None)
        ds0 = None
        if need_d0:
            ds0 = (d0 if store_d0 else dh[:, :, 0]).to(s0_dtype)
        return dq, dk, dv, dg, None, ds0, None, None


def _segment_states_fwd(kf, v, g, valid, s0, t, seg, ns, c, prec, need_final):
    """States entering each segment (slots 0..ns-1), the final state (slot ns, only when asked for: the last
    segment's own sum is not needed otherwise), and each segment's total log decay."""
    b, _, hk, f = kf.shape
    hv, d = v.shape[2], v.shape[3]
    bf, bd = p2(f), p2(d)
    bf_s = TUNE["bwd_block"] or (min(bf, 64) if bf * bd > 64 * 128 else bf)
    dev = kf.device
    loc = torch.zeros(b, hk, ns, f, d, device=dev, dtype=torch.float32)
    lgs = torch.zeros(b, hk, ns, f, device=dev, dtype=torch.float32)
    _seg_kv[(triton.cdiv(f, bf_s), ns if need_final else ns - 1, b * hk)](
        kf, v, g, valid if valid is not None else kf, loc, lgs, t, seg, ns, HK=hk, HV=hv, F=f, D=d, C=c, BF=bf_s,
        BD=bd, HAS_VALID=valid is not None, PREC=prec, **launch_opts(TUNE, bf_s * bd, 3))
    return _chain(loc, lgs, s0, reverse=False), lgs


def _segment_states_bwd(qf, do, g, valid, lgs, dst, t, seg, ns, c, hk, prec, need_d0):
    """Reverse states: slot s + 1 enters segment s's reverse pass (covers the later segments, and the final state's
    gradient); slot 0 is the initial state's gradient (the first segment's own sum is needed only for it)."""
    b, _, h, f = qf.shape
    d = do.shape[-1]
    bf, bd = p2(f), p2(d)
    bf_s = TUNE["bwd_block"] or (min(bf, 64) if bf * bd > 64 * 128 else bf)
    first = 0 if need_d0 else 1
    loc = torch.zeros(b, hk, ns, f, d, device=qf.device, dtype=torch.float32)
    _seg_q[(triton.cdiv(f, bf_s), ns - first, b * hk)](
        qf, do, g, valid if valid is not None else qf, loc, t, seg, ns, first, H=h, HK=hk, F=f, D=d, C=c, BF=bf_s,
        BD=bd, HAS_VALID=valid is not None, PREC=prec, **launch_opts(TUNE, bf_s * bd, 3))
    return _chain(loc, lgs, None if dst is None else dst.float().contiguous(), reverse=True)


def _chain(loc, lgs, init, reverse):
    b, hk, ns, f, d = loc.shape
    bf, bd = min(p2(f), 64), min(p2(d), 64)
    out = torch.empty(b, hk, ns + 1, f, d, device=loc.device, dtype=torch.float32)
    _scan[(triton.cdiv(f, bf), triton.cdiv(d, bd), b * hk)](
        loc, lgs, init if init is not None else loc, out, ns, HK=hk, F=f, D=d, BF=bf, BD=bd,
        HAS_INIT=init is not None, REVERSE=reverse)
    return out


def chunk_gla(qf, kf, v, g, valid=None, initial_state=None, output_final_state=False, chunk_size=64, cu_seqlens=None):
    """Same contract as `chunk_gla_torch`: returns (o [B, T, H, D] in v.dtype, final state S [B, Hk, F, D] fp32 or
    None). g [B, T, Hk, F] are log gates (<= 0), any float dtype. Differentiable in qf, kf, v, g and the initial state.
    cu_seqlens: optional [N + 1] boundaries of N sequences packed along T (B == 1); states are then per sequence
    ([N, ...]). They run as a left-padded batch (a gather and a scatter of the inputs and the output).
    """
    if cu_seqlens is not None:
        assert qf.shape[0] == 1, "cu_seqlens packs the sequences along T of a single row"
        rows, idx, xs = varlen_to_batch(cu_seqlens, qf, kf, v, g)
        o, st = chunk_gla(*xs, varlen_valid(valid, rows, idx), initial_state, output_final_state, chunk_size)
        return batch_to_varlen(o, rows, idx, qf.shape[1]), st
    dt = v.dtype
    qf, kf = qf.to(dt).contiguous(), kf.to(dt).contiguous()
    v, g = v.contiguous(), g.contiguous()
    check_size(qf, kf, v, g)
    c = chunk_size if chunk_size in (16, 32, 64, 128) else 64
    vmask = None if valid is None else valid.to(torch.uint8).contiguous()
    o, final = _GLA.apply(qf, kf, v, g, vmask, initial_state, bool(output_final_state), c)
    return o, (final if output_final_state else None)
