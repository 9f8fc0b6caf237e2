"""Backend dispatch: each op runs as a Triton kernel when the backend is "triton" (or "auto" on a CUDA device with
triton installed) and a kernel for it exists, else in PyTorch. `LINCAT_BACKEND` sets the default backend."""

import os

import torch

from .kernels.gla.torch_chunk import chunk_gla_torch
from .kernels.gla.torch_recurrent import recurrent_gla_torch
from .kernels.linear_attn.torch_chunk import chunk_linear_attn_torch
from .kernels.linear_attn.torch_recurrent import recurrent_linear_attn_torch
from .kernels.swa.torch_chunk import chunk_swa_torch
from .kernels.swa.torch_recurrent import recurrent_swa_torch
from .kernels.window_linear_attn.torch_chunk import chunk_window_linear_attn_torch
from .kernels.window_linear_attn.torch_recurrent import recurrent_window_linear_attn_torch

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
    else:
        return None
    return fn


_TRITON: dict = {}


def _run(name, torch_fn, backend, device, *args, **kwargs):
    if resolve_backend(backend, device) == "triton":
        fn = _triton_kernel(name)
        if fn is not None:
            return fn(*args, **kwargs)
    return torch_fn(*args, **kwargs)


def linear_attn(qf, kf, v, valid=None, initial_state=None, output_final_state=False, chunk_size=64, backend=None):
    return _run("linear_attn", chunk_linear_attn_torch, backend, qf.device, qf, kf, v, valid,
                initial_state, output_final_state, chunk_size)


def linear_attn_step(qf, kf, v, state, valid=None, backend=None):
    return _run("linear_attn_step", recurrent_linear_attn_torch, backend, qf.device, qf, kf, v, state, valid)


def window_linear_attn(q, k, v, qf, kf, gamma, window, scale, valid=None, initial_state=None,
                       output_final_state=False, chunk_size=64, backend=None):
    return _run("window_linear_attn", chunk_window_linear_attn_torch, backend, q.device, q, k, v, qf, kf, gamma,
                window, scale, valid, initial_state, output_final_state, chunk_size)


def window_linear_attn_step(q, k, v, qf, kf_evicted, gamma, scale, state, slot, valid=None, backend=None):
    return _run("window_linear_attn_step", recurrent_window_linear_attn_torch, backend, q.device, q, k, v, qf,
                kf_evicted, gamma, scale, state, slot, valid)


def gla(qf, kf, v, g, valid=None, initial_state=None, output_final_state=False, backend=None):
    return _run("gla", chunk_gla_torch, backend, qf.device, qf, kf, v, g, valid, initial_state, output_final_state)


def gla_step(qf, kf, v, g, state, valid=None, backend=None):
    return _run("gla_step", recurrent_gla_torch, backend, qf.device, qf, kf, v, g, state, valid)


def swa(q, k, v, window, scale, valid=None, sinks=None, chunk_size=64, backend=None):
    return _run("swa", chunk_swa_torch, backend, q.device, q, k, v, window, scale, valid, sinks, chunk_size)


def swa_step(q, k, v, scale, state, slot, pos, valid=None, sinks=None, backend=None):
    return _run("swa_step", recurrent_swa_torch, backend, q.device, q, k, v, scale, state, slot, pos, valid, sinks)
