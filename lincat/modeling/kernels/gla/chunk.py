"""Triton form of gated linear attention (Liger's GLA branch): forward and backward as one autograd Function, in two
passes, as linear_attn/chunk.py.

S_t = diag(exp(g_t)) S_{t-1} + kf_t v_t^T, o_t = qf_t S_t. Queries come in chunks of C tokens; lg is the in-chunk
cumulative log gate (<= 0, decreasing).
1. A state pass, one program per (feature block, value block, batch x state head), walks the chunks and stores the
   state entering each one (16-bit for 16-bit inputs), then the final state: S <- exp(lg_C) S + (kf exp(lg_C - lg))^T v.
   It is the only serial loop.
2. Every chunk then runs on its own: o = (qf exp(lg)) S_n + A v. Inside a chunk the pair weights
   qf_i . (kf_j exp(lg_i - lg_j)) factor as (qf exp(lg)) (kf exp(-lg))^T, one matrix product, as long as the chunk's
   total decay stays below SAFE (exp(-lg) must not overflow); a chunk that decays harder takes an exact, slower
   elementwise path. Both are exact up to rounding.
The backward mirrors it: a reverse state pass stores dh_n, the gradient of the state leaving chunk n
(dh_{n-1} = exp(lg_C) dh_n + (qf exp(lg))^T do over chunk n), then chunk-parallel passes for dqf (with qf dqf for the
gate gradient), dkf with dg, and dv. The gate gradient is a reverse cumsum over the whole sequence of qf dqf - kf dkf;
its part from the chunks after n needs no second pass: shifting the log gates of every token after chunk n by e
scales exactly the terms that pass through the state leaving it, so that part is sum_d S_{n+1} * dh_n (the forward
state pass stores S_{n+1} anyway, and for the last chunk it is the final state with its gradient).
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # transformers' remote-code import check skips try blocks; ops.py falls back to PyTorch
    raise

from ..utils import batch_to_varlen, varlen_to_batch, varlen_valid
from ..chunk_utils import check_size, dot_precision, keys_ok, load, p2, store
from ..linear_attn.chunk import _state_ptrs, fit, h_cfg, o_opts, states_dtype

# Knobs for tests and benchmarks, as linear_attn's TUNE: block, warps and stages of the state passes (h_*); value
# block and warps of the chunk-parallel passes (o_*); bwd_block, their feature / value block in the backward (64:
# with 128 x 128 heads the dq and dk/dv passes spill 100 and 276 registers a thread on whole 128-wide blocks, and
# the op takes 7.34 ms forward+backward at T = 8K on the H100 against 8.46); states_fp32 keeps 16-bit inputs' chunk
# states in fp32; chunk, the chunk when the caller gives none (64: 1.3x faster forward than 128 on the H100, and the
# in-chunk decay stays within the factored path's reach for gates down to about -1 per token).
TUNE = {"h_block": None, "h_warps": None, "h_stages": None, "o_bd": None, "o_warps": None, "bwd_block": 64,
        "states_fp32": False, "chunk": 64}


def _safe(dtype) -> float:
    """Largest in-chunk decay (in log units) that the factored path takes: exp(decay) must stay far from the
    operand dtype's overflow (fp16 tops out at 65504, bf16 / fp32 near 3e38)."""
    return 8.0 if dtype == torch.float16 else 60.0


# Never tl.trans a tl.dot result: Triton 3.4 to 3.7.0 miscompiles that on Hopper (fla issue 640). Products that need
# a transposed result are formed transposed instead, and the passes that multiply by S^T load it transposed.
# Transposing loaded tiles (and tiles computed elementwise from them) is fine.

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
def _state(hs, b, hk, slot, NSLOT, f, d, HK: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
           TRANS: tl.constexpr = False):
    """Pointers to a [BF, BD] tile of state slot `slot` of [B, HK, NSLOT, F, D] (TRANS: the [BD, BF] view)."""
    ps, ms, _, _ = _state_ptrs(hs, hs, b, hk, slot, NSLOT, f, d, HK, F, D, TRANS)
    return ps, ms


@triton.jit
def _state_tile(HK: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr):
    """A state pass program's batch row, state head, feature rows and value columns."""
    i_bh = tl.program_id(2)
    return i_bh // HK, i_bh % HK, tl.program_id(0) * BF + tl.arange(0, BF), tl.program_id(1) * BD + tl.arange(0, BD)


# ----------------------------------------------------------------------------------------------------------------------
# State passes


