"""Triton pieces shared by the fused decode steps (kernels/<op>/fused_recurrent.py).

Conventions of every step kernel:
- One token per row. q/k/v come as [B, heads, D], contiguous; states are the layer's cache tensors, updated in place.
- Positions are read on the device: `pos` [B] (tokens consumed by each row) gives the ring slots. Every program of
  a row reads it; the last program of the row to finish (an atomic ticket, `ticket` [B]) writes pos + 1 and resets
  the ticket. So a step is one launch with no host-side position: it can be captured in a CUDA graph and replayed.
- Programs never read what another program of the same launch writes: each state tile has one owner, the new
  token's ring row is used from registers (and the slot it overwrites is masked out of every read), and lolcats'
  evicted row sits in a slot nobody writes in that step (its ring has W + 1 slots).
- State arithmetic in fp32 with broadcast-and-reduce (the state tiles stream through once; BUDGET bounds the
  largest 3D temporary per program). The sliding windows of lolcats, liger and swa use tl.dot instead
  (softmax_block: tiles padded to 16 rows, 16-bit products made exact, see there): as broadcast-and-reduce over the
  ring's rows, their serial chains of small tiles made the window programs latency-bound (batch 64 on the H100:
  lolcats 136.0 us, now 117.5; liger 92.8, now 42.8; swa 47.6, now 7.4: bench/results/generate.md).
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # transformers' remote-code import check skips try blocks; ops.py falls back to PyTorch
    raise

BUDGET = 8192
# Knobs for tests and benchmarks: num_warps, bv (value block), splits (value-dim programs of gla, swa and lolcats),
# min_bg (smallest query-group tile), window_programs (lolcats' window programs per KV head), ring_block (ring rows
# per block of the window's online softmax, 64 by default).
TUNE = {"num_warps": None, "bv": None, "splits": None, "min_bg": None, "window_programs": None,
        "ring_block": None}
_SMS: dict = {}


def p2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


def sms(device) -> int:
    """Multiprocessor count (1 on CPU, i.e. the interpreter)."""
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def group_block(g: int, smallest: int = 2) -> int:
    """Rows of the query-group tile. The Hedgehog and lolcats steps take 1-row tiles for a state per query head
    (lolcats 1.35x faster at batch 64 on the H100 than 2 rows, half of them masked; Hedgehog about the same); the
    others keep 2, the size their GPU checks ran with."""
    return max(TUNE["min_bg"] or smallest, p2(g))


def value_block(dv: int, rows: int, bg: int) -> int:
    """Value columns per tile so that [bg, rows, bv] stays within BUDGET."""
    if TUNE["bv"]:
        return TUNE["bv"]
    return max(1, min(p2(dv), BUDGET // (bg * p2(rows))))


def value_splits(dv: int, bv: int, programs: int, device) -> int:
    """Programs along the value dim (ops without a shared normalizer only): enough to fill the GPU at small batch."""
    if TUNE["splits"]:
        return TUNE["splits"]
    want = triton.cdiv(2 * sms(device), max(programs, 1))
    n = 1
    while n * 2 <= want and dv % (n * 2 * bv) == 0:
        n *= 2
    return n


def window_lowp(qr, state) -> bool:
    """16-bit window products (fused_utils.key_scores / add_weighted) only when the queries and every ring and sink
    row of the state share that 16-bit dtype; else fp32 ones."""
    return qr.dtype in (torch.float16, torch.bfloat16) and all(
        state[n].dtype == qr.dtype for n in ("win_k", "win_v", "sink_k", "sink_v") if n in state)


def ring_block(rows: int) -> int:
    """Ring rows per block of the window's online softmax: TUNE["ring_block"] (64 by default), at most the window
    rounded up to a power of two, at least tl.dot's 16."""
    return max(16, min(TUNE["ring_block"] or 64, p2(rows)))


def contig(*xs):
    return [x if x.is_contiguous() else x.contiguous() for x in xs]


def check_state(state: dict, *names):
    for n in names:
        if not state[n].is_contiguous():
            raise ValueError(f"state {n!r} must be contiguous (it is updated in place)")


@triton.jit
def last_to_arrive(counter, NPROG: tl.constexpr):
    """True in the last of the NPROG programs to get here (an atomic ticket on the int32 `counter`, zero between
    launches, which that program resets). Every program has done its reads before it takes its ticket, so the last
    one may overwrite what the others read."""
    tl.debug_barrier()
    last = tl.atomic_add(counter, 1) == NPROG - 1
    tl.store(counter, 0, mask=last)
    return last


