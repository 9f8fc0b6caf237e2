"""The parallel (quadratic) reference, the chunked form and the recurrent form of every op agree (fp32, 1e-5)."""

import pytest
import torch
import torch.nn.functional as F

from lincat.modeling.kernels.gla.naive import naive_gla
from lincat.modeling.kernels.gla.torch_chunk import chunk_gla_torch
from lincat.modeling.kernels.gla.torch_recurrent import recurrent_gla_torch
from lincat.modeling.kernels.hedgehog_map.naive import naive_hedgehog_map
from lincat.modeling.kernels.linear_attn.naive import naive_linear_attn
from lincat.modeling.kernels.linear_attn.torch_chunk import chunk_linear_attn_torch
from lincat.modeling.kernels.linear_attn.torch_recurrent import recurrent_linear_attn_torch
from lincat.modeling.kernels.swa.naive import naive_swa
from lincat.modeling.kernels.swa.torch_chunk import chunk_swa_torch
from lincat.modeling.kernels.swa.torch_recurrent import recurrent_swa_torch
from lincat.modeling.kernels.window_linear_attn.naive import naive_window_linear_attn
from lincat.modeling.kernels.window_linear_attn.torch_chunk import chunk_window_linear_attn_torch
from lincat.modeling.kernels.window_linear_attn.torch_recurrent import recurrent_window_linear_attn_torch
from lincat.modeling.cache import sinks_of, update_sinks

TOL = 1e-5
B, T, H, HKV, D, F_ = 2, 37, 4, 2, 8, 6


def close(a, b, tol=TOL):
    assert a.shape == b.shape
    assert torch.isfinite(a).all()
    err = (a.float() - b.float()).abs().max().item()
    assert err < tol, err


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :5] = False  # left padding on the second row
    return dict(
        q=r(B, T, H, D), k=r(B, T, HKV, D), v=r(B, T, HKV, D),
        qf=torch.rand(B, T, H, F_, generator=g), kf=torch.rand(B, T, HKV, F_, generator=g),
        kf_h=torch.rand(B, T, H, F_, generator=g),
        g=F.logsigmoid(r(B, T, HKV, F_)), gamma=torch.rand(H, generator=g), valid=valid,
    )


@pytest.mark.parametrize("per_query_head", [False, True])
@pytest.mark.parametrize("chunk", [4, 8, 64])
def test_linear_attn(data, chunk, per_query_head):
    qf, v, valid = data["qf"], data["v"], data["valid"]
    kf = data["kf_h"] if per_query_head else data["kf"]
    ref = naive_linear_attn(qf, kf, v, valid)
    out, _ = chunk_linear_attn_torch(qf, kf, v, valid, chunk_size=chunk)
    close(out, ref)
    # carried state: two calls equal one
    a, st = chunk_linear_attn_torch(qf[:, :20], kf[:, :20], v[:, :20], valid[:, :20], output_final_state=True,
                                    chunk_size=chunk)
    b, _ = chunk_linear_attn_torch(qf[:, 20:], kf[:, 20:], v[:, 20:], valid[:, 20:], initial_state=st,
                                   chunk_size=chunk)
    close(torch.cat([a, b], 1), ref)
    hk = kf.shape[2]
    state = (torch.zeros(B, hk, F_, D), torch.zeros(B, hk, F_))
    rec = [recurrent_linear_attn_torch(qf[:, i], kf[:, i], v[:, i], state, valid[:, i]) for i in range(T)]
    close(torch.stack(rec, 1), ref)


