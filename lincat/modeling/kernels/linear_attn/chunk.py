"""Triton form of normalized causal linear attention (Hedgehog): forward and backward as one autograd Function, in
two passes.

Carrying the state through a sequence's chunks inside one program (one serial chain of loads and products per SM)
left these kernels latency bound at 8-25% of the H100's bandwidth. So only the state recurrence is serial:
1. a state pass, one program per (feature block, value block, batch x state head), walks the chunks and stores the
   state entering each chunk, h_n = sum over earlier keys of kf v^T (16-bit for 16-bit inputs, fp32 for fp32; the
   normalizer state z_n in fp32). Its loads do not depend on the state, so Triton pipelines them;
2. an output pass with one program per (value block, chunk, batch x query head) and no order between chunks:
   o = (qf h_n + causal(qf kf^T) v) / (qf z_n + rowsum causal(qf kf^T)).
The backward mirrors it: a reverse state pass (dh_n = sum over the queries of later chunks of qf dnum^T, dz_n of qf
dden, with dnum = do / den and dden = -do.o / den), then chunk-parallel passes for dqf, dkf and dv.
The lolcats op (window_linear_attn/chunk.py) uses the two state passes as they are.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # transformers' remote-code import check skips try blocks; ops.py falls back to PyTorch
    raise

from ..utils import DEN_EPS, batch_to_varlen, varlen_to_batch, varlen_valid
from ..chunk_utils import check_size, dot_precision, keys_ok, load, p2, row_dot, row_ptrs, store

# Knobs for tests and benchmarks: block, warps and pipeline stages of the state passes (h_*); value block and warps
# of the chunk-parallel passes (o_*); bwd_block, their feature / value block in the backward; states_fp32 stores
# 16-bit inputs' chunk states in fp32; chunk, the chunk when the caller gives none (128: half the states of 64, and
# 1.4x / 1.25x faster forward / forward+backward than 64 on the H100 in a development run; `bench/kernels.py
# --variants` times it).
TUNE = {"h_block": None, "h_warps": None, "h_stages": None, "o_bd": None, "o_warps": None, "bwd_block": None,
        "states_fp32": False, "chunk": 128}

# Never tl.trans a tl.dot result: Triton 3.4 to 3.7.0 miscompiles that on Hopper (fla issue 640). Products that need
# a transposed result are formed transposed instead (tl.dot(k, tl.trans(q)) rather than tl.trans(tl.dot(q, ...))),
# and passes that multiply by h^T load it transposed. Transposing loaded tiles is fine.


@triton.jit
def _state_ptrs(hs, hz, b, hk, slot, NSLOT, f, d, HK: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
                TRANS: tl.constexpr = False):
    """States are [B, HK, NSLOT, F, D] / [B, HK, NSLOT, F] (NSLOT: one per chunk, or 1). TRANS: the [D, F] view, for
    passes that multiply by S^T (loaded transposed rather than transposed in registers)."""
    base = ((b * HK + hk) * NSLOT + slot).to(tl.int64)
    if TRANS:
        ps, ms = hs + base * F * D + f[None, :] * D + d[:, None], (f[None, :] < F) & (d[:, None] < D)
    else:
        ps, ms = hs + base * F * D + f[:, None] * D + d[None, :], (f[:, None] < F) & (d[None, :] < D)
    return ps, ms, hz + base * F + f, f < F


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


@triton.jit
def _fwd_h(kf, v, valid, s0, z0, hs, hz, sT, zT, T, END, NC,
           HK: tl.constexpr, HV: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
           C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
           HAS_VALID: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, PREC: tl.constexpr):
    """hs[n] = s0 + sum of kf^T v over the keys before chunk n and before END (hz likewise, by the first value block);
    the final state (sT, zT) covers the keys before END. The lolcats op passes END = T - W: its final state leaves
    out the window, and no chunk state it reads holds a key at or past T - W anyway."""
    i_f, i_d, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = i_bh // HK, i_bh % HK
    hv = hk // (HK // HV)
    c = tl.arange(0, C)
    f = i_f * BF + tl.arange(0, BF)
    d = i_d * BD + tl.arange(0, BD)
    S = tl.zeros([BF, BD], tl.float32)
    z = tl.zeros([BF], tl.float32)
    if HAS_H0:  # names apart from the loop's: Triton would carry them through it, with another pointer type
        p0, m0, pz0, mz0 = _state_ptrs(s0, z0, b, hk, 0, 1, f, d, HK, F, D)
        S = tl.load(p0, mask=m0, other=0.0)
        z = tl.load(pz0, mask=mz0, other=0.0)
    for n in range(0, NC):
        ps, ms, pz, mz = _state_ptrs(hs, hz, b, hk, n, NC, f, d, HK, F, D)
        tl.store(ps, S.to(hs.dtype.element_ty), mask=ms)
        if i_d == 0:
            tl.store(pz, z, mask=mz)
        t = n * C + c
        ok = keys_ok(valid, b, t, END, T, HAS_VALID)
        kt = tl.where(ok[:, None], load(kf, b, hk, t, f, T, HK, F), 0.0)
        vt = load(v, b, hv, t, d, T, HV, D)
        S = tl.dot(tl.trans(kt), vt, acc=S, input_precision=PREC)
        z += tl.sum(kt.to(tl.float32), 0)
    if STORE_FINAL:
        ps, ms, pz, mz = _state_ptrs(sT, zT, b, hk, 0, 1, f, d, HK, F, D)
        tl.store(ps, S, mask=ms)
        if i_d == 0:
            tl.store(pz, z, mask=mz)


@triton.jit
def _fwd_o(qf, kf, v, valid, hs, hz, o, den, T, NC, eps,
           H: tl.constexpr, HK: tl.constexpr, HV: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
           C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr):
    i_d, n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = i_bh // H, i_bh % H
    hk = h // (H // HK)
    hv = hk // (HK // HV)
    c = tl.arange(0, C)
    f = tl.arange(0, BF)
    d = i_d * BD + tl.arange(0, BD)
    t = n * C + c
    ok = keys_ok(valid, b, t, T, T, HAS_VALID)
    qt = load(qf, b, h, t, f, T, H, F)
    kt = tl.where(ok[:, None], load(kf, b, hk, t, f, T, HK, F), 0.0)
    vt = load(v, b, hv, t, d, T, HV, D)
    ps, ms, pz, mz = _state_ptrs(hs, hz, b, hk, n, NC, f, d, HK, F, D)
    S = tl.load(ps, mask=ms, other=0.0).to(qt.dtype)
    z = tl.load(pz, mask=mz, other=0.0)
    a = tl.where(c[:, None] >= c[None, :], tl.dot(qt, tl.trans(kt), input_precision=PREC), 0.0)
    acc = tl.dot(qt, S, input_precision=PREC)
    acc = tl.dot(a.to(vt.dtype), vt, acc=acc, input_precision=PREC)
    dl = tl.sum(qt.to(tl.float32) * z[None, :], 1) + tl.sum(a, 1)
    store(o, acc / tl.maximum(dl, eps)[:, None], b, h, t, d, T, H, D)
    if i_d == 0:
        pr, mr = row_ptrs(den, b, h, t, T, H)
        tl.store(pr, dl, mask=mr)


@triton.jit
def _bwd_h(qf, do, den, delta, dsT, dzT, dhs, dhz, d0s, d0z, T, NC, eps,
           H: tl.constexpr, HK: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
           C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
           HAS_DH: tl.constexpr, STORE_D0: tl.constexpr, PREC: tl.constexpr):
    """dh_n = dS_T + sum over the queries of chunks after n of qf^T dnum (dz_n: of qf dden)."""
    i_f, i_d, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = i_bh // HK, i_bh % HK
    G: tl.constexpr = H // HK
    c = tl.arange(0, C)
    f = i_f * BF + tl.arange(0, BF)
    d = i_d * BD + tl.arange(0, BD)
    dS = tl.zeros([BF, BD], tl.float32)
    dz = tl.zeros([BF], tl.float32)
    if HAS_DH:  # names apart from the loop's, as in _fwd_h
        p0, m0, pz0, mz0 = _state_ptrs(dsT, dzT, b, hk, 0, 1, f, d, HK, F, D)
        dS = tl.load(p0, mask=m0, other=0.0)
        dz = tl.load(pz0, mask=mz0, other=0.0)
    for i in range(0, NC):
        n = NC - 1 - i
        ps, ms, pz, mz = _state_ptrs(dhs, dhz, b, hk, n, NC, f, d, HK, F, D)
        tl.store(ps, dS.to(dhs.dtype.element_ty), mask=ms)
        if i_d == 0:
            tl.store(pz, dz, mask=mz)
        for g in range(G):
            qs, zs = _q_chunk(qf, do, den, delta, b, hk * G + g, n * C + c, T, f, d, eps, PREC, H, F, D)
            dS += qs
            dz += zs
    if STORE_D0:
        ps, ms, pz, mz = _state_ptrs(d0s, d0z, b, hk, 0, 1, f, d, HK, F, D)
        tl.store(ps, dS, mask=ms)
        if i_d == 0:
            tl.store(pz, dz, mask=mz)


@triton.jit
def _bwd_dq(kf, v, valid, do, den, delta, hs, hz, dqf, T, NC, eps,
            H: tl.constexpr, HK: tl.constexpr, HV: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
            C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr):
    """dqf = dnum h_n^T + dden z_n + causal(dnum v^T + dden) kf; BD covers all of D."""
    i_f, n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = i_bh // H, i_bh % H
    hk = h // (H // HK)
    hv = hk // (HK // HV)
    c = tl.arange(0, C)
    f = i_f * BF + tl.arange(0, BF)
    d = tl.arange(0, BD)
    t = n * C + c
    ok = keys_ok(valid, b, t, T, T, HAS_VALID)
    kt = tl.where(ok[:, None], load(kf, b, hk, t, f, T, HK, F), 0.0)
    vt = load(v, b, hv, t, d, T, HV, D)
    pr, mr = row_ptrs(den, b, h, t, T, H)
    dn = tl.load(pr, mask=mr, other=1.0)
    rden = tl.where(dn >= eps, 1.0 / tl.maximum(dn, eps), 0.0)
    dden = -tl.load(row_ptrs(delta, b, h, t, T, H)[0], mask=mr, other=0.0) * rden
    dnum = (load(do, b, h, t, d, T, H, D).to(tl.float32) * rden[:, None]).to(kt.dtype)
    ps, ms, pz, mz = _state_ptrs(hs, hz, b, hk, n, NC, f, d, HK, F, D, True)
    ST = tl.load(ps, mask=ms, other=0.0).to(kt.dtype)
    z = tl.load(pz, mask=mz, other=0.0)
    da = tl.where(c[:, None] >= c[None, :], tl.dot(dnum, tl.trans(vt), input_precision=PREC) + dden[:, None], 0.0)
    dq = tl.dot(dnum, ST, input_precision=PREC) + dden[:, None] * z[None, :]
    dq = tl.dot(da.to(kt.dtype), kt, acc=dq, input_precision=PREC)
    store(dqf, dq, b, h, t, f, T, H, F)


@triton.jit
def _bwd_dkv(qf, kf, v, valid, do, den, delta, dhs, dhz, dkf, dv, T, NC, eps,
             H: tl.constexpr, HK: tl.constexpr, HV: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
             C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, DO_DKF: tl.constexpr,
             HAS_VALID: tl.constexpr, PREC: tl.constexpr):
    """Per (block, chunk, batch x state head), summing the group's query heads. DO_DKF: dkf = v dh_n^T + dz_n +
    causal^T(v dnum^T + dden) qf over a feature block (BD covers D); else dv = kf dh_n + causal^T(kf qf^T) dnum over
    a value block (BF covers F). Intra-chunk products are formed keys by queries."""
    i_x, n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = i_bh // HK, i_bh % HK
    G: tl.constexpr = H // HK
    hv = hk // (HK // HV)
    c = tl.arange(0, C)
    if DO_DKF:
        f = i_x * BF + tl.arange(0, BF)
        d = tl.arange(0, BD)
        acc = tl.zeros([C, BF], tl.float32)
    else:
        f = tl.arange(0, BF)
        d = i_x * BD + tl.arange(0, BD)
        acc = tl.zeros([C, BD], tl.float32)
    t = n * C + c
    causal_t = c[:, None] <= c[None, :]  # key row <= query column
    ok = keys_ok(valid, b, t, T, T, HAS_VALID)
    kt = tl.where(ok[:, None], load(kf, b, hk, t, f, T, HK, F), 0.0)
    vt = load(v, b, hv, t, d, T, HV, D)
    for g in range(G):
        h = hk * G + g
        qt = load(qf, b, h, t, f, T, H, F)
        pr, mr = row_ptrs(den, b, h, t, T, H)
        dn = tl.load(pr, mask=mr, other=1.0)
        rden = tl.where(dn >= eps, 1.0 / tl.maximum(dn, eps), 0.0)
        dnum = (load(do, b, h, t, d, T, H, D).to(tl.float32) * rden[:, None]).to(kt.dtype)
        if DO_DKF:
            dden = -tl.load(row_ptrs(delta, b, h, t, T, H)[0], mask=mr, other=0.0) * rden
            da_t = tl.where(causal_t, tl.dot(vt, tl.trans(dnum), input_precision=PREC) + dden[None, :], 0.0)
            acc = tl.dot(da_t.to(qt.dtype), qt, acc=acc, input_precision=PREC)
        else:
            a_t = tl.where(causal_t, tl.dot(kt, tl.trans(qt), input_precision=PREC), 0.0)
            acc = tl.dot(a_t.to(kt.dtype), dnum, acc=acc, input_precision=PREC)
    ps, ms, pz, mz = _state_ptrs(dhs, dhz, b, hk, n, NC, f, d, HK, F, D, DO_DKF)
    dS = tl.load(ps, mask=ms, other=0.0).to(kt.dtype)
    if DO_DKF:
        dz = tl.load(pz, mask=mz, other=0.0)
        acc = tl.dot(vt, dS, acc=acc, input_precision=PREC) + dz[None, :]
        store(dkf, tl.where(ok[:, None], acc, 0.0), b, hk, t, f, T, HK, F)
    else:
        acc = tl.dot(kt, dS, acc=acc, input_precision=PREC)
        store(dv, acc, b, hk, t, d, T, HK, D)


def h_cfg(f: int, d: int, tune: dict = TUNE):
    """Feature block, value block and launch options of the state passes."""
    bh = tune["h_block"] or 64
    return min(p2(f), bh), min(p2(d), bh), {"num_warps": tune["h_warps"] or 4, "num_stages": tune["h_stages"] or 3}


def o_opts(c: int, rows: int, cols: int, tune: dict = TUNE) -> dict:
    """Launch options of a chunk-parallel pass whose largest tile is [rows, cols] next to [c, c] scores: 8 warps
    from 128 x 128 (C = 128 with 128-wide heads), 4 below (C = 64)."""
    return {"num_warps": tune["o_warps"] or (8 if c * max(rows, cols) >= 128 * 128 else 4), "num_stages": 1}


def fit(full: int, other: int, tune_val=None) -> int:
    """A block of `full` columns next to a tile dim of `other`, so that the pair stays within 128 x 128; a knob's
    value (tune_val) instead, at most `full`."""
    if tune_val:
        return min(tune_val, full)
    return full if full * other <= 128 * 128 else max(16, 128 * 128 // other)


def states_dtype(v_dtype, tune: dict = TUNE):
    return torch.float32 if (v_dtype == torch.float32 or tune["states_fp32"]) else v_dtype


def fwd_states(kf, v, valid, s0, z0, end, c, prec, final, tune: dict = TUNE):
    """Chunk states hs [B, HK, NC, F, D], hz [B, HK, NC, F] and, with final, the state after the keys before end."""
    b, t, hk, f = kf.shape
    hv, d = v.shape[2], v.shape[3]
    nc = triton.cdiv(t, c)
    f32 = dict(device=kf.device, dtype=torch.float32)
    hs = torch.empty(b, hk, nc, f, d, device=kf.device, dtype=states_dtype(v.dtype, tune))
    hz = torch.empty(b, hk, nc, f, **f32)
    sT = torch.empty(b, hk, f, d, **f32) if final else hz
    zT = torch.empty(b, hk, f, **f32) if final else hz
    bfh, bdh, opts = h_cfg(f, d, tune)
    _fwd_h[(triton.cdiv(f, bfh), triton.cdiv(d, bdh), b * hk)](
        kf, v, valid if valid is not None else kf, s0 if s0 is not None else hz, z0 if z0 is not None else hz,
        hs, hz, sT, zT, t, end, nc, HK=hk, HV=hv, F=f, D=d, C=c, BF=bfh, BD=bdh, HAS_VALID=valid is not None,
        HAS_H0=s0 is not None, STORE_FINAL=final, PREC=prec, **opts)
    return hs, hz, (sT, zT) if final else None


def bwd_states(qf, do, den, delta, hk, dsT, dzT, c, prec, need_d0, states_like, tune: dict = TUNE):
    """Reverse chunk states dhs[n] = dsT + sum over the queries of chunks after n of qf dnum^T (dhz: of qf dden), and
    with need_d0 the sum over all queries (the initial state's gradient)."""
    b, t, h, f = qf.shape
    d = do.shape[-1]
    nc = triton.cdiv(t, c)
    f32 = dict(device=qf.device, dtype=torch.float32)
    # states_like gives the dtype: the lolcats op stores fewer forward states than there are chunks
    dhs = torch.empty(b, hk, nc, f, d, device=qf.device, dtype=states_like.dtype)
    dhz = torch.empty(b, hk, nc, f, **f32)
    d0s = torch.empty(b, hk, f, d, **f32) if need_d0 else dhz
    d0z = torch.empty(b, hk, f, **f32) if need_d0 else dhz
    has_dh = dsT is not None or dzT is not None
    if has_dh:
        dsT = torch.zeros(b, hk, f, d, **f32) if dsT is None else dsT.float().contiguous()
        dzT = torch.zeros(b, hk, f, **f32) if dzT is None else dzT.float().contiguous()
    bfh, bdh, opts = h_cfg(f, d, tune)
    _bwd_h[(triton.cdiv(f, bfh), triton.cdiv(d, bdh), b * hk)](
        qf, do, den, delta, dsT if has_dh else dhz, dzT if has_dh else dhz, dhs, dhz, d0s, d0z, t, nc, DEN_EPS,
        H=h, HK=hk, F=f, D=d, C=c, BF=bfh, BD=bdh, HAS_DH=has_dh, STORE_D0=need_d0, PREC=prec, **opts)
    return dhs, dhz, (d0s, d0z) if need_d0 else None


class _LinearAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qf, kf, v, valid, s0, z0, output_final_state, chunk):
        b, t, h, f = qf.shape
        hk, hv, d = kf.shape[2], v.shape[2], v.shape[-1]
        c = chunk
        nc = triton.cdiv(t, c)
        prec = dot_precision(v.dtype)
        vmask = valid if valid is not None else qf
        hs, hz, final = fwd_states(kf, v, valid, s0, z0, t, c, prec, output_final_state)
        o = torch.empty(b, t, h, d, device=qf.device, dtype=v.dtype)
        den = torch.empty(b, t, h, device=qf.device, dtype=torch.float32)
        bf = p2(f)
        bd = fit(p2(d), bf, TUNE["o_bd"])
        _fwd_o[(triton.cdiv(d, bd), nc, b * h)](
            qf, kf, v, vmask, hs, hz, o, den, t, nc, DEN_EPS, H=h, HK=hk, HV=hv, F=f, D=d, C=c, BF=bf, BD=bd,
            HAS_VALID=valid is not None, PREC=prec, **o_opts(c, bf, bd))
        ctx.save_for_backward(qf, kf, v, valid, o, den, hs, hz)
        ctx.cfg = (c, s0 is not None)
        ctx.set_materialize_grads(False)
        if not output_final_state:
            return o, None, None
        return o, final[0], final[1]

    @staticmethod
    def backward(ctx, do, dsT, dzT):
        qf, kf, v, valid, o, den, hs, hz = ctx.saved_tensors
        c, has_s0 = ctx.cfg
        b, t, h, f = qf.shape
        hk, hv, d = kf.shape[2], v.shape[2], v.shape[-1]
        nc = triton.cdiv(t, c)
        prec = dot_precision(v.dtype)
        f32 = dict(device=qf.device, dtype=torch.float32)
        do = torch.zeros_like(o) if do is None else do.contiguous()  # only the final state was used
        vmask = valid if valid is not None else qf
        delta = row_dot(do, o)  # do . o, which dden needs in every pass below
        need_d0 = has_s0 and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5])
        dhs, dhz, d0 = bwd_states(qf, do, den, delta, hk, dsT, dzT, c, prec, need_d0, hs)

        bf, bd = p2(f), p2(d)
        common = dict(H=h, HK=hk, HV=hv, F=f, D=d, C=c, HAS_VALID=valid is not None, PREC=prec)
        dqf = torch.empty_like(qf)
        bf_q = fit(bf, bd, TUNE["bwd_block"])
        _bwd_dq[(triton.cdiv(f, bf_q), nc, b * h)](
            kf, v, vmask, do, den, delta, hs, hz, dqf, t, nc, DEN_EPS, BF=bf_q, BD=bd, **common,
            **o_opts(c, bf_q, bd))
        shared_v = hk != hv  # several state heads write the same v head: fp32 partials, summed below
        dv = torch.empty(b, t, hk, d, **f32) if shared_v else torch.empty_like(v)
        dkf = torch.empty_like(kf)
        args = (qf, kf, v, vmask, do, den, delta, dhs, dhz, dkf, dv, t, nc, DEN_EPS)
        bd_v = fit(bd, bf, TUNE["bwd_block"])
        _bwd_dkv[(triton.cdiv(f, bf_q), nc, b * hk)](
            *args, BF=bf_q, BD=bd, DO_DKF=True, **common, **o_opts(c, bf_q, bd))
        _bwd_dkv[(triton.cdiv(d, bd_v), nc, b * hk)](
            *args, BF=bf, BD=bd_v, DO_DKF=False, **common, **o_opts(c, bf, bd_v))
        if shared_v:
            dv = dv.view(b, t, hv, hk // hv, d).sum(3).to(v.dtype)
        ds0, dz0 = d0 if need_d0 else (None, None)
        return dqf, dkf, dv, None, ds0, dz0, None, None


def chunk_linear_attn(qf, kf, v, valid=None, initial_state=None, output_final_state=False, chunk_size=None,
                      cu_seqlens=None):
    """Same contract as `chunk_linear_attn_torch`: returns (o [B, T, H, D] in v.dtype, final state or None).

    initial_state / final state: (S [B, Hk, F, D], z [B, Hk, F]) fp32, the sums of kf v^T and kf over earlier tokens.
    Differentiable in qf, kf, v and the initial state.
    chunk_size: 16, 32, 64 or 128 (None: TUNE["chunk"]); the result does not depend on it.
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
    # fp32 tiles are twice the bytes: at 128 tokens a chunk's q, k, v and state overflow an H100 block's shared memory
    c = chunk_size if chunk_size in (16, 32, 64, 128) else (TUNE["chunk"] if dt != torch.float32 else 64)
    s0 = z0 = None
    if initial_state is not None:
        s0, z0 = (x.float().contiguous() for x in initial_state)
    vmask = None if valid is None else valid.to(torch.uint8).contiguous()
    o, fs, fz = _LinearAttn.apply(qf, kf, v, vmask, s0, z0, bool(output_final_state), c)
    return o, ((fs, fz) if output_final_state else None)
