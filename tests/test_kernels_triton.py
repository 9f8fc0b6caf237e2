"""The Triton kernels against the PyTorch references, on CPU through Triton's interpreter (TRITON_INTERPRET=1).

Forward outputs, final states and every gradient are compared with naive.py (or torch_chunk.py where an initial
state is involved) in float64, by relative error ||out - ref|| / ||ref||. Tolerances: fp32 inputs 1e-5 (the
interpreter multiplies in exact fp32; we see ~1e-7..1e-6), fp16 inputs 5e-3 (we see ~3e-4..1e-3). bf16 is left to the
GPU checks in bench/kernels.py: the interpreter's bf16 tl.dot is wrong (Triton 3.9), whatever the kernel.

Shapes are small and chunks are 16 tokens so that a few dozen tokens already span several chunks (stored chunk
states) and window bands; the interpreter runs every program in Python, so each case costs seconds.
"""

import importlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import: @triton.jit reads it

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from lincat.modeling import ops  # noqa: E402
from lincat.modeling.cache import sinks_of, update_sinks  # noqa: E402
from lincat.modeling.kernels import chunk_utils  # noqa: E402
from lincat.modeling.kernels.gla import chunk as gla_k  # noqa: E402
from lincat.modeling.kernels.hedgehog_map import fused as hmap_k  # noqa: E402
from lincat.modeling.kernels.gla.naive import naive_gla  # noqa: E402
from lincat.modeling.kernels.gla.torch_chunk import chunk_gla_torch  # noqa: E402
from lincat.modeling.kernels.linear_attn import chunk as la_k  # noqa: E402
from lincat.modeling.kernels.linear_attn.naive import naive_linear_attn  # noqa: E402
from lincat.modeling.kernels.linear_attn.torch_chunk import chunk_linear_attn_torch  # noqa: E402
from lincat.modeling.kernels.swa import chunk as swa_k  # noqa: E402
from lincat.modeling.kernels.swa.naive import naive_swa  # noqa: E402
from lincat.modeling.kernels.swa.torch_chunk import chunk_swa_torch  # noqa: E402
from lincat.modeling.kernels.window_linear_attn import chunk as win_k  # noqa: E402
from lincat.modeling.kernels.window_linear_attn.naive import naive_window_linear_attn  # noqa: E402
from lincat.modeling.kernels.window_linear_attn.torch_chunk import chunk_window_linear_attn_torch  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("these tests run Triton's interpreter on CPU tensors", allow_module_level=True)

# A kernel module imported earlier in this process without the interpreter holds compiled-mode kernels.
# (not fused_utils: test_decode reloads it and the decode steps with it, and holds its TUNE)
for _m in (chunk_utils, gla_k, la_k, swa_k, win_k, hmap_k):  # helpers first, Hedgehog before lolcats
    importlib.reload(_m)

TOL = {torch.float32: 1e-5, torch.float16: 5e-3}
C = 16  # chunk size
# as on the GPU (64-token chunks, states 128 tokens apart, 32-row query tiles in the softmax dk / dv passes), a stored
# lolcats state every two chunks and query tiles of half a chunk
win_k.TUNE["state_tokens"] = 2 * C
win_k.TUNE["win_queries"] = C // 2
swa_k.TUNE["dkv_queries"] = C // 2


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def close(name, a, b, tol):
    assert a.shape == b.shape, name
    assert torch.isfinite(a).all(), name
    err = rel(a, b)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def tensors(seed, *shapes, positive=()):
    g = torch.Generator().manual_seed(seed)
    draw = [torch.rand if i in positive else torch.randn for i in range(len(shapes))]
    return [fn(*s, generator=g) for fn, s in zip(draw, shapes)]


def padding(b, t):
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[-1, :5] = False  # left padding on the last row
    return valid


def run_both(fn, ref_fn, inputs, dtype, extra_loss=None):
    """Forward and backward of the kernel (inputs cast to dtype) and of the reference (float64), with the same
    random output weights. Returns (outs, grads, ref_outs, ref_grads)."""
    ours = [x.detach().to(dtype).requires_grad_() if x.is_floating_point() else x for x in inputs]
    ref = [x.detach().double().requires_grad_() if x.is_floating_point() else x for x in inputs]
    out, rout = fn(*ours), ref_fn(*ref)
    g = torch.Generator().manual_seed(123)
    ws = [torch.randn(o.shape, generator=g) for o in out]
    sum(((o.float() * w).sum() for o, w in zip(out, ws)), torch.zeros(())).backward()
    sum(((o * w.double()).sum() for o, w in zip(rout, ws)), torch.zeros((), dtype=torch.float64)).backward()
    grads = [x.grad if x.is_floating_point() else None for x in ours]
    rgrads = [x.grad if x.is_floating_point() else None for x in ref]
    return out, grads, rout, rgrads


