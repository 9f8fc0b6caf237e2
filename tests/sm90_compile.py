"""Compile every Triton kernel for sm_90 (the H100) on a machine without a GPU.

Each op's forward, backward and decode step runs on CPU tensors with Triton's driver replaced by one that names an
sm_90 target: every launch compiles the kernel for real (Triton's frontend, LLVM, ptxas) and returns without running
it. This catches what the interpreter tests cannot: code that Triton's compiler rejects (a variable whose type
changes across a loop, for one) and kernels whose shared memory exceeds what an H100 block may use. The shapes are
the GPU ones (head dims 64 and 128, 128 features, GQA, padding, initial and final states), in bf16 and fp32.

    python tests/sm90_compile.py [bf16|fp32 ...] [--regs]   # one line per kernel; tests/test_kernels_compile.py runs it

--regs adds each kernel's registers a thread and spilled bytes (ptxas -v); bench/regs.py reports them at the
benchmark's shapes.

Must run in its own process without TRITON_INTERPRET (the kernels read it when imported).
"""

import os
import re
import subprocess
import sys
import tempfile
import time

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# bf16 is what runs on GPUs; fp32 at the largest head dim, where its tiles are biggest
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
HEAD_DIMS = {torch.bfloat16: (128, 64), torch.float32: (128,)}
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on an H100 (227 KiB)
COMPILED = []
CASE = [""]
USAGE = "--regs" in sys.argv  # also each kernel's registers and spills (ptxas -v): the compile test asks for them


class _Sm90Driver:
    """Just enough of a driver for JITFunction.run to pick a target and bind arguments."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def ptxas_usage(ptx: str) -> tuple:
    """(registers a thread, bytes of spill stores) of one kernel's PTX, from `ptxas -v` for sm_90a with the ptxas
    Triton itself uses. Without a GPU, Triton never loads the kernel, so its n_regs / n_spills stay unset; with the
    device's Triton (3.6) these match what the H100 reports."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
        fh.write(ptx)
    try:
        r = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", fh.name, "-o", os.devnull],
                           capture_output=True, text=True)
    finally:
        os.unlink(fh.name)
    regs = re.search(r"Used (\d+) registers", r.stdout + r.stderr)
    spill = re.search(r"(\d+) bytes spill stores", r.stdout + r.stderr)
    if regs is None or spill is None:
        raise RuntimeError(f"ptxas -v gave no register count: {(r.stdout + r.stderr)[-500:]}")
    return int(regs.group(1)), int(spill.group(1))


def _compile_only(self, key, signature, device, constexprs, options, attrs, warmup):
    """Replaces JITFunction._do_compile: compile, record, and return None so that run() launches nothing."""
    _, _, target, _, _ = self.device_caches[device]
    t0 = time.time()
    kernel = self.compile(self.ASTSource(self, signature, constexprs, attrs), target=target, options=options.__dict__)
    usage = ptxas_usage(kernel.asm["ptx"]) if USAGE else None
    COMPILED.append((f"{self.fn.__module__.split('.')[-2]}.{self.fn.__name__} ({CASE[0]})", options.num_warps,
                     kernel.metadata.shared, time.time() - t0, usage))
    return None


