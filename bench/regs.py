"""Registers a thread, spilled bytes and shared memory of the Triton prefill kernels at the benchmark's shape (H = 32,
D = F = 128, window 64, bf16), compiled for sm_90 on a machine without a GPU.

Every pass of these kernels is bound by registers on the H100 (bench/results/kernels.md): at 4 warps, a pass above
168 registers fits two programs on an SM, and a change that makes a pass spill has so far always made it slower.
This screens a change, or a knob, for that before spending device time on it (the last column: programs an SM holds
at once, from the registers, shared memory and warps):

    python bench/regs.py                                    # every op at Hkv = 32
    python bench/regs.py --ops window_linear_attn --hkv 8 --set window_linear_attn.merge_band=False

The counts come from ptxas -v on the PTX that this machine's Triton generates (tests/sm90_compile.py's driver, which
compiles each launch and runs nothing). Other Triton versions generate other code: for the device's counts, use its
version, e.g. `pip install --no-deps --target /tmp/t36 triton==3.6.0` and `PYTHONPATH=/tmp/t36 python bench/regs.py`
(with 3.6.0 the counts of the window_linear_attn passes matched the H100's n_regs / n_spills exactly; 3.9 spills
196 bytes in the softmax dq pass where 3.6 spills 16).
"""

import argparse
import ast
import importlib.util
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels; they read it when imported

from _paths import BENCH, REPO  # noqa: E402

sys.path.insert(0, os.path.join(REPO, "tests"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import sm90_compile as S  # noqa: E402

OPS = ("window_linear_attn", "linear_attn", "gla", "swa", "hedgehog_map")


def bench_module():
    """bench/kernels.py under another name (as `kernels` it would shadow Hugging Face's package)."""
    spec = importlib.util.spec_from_file_location("lincat_bench_kernels", os.path.join(BENCH, "kernels.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.DEV = "cpu"
    return mod


def set_knob(K, spec: str):
    """op.key=value into that op's TUNE; the value read as a Python literal (True, 64, None), else as a string."""
    try:
        name, val = spec.split("=", 1)
        op, key = name.split(".", 1)
        tune = {"window_linear_attn": K.win_k, "linear_attn": K.la_k, "gla": K.gla_k, "swa": K.swa_k}[op].TUNE
    except (ValueError, KeyError):
        raise SystemExit(f"--set {spec!r}: expected op.key=value with op one of window_linear_attn, linear_attn, gla, "
                         "swa")
    if key not in tune:
        raise SystemExit(f"--set {spec!r}: {op} has no knob {key!r}; its knobs: {', '.join(tune)}")
    try:
        tune[key] = ast.literal_eval(val)
    except (ValueError, SyntaxError):
        tune[key] = val


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    ap.add_argument("--hkv", type=int, default=32, help="k/v heads (the query heads are 32)")
    ap.add_argument("--set", action="append", default=[], metavar="OP.KEY=VALUE", help="a kernel knob (TUNE)")
    args = ap.parse_args()
    K = bench_module()
    for spec in args.set:
        set_knob(K, spec)
    driver.set_active(S._Sm90Driver())
    JITFunction._do_compile = S._compile_only
    S.USAGE = True
    h, d, f = 32, 128, 128
    print(f"triton {triton.__version__} (the H100 device runs 3.6.0); H = {h}, Hkv = {args.hkv}, D = F = {d}, bf16"
          + (f"; {' '.join(args.set)}" if args.set else ""))
    for op in args.ops:
        S.CASE[0] = op
        x, _ = K.make_inputs(op, 1, 256, h, args.hkv, args.hkv if op == "gla" else h, d, f, torch.bfloat16)
        for v in x.values():
            v.requires_grad_()
        K.call(op, "lincat", x, None)[0].float().sum().backward()
    print(f"{'kernel':40s} {'warps':>5s} {'registers':>9s} {'spilled B':>9s} {'shared B':>8s} {'per SM':>6s}")
    for name, warps, shared, _, (regs, spill) in S.COMPILED:
        print(f"{name.split(' (')[0]:40s} {warps:5d} {regs:9d} {spill:9d} {shared:8d} {per_sm(warps, regs, shared):6d}")


def per_sm(warps: int, regs: int, shared: int) -> int:
    """Programs an H100 SM holds at once: 64K registers, allocated per warp in units of 256; 228 KiB of shared
    memory, 1 KiB of it reserved per program; 64 warps."""
    warp_regs = -(-regs * 32 // 256) * 256
    return min(65536 // (warps * warp_regs), 233472 // (shared + 1024), 64 // warps)


if __name__ == "__main__":
    main()