@triton.jit
def advance_pos(pos, ticket, b, p, NPROG: tl.constexpr):
    """The last of the NPROG programs of row b to get here writes pos[b] = p + 1 (all have read pos by then)."""
    if NPROG == 1:
        tl.store(pos + b, p + 1)
    else:
        tl.store(pos + b, p + 1, mask=last_to_arrive(ticket + b, NPROG))


@triton.jit
def group_features(xrow, w, wh0, og, of, D: tl.constexpr, FH: tl.constexpr, G: tl.constexpr, BG: tl.constexpr,
                   BF: tl.constexpr, BD: tl.constexpr, BDC: tl.constexpr):
    """phi(x) = (softmax(x W), softmax(-x W)) of G rows x_g = xrow[g * D : (g + 1) * D] (any float dtype), row g
    under its own W[wh0 + g] of W [heads, D, FH]: ([BG, BF], [BG, BF]) fp32, zero past FH. All rows at once, BDC
    columns of D at a time: one chain of loads and reductions instead of one per row (a shared state's 4 query heads
    took 4 in a row), in [BG, BDC, BF] tiles. W is read by the programs of every row while the states stream
    through L2: kept there (evict_last; Hedgehog / lolcats steps at batch 64 on the H100 1-3% faster)."""
    mg, mf = og < G, of < FH
    z = tl.zeros([BG, BF], dtype=tl.float32)
    for d0 in tl.static_range(0, BD, BDC):
        cd = d0 + tl.arange(0, BDC)
        mdc = cd < D
        xc = tl.load(xrow + og[:, None] * D + cd[None, :], mask=mg[:, None] & mdc[None, :], other=0.0).to(tl.float32)
        wc = tl.load(w + (wh0 + og[:, None, None]) * (D * FH) + cd[None, :, None] * FH + of[None, None, :],
                     mask=mg[:, None, None] & mdc[None, :, None] & mf[None, None, :], other=0.0,
                     eviction_policy="evict_last").to(tl.float32)
        z += tl.sum(xc[:, :, None] * wc, 1)
    return softmax_pair(z, mf)


@triton.jit
def softmax_pair(z, mf):
    """Hedgehog's two halves from the logits z [rows, BF]: (softmax(z), softmax(-z)) over the columns where mf."""
    zp = tl.where(mf[None, :], z, float("-inf"))
    ep = tl.exp(zp - tl.max(zp, 1)[:, None])
    zn = tl.where(mf[None, :], -z, float("-inf"))
    en = tl.exp(zn - tl.max(zn, 1)[:, None])
    return ep / tl.sum(ep, 1)[:, None], en / tl.sum(en, 1)[:, None]


@triton.jit
def row_features(xrow, w, wh, of, D: tl.constexpr, FH: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
                 BDC: tl.constexpr):
    """group_features of the single row xrow under W[wh]: ([BF], [BF])."""
    fp, fn = group_features(xrow, w, wh, tl.arange(0, 1), of, D, FH, 1, 1, BF, BD, BDC)
    return tl.sum(fp, 0), tl.sum(fn, 0)


