"""Triton form of Hedgehog's feature map phi(x) = [softmax(x W) || softmax(-x W)] (one W per head), forward and
backward as one autograd Function.

In PyTorch (HedgehogFeatureMap) the map is an fp32 einsum, two softmaxes, a concat and a cast back to the model's
dtype, each a pass over memory: at 32K tokens, 32 query heads, 8 KV heads and head_dim 128 on the H100, the q and k
maps took 5.3 ms of forward against 1.1 ms for the lolcats attention kernel that reads them (0.44 ms here). Here
one pass reads x and writes phi in x's dtype, which is what the chunk kernels read (bench/results/kernels.md).

- Logits in fp32, as in PyTorch. A 16-bit x multiplies W = W_hi + W_lo (its two 16-bit parts): each product is exact
  in the fp32 accumulator and the pair carries W to about 16 bits of mantissa, on the tensor cores. fp32 x: fp32
  products.
- Backward: the logits are recomputed, dz = p (dp - sum p dp) - n (dn - sum n dn), dx = dz W^T and dW = x^T dz
  (tf32 products for 16-bit x, like cuBLAS under `allow_tf32`; fp32 for fp32 x). dW: each program sums over a range
  of rows, PyTorch adds up the programs' partial sums. With GQA, dx (a sum over the weight heads that read an x
  head) comes from a second pass, one program per row tile and x head.
- GQA: weight head j reads x head j // (Hw // Hx) (keys mapped per query head), without repeating x.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # transformers' remote-code import check skips try blocks; ops.py falls back to PyTorch
    raise

from ..chunk_utils import p2
from ..fused_utils import sms, softmax_pair

BN = 64  # rows per tile
# Knob for benchmarks: bwd_stages, pipeline stages of the dW pass (16-bit x: 3, 0.92 ms forward+backward at 32K x 32
# heads on the H100, against 0.94 with 2 and 1.04 with 1; fp32 x: 2)
TUNE = {"bwd_stages": None}


@triton.jit
def _logits(xt, w_hi, w_lo, wh, D: tl.constexpr, FH: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
            SPLIT: tl.constexpr):
    """z = x W (fp32) of a [rows, BD] tile of x under weight head wh; W given as two 16-bit parts (SPLIT) or fp32."""
    od, of = tl.arange(0, BD), tl.arange(0, BF)
    m = (od[:, None] < D) & (of[None, :] < FH)
    off = wh * (D * FH) + od[:, None] * FH + of[None, :]
    if SPLIT:
        z = tl.dot(xt, tl.load(w_hi + off, mask=m, other=0.0), out_dtype=tl.float32)
        return tl.dot(xt, tl.load(w_lo + off, mask=m, other=0.0), acc=z)
    return tl.dot(xt, tl.load(w_hi + off, mask=m, other=0.0), input_precision="ieee")


@triton.jit
def _x_tile(x, rows, hx, mr, od, HX: tl.constexpr, D: tl.constexpr):
    return tl.load(x + (rows[:, None] * HX + hx) * D + od[None, :], mask=mr[:, None] & (od[None, :] < D), other=0.0)


@triton.jit
def _fwd(x, w_hi, w_lo, phi, N, HX: tl.constexpr, HW: tl.constexpr, D: tl.constexpr, FH: tl.constexpr,
         BN: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, SPLIT: tl.constexpr):
    """One program per (row tile, weight head)."""
    i_n, wh = tl.program_id(0), tl.program_id(1)
    hx = wh // (HW // HX)
    rows = (i_n * BN + tl.arange(0, BN)).to(tl.int64)
    od, of = tl.arange(0, BD), tl.arange(0, BF)
    mr, mf = rows < N, of < FH
    p, n = softmax_pair(_logits(_x_tile(x, rows, hx, mr, od, HX, D), w_hi, w_lo, wh, D, FH, BD, BF, SPLIT), mf)
    out = phi + (rows[:, None] * HW + wh) * (2 * FH) + of[None, :]
    m = mr[:, None] & mf[None, :]
    tl.store(out, p.to(phi.dtype.element_ty), mask=m)
    tl.store(out + FH, n.to(phi.dtype.element_ty), mask=m)


@triton.jit
def _dz(x, w_hi, w_lo, dphi, rows, mr, hx, wh, od, of, HX: tl.constexpr, HW: tl.constexpr, D: tl.constexpr,
        FH: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, SPLIT: tl.constexpr):
    """The x tile of rows and the logits' gradient under weight head wh, from the recomputed features."""
    xt = _x_tile(x, rows, hx, mr, od, HX, D)
    mf = of < FH
    p, n = softmax_pair(_logits(xt, w_hi, w_lo, wh, D, FH, BD, BF, SPLIT), mf)
    m = mr[:, None] & mf[None, :]
    g = dphi + (rows[:, None] * HW + wh) * (2 * FH) + of[None, :]
    dp = tl.load(g, mask=m, other=0.0).to(tl.float32)
    dn = tl.load(g + FH, mask=m, other=0.0).to(tl.float32)
    dz = p * (dp - tl.sum(p * dp, 1)[:, None]) - n * (dn - tl.sum(n * dn, 1)[:, None])
    return xt, tl.where(m, dz, 0.0)