@pytest.mark.parametrize("window", [1, 3, 8, 13, 64])
@pytest.mark.parametrize("chunk", [4, 16])
def test_window_linear_attn(data, window, chunk):
    d = data
    scale = D**-0.5
    ref = naive_window_linear_attn(d["q"], d["k"], d["v"], d["qf"], d["kf_h"], d["gamma"], window, scale, d["valid"])
    out, _ = chunk_window_linear_attn_torch(d["q"], d["k"], d["v"], d["qf"], d["kf_h"], d["gamma"], window, scale,
                                            d["valid"], chunk_size=chunk)
    close(out, ref)

    # recurrent: ring buffer of the last `window` tokens plus the linear state of older ones
    state = dict(S=torch.zeros(B, H, F_, D), z=torch.zeros(B, H, F_), win_k=torch.zeros(B, window, HKV, D),
                 win_v=torch.zeros(B, window, HKV, D), win_valid=torch.zeros(B, window, dtype=torch.bool))
    outs = []
    for i in range(T):
        evicted = d["kf_h"][:, i - window] if i >= window else torch.zeros(B, H, F_)
        outs.append(recurrent_window_linear_attn_torch(d["q"][:, i], d["k"][:, i], d["v"][:, i], d["qf"][:, i],
                                                       evicted, d["gamma"], scale, state, i % window, d["valid"][:, i]))
    close(torch.stack(outs, 1), ref)

    # chunked with the final state handed over: the state holds all but the last `window` tokens
    cut = 20
    _, st = chunk_window_linear_attn_torch(d["q"][:, :cut], d["k"][:, :cut], d["v"][:, :cut], d["qf"][:, :cut],
                                           d["kf_h"][:, :cut], d["gamma"], window, scale, d["valid"][:, :cut],
                                           output_final_state=True, chunk_size=chunk)
    keep = max(cut - window, 0)
    sl = slice(keep, None)
    out2, _ = chunk_window_linear_attn_torch(d["q"][:, sl], d["k"][:, sl], d["v"][:, sl], d["qf"][:, sl],
                                             d["kf_h"][:, sl], d["gamma"], window, scale, d["valid"][:, sl],
                                             initial_state=st, chunk_size=chunk)
    close(out2[:, cut - keep:], ref[:, cut:])


@pytest.mark.parametrize("chunk", [4, 16])
def test_gla(data, chunk):
    d = data
    ref = naive_gla(d["qf"], d["kf"], d["v"], d["g"], d["valid"])
    out, _ = chunk_gla_torch(d["qf"], d["kf"], d["v"], d["g"], d["valid"], chunk_size=chunk)
    close(out, ref)
    a, st = chunk_gla_torch(d["qf"][:, :20], d["kf"][:, :20], d["v"][:, :20], d["g"][:, :20], d["valid"][:, :20],
                            output_final_state=True, chunk_size=chunk)
    b, _ = chunk_gla_torch(d["qf"][:, 20:], d["kf"][:, 20:], d["v"][:, 20:], d["g"][:, 20:], d["valid"][:, 20:],
                           initial_state=st, chunk_size=chunk)
    close(torch.cat([a, b], 1), ref)
    state = torch.zeros(B, HKV, F_, D)
    rec = [recurrent_gla_torch(d["qf"][:, i], d["kf"][:, i], d["v"][:, i], d["g"][:, i], state, d["valid"][:, i])
           for i in range(T)]
    close(torch.stack(rec, 1), ref)


def test_gla_strong_decay_is_finite(data):
    """Large negative gates (fast forgetting) must not overflow the chunked form."""
    d = data
    g = d["g"] * 200
    ref = naive_gla(d["qf"], d["kf"], d["v"], g, d["valid"])
    out, _ = chunk_gla_torch(d["qf"], d["kf"], d["v"], g, d["valid"])
    close(out, ref)


