"""Triton form of sliding-window softmax attention with attention sinks: forward and backward as one autograd Function.

Each chunk of C queries sees its band of P + 1 key chunks (P = ceil((W - 1) / C)), masked to the window, plus the sink
keys that have left the window (online softmax over both). There is no state, so every (chunk, head) is independent:
the forward and the dq pass run one program per query chunk, the dk/dv pass one per key chunk and k/v head (looping
over its query heads, so GQA needs no reduction). Sink gradients are summed over query chunks with atomics.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # transformers' remote-code import check skips try blocks; ops.py falls back to PyTorch
    raise

from ..utils import DEN_EPS, batch_to_varlen, varlen_to_batch, varlen_valid
from ..chunk_utils import (band_query_tiles, check_size, dot_precision, keys_ok, launch_opts, load, p2, ptrs,
                           row_ptrs, store)

# Knobs for tests and benchmarks: num_warps / num_stages of every pass (None: launch_opts' rule); dkv_queries, rows
# of the query tiles in the dk / dv pass (at most the chunk), and dkv_warps, its warps. With 32 rows at 4 warps the
# op takes 2.36 ms forward+backward at T = 8K on the H100, against 2.72 with whole 64-token chunks at 8 warps
# (bench/results/kernels.md).
TUNE = {"num_warps": None, "num_stages": None, "dkv_queries": 32, "dkv_warps": 4}


# ----------------------------------------------------------------------------------------------------------------------
# Triton helpers


@triton.jit
def _scores(qt, kt, tq, tk, ok, W, scale, PREC: tl.constexpr):
    """Scaled scores of a query chunk against a key chunk, -inf outside the window or on padding."""
    s = tl.dot(qt, tl.trans(kt), input_precision=PREC) * scale
    rel = tk[None, :] - tq[:, None]
    return tl.where((rel <= 0) & (rel > -W) & ok[None, :], s, float("-inf"))


@triton.jit
def _sink_scores(qt, sk, spos, sok, bi, hv, tq, j, W, NSINK, scale,
                 HKV: tl.constexpr, DK: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """Scores against the sinks [B, NSINK, HKV, DK]: a sink counts once it has left the window (pos <= i - W)."""
    x = tl.arange(0, BK)
    skt = load(sk, bi, hv, j, x, NSINK, HKV, DK)
    pos = tl.load(spos + bi * NSINK + j, mask=j < NSINK, other=0)
    ok = tl.load(sok + bi * NSINK + j, mask=j < NSINK, other=0) != 0
    vis = ok[None, :] & (pos[None, :] <= (tq[:, None] - W).to(pos.dtype))
    s = tl.dot(qt, tl.trans(skt), input_precision=PREC) * scale
    return tl.where(vis, s, float("-inf")), skt


# ----------------------------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd(q, k, v, sk, sv, spos, sok, valid, o, lse, T, W, P, NSINK, scale, eps,
         H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
         BK: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
         HAS_VALID: tl.constexpr, HAS_SINKS: tl.constexpr, PREC: tl.constexpr):
    n, i_bh = tl.program_id(0), tl.program_id(1)
    bi, h = i_bh // H, i_bh % H
    hv = h // (H // HKV)
    c = tl.arange(0, C)
    x = tl.arange(0, BK)
    d = tl.arange(0, BD)
    tq = n * C + c
    qt = load(q, bi, h, tq, x, T, H, DK)
    m = tl.full([C], -1e30, tl.float32)
    l = tl.zeros([C], tl.float32)
    acc = tl.zeros([C, BD], tl.float32)
    for p in range(tl.maximum(n - P, 0), n + 1):
        tk = p * C + c
        ok = keys_ok(valid, bi, tk, T, T, HAS_VALID)
        s = _scores(qt, load(k, bi, hv, tk, x, T, HKV, DK), tq, tk, ok, W, scale, PREC)
        vt = load(v, bi, hv, tk, d, T, HKV, D)
        mn = tl.maximum(m, tl.max(s, 1))
        e = tl.exp(s - mn[:, None])
        alpha = tl.exp(m - mn)
        acc = acc * alpha[:, None] + tl.dot(e.to(vt.dtype), vt, input_precision=PREC)
        l = l * alpha + tl.sum(e, 1)
        m = mn
    if HAS_SINKS:
        j = tl.arange(0, BS)
        s, _ = _sink_scores(qt, sk, spos, sok, bi, hv, tq, j, W, NSINK, scale, HKV, DK, BK, PREC)
        svt = load(sv, bi, hv, j, d, NSINK, HKV, D)
        mn = tl.maximum(m, tl.max(s, 1))
        e = tl.exp(s - mn[:, None])
        alpha = tl.exp(m - mn)
        acc = acc * alpha[:, None] + tl.dot(e.to(svt.dtype), svt, input_precision=PREC)
        l = l * alpha + tl.sum(e, 1)
        m = mn
    store(o, acc / tl.maximum(l, eps)[:, None], bi, h, tq, d, T, H, D)
    pr, mr = row_ptrs(lse, bi, h, tq, T, H)
    # rows that see no key keep weight 0 in the backward: any finite lse does (their scores are -inf)
    tl.store(pr, tl.where(l > 0, m + tl.log(tl.maximum(l, eps)), 0.0), mask=mr)


# ----------------------------------------------------------------------------------------------------------------------
# Backward: dq (and the sinks' gradients) per query chunk; dk, dv per key chunk.


@triton.jit
def _bwd_dq(q, k, v, sk, sv, spos, sok, valid, o, do, lse, delta, dq, dsk, dsv, T, W, P, NSINK, scale,
            H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
            BK: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
            HAS_VALID: tl.constexpr, HAS_SINKS: tl.constexpr, SINK_GRAD: tl.constexpr, PREC: tl.constexpr):
    n, i_bh = tl.program_id(0), tl.program_id(1)
    bi, h = i_bh // H, i_bh % H
    hv = h // (H // HKV)
    c = tl.arange(0, C)
    x = tl.arange(0, BK)
    d = tl.arange(0, BD)
    tq = n * C + c
    qt = load(q, bi, h, tq, x, T, H, DK)
    dot_ = load(do, bi, h, tq, d, T, H, D)
    dl = tl.sum(dot_.to(tl.float32) * load(o, bi, h, tq, d, T, H, D).to(tl.float32), 1)
    pr, mr = row_ptrs(lse, bi, h, tq, T, H)
    ls = tl.load(pr, mask=mr, other=0.0)
    tl.store(row_ptrs(delta, bi, h, tq, T, H)[0], dl, mask=mr)
    dqt = tl.zeros([C, BK], tl.float32)
    for p in range(tl.maximum(n - P, 0), n + 1):
        tk = p * C + c
        ok = keys_ok(valid, bi, tk, T, T, HAS_VALID)
        kt = load(k, bi, hv, tk, x, T, HKV, DK)
        pw = tl.exp(_scores(qt, kt, tq, tk, ok, W, scale, PREC) - ls[:, None])
        vt = load(v, bi, hv, tk, d, T, HKV, D)
        ds = pw * (tl.dot(dot_, tl.trans(vt), input_precision=PREC) - dl[:, None])
        dqt = tl.dot(ds.to(kt.dtype), kt, acc=dqt, input_precision=PREC)
    if HAS_SINKS:
        j = tl.arange(0, BS)
        s, skt = _sink_scores(qt, sk, spos, sok, bi, hv, tq, j, W, NSINK, scale, HKV, DK, BK, PREC)
        pw = tl.exp(s - ls[:, None])
        svt = load(sv, bi, hv, j, d, NSINK, HKV, D)
        ds = pw * (tl.dot(dot_, tl.trans(svt), input_precision=PREC) - dl[:, None])
        dqt = tl.dot(ds.to(skt.dtype), skt, acc=dqt, input_precision=PREC)
        if SINK_GRAD:
            # the sinks' own gradients want ds^T and p^T: form them sinks by queries
            pos = tl.load(spos + bi * NSINK + j, mask=j < NSINK, other=0)
            sok_ = tl.load(sok + bi * NSINK + j, mask=j < NSINK, other=0) != 0
            vis_t = sok_[:, None] & (pos[:, None] <= (tq[None, :] - W).to(pos.dtype))
            s_t = tl.dot(skt, tl.trans(qt), input_precision=PREC) * scale
            p_t = tl.exp(tl.where(vis_t, s_t, float("-inf")) - ls[None, :])
            ds_t = p_t * (tl.dot(svt, tl.trans(dot_), input_precision=PREC) - dl[None, :])
            pk, mk = ptrs(dsk, bi, hv, j, x, NSINK, NSINK, HKV, DK)
            tl.atomic_add(pk, tl.dot(ds_t.to(qt.dtype), qt, input_precision=PREC) * scale, mask=mk)
            pv, mv = ptrs(dsv, bi, hv, j, d, NSINK, NSINK, HKV, D)
            tl.atomic_add(pv, tl.dot(p_t.to(dot_.dtype), dot_, input_precision=PREC), mask=mv)
    store(dq, dqt * scale, bi, h, tq, x, T, H, DK)


@triton.jit
def _bwd_dkv(q, k, v, valid, do, lse, delta, dk, dv, T, W, P, scale,
             H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
             BK: tl.constexpr, BD: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr, CQ: tl.constexpr):
    """dk = ds^T q and dv = p^T do per key chunk, with scores formed keys by queries: Triton 3.4 to 3.7.0 miscompiles
    a transposed tl.dot result on Hopper (fla issue 640), and this needs none. The queries come in tiles of CQ <= C
    rows."""
    kc, i_bh = tl.program_id(0), tl.program_id(1)
    bi, hv = i_bh // HKV, i_bh % HKV
    G: tl.constexpr = H // HKV
    c = tl.arange(0, CQ)
    x = tl.arange(0, BK)
    d = tl.arange(0, BD)
    tk = kc * C + tl.arange(0, C)
    ok = keys_ok(valid, bi, tk, T, T, HAS_VALID)
    kt = load(k, bi, hv, tk, x, T, HKV, DK)
    vt = load(v, bi, hv, tk, d, T, HKV, D)
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
        qt = load(q, bi, h, tq, x, T, H, DK)
        dot_ = load(do, bi, h, tq, d, T, H, D)
        pr, mr = row_ptrs(lse, bi, h, tq, T, H)
        ls = tl.load(pr, mask=mr, other=0.0)
        dl = tl.load(row_ptrs(delta, bi, h, tq, T, H)[0], mask=mr, other=0.0)
        s_t = tl.dot(kt, tl.trans(qt), input_precision=PREC) * scale
        p_t = tl.exp(tl.where(win, s_t, float("-inf")) - ls[None, :])
        dvt = tl.dot(p_t.to(dot_.dtype), dot_, acc=dvt, input_precision=PREC)
        ds_t = p_t * (tl.dot(vt, tl.trans(dot_), input_precision=PREC) - dl[None, :])
        dkt = tl.dot(ds_t.to(qt.dtype), qt, acc=dkt, input_precision=PREC)
    store(dk, dkt * scale, bi, hv, tk, x, T, HKV, DK)
    store(dv, dvt, bi, hv, tk, d, T, HKV, D)


# ----------------------------------------------------------------------------------------------------------------------
# Host side


def _band(window: int, c: int) -> int:
    return -(-(window - 1) // c) if window > 1 else 0


class _SWA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink_k, sink_v, sink_pos, sink_ok, valid, window, scale, chunk):
        b, t, h, dk = q.shape
        hkv, d = k.shape[2], v.shape[-1]
        c, p = chunk, _band(window, chunk)
        n = triton.cdiv(t, c)
        has_sinks = sink_k is not None
        nsink = sink_k.shape[1] if has_sinks else 0
        bk, bd, bs = p2(dk), p2(d), p2(nsink)
        prec = dot_precision(v.dtype)
        o = torch.empty(b, t, h, d, device=q.device, dtype=v.dtype)
        lse = torch.empty(b, t, h, device=q.device, dtype=torch.float32)
        sinks = (sink_k, sink_v, sink_pos, sink_ok) if has_sinks else (q, q, q, q)
        _fwd[(n, b * h)](
            q, k, v, *sinks, valid if valid is not None else q, o, lse, t, window, p, nsink, scale, DEN_EPS,
            H=h, HKV=hkv, DK=dk, D=d, C=c, BK=bk, BD=bd, BS=bs, HAS_VALID=valid is not None, HAS_SINKS=has_sinks,
            PREC=prec, **launch_opts(TUNE, c * max(bk, bd)))
        ctx.save_for_backward(q, k, v, sink_k, sink_v, sink_pos, sink_ok, valid, o, lse)
        ctx.cfg = (window, scale, c, p)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, sink_k, sink_v, sink_pos, sink_ok, valid, o, lse = ctx.saved_tensors
        window, scale, c, p = ctx.cfg
        b, t, h, dk = q.shape
        hkv, d = k.shape[2], v.shape[-1]
        n = triton.cdiv(t, c)
        has_sinks = sink_k is not None
        nsink = sink_k.shape[1] if has_sinks else 0
        bk, bd, bs = p2(dk), p2(d), p2(nsink)
        prec = dot_precision(v.dtype)
        do = do.contiguous()
        vmask = valid if valid is not None else q
        sink_grad = has_sinks and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
        dq = torch.empty_like(q)
        delta = torch.empty_like(lse)
        dsk = torch.zeros(sink_k.shape, device=q.device, dtype=torch.float32) if sink_grad else q
        dsv = torch.zeros(sink_v.shape, device=q.device, dtype=torch.float32) if sink_grad else q
        sinks = (sink_k, sink_v, sink_pos, sink_ok) if has_sinks else (q, q, q, q)
        common = dict(H=h, HKV=hkv, DK=dk, D=d, C=c, BK=bk, BD=bd, HAS_VALID=valid is not None, PREC=prec)
        _bwd_dq[(n, b * h)](
            q, k, v, *sinks, vmask, o, do, lse, delta, dq, dsk, dsv, t, window, p, nsink, scale, BS=bs,
            HAS_SINKS=has_sinks, SINK_GRAD=sink_grad, **common, **launch_opts(TUNE, c * max(bk, bd)))
        dk_ = torch.empty_like(k)
        dv_ = torch.empty_like(v)
        opts = launch_opts(TUNE, c * max(bk, bd))
        _bwd_dkv[(n, b * hkv)](q, k, v, vmask, do, lse, delta, dk_, dv_, t, window, p, scale,
                               CQ=min(TUNE["dkv_queries"], c), **common,
                               **{**opts, "num_warps": TUNE["num_warps"] or TUNE["dkv_warps"] or opts["num_warps"]})
        dsk_out = dsk.to(sink_k.dtype) if sink_grad else None
        dsv_out = dsv.to(sink_v.dtype) if sink_grad else None
        return dq, dk_, dv_, dsk_out, dsv_out, None, None, None, None, None, None


def chunk_swa(q, k, v, window, scale, valid=None, sinks=None, chunk_size=64, cu_seqlens=None):
    """Same contract as `chunk_swa_torch`: returns o [B, T, H, D] in v.dtype.

    sinks: optional (sink_k [B, S, Hkv, D], sink_v [B, S, Hkv, D], sink_pos [B, S], sink_valid [B, S]), positions in
    this call's frame; a sink counts for query i once pos <= i - window. Differentiable in q, k, v, sink_k, sink_v.
    cu_seqlens: optional [N + 1] boundaries of N sequences packed along T (B == 1); sinks are then per sequence
    ([N, S, ...], positions in each sequence's frame). They run as a left-padded batch (a gather and a scatter).
    """
    if cu_seqlens is not None:
        assert q.shape[0] == 1, "cu_seqlens packs the sequences along T of a single row"
        rows, idx, xs = varlen_to_batch(cu_seqlens, q, k, v)
        if sinks is not None:  # each row starts with its padding: positions shift by its length
            sk, sv, spos, sok = sinks
            sinks = (sk, sv, spos + (~rows).sum(1, keepdim=True), sok)
        o = chunk_swa(*xs, window, scale, varlen_valid(valid, rows, idx), sinks, chunk_size)
        return batch_to_varlen(o, rows, idx, q.shape[1])
    dt = v.dtype
    q, k = q.to(dt).contiguous(), k.to(dt).contiguous()
    v = v.contiguous()
    check_size(q, k, v)
    c = chunk_size if chunk_size in (16, 32, 64, 128) else 64
    vmask = None if valid is None else valid.to(torch.uint8).contiguous()
    sk = sv = spos = sok = None
    if sinks is not None:
        sk, sv, spos, sok = sinks
        sk, sv = sk.to(dt).contiguous(), sv.to(dt).contiguous()
        spos, sok = spos.to(torch.int64).contiguous(), sok.to(torch.uint8).contiguous()
    return _SWA.apply(q, k, v, sk, sv, spos, sok, vmask, int(window), float(scale), c)
