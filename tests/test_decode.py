"""Constant-memory decoding: the fused Triton decode steps (under TRITON_INTERPRET=1 on CPU), the graph-friendly
PyTorch steps, and the static-shape generation paths.

1. Every step form (PyTorch, fused Triton) decodes a sequence token by token to the quadratic references (naive.py),
   with GQA shared and unshared states, left padding, ring wrap-around and sinks.
2. The fused steps equal the PyTorch steps from arbitrary states and per-row positions (states compared too).
3. On stories260K: graph_generate (static buffers, device positions) and generate(cache_implementation="static")
   give the tokens of the eager generate; a traced replay of the decode step (make_fx: the same op list re-run on
   the same buffers, as a CUDA graph replays) reproduces generate, so the step has no host-side positions baked in.
"""

import importlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import: @triton.jit reads it

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lincat  # noqa: E402
from lincat.generation import DecodeGraph, graph_generate, make_cache, positions_from_mask  # noqa: E402
from lincat.modeling import ops  # noqa: E402
from lincat.modeling.cache import LincatLayerCache, ordered_window  # noqa: E402
from lincat.modeling.kernels.gla.naive import naive_gla  # noqa: E402
from lincat.modeling.kernels.linear_attn.naive import naive_linear_attn  # noqa: E402
from lincat.modeling.kernels.step_torch import (hedgehog_features, hedgehog_step_torch, liger_step_torch,  # noqa: E402
                                                lolcats_step_torch, swa_step_torch)
from lincat.modeling.kernels.swa.naive import naive_swa  # noqa: E402
from lincat.modeling.kernels.window_linear_attn.naive import naive_window_linear_attn  # noqa: E402
from conftest import stories_model  # noqa: E402

KINDS = ["hedgehog", "lolcats", "liger", "swa"]

try:
    import triton  # noqa: F401

    from lincat.modeling.kernels import fused_utils
    from lincat.modeling.kernels.gla import fused_recurrent as gla_f
    from lincat.modeling.kernels.linear_attn import fused_recurrent as la_f
    from lincat.modeling.kernels.swa import fused_recurrent as swa_f
    from lincat.modeling.kernels.window_linear_attn import fused_recurrent as win_f

    for _m in (fused_utils, la_f, win_f, gla_f, swa_f):  # kernels imported earlier without the interpreter
        importlib.reload(_m)
    FUSED = {"hedgehog": la_f.fused_hedgehog_step, "lolcats": win_f.fused_lolcats_step,
             "liger": gla_f.fused_liger_step, "swa": swa_f.fused_swa_step}