def chunk_ops(dtype):
    from lincat.modeling.kernels.gla import chunk as gla_k
    from lincat.modeling.kernels.hedgehog_map.fused import fused_hedgehog_map
    from lincat.modeling.kernels.linear_attn import chunk as la_k
    from lincat.modeling.kernels.swa import chunk as swa_k
    from lincat.modeling.kernels.window_linear_attn import chunk as win_k

    def leaf(*shape, positive=False, dt=dtype):
        x = torch.rand(*shape) if positive else torch.randn(*shape)
        return x.to(dt).requires_grad_()

    for d in HEAD_DIMS[dtype]:
        CASE[0] = f"{str(dtype)[6:]}, D={d}"
        b, t, h, hkv, f = 2, 300, 4, 2, 128
        valid = torch.ones(b, t, dtype=torch.bool)
        valid[1, :7] = False
        q, k, v = leaf(b, t, h, d), leaf(b, t, hkv, d), leaf(b, t, hkv, d)
        qf, kf = leaf(b, t, h, f, positive=True), leaf(b, t, h, f, positive=True)
        s0 = (leaf(b, h, f, d, positive=True, dt=torch.float32), leaf(b, h, f, positive=True, dt=torch.float32))
        o, st = la_k.chunk_linear_attn(qf, kf, v, valid, s0, True)
        (o.float().sum() + st[0].sum() + st[1].sum()).backward()
        o, st = win_k.chunk_window_linear_attn(q, k, v, qf, kf, torch.rand(h).requires_grad_(), 64, d ** -0.5,
                                               valid, s0, True)
        (o.float().sum() + st[0].sum()).backward()
        if d == 128:  # the forward whose band's older pairs take their own product (fp16 inputs run it)
            merge, win_k.TUNE["merge_band"] = win_k.TUNE["merge_band"], False
            o, _ = win_k.chunk_window_linear_attn(q, k, v, qf, kf, torch.rand(h).requires_grad_(), 64, d ** -0.5)
            o.float().sum().backward()
            win_k.TUNE["merge_band"] = merge
        # Hedgehog's map: one weight head per x head, 2 per x head (keys, GQA), and 256 features (feature_dim 128)
        for xh, fh in ((q, f // 2), (k, f // 2), (k, f)):
            fused_hedgehog_map(xh, leaf(h, d, fh, dt=torch.float32)).float().sum().backward()
        kg = leaf(b, t, hkv, f)
        g = (F.logsigmoid(kg.float()) / 16).detach().requires_grad_()
        o, st = gla_k.chunk_gla(qf[:, :, :h], kg.softmax(-1).to(dtype), v, g, valid,
                                leaf(b, hkv, f, d, dt=torch.float32), True)
        (o.float().sum() + st.sum()).backward()
        sinks = (torch.zeros(b, 2, hkv, d, dtype=dtype), torch.zeros(b, 2, hkv, d, dtype=dtype),
                 torch.zeros(b, 2, dtype=torch.long), torch.ones(b, 2, dtype=torch.bool))
        for sk in (None, sinks):
            o = swa_k.chunk_swa(q, k, v, 64, d ** -0.5, valid, sk)
            o.float().sum().backward()


def decode_steps(dtype):
    from lincat.modeling.kernels import fused_utils
    from lincat.modeling.kernels.gla.fused_recurrent import fused_liger_step
    from lincat.modeling.kernels.linear_attn.fused_recurrent import fused_hedgehog_step
    from lincat.modeling.kernels.swa.fused_recurrent import fused_swa_step
    from lincat.modeling.kernels.window_linear_attn.fused_recurrent import fused_lolcats_step

    h, hkv, d, fh, window = 32, 8, 128, 64, 64
    CASE[0] = f"{str(dtype)[6:]}, step"
    for b in (1, 64):  # the step picks its launch settings from the number of programs
        for hs in (h, hkv):
            q, k, v = (torch.randn(b, n, d, dtype=dtype) for n in (h, hkv, hkv))
            wq, wk = torch.randn(h, d, fh), torch.randn(hs, d, fh)
            pos, ticket = torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.int32)
            lin = dict(S=torch.zeros(b, hs, 2 * fh, d), z=torch.zeros(b, hs, 2 * fh), pos=pos, ticket=ticket)
            fused_hedgehog_step(q, k, v, wq, wk, lin)
            ring = lambda r: dict(win_k=torch.zeros(b, r, hkv, d, dtype=dtype),  # noqa: E731
                                  win_v=torch.zeros(b, r, hkv, d, dtype=dtype),
                                  win_valid=torch.zeros(b, r, dtype=torch.bool))
            fused_lolcats_step(q, k, v, wq, wk, torch.rand(h), d ** -0.5, window, {**lin, **ring(window + 1)})
            if b == 1:  # the value dim split over programs (the CPU's one "SM" never asks for it on its own)
                fused_utils.TUNE.update(splits=4, window_programs=h // hkv if hs == h else None)
                fused_lolcats_step(q, k, v, wq, wk, torch.rand(h), d ** -0.5, window, {**lin, **ring(window + 1)})
                fused_utils.TUNE.update(splits=None, window_programs=None)
        st = dict(S=torch.zeros(b, hkv, d, d), pos=pos, ticket=ticket, **ring(window))
        fused_liger_step(q, k, q, k, v, 16.0, 0.5, d ** -0.5, st)
        fused_swa_step(q, k, v, d ** -0.5, window, {**ring(window), "pos": pos, "ticket": ticket})
    # a window over two ring blocks (the online softmax across blocks; liger's weights again per column block), and
    # swa's sinks
    w2, ns = 100, 4
    fused_lolcats_step(q, k, v, wq, wk, torch.rand(h), d ** -0.5, w2, {**lin, **ring(w2 + 1)})
    fused_liger_step(q, k, q, k, v, 16.0, 0.5, d ** -0.5,
                     dict(S=torch.zeros(b, hkv, d, d), pos=pos, ticket=ticket, **ring(w2)))
    sinks = dict(sink_k=torch.zeros(b, ns + 1, hkv, d, dtype=dtype), sink_v=torch.zeros(b, ns + 1, hkv, d, dtype=dtype),
                 sink_pos=torch.zeros(b, ns + 1, dtype=torch.long), sink_valid=torch.zeros(b, ns + 1, dtype=torch.bool),
                 n_valid=torch.zeros(b, dtype=torch.long))
    fused_swa_step(q, k, v, d ** -0.5, w2, {**ring(w2), "pos": pos, "ticket": ticket, **sinks})


def main():
    driver.set_active(_Sm90Driver())
    JITFunction._do_compile = _compile_only
    for name in [a for a in sys.argv[1:] if not a.startswith("--")] or list(DTYPES):
        dtype = DTYPES[name]
        chunk_ops(dtype)
        decode_steps(dtype)
    worst = max(COMPILED, key=lambda r: r[2])
    for name, warps, shared, sec, usage in COMPILED:
        regs = f"  registers {usage[0]:3d}  spilled {usage[1]:4d} B" if usage else ""
        print(f"{name:52s} warps {warps:2d}  shared {shared:7d} B{regs}  {sec:5.1f} s")
    print(f"{len(COMPILED)} kernels compiled for sm_90; most shared memory: {worst[0]} {worst[2]} B "
          f"(limit {SMEM_LIMIT})")
    over = [r for r in COMPILED if r[2] > SMEM_LIMIT]
    if over:
        raise SystemExit(f"{len(over)} kernels need more shared memory than an H100 block has: "
                         + ", ".join(f"{n} ({s} B)" for n, _, s, _, _ in over))


if __name__ == "__main__":
    main()