@triton.jit
def _fwd_h(kf, v, g, valid, s0, hs, sT, T, NC,
           HK: tl.constexpr, HV: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
           C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
           HAS_VALID: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, PREC: tl.constexpr):
    """hs[n] = the state entering chunk n, hs[NC] = the final state (also to sT in fp32 with STORE_FINAL)."""
    b, hk, f, d = _state_tile(HK, BF, BD)
    hv = hk // (HK // HV)
    c = tl.arange(0, C)
    S = tl.zeros([BF, BD], tl.float32)
    if HAS_H0:  # names apart from the loop's: Triton would carry them through it, with another pointer type
        p0, m0 = _state(s0, b, hk, 0, 1, f, d, HK, F, D)
        S = tl.load(p0, mask=m0, other=0.0)
    for n in range(0, NC):
        ps, ms = _state(hs, b, hk, n, NC + 1, f, d, HK, F, D)
        tl.store(ps, S.to(hs.dtype.element_ty), mask=ms)
        t = n * C + c
        lg, last, ok = _gates(g, valid, b, hk, t, T, f, HK, F, HAS_VALID)
        kt = tl.where(ok[:, None], load(kf, b, hk, t, f, T, HK, F), 0.0)
        vt = load(v, b, hv, t, d, T, HV, D)
        kl = (kt * tl.exp(last[None, :] - lg)).to(vt.dtype)
        S = tl.dot(tl.trans(kl), vt, acc=S * tl.exp(last)[:, None], input_precision=PREC)
    pe, me = _state(hs, b, hk, NC, NC + 1, f, d, HK, F, D)
    tl.store(pe, S.to(hs.dtype.element_ty), mask=me)
    if STORE_FINAL:
        pf, mf = _state(sT, b, hk, 0, 1, f, d, HK, F, D)
        tl.store(pf, S, mask=mf)


@triton.jit
def _bwd_h(qf, do, g, valid, dsT, dhs, d0, T, NC,
           H: tl.constexpr, HK: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
           C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
           HAS_DH: tl.constexpr, STORE_D0: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr):
    """dhs[n] = the gradient of the state leaving chunk n (dsT for the last); d0, the initial state's."""
    b, hk, f, d = _state_tile(HK, BF, BD)
    G: tl.constexpr = H // HK
    c = tl.arange(0, C)
    dS = tl.zeros([BF, BD], tl.float32)
    if HAS_DH:  # names apart from the loop's, as in _fwd_h
        p0, m0 = _state(dsT, b, hk, 0, 1, f, d, HK, F, D)
        dS = tl.load(p0, mask=m0, other=0.0)
    for i in range(0, NC):
        n = NC - 1 - i
        ps, ms = _state(dhs, b, hk, n, NC, f, d, HK, F, D)
        tl.store(ps, dS.to(dhs.dtype.element_ty), mask=ms)
        t = n * C + c
        lg, last, ok = _gates(g, valid, b, hk, t, T, f, HK, F, HAS_VALID)
        dS = dS * tl.exp(last)[:, None]
        for gi in range(G):
            h = hk * G + gi
            dot_ = load(do, b, h, t, d, T, H, D)
            qd = (load(qf, b, h, t, f, T, H, F) * tl.exp(lg)).to(dot_.dtype)
            dS = tl.dot(tl.trans(qd), dot_, acc=dS, input_precision=PREC)
    if STORE_D0:
        pd, md = _state(d0, b, hk, 0, 1, f, d, HK, F, D)
        tl.store(pd, dS, mask=md)


# ----------------------------------------------------------------------------------------------------------------------
# Chunk-parallel passes


@triton.jit
def _fwd_o(qf, kf, v, g, valid, hs, o, T, NC,
           H: tl.constexpr, HK: tl.constexpr, HV: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
           C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr,
           SAFE: tl.constexpr):
    """o = (qf exp(lg)) S_n + A v over a value block; BF covers F."""
    i_d, n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = i_bh // H, i_bh % H
    hk = h // (H // HK)
    hv = hk // (HK // HV)
    c = tl.arange(0, C)
    f = tl.arange(0, BF)
    d = i_d * BD + tl.arange(0, BD)
    t = n * C + c
    lg, last, ok = _gates(g, valid, b, hk, t, T, f, HK, F, HAS_VALID)
    qt = load(qf, b, h, t, f, T, H, F)
    vt = load(v, b, hv, t, d, T, HV, D)
    qd = (qt * tl.exp(lg)).to(vt.dtype)
    ps, ms = _state(hs, b, hk, n, NC + 1, f, d, HK, F, D)
    acc = tl.dot(qd, tl.load(ps, mask=ms, other=0.0).to(vt.dtype), input_precision=PREC)
    if tl.max(-last, 0) <= SAFE:
        kt = tl.where(ok[:, None], load(kf, b, hk, t, f, T, HK, F), 0.0)
        kd = (kt * tl.exp(tl.minimum(-lg, SAFE))).to(vt.dtype)
        a = tl.where(c[:, None] >= c[None, :], tl.dot(qd, tl.trans(kd), input_precision=PREC), 0.0)
    else:
        a = _intra_exact(qt, kf, g, valid, b, hk, n * C, T, f, lg, c, C, HK, F, HAS_VALID, False)
    acc = tl.dot(a.to(vt.dtype), vt, acc=acc, input_precision=PREC)
    store(o, acc, b, h, t, d, T, H, D)