@pytest.mark.parametrize("window", [1, 5, 16, 64])
@pytest.mark.parametrize("n_sinks", [0, 3])
def test_swa(data, window, n_sinks):
    d = data
    scale = D**-0.5
    ref = naive_swa(d["q"], d["k"], d["v"], window, scale, n_sinks, d["valid"])
    sinks = None
    st = None
    if n_sinks:
        st = dict(sink_k=torch.zeros(B, n_sinks + 1, HKV, D), sink_v=torch.zeros(B, n_sinks + 1, HKV, D),
                  sink_pos=torch.zeros(B, n_sinks + 1, dtype=torch.long),
                  sink_valid=torch.zeros(B, n_sinks + 1, dtype=torch.bool), n_valid=torch.zeros(B, dtype=torch.long))
        update_sinks(st, d["k"], d["v"], d["valid"], 0)
        sinks = sinks_of(st)
    out = chunk_swa_torch(d["q"], d["k"], d["v"], window, scale, d["valid"], sinks, chunk_size=8)
    close(out, ref)

    ring = dict(win_k=torch.zeros(B, window, HKV, D), win_v=torch.zeros(B, window, HKV, D),
                win_valid=torch.zeros(B, window, dtype=torch.bool))
    if n_sinks:
        for name in ("sink_k", "sink_v", "sink_pos", "sink_valid", "n_valid"):
            ring[name] = torch.zeros_like(st[name])
    outs = []
    for i in range(T):
        s = None
        if n_sinks:
            update_sinks(ring, d["k"][:, i:i + 1], d["v"][:, i:i + 1], d["valid"][:, i:i + 1], i)
            s = sinks_of(ring)
        outs.append(recurrent_swa_torch(d["q"][:, i], d["k"][:, i], d["v"][:, i], scale, ring, i % window, i,
                                        d["valid"][:, i], s))
    close(torch.stack(outs, 1), ref)


def test_padding_rows_are_zero_not_nan(data):
    d = data
    out = naive_linear_attn(d["qf"], d["kf"], d["v"], d["valid"])
    assert torch.isfinite(out).all()
    assert out[1, :5].abs().max() == 0


def test_chunk_size_goes_to_the_pytorch_form_only(monkeypatch):
    """`attention.chunk_size` sets the PyTorch form's chunk; the Triton kernels choose their own (fp32 shared-memory
    limits, band widths), so ops must not pass it to them."""
    from lincat.modeling import ops

    seen = {}

    def kernel(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        return "triton"

    qf, kf, v = torch.rand(1, 5, 2, 4), torch.rand(1, 5, 2, 4), torch.randn(1, 5, 2, 4)
    monkeypatch.setattr(ops, "triton_available", lambda: True)
    monkeypatch.setattr(ops, "_triton_kernel", lambda name: kernel)
    assert ops.linear_attn(qf, kf, v, chunk_size=16, backend="triton") == "triton"
    assert len(seen["args"]) == 6 and not seen["kwargs"]  # qf, kf, v, valid, initial_state, output_final_state
    q = torch.randn(1, 5, 2, 4)
    assert ops.window_linear_attn(q, q, v, qf, kf, torch.rand(2), 3, 0.5, chunk_size=16, backend="triton") == "triton"
    assert len(seen["args"]) == 11 and not seen["kwargs"]
    o, _ = ops.linear_attn(qf, kf, v, chunk_size=2, backend="torch")  # chunk 2 over 5 tokens: still exact
    torch.testing.assert_close(o, naive_linear_attn(qf, kf, v))


def test_hedgehog_map_wide_heads_use_pytorch(monkeypatch):
    """Head or feature dims over 128 (what the Triton map's tiles are sized for) take the PyTorch form whatever the
    backend; narrower ones go to the kernel."""
    from lincat.modeling import ops

    def kernel(*args):
        raise AssertionError("the Triton map was called")

    monkeypatch.setattr(ops, "triton_available", lambda: True)
    monkeypatch.setattr(ops, "_triton_kernel", lambda name: kernel)
    for d, fh in ((160, 8), (16, 160)):
        x, w = torch.randn(1, 3, 1, d), torch.randn(2, d, fh)  # GQA: 2 weight heads on one x head
        torch.testing.assert_close(ops.hedgehog_map(x, w, backend="triton"), naive_hedgehog_map(x, w))
    with pytest.raises(AssertionError, match="Triton map was called"):
        ops.hedgehog_map(torch.randn(1, 3, 1, 16), torch.randn(2, 16, 8), backend="triton")