@triton.jit
def _w_t(w32, wh, od, of, D: tl.constexpr, FH: tl.constexpr):
    """W^T of weight head wh ([BF, BD]), loaded transposed rather than transposed in registers."""
    return tl.load(w32 + wh * (D * FH) + of[:, None] + od[None, :] * FH, mask=(of[:, None] < FH) & (od[None, :] < D),
                   other=0.0)


@triton.jit
def _bwd(x, w_hi, w_lo, w32, dphi, dx, dwp, N, RPP, HX: tl.constexpr, HW: tl.constexpr, D: tl.constexpr,
         FH: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, SPLIT: tl.constexpr,
         DX: tl.constexpr, PREC: tl.constexpr):
    """One program per (range of RPP rows, weight head): its partial dW, stored to dwp[program], and (DX: one weight
    head per x head) dx of its rows."""
    i_p, wh = tl.program_id(0), tl.program_id(1)
    hx = wh // (HW // HX)
    od, of = tl.arange(0, BD), tl.arange(0, BF)
    if DX:
        wt = _w_t(w32, wh, od, of, D, FH)
    dw = tl.zeros([BD, BF], tl.float32)
    r_end = tl.minimum((i_p + 1) * RPP, N)
    for r0 in range(i_p * RPP, r_end, BN):
        rows = (r0 + tl.arange(0, BN)).to(tl.int64)
        mr = rows < r_end
        xt, dz = _dz(x, w_hi, w_lo, dphi, rows, mr, hx, wh, od, of, HX, HW, D, FH, BD, BF, SPLIT)
        if DX:
            tl.store(dx + (rows[:, None] * HX + hx) * D + od[None, :],
                     tl.dot(dz, wt, input_precision=PREC).to(dx.dtype.element_ty),
                     mask=mr[:, None] & (od[None, :] < D))
        dw = tl.dot(tl.trans(xt.to(tl.float32)), dz, acc=dw, input_precision=PREC)
    tl.store(dwp + ((i_p * HW + wh) * D + od[:, None]) * FH + of[None, :], dw,
             mask=(od[:, None] < D) & (of[None, :] < FH))


@triton.jit
def _bwd_dx(x, w_hi, w_lo, w32, dphi, dx, N, HX: tl.constexpr, HW: tl.constexpr, D: tl.constexpr,
            FH: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, SPLIT: tl.constexpr,
            PREC: tl.constexpr):
    """dx of a row tile of x head hx where several weight heads read it (GQA): their dz W^T summed here and stored
    once (fp32 atomics from one program per weight head took 2.1 ms forward+backward at 8 -> 32 heads on the H100)."""
    i_n, hx = tl.program_id(0), tl.program_id(1)
    G: tl.constexpr = HW // HX
    rows = (i_n * BN + tl.arange(0, BN)).to(tl.int64)
    od, of = tl.arange(0, BD), tl.arange(0, BF)
    mr = rows < N
    acc = tl.zeros([BN, BD], tl.float32)
    for g in range(G):
        _, dz = _dz(x, w_hi, w_lo, dphi, rows, mr, hx, hx * G + g, od, of, HX, HW, D, FH, BD, BF, SPLIT)
        acc = tl.dot(dz, _w_t(w32, hx * G + g, od, of, D, FH), acc=acc, input_precision=PREC)
    tl.store(dx + (rows[:, None] * HX + hx) * D + od[None, :], acc.to(dx.dtype.element_ty),
             mask=mr[:, None] & (od[None, :] < D))