@triton.jit
def _bwd_dq(qf, kf, v, g, valid, do, hs, dq, qdq, T, NC,
            H: tl.constexpr, HK: tl.constexpr, HV: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
            C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
            HAS_VALID: tl.constexpr, STORE_QDQ: tl.constexpr, PREC: tl.constexpr, SAFE: tl.constexpr):
    """dqf = exp(lg) (do S_n^T + dA kd) with dA = causal(do v^T), over a feature block (BD covers D); also qf dqf in
    fp32, which the gate gradient needs."""
    i_f, n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = i_bh // H, i_bh % H
    hk = h // (H // HK)
    hv = hk // (HK // HV)
    c = tl.arange(0, C)
    f = i_f * BF + tl.arange(0, BF)
    d = tl.arange(0, BD)
    t = n * C + c
    lg, last, ok = _gates(g, valid, b, hk, t, T, f, HK, F, HAS_VALID)
    vt = load(v, b, hv, t, d, T, HV, D)
    dot_ = load(do, b, h, t, d, T, H, D)
    ps, ms = _state(hs, b, hk, n, NC + 1, f, d, HK, F, D, True)
    dqt = tl.dot(dot_, tl.load(ps, mask=ms, other=0.0).to(vt.dtype), input_precision=PREC)
    da = tl.where(c[:, None] >= c[None, :], tl.dot(dot_, tl.trans(vt), input_precision=PREC), 0.0)
    if tl.max(-last, 0) <= SAFE:
        kt = tl.where(ok[:, None], load(kf, b, hk, t, f, T, HK, F), 0.0)
        kd = (kt * tl.exp(tl.minimum(-lg, SAFE))).to(vt.dtype)
        dqt = tl.dot(da.to(kd.dtype), kd, acc=dqt, input_precision=PREC) * tl.exp(lg)
    else:
        dqt = dqt * tl.exp(lg) + _dq_exact(da, kf, g, valid, b, hk, n * C, T, f, lg, c, C, HK, F, HAS_VALID)
    store(dq, dqt, b, h, t, f, T, H, F)
    if STORE_QDQ:
        store(qdq, load(qf, b, h, t, f, T, H, F).to(tl.float32) * dqt, b, h, t, f, T, H, F)


