"""Fused Triton decode step of Hedgehog linear attention: one launch per layer per token.

One program per (row, state head) does it all: the key's feature map phi(k) = [softmax(k W) || softmax(-k W)], the
state update S += phi(k) v^T, z += phi(k) (fp32, in place), and the readout of the G query heads that share the
state, o = phi(q) S / phi(q) z, their feature maps computed from the post-RoPE queries in the same program. The
state is read and written once; with GQA-shared states (state heads == KV heads) the G = H / Hkv query heads of a
group read it once together. The value dim is walked in tiles inside the program (the normalizer z is shared by all
columns, so one program owns each state head and no program waits on another).

Matches kernels/step_torch.py:hedgehog_step_torch (and torch_recurrent.py with features computed outside).
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # transformers' remote-code import check skips try blocks; ops.py falls back to PyTorch
    raise

from ..fused_utils import (TUNE, advance_pos, check_state, contig, feature_chunk, group_block, group_features, p2,
                           row_features, value_block)
from ..utils import DEN_EPS


@triton.jit
def _hedgehog_step(q, k, v, wq, wk, S, Z, o, valid, pos, ticket, eps,
                   H: tl.constexpr, HS: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, FH: tl.constexpr,
                   DV: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
                   BV: tl.constexpr, BFC: tl.constexpr, HAS_VALID: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HS
    hs = pid % HS
    hkv = hs // (HS // HKV)
    b64 = b.to(tl.int64)
    p = tl.load(pos + b)
    of = tl.arange(0, BF)
    og = tl.arange(0, BG)
    ov = tl.arange(0, BV)
    mf, mg = of < FH, og < G

    kp, kn = row_features(k + (b64 * HKV + hkv) * D, wk, hs, of, D, FH, BF, BD, BFC)
    if HAS_VALID:
        okf = (tl.load(valid + b) != 0).to(tl.float32)
        kp = kp * okf
        kn = kn * okf
    zb = (b64 * HS + hs) * (2 * FH)
    zp = tl.load(Z + zb + of, mask=mf, other=0.0) + kp
    zn = tl.load(Z + zb + FH + of, mask=mf, other=0.0) + kn
    tl.store(Z + zb + of, zp, mask=mf)
    tl.store(Z + zb + FH + of, zn, mask=mf)

    qp_all, qn_all = group_features(q + (b64 * H + hs * G) * D, wq, hs * G, og, of, D, FH, G, BG, BF, BD, BFC)
    den = tl.sum(qp_all * zp[None, :], 1) + tl.sum(qn_all * zn[None, :], 1)
    rden = tl.where(den > eps, 1.0 / tl.maximum(den, eps), 0.0)  # no visible key (padding): 0

    sb = (b64 * HS + hs) * (2 * FH) * DV
    for v0 in range(0, DV, BV):
        cv = v0 + ov
        mv = cv < DV
        vv = tl.load(v + (b64 * HKV + hkv) * DV + cv, mask=mv, other=0.0).to(tl.float32)
        m2 = mf[:, None] & mv[None, :]
        ptr_p = S + sb + of[:, None] * DV + cv[None, :]
        ptr_n = ptr_p + FH * DV
        # The state is read and written once per step: streamed past L2 (evict_first loads, .cs stores) so that it
        # does not push out the feature-map weights every row reads (batch 64 on the H100: 103.4 us against 110.1)
        sp = tl.load(ptr_p, mask=m2, other=0.0, eviction_policy="evict_first") + kp[:, None] * vv[None, :]
        sn = tl.load(ptr_n, mask=m2, other=0.0, eviction_policy="evict_first") + kn[:, None] * vv[None, :]
        tl.store(ptr_p, sp, mask=m2, cache_modifier=".cs")
        tl.store(ptr_n, sn, mask=m2, cache_modifier=".cs")
        num = tl.sum(qp_all[:, :, None] * sp[None, :, :], 1) + tl.sum(qn_all[:, :, None] * sn[None, :, :], 1)
        out = num * rden[:, None]
        tl.store(o + (b64 * H + hs * G + og[:, None]) * DV + cv[None, :], out.to(o.dtype.element_ty),
                 mask=mg[:, None] & mv[None, :])
    advance_pos(pos, ticket, b, p, HS)


def fused_hedgehog_step(qr, kr, v, wq, wk, state, valid=None):
    """qr [B, H, D] (post-RoPE), kr [B, Hkv, D], v [B, Hkv, Dv]; wq [H, D, Fh], wk [Hs, D, Fh]; state with
    S [B, Hs, 2Fh, Dv], z [B, Hs, 2Fh] (fp32), pos [B], ticket [B], all updated in place. Returns o [B, H, Dv]."""
    qr, kr, v, wq, wk = contig(qr, kr, v, wq, wk)
    check_state(state, "S", "z", "pos", "ticket")
    b, h, d = qr.shape
    hkv, dv = kr.shape[1], v.shape[2]
    hs, _, fh = wk.shape
    if v.shape[1] != hkv or h % hs or hs % hkv or state["S"].shape != (b, hs, 2 * fh, dv):
        raise ValueError(f"hedgehog step: shapes q {tuple(qr.shape)} k {tuple(kr.shape)} v {tuple(v.shape)} "
                         f"wk {tuple(wk.shape)} S {tuple(state['S'].shape)} do not fit")
    g = h // hs
    bg, bf = group_block(g, 1), p2(fh)
    bv = value_block(dv, bf, bg)
    o = torch.empty(b, h, dv, dtype=v.dtype, device=v.device)
    _hedgehog_step[(b * hs,)](
        qr, kr, v, wq, wk, state["S"], state["z"], o, valid.contiguous() if valid is not None else o, state["pos"],
        state["ticket"], DEN_EPS, H=h, HS=hs, HKV=hkv, D=d, FH=fh, DV=dv, G=g, BG=bg, BD=p2(d), BF=bf, BV=bv,
        BFC=feature_chunk(p2(d), bg, bf),
        HAS_VALID=valid is not None, num_warps=TUNE["num_warps"] or 4,  # 4: 1.1x faster than 8 on the H100
    )
    return o