except ImportError:
    FUSED = None

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(FUSED is None or not INTERP, reason="needs triton, run under TRITON_INTERPRET=1")
TORCH = {"hedgehog": hedgehog_step_torch, "lolcats": lolcats_step_torch, "liger": liger_step_torch,
         "swa": swa_step_torch}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread and no oneDNN. Here oneDNN's CPU linear cost ~8 ms a call whatever the size, and two
    OpenMP threads on a busy 2-core machine wait on each other for milliseconds per op."""
    saved = torch.backends.mkldnn.enabled, torch.get_num_threads()
    torch.backends.mkldnn.enabled = False
    torch.set_num_threads(1)
    yield
    torch.backends.mkldnn.enabled = saved[0]
    torch.set_num_threads(saved[1])


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture
def tune():
    saved = dict(fused_utils.TUNE) if FUSED else {}
    yield fused_utils.TUNE if FUSED else {}
    if FUSED:
        fused_utils.TUNE.clear()
        fused_utils.TUNE.update(saved)


# ---------------------------------------------------------------------------------------------------------------------
# problems: weights, a token sequence, and the reference output of the whole sequence

class Problem:
    def __init__(self, kind, b=2, t=8, h=4, hkv=2, shared=False, d=8, fh=4, window=3, sinks=0, seed=0):
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        self.kind, self.b, self.t, self.h, self.hkv, self.d, self.window, self.sinks = kind, b, t, h, hkv, d, window, sinks
        self.hs = hkv if (shared or kind == "liger") else h
        self.fh = fh
        self.scale = d ** -0.5
        self.q, self.k, self.v = r(b, t, h, d), r(b, t, hkv, d), r(b, t, hkv, d)
        self.qr, self.kr = r(b, t, h, d), r(b, t, hkv, d)  # stand-ins for the post-RoPE q/k
        self.wq, self.wk = r(h, d, fh) * 0.5, r(self.hs, d, fh) * 0.5
        self.gamma = torch.rand(h, generator=g)
        self.valid = torch.ones(b, t, dtype=torch.bool)
        self.valid[1, :3] = False  # left padding
        self.valid[0, 5] = False  # and a hole

    def reference(self):
        """[B, T, H, D] from the quadratic forms."""
        if self.kind in ("hedgehog", "lolcats"):
            qf = hedgehog_features(self.qr.flatten(0, 1), self.wq).view(self.b, self.t, self.h, -1)
            kx = self.kr.repeat_interleave(self.hs // self.hkv, dim=2)
            kf = hedgehog_features(kx.flatten(0, 1), self.wk).view(self.b, self.t, self.hs, -1)
            if self.kind == "hedgehog":
                return naive_linear_attn(qf, kf, self.v, self.valid)
            return naive_window_linear_attn(self.qr, self.kr, self.v, qf, kf, self.gamma, self.window, self.scale,
                                            self.valid)
        if self.kind == "liger":
            o_gla = naive_gla(self.q.softmax(-1), self.k.softmax(-1), self.v, F.logsigmoid(self.k) / 16.0, self.valid)
            o_swa = naive_swa(self.qr, self.kr, self.v, self.window, self.scale, 0, self.valid)
            return 0.5 * o_gla + 0.5 * o_swa
        return naive_swa(self.qr, self.kr, self.v, self.window, self.scale, self.sinks, self.valid)

    def state(self):
        b, hkv, d, hs, f = self.b, self.hkv, self.d, self.hs, 2 * self.fh
        st = {}
        if self.kind in ("hedgehog", "lolcats"):
            st.update(S=torch.zeros(b, hs, f, d), z=torch.zeros(b, hs, f))
        if self.kind == "lolcats":
            st.update(oticket=torch.zeros(b, hkv, dtype=torch.int32), opart=torch.zeros(b, self.h, 2 * d + 2))
        if self.kind == "liger":
            st.update(S=torch.zeros(b, hkv, d, d))
        if self.kind != "hedgehog":
            ring = self.window + (self.kind == "lolcats")
            st.update(win_k=torch.zeros(b, ring, hkv, d), win_v=torch.zeros(b, ring, hkv, d),
                      win_valid=torch.zeros(b, ring, dtype=torch.bool))
        if self.sinks:
            s = self.sinks + 1
            st.update(sink_k=torch.zeros(b, s, hkv, d), sink_v=torch.zeros(b, s, hkv, d),
                      sink_pos=torch.zeros(b, s, dtype=torch.long), sink_valid=torch.zeros(b, s, dtype=torch.bool),
                      n_valid=torch.zeros(b, dtype=torch.long))
        st.update(pos=torch.zeros(b, dtype=torch.long), ticket=torch.zeros(b, dtype=torch.int32))
        return st

    def step(self, fn, st, i, valid=True):
        ok = self.valid[:, i] if valid else None
        if self.kind == "hedgehog":
            return fn(self.qr[:, i], self.kr[:, i], self.v[:, i], self.wq, self.wk, st, ok)
        if self.kind == "lolcats":
            return fn(self.qr[:, i], self.kr[:, i], self.v[:, i], self.wq, self.wk, self.gamma, self.scale,
                      self.window, st, ok)
        if self.kind == "liger":
            return fn(self.q[:, i], self.k[:, i], self.qr[:, i], self.kr[:, i], self.v[:, i], 16.0, 0.5, self.scale,
                      st, ok)
        return fn(self.qr[:, i], self.kr[:, i], self.v[:, i], self.scale, self.window, st, ok)


CASES = [  # (kind, shared GQA state, sinks, value splits)
    ("hedgehog", False, 0, None), ("hedgehog", True, 0, None),
    ("lolcats", False, 0, None), ("lolcats", True, 0, None), ("lolcats", True, 0, 2), ("lolcats", False, 0, 2),
    ("liger", True, 0, None), ("liger", True, 0, 2),
    ("swa", True, 0, None), ("swa", True, 2, 2),
]


@pytest.mark.parametrize("kind,shared,sinks,splits", CASES)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_step_decodes_to_reference(kind, shared, sinks, splits, impl, tune):
    """Token by token from an empty state, past the window (ring wrap-around), with padding, to the naive forms."""
    if impl == "triton":
        if FUSED is None or not INTERP:
            pytest.skip("needs triton, run under TRITON_INTERPRET=1")
        tune.update(splits=splits, bv=4 if splits else None)
    fn = FUSED[kind] if impl == "triton" else TORCH[kind]
    p = Problem(kind, shared=shared, sinks=sinks, t=8 if impl == "triton" else 12)
    ref = p.reference()
    st = p.state()
    outs = [p.step(fn, st, i) for i in range(p.t)]
    out = torch.stack(outs, 1)
    assert torch.isfinite(out).all()
    assert rel(out, ref) < 1e-5, rel(out, ref)
    assert torch.equal(st["pos"], torch.full((p.b,), p.t))
    assert not st["ticket"].any()
    assert "oticket" not in st or not st["oticket"].any()
    if kind != "hedgehog":  # the ring holds the last W tokens
        wk, wv, wok = ordered_window(st, st["pos"], p.window)
        assert torch.equal(wk, p.kr[:, -p.window:]) and torch.equal(wok, p.valid[:, -p.window:])
    if sinks:
        assert torch.equal(st["n_valid"], p.valid.sum(1))


def random_state(p, seed):
    """A state as a long decode leaves it: random S/z, full rings, per-row positions across a wrap."""
    g = torch.Generator().manual_seed(seed)
    st = p.state()
    for name, x in st.items():
        if x.dtype == torch.bool:
            x.copy_(torch.rand(x.shape, generator=g) > 0.25)
        elif x.is_floating_point():
            x.copy_(torch.rand(x.shape, generator=g) + 0.1 if name == "z" else torch.randn(x.shape, generator=g))
    ring = st["win_k"].shape[1] if "win_k" in st else 7
    st["pos"].copy_(torch.tensor([ring - 1, 5 * ring + 2])[: p.b])
    if p.sinks:
        st["n_valid"].copy_(torch.tensor([1, p.sinks])[: p.b])
        st["sink_pos"].copy_(torch.randint(0, 4, st["sink_pos"].shape, generator=g))
        st["sink_valid"][0, 1:] = False  # rows past a row's sink count hold nothing
        st["sink_valid"][1, :p.sinks] = True
    return st


@needs_triton
@pytest.mark.parametrize("kind,shared,sinks,splits", CASES)
def test_fused_equals_torch_step(kind, shared, sinks, splits, tune):
    """From an arbitrary state with different positions per row, three steps (with and without a validity mask):
    outputs and every state tensor match the PyTorch step."""
    tune.update(splits=splits, bv=4 if splits else None)
    fused_matches_torch(Problem(kind, shared=shared, sinks=sinks, h=8, hkv=2, d=8, fh=8, window=4, seed=3), 3)


@needs_triton
@pytest.mark.parametrize("shared,splits,window_programs", [(False, None, 4), (False, 2, 1), (True, 2, 4),
                                                            (True, None, 2)])
def test_fused_lolcats_window_programs(shared, splits, window_programs, tune):
    """lolcats with 4 query heads per KV head, its window over 4 programs (one per query head: what few rows get on
    a GPU, also with one state per KV head), 2 or 1, against the PyTorch step."""
    tune.update(splits=splits, bv=4 if splits else None, window_programs=window_programs)
    fused_matches_torch(Problem("lolcats", shared=shared, h=8, hkv=2, d=8, fh=8, window=4, seed=3), 3)


@needs_triton
def test_fused_lolcats_window_programs_must_divide(tune):
    tune.update(window_programs=3)
    with pytest.raises(ValueError, match="3 window programs per KV head do not divide its 4 query heads"):
        fused_matches_torch(Problem("lolcats", shared=True, h=8, hkv=2, d=8, fh=8, window=4, seed=3), 1)


@needs_triton
@pytest.mark.parametrize("kind", ["lolcats", "swa", "liger"])
def test_fused_window_not_a_power_of_two(kind):
    """A 6-token window (tiles padded to 8) over more steps than the ring holds."""
    fused_matches_torch(Problem(kind, t=10, shared=kind != "lolcats", h=4, hkv=2, d=8, fh=8, window=6, seed=5), 9)


@needs_triton
@pytest.mark.parametrize("dtype", [None, torch.float16])
@pytest.mark.parametrize("kind,shared,sinks", [("lolcats", False, 0), ("lolcats", True, 0), ("swa", True, 2),
                                               ("liger", True, 0)])
def test_fused_window_blocks(kind, shared, sinks, dtype, tune):
    """The window's online softmax over two 16-row ring blocks (a 20-token window), in fp32 and with 16-bit
    queries and ring (16-bit tensor-core products, the weights split into two 16-bit parts for the values); value
    columns in two blocks of 16 (liger picks each out of the window's whole readout)."""
    tune.update(ring_block=16, bv=16)
    p = Problem(kind, shared=shared, sinks=sinks, t=24, h=8, hkv=2, d=32, fh=8, window=20, seed=7)
    fused_matches_torch(p, 5, dtype, 1e-5 if dtype is None else 2e-3)


if FUSED is not None:
    import triton.language as tl

    @triton.jit
    def _two_blocks(q, k, v, ok, out, scale, R: tl.constexpr, K: tl.constexpr, D: tl.constexpr, LOWP: tl.constexpr):
        """fused_utils.softmax_block over the key blocks k[:K] and k[K:], from nothing; out = [m, den, acc]."""
        r, c, d = tl.arange(0, R), tl.arange(0, K), tl.arange(0, D)
        qt = tl.load(q + r[:, None] * D + d[None, :])
        m = tl.full([R], float("-inf"), tl.float32)
        den = tl.zeros([R], tl.float32)
        acc = tl.zeros([R, D], tl.float32)
        for i in tl.static_range(2):
            rows = i * K + c
            kt = tl.load(k + rows[:, None] * D + d[None, :])
            vt = tl.load(v + rows[:, None] * D + d[None, :])
            s = fused_utils.key_scores(qt, kt, tl.load(ok + rows) != 0, scale, LOWP)
            m, den, acc = fused_utils.softmax_block(s, vt, m, den, acc, LOWP)
        tl.store(out + r * (D + 2), m)
        tl.store(out + r * (D + 2) + 1, den)
        tl.store(out + r[:, None] * (D + 2) + 2 + d[None, :], acc)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_softmax_block_exact(dtype):
    """The window's online-softmax block against float64: the running max is the visible max, and the weighted
    values are as exact as fp32 arithmetic with 16-bit operands too (the weights' low 16-bit part matters: without
    it the error is ~1e-4)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 32, generator=g).to(dtype) for n in (16, 32, 32))
    ok = torch.rand(32, generator=g) > 0.3
    out = torch.empty(16, 34)
    _two_blocks[(1,)](q, k, v, ok.to(torch.int8), out, 0.3, R=16, K=16, D=32, LOWP=dtype != torch.float32)
    s = (q.double() @ k.double().T * 0.3).masked_fill(~ok, float("-inf"))
    m = s.amax(1)
    e = torch.exp(s - m[:, None])
    assert rel(out[:, 0], m) < 1e-6
    assert rel(out[:, 1], e.sum(1)) < 1e-6
    assert rel(out[:, 2:], e @ v.double()) < 1e-5


def fused_matches_torch(p, steps, dtype=None, tol=1e-5):
    """dtype: queries, keys, values and the ring / sink rows in that dtype (the states stay fp32)."""
    st = random_state(p, 1)
    if dtype is not None:
        for name in ("q", "k", "v", "qr", "kr"):
            setattr(p, name, getattr(p, name).to(dtype))
        for name in ("win_k", "win_v", "sink_k", "sink_v"):
            if name in st:
                st[name] = st[name].to(dtype)
    st_ref = {n: x.clone() for n, x in st.items()}
    for i in range(steps):
        o = p.step(FUSED[p.kind], st, i, valid=i != 1)
        o_ref = p.step(TORCH[p.kind], st_ref, i, valid=i != 1)
        assert o.dtype == o_ref.dtype and rel(o, o_ref) < tol, (i, rel(o, o_ref))
    for name in st:
        if name == "opart":  # the fused lolcats step's scratch
            continue
        a, b = st[name], st_ref[name]
        if name.startswith("sink_"):  # the spare row is update_sinks' scratch
            a, b = a[:, :-1], b[:, :-1]
        if a.is_floating_point():
            assert rel(a, b) < 1e-6, name
        else:
            assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------------------------------
# whole models: stories260K

def converted(kind, **kw):
    return lincat.convert(stories_model(), "lolcats", kind=kind, window=8, chunk_size=8, backend="torch",
                          sinks=2 if kind == "swa" else 0, **kw)


def prompt(b=2, t=12, pad=5):
    ids = torch.randint(3, 512, (b, t), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if b > 1:
        mask[1, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("kind", KINDS)
def test_static_paths_match_generate(kind):
    """graph_generate's static step and generate(cache_implementation="static") give the eager tokens, for a pure
    lincat model (LincatCache) and one with a softmax layer (StaticCache), left-padded."""
    ids, mask = prompt()
    for model in (converted(kind), converted(kind, softmax_layers=[1])):
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
        assert torch.equal(graph_generate(model, ids, 24, attention_mask=mask, cuda_graph=False), ref)
        st = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0,
                            cache_implementation="static")
        assert torch.equal(st, ref)


def test_static_cache_layers_are_static():
    model = converted("lolcats", softmax_layers=[1])
    ids, mask = prompt()
    out, cache = graph_generate(model, ids, 4, attention_mask=mask, cuda_graph=False, return_cache=True)
    layer = cache.layers[0]
    assert isinstance(layer, LincatLayerCache) and layer.is_static and cache.is_compileable
    assert int(layer.get_seq_length()) == 12 + 3 and layer.get_mask_sizes(1) == (12 + 4, 0)
    assert int(cache.layers[1].get_seq_length()) == 15  # the softmax layer's StaticLayer


def test_graph_generate_eos_and_sampling():
    model = converted("lolcats")
    ids, mask = prompt()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    eos = int(ref[0, 14])  # row 0 stops there
    out = graph_generate(model, ids, 16, attention_mask=mask, cuda_graph=False, eos_token_id=eos, pad_token_id=0,
                         check_every=4)
    n = out.shape[1]
    assert torch.equal(out[0, :15], ref[0, :15]) and (out[0, 15:] == 0).all()
    hit = (ref[1, 12:] == eos).nonzero()
    stop = 12 + (int(hit[0]) + 1 if len(hit) else 16)
    assert torch.equal(out[1, :min(stop, n)], ref[1, :min(stop, n)])
    torch.manual_seed(0)
    s = graph_generate(model, ids, 8, attention_mask=mask, cuda_graph=False, do_sample=True, temperature=0.8)
    assert s.shape == (2, 20) and torch.equal(s[:, :12], ids)


@pytest.mark.parametrize("kind", KINDS)
def test_traced_step_replays(kind):
    """Trace one decode step into a fixed list of ops (make_fx runs it once for real) and replay that list: the
    tokens still match generate, so positions and ring slots come from device tensors, not from Python ints frozen
    at capture, and the step has no data-dependent host control flow (a CUDA graph replays the same way)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    model = converted(kind)
    ids, mask = prompt()
    n = 12
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cache = make_cache(model, 2, 12 + n)
        pos = positions_from_mask(mask)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]
        dec = DecodeGraph(model, cache, 2, n, ids.device, cuda_graph=False)
        dec.start(dec.pick(logits), pos[:, -1] + 1)
        dec.step()  # the eager warm-up step, as DecodeGraph.capture does

        def step(x):
            dec._step()
            return x

        replay = make_fx(step)(torch.zeros(1))  # this runs step 3
        for _ in range(n - 3):
            replay(torch.zeros(1))
    assert torch.equal(torch.cat([ids, dec.out], 1), ref)


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
def test_fused_steps_in_model(kind, monkeypatch):
    """stories260K decoding with the fused Triton steps (interpreted; the chunked attention prefill stays in PyTorch,
    Hedgehog's feature map runs its kernel) gives the tokens of the eager PyTorch generate."""
    for name in ("linear_attn", "window_linear_attn", "gla", "swa"):
        monkeypatch.setitem(ops._TRITON, name, None)
    model = converted(kind)
    ids, _ = prompt(b=1)
    ref = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    lincat.set_backend(model, "triton")
    assert torch.equal(graph_generate(model, ids, 5, cuda_graph=False), ref)