def flat(o, st):
    """(o, final state) -> a tuple of tensors."""
    return (o,) + (() if st is None else tuple(st) if isinstance(st, tuple) else (st,))


_DEFAULTS = {m: dict(m.TUNE) for m in (gla_k, la_k, swa_k, win_k)}


@pytest.fixture(autouse=True)
def _tune():
    """Reset the kernels' knobs after each test."""
    yield
    for m, knobs in _DEFAULTS.items():
        m.TUNE.clear()
        m.TUNE.update(knobs)


def test_row_dot():
    """do . o for the normalized ops' backward: fp32 sums of 16-bit rows, any row count and width."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3, 37, 5, 24, generator=g).to(torch.bfloat16) for _ in range(2))
    ref = (a.double() * b.double()).sum(-1)
    out = chunk_utils.row_dot(a, b)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out.double() - ref).abs().max() < 1e-5 * ref.abs().max()


# ----------------------------------------------------------------------------------------------------------------------
# window_linear_attn


@pytest.mark.parametrize(
    "t, window, h, hkv, hk, dtype",
    [
        (37, 8, 2, 1, 2, torch.float32),  # state per query head, GQA k/v; 3 chunks
        (37, 8, 4, 2, 2, torch.float32),  # state shared by a query-head group
        (20, 24, 2, 1, 2, torch.float32),  # T < window: no linear term at all
        (21, 1, 2, 1, 2, torch.float32),  # window of one token
        (45, 20, 2, 2, 2, torch.float32),  # window wider than a chunk (band of 3 chunks)
        (45, 16, 2, 1, 2, torch.float32),  # window of a chunk: a band of 2 chunks, no older pair in the query's own
        (37, 17, 4, 2, 2, torch.float32),  # window of a chunk and a token, state shared by a query-head group
        (37, 8, 4, 1, 4, torch.float32),  # 4 state heads per k/v head: the dv pass sums their shares
        (37, 8, 2, 1, 2, torch.float16),  # fp16 chunk states
    ],
)
def test_window_linear_attn(t, window, h, hkv, hk, dtype):
    b, d, f = 2, 16, 16
    q, k, v, qf, kf, gamma = tensors(t, (b, t, h, d), (b, t, hkv, d), (b, t, hkv, d), (b, t, h, f), (b, t, hk, f), (h,),
                                     positive=(3, 4, 5))
    valid, scale = padding(b, t), d**-0.5
    out, grads, rout, rgrads = run_both(
        lambda *x: win_k.chunk_window_linear_attn(*x, window, scale, valid, chunk_size=C)[:1],
        lambda *x: (naive_window_linear_attn(*x, window, scale, valid),),
        [q, k, v, qf, kf, gamma], dtype)
    tol = TOL[dtype]
    close("o", out[0], rout[0], tol)
    for name, a, r in zip(("dq", "dk", "dv", "dqf", "dkf"), grads, rgrads):
        if window == 1 and name in ("dq", "dk"):  # softmax over one key: q and k cancel out, the gradient is noise
            assert (a - r).abs().max() < tol * rgrads[2].abs().max(), name
        else:
            close(name, a, r, tol)
    if t <= window:  # no linear term, so gamma cancels out of o: its gradient is rounding noise around 0
        assert (grads[5] - rgrads[5]).abs().max() < tol * rgrads[0].abs().max()
    else:
        close("dgamma", grads[5], rgrads[5], tol)


@pytest.mark.parametrize("t, window", [(37, 8), (21, 1), (45, 20), (45, 16)])
def test_window_linear_attn_merge_band_off(t, window):
    """TUNE["merge_band"] off (as fp16 inputs run it): the forward walks the band from its first key chunk and gives
    that chunk's older pairs their own product; same results with windows shorter than, as long as and longer than a
    chunk. The fp32 cases of test_window_linear_attn run it on."""
    win_k.TUNE["merge_band"] = False
    test_window_linear_attn(t, window, 2, 1, 2, torch.float32)


@pytest.mark.parametrize("tokens, fuse_dkv, fuse_dq, win_queries", [
    (16, True, True, 8), (64, True, True, 8), (64, False, False, 16), (64, True, False, 4)])
def test_window_linear_attn_state_spacing(tokens, fuse_dkv, fuse_dq, win_queries):
    """The forward stores one linear state per `tokens` (2 chunks elsewhere in these tests, as on the GPU);
    the keys between that state and a chunk's band join as older pairs. Any spacing gives the same outputs and
    gradients, with the linear part's dkf and dv in one pass or two, its dqf in the softmax dq pass or its own, and
    any query tile in the softmax dk / dv pass; spacings that are not a power of two are refused."""
    win_k.TUNE.update(state_tokens=tokens, fuse_dkv=fuse_dkv, fuse_dq=fuse_dq, win_queries=win_queries)
    b, t, h, d, f, window = 1, 83, 2, 16, 16, 8
    q, k, v, qf, kf, gamma = tensors(7, (b, t, h, d), (b, t, 1, d), (b, t, 1, d), (b, t, h, f), (b, t, h, f), (h,),
                                     positive=(3, 4, 5))
    scale = d**-0.5
    out, grads, rout, rgrads = run_both(
        lambda *x: win_k.chunk_window_linear_attn(*x, window, scale, chunk_size=C)[:1],
        lambda *x: (naive_window_linear_attn(*x, window, scale),), [q, k, v, qf, kf, gamma], torch.float32)
    close("o", out[0], rout[0], 1e-5)
    for name, a, r in zip(("dq", "dk", "dv", "dqf", "dkf", "dgamma"), grads, rgrads):
        close(name, a, r, 1e-5)
    win_k.TUNE["state_tokens"] = 48
    with pytest.raises(ValueError, match="must be a power of two"):
        win_k.chunk_window_linear_attn(q, k, v, qf, kf, gamma, window, scale, chunk_size=C)


def test_window_linear_attn_grid_limit():
    """The softmax dk / dv pass's grid holds the chunks in y and the other passes' the batch x heads: past 65535
    either way the op says so before it launches anything."""
    q, k, v, qf, kf, gamma = tensors(0, (65536, 1, 1, 16), (65536, 1, 1, 16), (65536, 1, 1, 16), (65536, 1, 1, 16),
                                     (65536, 1, 1, 16), (1,), positive=(3, 4, 5))
    with pytest.raises(ValueError, match="must stay below 65536"):
        win_k.chunk_window_linear_attn(q, k, v, qf, kf, gamma, 8, 0.25, chunk_size=C)


@pytest.mark.parametrize("t, window", [(37, 8), (20, 24)])
def test_window_linear_attn_states(t, window):
    """Initial state in, final state out (both differentiable), against the chunked PyTorch form, over several
    chunks (with blocks split, see test_blocks); and with T < W, where the final state is the initial one."""
    b, h, hkv, d, f = 2, 2, 1, 16, 16
    q, k, v, qf, kf, gamma, s0, z0 = tensors(
        1, (b, t, h, d), (b, t, hkv, d), (b, t, hkv, d), (b, t, h, f), (b, t, h, f), (h,), (b, h, f, d), (b, h, f),
        positive=(3, 4, 5, 6, 7))
    valid, scale = padding(b, t), d**-0.5

    def ours(q, k, v, qf, kf, gamma, s0, z0):
        o, (s, z) = win_k.chunk_window_linear_attn(q, k, v, qf, kf, gamma, window, scale, valid, (s0, z0), True, C)
        return o, s, z

    def ref(q, k, v, qf, kf, gamma, s0, z0):
        o, (s, z) = chunk_window_linear_attn_torch(q, k, v, qf, kf, gamma, window, scale, valid, (s0, z0), True, C)
        return o, s, z

    out, grads, rout, rgrads = run_both(ours, ref, [q, k, v, qf, kf, gamma, s0, z0], torch.float32)
    for name, a, r in zip(("o", "S", "z"), out, rout):
        close(name, a, r, 1e-5)
    for name, a, r in zip(("dq", "dk", "dv", "dqf", "dkf", "dgamma", "dS0", "dz0"), grads, rgrads):
        close(name, a, r, 1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# hedgehog_map


@pytest.mark.parametrize(
    "t, hx, hw, dtype",
    [
        (70, 2, 2, torch.float32),  # rows not a multiple of the tile; two backward programs (partial dW sums)
        (37, 2, 8, torch.float32),  # GQA: 4 weight heads per x head (dx from a pass over the group)
        (37, 1, 2, torch.float16),  # 16-bit x: W as two 16-bit parts
    ],
)
def test_hedgehog_map(t, hx, hw, dtype):
    """phi(x) = [softmax(x W) || softmax(-x W)] and its gradients (x, and W kept in fp32 as the map's parameter is)
    against float64."""
    b, d, fh = 2, 16, 8
    x, w, dphi = tensors(t, (b, t, hx, d), (hw, d, fh), (b, t, hw, 2 * fh))
    x = x.to(dtype).requires_grad_()
    w = (w * 0.5).requires_grad_()
    phi = hmap_k.fused_hedgehog_map(x, w, torch.float32)
    (phi * dphi).sum().backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    z = torch.einsum("bthd,hdf->bthf", x64.repeat_interleave(hw // hx, 2), w64)
    ref = torch.cat([z.softmax(-1), (-z).softmax(-1)], -1)
    (ref * dphi.double()).sum().backward()
    close("phi", phi, ref, 1e-5)  # fp32-exact logits for 16-bit x too (W in two 16-bit parts)
    close("dx", x.grad, x64.grad, TOL[dtype])
    close("dw", w.grad, w64.grad, 1e-5 if dtype == torch.float32 else 1e-3)  # tf32 products for 16-bit x
    with pytest.raises(ValueError, match="do not fit"):
        hmap_k.fused_hedgehog_map(x, torch.randn(hw, d + 1, fh))  # head dims differ


# ----------------------------------------------------------------------------------------------------------------------
# linear_attn


@pytest.mark.parametrize(
    "t, h, hk, hv, dtype",
    [
        (37, 2, 2, 1, torch.float32),  # state per query head, v shared by two state heads; 3 chunks
        (37, 4, 2, 2, torch.float32),  # state shared by a query-head group
        (5, 2, 2, 1, torch.float32),  # shorter than a chunk
        (37, 2, 2, 1, torch.float16),  # fp16 chunk states
    ],
)
def test_linear_attn(t, h, hk, hv, dtype):
    b, d, f = 2, 16, 24  # f not a power of two: masked feature columns
    qf, kf, v = tensors(t + 1, (b, t, h, f), (b, t, hk, f), (b, t, hv, d), positive=(0, 1))
    valid = padding(b, t)
    # naive, not torch_chunk: the latter's gradients are off for rows that see no key (left padding), where
    # 1/den is 1/DEN_EPS and `kv.cumsum(1) - kv` cancels catastrophically
    out, grads, rout, rgrads = run_both(
        lambda *x: la_k.chunk_linear_attn(*x, valid, chunk_size=C)[:1],
        lambda *x: (naive_linear_attn(*x, valid),), [qf, kf, v], dtype)
    close("o", out[0], rout[0], TOL[dtype])
    for name, a, r in zip(("dqf", "dkf", "dv"), grads, rgrads):
        close(name, a, r, TOL[dtype])


def test_linear_attn_states():
    """As test_window_linear_attn_states."""
    b, t, h, hk, hv, d, f = 2, 37, 2, 2, 1, 16, 16
    qf, kf, v, s0, z0 = tensors(2, (b, t, h, f), (b, t, hk, f), (b, t, hv, d), (b, hk, f, d), (b, hk, f),
                                positive=(0, 1, 3, 4))
    valid = padding(b, t)

    def ours(qf, kf, v, s0, z0):
        o, (s, z) = la_k.chunk_linear_attn(qf, kf, v, valid, (s0, z0), True, C)
        return o, s, z

    def ref(qf, kf, v, s0, z0):
        o, (s, z) = chunk_linear_attn_torch(qf, kf, v, valid, (s0, z0), True, C)
        return o, s, z

    out, grads, rout, rgrads = run_both(ours, ref, [qf, kf, v, s0, z0], torch.float32)
    for name, a, r in zip(("o", "S", "z"), out, rout):
        close(name, a, r, 1e-5)
    for name, a, r in zip(("dqf", "dkf", "dv", "dS0", "dz0"), grads, rgrads):
        close(name, a, r, 1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# gla


@pytest.mark.parametrize(
    "t, h, hk, hv, dtype",
    [
        (37, 2, 1, 1, torch.float32),  # 3 chunks, the last one partial
        (37, 4, 2, 1, torch.float32),  # GQA both ways
        (37, 2, 1, 1, torch.float16),  # fp16 takes the exact path on chunks that decay by more than e^8
    ],
)
def test_gla(t, h, hk, hv, dtype):
    b, d, f = 2, 16, 16
    qf, kf, v, g = tensors(t + 2, (b, t, h, f), (b, t, hk, f), (b, t, hv, d), (b, t, hk, f), positive=(0, 1))
    g = F.logsigmoid(g)
    valid = padding(b, t)
    out, grads, rout, rgrads = run_both(
        lambda *x: gla_k.chunk_gla(*x, valid, chunk_size=C)[:1],
        lambda *x: (naive_gla(*x, valid),), [qf, kf, v, g], dtype)
    close("o", out[0], rout[0], TOL[dtype])
    for name, a, r in zip(("dqf", "dkf", "dv", "dg"), grads, rgrads):
        close(name, a, r, TOL[dtype])


def test_gla_strong_decay():
    """Gates 200x logsigmoid: every chunk takes the exact path. dg is then a near-total cancellation of
    qf dqf - kf dkf (its true size is ~3e-4 of the summands), so it is compared on the summands' scale."""
    b, t, h, hk, hv, d, f = 2, 20, 2, 1, 1, 16, 16
    qf, kf, v, g = tensors(3, (b, t, h, f), (b, t, hk, f), (b, t, hv, d), (b, t, hk, f), positive=(0, 1))
    g = F.logsigmoid(g) * 200
    out, grads, rout, rgrads = run_both(lambda *x: gla_k.chunk_gla(*x, chunk_size=C)[:1],
                                        lambda *x: (naive_gla(*x),), [qf, kf, v, g], torch.float32)
    close("o", out[0], rout[0], 1e-5)
    for name, a, r in zip(("dqf", "dkf", "dv"), grads, rgrads):
        close(name, a, r, 1e-5)
    summands = (rgrads[1].abs() * kf.double()).max()
    assert (grads[3] - rgrads[3]).abs().max() < 1e-5 * summands


def test_gla_states():
    """As test_window_linear_attn_states."""
    b, t, h, hk, hv, d, f = 2, 37, 2, 2, 1, 16, 16
    qf, kf, v, g, s0 = tensors(4, (b, t, h, f), (b, t, hk, f), (b, t, hv, d), (b, t, hk, f), (b, hk, f, d),
                               positive=(0, 1))
    g = F.logsigmoid(g)
    valid = padding(b, t)
    out, grads, rout, rgrads = run_both(
        lambda qf, kf, v, g, s0: gla_k.chunk_gla(qf, kf, v, g, valid, s0, True, C),
        lambda qf, kf, v, g, s0: chunk_gla_torch(qf, kf, v, g, valid, s0, True, C),
        [qf, kf, v, g, s0], torch.float32)
    for name, a, r in zip(("o", "S"), out, rout):
        close(name, a, r, 1e-5)
    for name, a, r in zip(("dqf", "dkf", "dv", "dg", "dS0"), grads, rgrads):
        close(name, a, r, 1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# swa


@pytest.mark.parametrize(
    "t, window, n_sinks, h, hkv, dtype",
    [
        (37, 8, 3, 4, 2, torch.float32),
        (21, 1, 2, 2, 1, torch.float32),  # window of one token: the sinks carry the rest
        (20, 64, 0, 2, 2, torch.float32),  # T < window
        (37, 8, 0, 2, 1, torch.float16),
    ],
)
def test_swa(t, window, n_sinks, h, hkv, dtype):
    b, d = 2, 16
    q, k, v = tensors(t + 3, (b, t, h, d), (b, t, hkv, d), (b, t, hkv, d))
    valid, scale = padding(b, t), d**-0.5

    def sinks_of_keys(k, v):  # the sinks are the first real tokens: their gradient flows back into k and v
        if not n_sinks:
            return None
        st = dict(sink_k=k.new_zeros(b, n_sinks + 1, hkv, d), sink_v=v.new_zeros(b, n_sinks + 1, hkv, d),
                  sink_pos=torch.zeros(b, n_sinks + 1, dtype=torch.long),
                  sink_valid=torch.zeros(b, n_sinks + 1, dtype=torch.bool), n_valid=torch.zeros(b, dtype=torch.long))
        update_sinks(st, k, v, valid, 0)
        return sinks_of(st)

    out, grads, rout, rgrads = run_both(
        lambda q, k, v: (swa_k.chunk_swa(q, k, v, window, scale, valid, sinks_of_keys(k, v), C),),
        lambda q, k, v: (naive_swa(q, k, v, window, scale, n_sinks, valid),), [q, k, v], dtype)
    close("o", out[0], rout[0], TOL[dtype])
    for name, a, r in zip(("dq", "dk", "dv"), grads, rgrads):
        close(name, a, r, TOL[dtype])


@pytest.mark.parametrize("queries", [C, C // 4])
def test_swa_query_tiles(queries):
    """The dk / dv pass walks the queries in tiles of any rows up to the chunk (half a chunk elsewhere here)."""
    swa_k.TUNE["dkv_queries"] = queries
    b, t, h, hkv, d, window = 2, 45, 4, 2, 16, 20
    q, k, v = tensors(5, (b, t, h, d), (b, t, hkv, d), (b, t, hkv, d))
    valid, scale = padding(b, t), d**-0.5
    out, grads, rout, rgrads = run_both(
        lambda q, k, v: (swa_k.chunk_swa(q, k, v, window, scale, valid, None, C),),
        lambda q, k, v: (naive_swa(q, k, v, window, scale, 0, valid),), [q, k, v], torch.float32)
    close("o", out[0], rout[0], 1e-5)
    for name, a, r in zip(("dq", "dk", "dv"), grads, rgrads):
        close(name, a, r, 1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# block splits: at GPU head sizes the forward splits the value dim and the backward passes the feature and value dims;
# forced here at small sizes (blocks of 16 over 32), with several chunks, an initial state and the final state


@pytest.mark.parametrize("op", ["linear_attn", "window_linear_attn", "gla"])
def test_blocks(op):
    mod = {"linear_attn": la_k, "window_linear_attn": win_k, "gla": gla_k}[op]
    if op == "gla":
        mod.TUNE.update(h_block=16, o_bd=16, bwd_block=16)
    else:  # the state passes (the Hedgehog op's, for both) and the chunk passes
        la_k.TUNE.update(h_block=16, o_bd=16, bwd_block=16)
        win_k.TUNE.update(fwd_bd=16, bwd_block=16)
    b, t, h, hk, d, f, window = 2, 37, 2, 1, 32, 32, 8
    scale = d**-0.5
    q, k, v, qf, kf, g, gamma, s0, z0 = tensors(7, (b, t, h, d), (b, t, hk, d), (b, t, hk, d), (b, t, h, f),
                                                (b, t, hk, f), (b, t, hk, f), (h,), (b, hk, f, d), (b, hk, f),
                                                positive=(3, 4, 6, 7, 8))
    g = F.logsigmoid(g)
    valid = padding(b, t)
    if op == "linear_attn":
        inputs = [qf, kf, v, s0, z0]
        ours = lambda qf, kf, v, s0, z0: flat(*la_k.chunk_linear_attn(qf, kf, v, valid, (s0, z0), True, C))  # noqa
        ref = lambda qf, kf, v, s0, z0: flat(*chunk_linear_attn_torch(qf, kf, v, valid, (s0, z0), True, C))  # noqa
    elif op == "gla":
        inputs = [qf, kf, v, g, s0]
        ours = lambda qf, kf, v, g, s0: flat(*gla_k.chunk_gla(qf, kf, v, g, valid, s0, True, C))  # noqa
        ref = lambda qf, kf, v, g, s0: flat(*chunk_gla_torch(qf, kf, v, g, valid, s0, True, C))  # noqa
    else:
        inputs = [q, k, v, qf, kf, gamma, s0, z0]

        def ours(q, k, v, qf, kf, gamma, s0, z0):
            return flat(*win_k.chunk_window_linear_attn(q, k, v, qf, kf, gamma, window, scale, valid, (s0, z0), True,
                                                        C))

        def ref(q, k, v, qf, kf, gamma, s0, z0):
            return flat(*chunk_window_linear_attn_torch(q, k, v, qf, kf, gamma, window, scale, valid, (s0, z0), True,
                                                        C))
    out, grads, rout, rgrads = run_both(ours, ref, inputs, torch.float32)
    for i, (a, r) in enumerate(zip(out, rout)):
        close(f"out{i}", a, r, 1e-5)
    for i, (a, r) in enumerate(zip(grads, rgrads)):
        close(f"grad{i}", a, r, 1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# variable lengths: sequences packed along T (B == 1), against each sequence run on its own


@pytest.mark.parametrize("op", ["linear_attn", "window_linear_attn", "gla", "swa"])
def test_varlen(op):
    lens = [13, 30, 5]
    cu = torch.tensor([0, 13, 43, 48])
    t, h, hkv, d, f, window = sum(lens), 2, 1, 16, 16, 8
    scale = d**-0.5
    q, k, v, qf, kf, g, gamma = tensors(6, (1, t, h, d), (1, t, hkv, d), (1, t, hkv, d), (1, t, h, f), (1, t, hkv, f),
                                        (1, t, hkv, f), (h,), positive=(3, 4, 6))
    g = F.logsigmoid(g)
    inputs = {
        "linear_attn": [qf, kf, v], "gla": [qf, kf, v, g], "swa": [q, k, v],
        "window_linear_attn": [q, k, v, qf, kf, gamma],
    }[op]
    kernel = {
        "linear_attn": lambda *x, **kw: la_k.chunk_linear_attn(*x, None, None, True, C, **kw),
        "gla": lambda *x, **kw: gla_k.chunk_gla(*x, None, None, True, C, **kw),
        "swa": lambda *x, **kw: (swa_k.chunk_swa(*x, window, scale, None, None, C, **kw), None),
        "window_linear_attn": lambda *x, **kw: win_k.chunk_window_linear_attn(*x, window, scale, None, None, True, C,
                                                                              **kw),
    }[op]
    reference = {
        "linear_attn": lambda *x: chunk_linear_attn_torch(*x, None, None, True, C),
        "gla": lambda *x: chunk_gla_torch(*x, None, None, True, C),
        "swa": lambda *x: (chunk_swa_torch(*x, window, scale, None, None, C), None),
        "window_linear_attn": lambda *x: chunk_window_linear_attn_torch(*x, window, scale, None, None, True, C),
    }[op]

    def ours(*x):
        return flat(*kernel(*x, cu_seqlens=cu))

    def ref(*x):  # one call per sequence; gamma is per head, not per token
        per = [flat(*reference(*(y if y.dim() == 1 else y[:, a:b] for y in x))) for a, b in zip(cu[:-1], cu[1:])]
        return (torch.cat([r[0] for r in per], 1),) + tuple(torch.cat(z, 0) for z in list(zip(*per))[1:])

    out, grads, rout, rgrads = run_both(ours, ref, inputs, torch.float32)
    for i, (a, r) in enumerate(zip(out, rout)):
        close(f"out{i}", a, r, 1e-5)
    for i, (a, r) in enumerate(zip(grads, rgrads)):
        close(f"grad{i}", a, r, 1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# dispatch: ops.py calls the kernels positionally, exactly like the PyTorch forms


def test_ops_dispatch_matches_torch():
    b, t, h, hkv, d, f, window = 1, 20, 2, 1, 16, 16, 8
    q, k, v, qf, kf, g, gamma = tensors(5, (b, t, h, d), (b, t, hkv, d), (b, t, hkv, d), (b, t, h, f), (b, t, h, f),
                                        (b, t, hkv, d), (h,), positive=(3, 4, 6))
    g = F.logsigmoid(g)
    valid = torch.ones(b, t, dtype=torch.bool)
    scale = d**-0.5
    calls = [
        lambda be: ops.linear_attn(qf, kf, v, valid, None, True, C, backend=be),
        lambda be: ops.window_linear_attn(q, k, v, qf, kf, gamma, window, scale, valid, None, True, C, backend=be),
        lambda be: ops.gla(qf[:, :, :1], kf[:, :, :1], v, g, valid, None, True, backend=be),
        lambda be: (ops.swa(q, k, v, window, scale, valid, None, C, backend=be),),
        lambda be: (ops.hedgehog_map(k, kf.flatten()[:h * d * f // 2].view(h, d, f // 2), backend=be).float(),),
    ]
    for call in calls:
        ours, ref = call("triton"), call("torch")
        close("o", ours[0], ref[0], 1e-5)
        if len(ours) > 1:  # final state: S, or (S, z)
            for a, c in zip(*(x if isinstance(x, tuple) else (x,) for x in (ours[1], ref[1]))):
                close("state", a, c, 1e-5)
