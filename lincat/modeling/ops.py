"""Backend dispatch: each op runs as a Triton kernel when the backend is "triton" (or "auto" on a CUDA device with
triton installed) and a kernel for it exists, else in PyTorch. `LINCAT_BACKEND` sets the default backend."""

import os

import torch

from .kernels.gla.torch_chunk import chunk_gla_torch
from .kernels.hedgehog_map.naive import naive_hedgehog_map
from .kernels.linear_attn.torch_chunk import chunk_linear_attn_torch
from .kernels.step_torch import hedgehog_step_torch, liger_step_torch, lolcats_step_torch, swa_step_torch
from .kernels.swa.torch_chunk import chunk_swa_torch
from .kernels.window_linear_attn.torch_chunk import chunk_window_linear_attn_torch

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """"torch" or "triton" for tensors on `device`."""
    backend = backend or os.environ.get("LINCAT_BACKEND") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)} (argument or LINCAT_BACKEND)")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend 'triton' needs triton: `pip install triton`, or use backend='torch'")
    return backend


def _triton_kernel(name: str):
    """The Triton implementation of op `name`, or None where there is none (the PyTorch form is used then).

    Imported lazily: the kernel files import triton at module level, and a CPU-only install has no triton.
    """
    if name not in _TRITON:
        try:
            _TRITON[name] = _import_triton(name)
        except ImportError:
            _TRITON[name] = None
    return _TRITON[name]


def _import_triton(name: str):
    if name == "linear_attn":
        from .kernels.linear_attn.chunk import chunk_linear_attn as fn
    elif name == "window_linear_attn":
        from .kernels.window_linear_attn.chunk import chunk_window_linear_attn as fn
    elif name == "gla":
        from .kernels.gla.chunk import chunk_gla as fn
    elif name == "swa":
        from .kernels.swa.chunk import chunk_swa as fn
    elif name == "hedgehog_map":
        from .kernels.hedgehog_map.fused import fused_hedgehog_map as fn
    elif name == "hedgehog_step":
        from .kernels.linear_attn.fused_recurrent import fused_hedgehog_step as fn
    elif name == "lolcats_step":
        from .kernels.window_linear_attn.fused_recurrent import fused_lolcats_step as fn
    elif name == "liger_step":
        from .kernels.gla.fused_recurrent import fused_liger_step as fn
    elif name == "swa_step":
        from .kernels.swa.fused_recurrent import fused_swa_step as fn
    else:
        return None
    return fn


_TRITON: dict = {}


def _run(name, torch_fn, backend, device, *args, torch_kwargs=None, **kwargs):
    """torch_kwargs go to the PyTorch form only (its chunk size: the Triton kernels pick their own)."""
    if resolve_backend(backend, device) == "triton":
        fn = _triton_kernel(name)
        if fn is not None:
            return fn(*args, **kwargs)
    return torch_fn(*args, **kwargs, **(torch_kwargs or {}))


def hedgehog_map(x, w, backend=None):
    """Hedgehog's features of x [B, T, Hx, D] under w [Hw, D, Fh] (weight head j reads x head j // (Hw // Hx)):
    [B, T, Hw, 2Fh], fp32 in PyTorch, x's dtype from the Triton kernel (what the Triton ops read). The kernel's
    tiles are sized for D and Fh up to 128 (checked to fit an H100's shared memory); wider ones use PyTorch."""
    if x.shape[-1] > 128 or w.shape[-1] > 128:
        backend = "torch"
    return _run("hedgehog_map", naive_hedgehog_map, backend, x.device, x, w)


def linear_attn(qf, kf, v, valid=None, initial_state=None, output_final_state=False, chunk_size=64, backend=None):
    return _run("linear_attn", chunk_linear_attn_torch, backend, qf.device, qf, kf, v, valid,
                initial_state, output_final_state, torch_kwargs={"chunk_size": chunk_size})


def window_linear_attn(q, k, v, qf, kf, gamma, window, scale, valid=None, initial_state=None,
                       output_final_state=False, chunk_size=64, backend=None):
    return _run("window_linear_attn", chunk_window_linear_attn_torch, backend, q.device, q, k, v, qf, kf, gamma,
                window, scale, valid, initial_state, output_final_state, torch_kwargs={"chunk_size": chunk_size})


def gla(qf, kf, v, g, valid=None, initial_state=None, output_final_state=False, backend=None):
    return _run("gla", chunk_gla_torch, backend, qf.device, qf, kf, v, g, valid, initial_state, output_final_state)


def swa(q, k, v, window, scale, valid=None, sinks=None, chunk_size=64, backend=None):
    return _run("swa", chunk_swa_torch, backend, q.device, q, k, v, window, scale, valid, sinks, chunk_size)


# --- decode steps: one token per row, state updated in place (see kernels/step_torch.py). On the triton backend each is
# one fused launch per layer (kernels/<op>/fused_recurrent.py): feature map, state update, ring write and readout.

STEP_OPS = ("hedgehog_step", "lolcats_step", "liger_step", "swa_step")


def preload_steps(backend, device) -> None:
    """Import the fused step kernels now (from eager code), so a compiled or captured decode step finds them loaded."""
    if resolve_backend(backend, device) == "triton":
        for name in STEP_OPS:
            _triton_kernel(name)
        if device.type == "cuda" and _triton_kernel("hedgehog_step") is not None:
            from .kernels.fused_utils import sms
            sms(device)  # cached: the step's launch heuristics read it


def hedgehog_step(qr, kr, v, wq, wk, state, valid=None, backend=None):
    """qr [B, H, D], kr [B, Hkv, D], v [B, Hkv, Dv] (one token), hedgehog weights wq [H, D, Fh], wk [Hs, D, Fh];
    state {S, z, pos, ticket} -> o [B, H, Dv]."""
    return _run("hedgehog_step", hedgehog_step_torch, backend, qr.device, qr, kr, v, wq, wk, state, valid)


def lolcats_step(qr, kr, v, wq, wk, gamma, scale, window, state, valid=None, backend=None):
    """hedgehog_step plus the sliding window: state also holds the ring win_k / win_v [B, R, Hkv, D], win_valid."""
    return _run("lolcats_step", lolcats_step_torch, backend, qr.device, qr, kr, v, wq, wk, gamma, scale, window,
                state, valid)


def liger_step(q, k, qr, kr, v, gate_norm, mix, scale, state, valid=None, backend=None):
    """q/k before RoPE (GLA branch) and qr/kr after (window branch); state {S, win_*, pos, ticket}."""
    return _run("liger_step", liger_step_torch, backend, q.device, q, k, qr, kr, v, gate_norm, mix, scale, state, valid)


def swa_step(qr, kr, v, scale, window, state, valid=None, backend=None):
    """Sliding-window softmax over the ring, plus sinks when the state has sink_* buffers."""
    return _run("swa_step", swa_step_torch, backend, qr.device, qr, kr, v, scale, window, state, valid)