def _parts(w: torch.Tensor, dtype: torch.dtype):
    """(W_hi, W_lo, split, W in fp32): 16-bit parts of W for a 16-bit x, else W in fp32 twice."""
    w32 = w.float().contiguous()
    if dtype in (torch.float16, torch.bfloat16):
        hi = w32.to(dtype)
        return hi, (w32 - hi.float()).to(dtype), True, w32
    return w32, w32, False, w32


class _HedgehogMap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, out_dtype):
        b, t, hx, d = x.shape
        hw, _, fh = w.shape
        n = b * t
        hi, lo, split, _ = _parts(w, x.dtype)
        phi = torch.empty(b, t, hw, 2 * fh, device=x.device, dtype=out_dtype)
        bd, bf = p2(d), p2(fh)
        _fwd[(triton.cdiv(n, BN), hw)](x, hi, lo, phi, n, HX=hx, HW=hw, D=d, FH=fh, BN=BN, BD=bd, BF=bf,
                                       SPLIT=split, num_warps=4)
        ctx.save_for_backward(x, w)
        return phi

    @staticmethod
    def backward(ctx, dphi):
        x, w = ctx.saved_tensors
        b, t, hx, d = x.shape
        hw, _, fh = w.shape
        n = b * t
        hi, lo, split, w32 = _parts(w, x.dtype)
        bd, bf = p2(d), p2(fh)
        # row ranges: about four programs per SM over all weight heads (each adds one partial dW)
        progs = max(1, min(triton.cdiv(n, BN), triton.cdiv(4 * sms(x.device), hw)))
        rpp = triton.cdiv(triton.cdiv(n, progs), BN) * BN
        progs = triton.cdiv(n, rpp)
        one = hw == hx  # one weight head per x head: dx in the same pass as dW
        dx = torch.empty_like(x)
        dwp = torch.empty(progs, hw, d, fh, device=x.device, dtype=torch.float32)
        prec = "ieee" if x.dtype == torch.float32 else "tf32"
        common = dict(HX=hx, HW=hw, D=d, FH=fh, BN=BN, BD=bd, BF=bf, SPLIT=split, PREC=prec, num_warps=8)
        dphi = dphi.contiguous()
        # pipeline stages within the H100's 227 KiB of shared memory (fp32 x at 3 stages: 256 KiB; 128-wide feature
        # halves, F = 256, at 3 stages: 400 KiB)
        big = bd * bf > 128 * 64
        stages = TUNE["bwd_stages"] or (1 if big else 3 if split else 2)
        _bwd[(progs, hw)](x, hi, lo, w32, dphi, dx, dwp, n, rpp, DX=one, num_stages=stages, **common)
        if not one:
            _bwd_dx[(triton.cdiv(n, BN), hx)](x, hi, lo, w32, dphi, dx, n, num_stages=1 if big else 2, **common)
        return dx, dwp.sum(0).to(w.dtype), None


def fused_hedgehog_map(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [B, T, Hx, D], w [Hw, D, Fh] (Hw % Hx == 0) -> phi [B, T, Hw, 2Fh] in out_dtype (default x's dtype),
    as naive.py computes it (which returns fp32). Differentiable in x and w."""
    if x.dim() != 4 or w.dim() != 3 or w.shape[1] != x.shape[-1] or w.shape[0] % x.shape[2]:
        raise ValueError(f"hedgehog map: x {tuple(x.shape)} and w {tuple(w.shape)} do not fit "
                         "(x [B, T, Hx, D], w [Hw, D, Fh] with Hw a multiple of Hx)")
    return _HedgehogMap.apply(x.contiguous(), w, out_dtype or x.dtype)