@triton.jit
def _bwd_dkv(qf, kf, v, g, valid, do, qdq, hs, dhs, dk, dv, dg, T, NC,
             H: tl.constexpr, HK: tl.constexpr, HV: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
             C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, DO_DK: tl.constexpr, DO_DG: tl.constexpr,
             HAS_VALID: tl.constexpr, PREC: tl.constexpr, SAFE: tl.constexpr):
    """Per (block, chunk, batch x state head), summing the group's query heads. DO_DK: over a feature block (BD
    covers D) dkf = exp(lg_C - lg) (v dh_n^T) + exp(-lg) (dA^T qd), and with DO_DG the gate gradient: the chunk's
    reverse cumsum of qf dqf - kf dkf plus sum_d S_{n+1} * dh_n. Else over a value block (BF covers F)
    dv = (kf exp(lg_C - lg)) dh_n + A^T do. Intra-chunk products are formed keys by queries."""
    i_x, n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = i_bh // HK, i_bh % HK
    G: tl.constexpr = H // HK
    hv = hk // (HK // HV)
    c = tl.arange(0, C)
    if DO_DK:
        f = i_x * BF + tl.arange(0, BF)
        d = tl.arange(0, BD)
    else:
        f = tl.arange(0, BF)
        d = i_x * BD + tl.arange(0, BD)
    t = n * C + c
    causal_t = c[:, None] <= c[None, :]  # key row <= query column
    lg, last, ok = _gates(g, valid, b, hk, t, T, f, HK, F, HAS_VALID)
    safe = tl.max(-last, 0) <= SAFE
    kt = tl.where(ok[:, None], load(kf, b, hk, t, f, T, HK, F), 0.0)
    vt = load(v, b, hv, t, d, T, HV, D)
    pd, md = _state(dhs, b, hk, n, NC, f, d, HK, F, D, DO_DK)
    dh = tl.load(pd, mask=md, other=0.0)
    if DO_DK:
        acc = tl.dot(vt, dh.to(vt.dtype), input_precision=PREC) * tl.exp(last[None, :] - lg)
        dki = tl.zeros([C, BF], tl.float32)
        qsum = tl.zeros([C, BF], tl.float32)
    else:
        acc = tl.dot((kt * tl.exp(last[None, :] - lg)).to(vt.dtype), dh.to(vt.dtype), input_precision=PREC)
        kd = (kt * tl.exp(tl.minimum(-lg, SAFE))).to(vt.dtype)
    for gi in range(G):
        h = hk * G + gi
        qt = load(qf, b, h, t, f, T, H, F)
        dot_ = load(do, b, h, t, d, T, H, D)
        qd = (qt * tl.exp(lg)).to(vt.dtype)
        if DO_DK:
            da_t = tl.where(causal_t, tl.dot(vt, tl.trans(dot_), input_precision=PREC), 0.0)
            if safe:
                dki = tl.dot(da_t.to(qd.dtype), qd, acc=dki, input_precision=PREC)
            else:
                acc += _dk_exact(da_t, qt, g, valid, b, hk, n * C, T, f, lg, c, C, HK, F, HAS_VALID)
            if DO_DG:
                qsum += load(qdq, b, h, t, f, T, H, F)
        else:
            if safe:
                a_t = tl.where(causal_t, tl.dot(kd, tl.trans(qd), input_precision=PREC), 0.0)
            else:
                a_t = _intra_exact(qt, kf, g, valid, b, hk, n * C, T, f, lg, c, C, HK, F, HAS_VALID, True)
            acc = tl.dot(a_t.to(vt.dtype), dot_, acc=acc, input_precision=PREC)
    if DO_DK:
        dkt = tl.where(ok[:, None], acc + dki * tl.exp(tl.minimum(-lg, SAFE)), 0.0)
        store(dk, dkt, b, hk, t, f, T, HK, F)
        if DO_DG:
            pn, mn = _state(hs, b, hk, n + 1, NC + 1, f, d, HK, F, D, True)
            later = tl.sum(tl.load(pn, mask=mn, other=0.0).to(tl.float32) * dh.to(tl.float32), 0)
            db = qsum - kt.to(tl.float32) * dkt
            dgt = tl.cumsum(db, 0, reverse=True) + later[None, :]
            store(dg, tl.where(ok[:, None], dgt, 0.0), b, hk, t, f, T, HK, F)
    else:
        store(dv, acc, b, hk, t, d, T, HK, D)


# ----------------------------------------------------------------------------------------------------------------------
# Host side