def feature_chunk(bd: int, bg: int, bf: int, budget: int = BUDGET) -> int:
    """Columns of D per step of group_features, so that its [bg, BDC, bf] tile holds at most `budget` elements."""
    return max(1, min(bd, budget // (bg * bf)))


@triton.jit
def key_scores(qt, kt, ok, scale, LOWP: tl.constexpr):
    """Scaled scores [rows, keys] of the query tile qt [rows, BD] against the key tile kt [keys, BD], -inf where
    not ok. Tensor-core products (every tile dim 16 and up): 16-bit operands when LOWP (exact products, fp32
    sums), else fp32 ("ieee")."""
    if LOWP:
        s = tl.dot(qt, tl.trans(kt.to(qt.dtype)))
    else:
        s = tl.dot(qt, tl.trans(kt.to(tl.float32)), input_precision="ieee")
    return tl.where(ok[None, :], s * scale, float("-inf"))


@triton.jit
def add_weighted(acc, e, vt, LOWP: tl.constexpr):
    """acc + e vt for fp32 weights e [rows, keys] and values vt [keys, BV]. With 16-bit values (LOWP) the weights
    go in as two 16-bit parts, high and low, so that the sum is as exact as an fp32 one (one part alone: 1e-4
    relative error in fp16, 1e-3 in bf16)."""
    if LOWP:
        e_hi = e.to(vt.dtype)
        e_lo = (e - e_hi.to(tl.float32)).to(vt.dtype)
        return tl.dot(e_lo, vt, acc=tl.dot(e_hi, vt, acc=acc))
    return tl.dot(e, vt.to(tl.float32), acc=acc, input_precision="ieee")


@triton.jit
def softmax_block(s, vt, m, den, acc, LOWP: tl.constexpr):
    """One block of scores s [rows, keys] and values vt [keys, BV] into a running softmax: max m [rows], sum den and
    weighted values acc [rows, BV], both relative to m (-inf while nothing is visible)."""
    mn = tl.maximum(m, tl.max(s, 1))
    ms = tl.where(mn == float("-inf"), 0.0, mn)
    e = tl.exp(s - ms[:, None])
    alpha = tl.exp(m - ms)
    return mn, den * alpha + tl.sum(e, 1), add_weighted(acc * alpha[:, None], e, vt, LOWP)


@triton.jit
def ring_slots(p, r0, NR: tl.constexpr, R: tl.constexpr, BRB: tl.constexpr):
    """Ring slots of the window's rows r0 .. r0 + BRB - 1, newest first (token p - j in slot (p - j) % R), R (past
    the ring) for rows past NR: the rows are gathered by index, so a block is as wide as the window, not the ring."""
    jr = r0 + tl.arange(0, BRB)
    return tl.where(jr < NR, (p - jr + R) % R, R)


@triton.jit
def ring_block_scores(qt, kn, win_k, win_valid, ok_new, b64, hkv, orr, w_slot, scale, od, md,
                      R: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, LOWP: tl.constexpr):
    """key_scores against the ring rows orr of KV head hkv, the new token's slot w_slot taken as kn [BD] (visible if
    ok_new: the ring's own row there is never read, another program may be writing it); empty and padding rows
    not visible."""
    mrow = (orr < R) & (orr != w_slot)
    kt = tl.load(win_k + ((b64 * R + orr[:, None]) * HKV + hkv) * DK + od[None, :], mask=mrow[:, None] & md[None, :],
                 other=0.0)
    kt = tl.where((orr == w_slot)[:, None], kn[None, :].to(kt.dtype), kt)
    ok = tl.load(win_valid + b64 * R + orr, mask=mrow, other=0) != 0
    return key_scores(qt, kt, tl.where(orr == w_slot, ok_new, ok), scale, LOWP)


@triton.jit
def ring_block_values(vn, win_v, b64, hkv, orr, w_slot, cv, mv, R: tl.constexpr, HKV: tl.constexpr,
                      DV: tl.constexpr):
    """Values [rows, BV] of the ring rows orr, columns cv, the new token's slot taken as vn [BV]."""
    vt = tl.load(win_v + ((b64 * R + orr[:, None]) * HKV + hkv) * DV + cv[None, :],
                 mask=((orr < R) & (orr != w_slot))[:, None] & mv[None, :], other=0.0)
    return tl.where((orr == w_slot)[:, None], vn[None, :].to(vt.dtype), vt)


@triton.jit
def window_query(qr, kr, win_k, b64, h0, hkv, og, mg, od, md, H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr,
                 LOWP: tl.constexpr):
    """The query tile of heads h0 + og (rows where mg; the window's tensor-core tile) in the dtype of its products,
    and the new token's key kr[b, hkv]."""
    qt = tl.load(qr + (b64 * H + h0 + og[:, None]) * DK + od[None, :], mask=mg[:, None] & md[None, :], other=0.0)
    qt = qt.to(win_k.dtype.element_ty) if LOWP else qt.to(tl.float32)
    return qt, tl.load(kr + (b64 * HKV + hkv) * DK + od, mask=md, other=0.0)


@triton.jit
def ring_softmax(qt, kn, vn, win_k, win_v, win_valid, ok_new, b64, hkv, p, scale, od, md, cv, mv,
                 NR: tl.constexpr, R: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                 BRB: tl.constexpr, LOWP: tl.constexpr):
    """softmax_block from nothing over the NR newest ring rows of KV head hkv, BRB at a time (ring_slots), value
    columns cv (vn: the new token's): (m, den, acc)."""
    m = tl.full([qt.shape[0]], float("-inf"), tl.float32)
    den = tl.zeros([qt.shape[0]], tl.float32)
    acc = tl.zeros([qt.shape[0], vn.shape[0]], tl.float32)
    w_slot = p % R
    for r0 in tl.static_range(0, NR, BRB):
        orr = ring_slots(p, r0, NR, R, BRB)
        s = ring_block_scores(qt, kn, win_k, win_valid, ok_new, b64, hkv, orr, w_slot, scale, od, md, R, HKV, DK,
                              LOWP)
        vt = ring_block_values(vn, win_v, b64, hkv, orr, w_slot, cv, mv, R, HKV, DV)
        m, den, acc = softmax_block(s, vt, m, den, acc, LOWP)
    return m, den, acc
