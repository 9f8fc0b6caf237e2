"""Every Triton kernel compiles for the H100 (sm_90), on this CPU-only machine: tests/sm90_compile.py drives each op's
forward, backward and decode step with Triton's driver pointed at an sm_90 target, so each launch compiles for real
and runs nothing. It fails on what Triton's compiler rejects and on shared memory beyond an H100 block's 227 KiB;
the interpreter tests (test_kernels_triton.py, test_decode.py) check the arithmetic.

One subprocess per dtype, side by side: the kernels must be imported without TRITON_INTERPRET, which the interpreter
tests set for this process, and a cold compile of all of them takes minutes on one core.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sm90_compile.py")


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the bf16 run also reports registers and spills (ptxas -v), as bench/regs.py does at the benchmark's shapes
    procs = {name: subprocess.Popen([sys.executable, SCRIPT, name] + (["--regs"] if name == "bf16" else []),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for name in ("bf16", "fp32")}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=1200)
        assert proc.returncode == 0, f"{name}: sm_90 compile failed:\n{out[-4000:]}"
        summary = [line for line in out.splitlines() if "kernels compiled for sm_90" in line]
        assert summary, out[-2000:]
        n = int(summary[0].split()[0])
        # forward, backward and step kernels of all four ops: far more than a run that silently compiled nothing
        assert n >= 30, summary[0]
        for kernel in ("linear_attn._fwd_h", "linear_attn._bwd_h", "window_linear_attn._fwd", "gla._bwd_dkv",
                       "swa._bwd_dkv", "window_linear_attn._lolcats_step", "gla._liger_step"):
            assert kernel in out, f"{name}: {kernel} was not compiled"
        if name == "bf16":
            lines = [line for line in out.splitlines() if " warps " in line]
            regs = [int(line.split("registers")[1].split()[0]) for line in lines if "registers" in line]
            assert len(regs) == len(lines) and all(16 <= r <= 255 for r in regs), out[-2000:]