class _GLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qf, kf, v, g, valid, s0, output_final_state, chunk):
        b, t, h, f = qf.shape
        hk, hv, d = kf.shape[2], v.shape[2], v.shape[-1]
        c = chunk
        nc = triton.cdiv(t, c)
        prec = dot_precision(v.dtype)
        vmask = valid if valid is not None else qf
        hs = torch.empty(b, hk, nc + 1, f, d, device=qf.device, dtype=states_dtype(v.dtype, TUNE))
        sT = torch.empty(b, hk, f, d, device=qf.device, dtype=torch.float32) if output_final_state else hs
        bfh, bdh, opts = h_cfg(f, d, TUNE)
        _fwd_h[(triton.cdiv(f, bfh), triton.cdiv(d, bdh), b * hk)](
            kf, v, g, vmask, s0 if s0 is not None else hs, hs, sT, t, nc, HK=hk, HV=hv, F=f, D=d, C=c, BF=bfh,
            BD=bdh, HAS_VALID=valid is not None, HAS_H0=s0 is not None, STORE_FINAL=output_final_state, PREC=prec,
            **opts)
        o = torch.empty(b, t, h, d, device=qf.device, dtype=v.dtype)
        bf = p2(f)
        bd = fit(p2(d), bf, TUNE["o_bd"])
        _fwd_o[(triton.cdiv(d, bd), nc, b * h)](
            qf, kf, v, g, vmask, hs, o, t, nc, H=h, HK=hk, HV=hv, F=f, D=d, C=c, BF=bf, BD=bd,
            HAS_VALID=valid is not None, PREC=prec, SAFE=_safe(v.dtype), **o_opts(c, bf, bd, TUNE))
        ctx.save_for_backward(qf, kf, v, g, valid, hs)
        ctx.cfg = (c, None if s0 is None else s0.dtype)
        ctx.set_materialize_grads(False)
        return o, (sT if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dsT):
        qf, kf, v, g, valid, hs = ctx.saved_tensors
        c, s0_dtype = ctx.cfg
        b, t, h, f = qf.shape
        hk, hv, d = kf.shape[2], v.shape[2], v.shape[-1]
        nc = triton.cdiv(t, c)
        prec = dot_precision(v.dtype)
        f32 = dict(device=qf.device, dtype=torch.float32)
        do = v.new_zeros(b, t, h, d) if do is None else do.contiguous()  # only the final state was used
        vmask = valid if valid is not None else qf
        need_dg, need_d0 = ctx.needs_input_grad[3], s0_dtype is not None and ctx.needs_input_grad[5]

        dhs = torch.empty(b, hk, nc, f, d, device=qf.device, dtype=hs.dtype)
        d0 = torch.empty(b, hk, f, d, **f32) if need_d0 else dhs
        bfh, bdh, opts = h_cfg(f, d, TUNE)
        _bwd_h[(triton.cdiv(f, bfh), triton.cdiv(d, bdh), b * hk)](
            qf, do, g, vmask, dsT.float().contiguous() if dsT is not None else dhs, dhs, d0, t, nc, H=h, HK=hk, F=f,
            D=d, C=c, BF=bfh, BD=bdh, HAS_DH=dsT is not None, STORE_D0=need_d0, HAS_VALID=valid is not None,
            PREC=prec, **opts)

        bf, bd = p2(f), p2(d)
        common = dict(H=h, HK=hk, HV=hv, F=f, D=d, C=c, HAS_VALID=valid is not None, PREC=prec, SAFE=_safe(v.dtype))
        dq = torch.empty_like(qf)
        qdq = torch.empty(b, t, h, f, **f32) if need_dg else dq
        bf_q = fit(bf, bd, TUNE["bwd_block"])
        _bwd_dq[(triton.cdiv(f, bf_q), nc, b * h)](
            qf, kf, v, g, vmask, do, hs, dq, qdq, t, nc, BF=bf_q, BD=bd, STORE_QDQ=need_dg, **common,
            **o_opts(c, bf_q, bd, TUNE))
        shared_v = hk != hv  # several state heads write the same v head: fp32 partials, summed below
        dv = torch.empty(b, t, hk, d, **f32) if shared_v else torch.empty_like(v)
        dk = torch.empty_like(kf)
        dg = torch.empty_like(g) if need_dg else None
        args = (qf, kf, v, g, vmask, do, qdq, hs, dhs, dk, dv, dg if need_dg else dk, t, nc)
        _bwd_dkv[(triton.cdiv(f, bf_q), nc, b * hk)](
            *args, BF=bf_q, BD=bd, DO_DK=True, DO_DG=need_dg, **common, **o_opts(c, bf_q, bd, TUNE))
        bd_v = fit(bd, bf, TUNE["bwd_block"])
        _bwd_dkv[(triton.cdiv(d, bd_v), nc, b * hk)](
            *args, BF=bf, BD=bd_v, DO_DK=False, DO_DG=False, **common, **o_opts(c, bf, bd_v, TUNE))
        if shared_v:
            dv = dv.view(b, t, hv, hk // hv, d).sum(3).to(v.dtype)
        ds0 = d0.to(s0_dtype) if need_d0 else None
        return dq, dk, dv, dg, None, ds0, None, None


def chunk_gla(qf, kf, v, g, valid=None, initial_state=None, output_final_state=False, chunk_size=None,
              cu_seqlens=None):
    """Same contract as `chunk_gla_torch`: returns (o [B, T, H, D] in v.dtype, final state S [B, Hk, F, D] fp32 or
    None). g [B, T, Hk, F] are log gates (<= 0), any float dtype. Differentiable in qf, kf, v, g and the initial state.
    chunk_size: 16, 32, 64 or 128 (None: TUNE["chunk"]); the result does not depend on it.
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
    # fp32 tiles are twice the bytes: at 128 tokens a chunk's tiles overflow an H100 block's shared memory
    c = chunk_size if chunk_size in (16, 32, 64, 128) else (TUNE["chunk"] if dt != torch.float32 else 64)
    s0 = None if initial_state is None else initial_state.float().contiguous()
    vmask = None if valid is None else valid.to(torch.uint8).contiguous()
    o, final = _GLA.apply(qf, kf, v, g, vmask, s0, bool(output_final_state), c)
    return o, (final if output_final_state else None)
