"""Pieces shared by the Triton chunk kernels (kernels/<op>/chunk.py): launch heuristics and tile pointers.

Every op keeps its own TUNE dict of knobs for tests and benchmarks; the host helpers here take it as their first
argument.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # transformers' remote-code import check skips try blocks; ops.py falls back to PyTorch
    raise


def p2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def dot_precision(dtype) -> str:
    # fp32 inputs get exact fp32 products; 16-bit inputs use the tensor cores either way
    return "ieee" if dtype == torch.float32 else "tf32"


def launch_opts(tune: dict, elems: int, stages: int = 1) -> dict:
    """Warps and pipeline stages of the swa kernels: their band loops are too short for Triton to pipeline, so more
    stages only spill registers."""
    warps = tune["num_warps"] or (8 if elems >= 128 * 64 else 4)
    return {"num_warps": warps, "num_stages": tune["num_stages"] or stages}


def check_size(*xs):
    for x in xs:
        if x is not None and x.shape[1] * x.shape[2] * x.shape[3] >= 2**31:
            raise ValueError("T * heads * head_dim must stay below 2^31 (32-bit in-tile offsets)")


@triton.jit
def ptrs(base, b, h, t, x, T, lim, NH: tl.constexpr, X: tl.constexpr):
    """Pointers to rows t / columns x of head h in a contiguous [B, T, NH, X] tensor; rows at or past lim are masked.
    The (batch, head) offset is one 64-bit scalar; in-tile offsets stay 32-bit (64-bit tiles cost two registers per
    element). check_size makes sure T * NH * X fits in 32 bits."""
    row0 = base + (b.to(tl.int64) * T * NH + h) * X
    ptr = row0 + t[:, None] * (NH * X) + x[None, :]
    return ptr, (t[:, None] < lim) & (t[:, None] >= 0) & (x[None, :] < X)


@triton.jit
def load(base, b, h, t, x, T, NH: tl.constexpr, X: tl.constexpr):
    ptr, mask = ptrs(base, b, h, t, x, T, T, NH, X)
    return tl.load(ptr, mask=mask, other=0.0)


@triton.jit
def store(base, val, b, h, t, x, T, NH: tl.constexpr, X: tl.constexpr):
    ptr, mask = ptrs(base, b, h, t, x, T, T, NH, X)
    tl.store(ptr, val.to(base.dtype.element_ty), mask=mask)


@triton.jit
def row_ptrs(base, b, h, t, T, NH: tl.constexpr):
    """Per-token scalars ([B, T, NH] tensors: den, max, ...)."""
    return base + (b.to(tl.int64) * T * NH + h) + t * NH, (t < T) & (t >= 0)


@triton.jit
def keys_ok(valid, b, t, lim, T, HAS_VALID: tl.constexpr):
    """Keys that exist (t < lim) and are not padding."""
    ok = (t < lim) & (t >= 0)
    if HAS_VALID:
        ok = ok & (tl.load(valid + b * T + t, mask=ok, other=0) != 0)
    return ok


@triton.jit
def band_query_tiles(kc, T, W, C: tl.constexpr, CQ: tl.constexpr):
    """The query tiles (CQ rows each) that see key chunk kc (C keys) through a W-token window: the first one and how
    many, from the chunk's first key to its last key's window (W - 1 queries on), within T."""
    q0 = kc * C // CQ
    return q0, tl.minimum((kc * C + C + W - 2) // CQ, tl.cdiv(T, CQ) - 1) + 1 - q0


@triton.jit
def _row_dot(a, b, out, N, X: tl.constexpr, BX: tl.constexpr, BR: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    x = tl.arange(0, BX)
    m = (r[:, None] < N) & (x[None, :] < X)
    p = r[:, None].to(tl.int64) * X + x[None, :]
    s = tl.load(a + p, mask=m, other=0.0).to(tl.float32) * tl.load(b + p, mask=m, other=0.0).to(tl.float32)
    tl.store(out + r, tl.sum(s, 1), mask=r < N)


def row_dot(a, b):
    """sum(a * b, -1) in fp32 for contiguous a and b of one shape. By hand because PyTorch forms this from fp32
    copies of both (four passes over memory; in the Hedgehog op's backward, 1.6 of its 4.9 ms on the H100 at T = 8K),
    and its bf16 reductions round the result to bf16."""
    x = a.shape[-1]
    n = a.numel() // x
    out = torch.empty(a.shape[:-1], device=a.device, dtype=torch.float32)
    _row_dot[(triton.cdiv(n, 64),)](a, b, out, n, X=x, BX=p2(x), BR=64, num_warps=4)
    return out
