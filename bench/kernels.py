"""GPU checks and timings of lincat's Triton kernels, against PyTorch references, SDPA (flash) and fla-core.

    python bench/kernels.py            # full run: B*T = 32768, H = 32, D = F = 128, T in {2K, 8K, 32K}, bf16
    python bench/kernels.py --quick    # smoke run: B*T = 8192, T in {2K, 8K}
    python bench/kernels.py --variants # also time the kernels' knobs (chunk, blocks, warps, state dtype) at T = 8K

1. Correctness: each lincat op in bf16 against its chunked PyTorch form in fp32 (inputs upcast), forward outputs,
   final states and gradients, as ||out - ref|| / ||ref||; with GQA, right padding and an initial state. fla's ops get
   the same check where their semantics match (chunk_gla with scale 1, chunk_linear_attn normalized).
2. Timing: triton.testing.do_bench medians of forward and forward+backward, and the bandwidth that the minimal traffic
   (each input read once, each output written once) implies, against ~3.0 TB/s.
3. Writes bench/results/kernels.md (and prints it). One failing op is reported and the run goes on.
"""

import argparse
import datetime
import math
import os
import sys
import time
import traceback
import types

import torch
import torch.nn.functional as F

from _paths import REPO  # noqa: E402  (repository root on sys.path, bench/ off it)
if "lincat" not in sys.modules:  # the kernels only: skip lincat/__init__.py, which loads transformers and training
    _pkg = types.ModuleType("lincat")
    _pkg.__path__ = [os.path.join(REPO, "lincat")]
    sys.modules["lincat"] = _pkg

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from lincat.modeling.kernels.gla import chunk as gla_k  # noqa: E402
from lincat.modeling.kernels.gla.torch_chunk import chunk_gla_torch  # noqa: E402
from lincat.modeling.kernels.linear_attn import chunk as la_k  # noqa: E402
from lincat.modeling.kernels.linear_attn.torch_chunk import chunk_linear_attn_torch  # noqa: E402
from lincat.modeling.kernels.swa import chunk as swa_k  # noqa: E402
from lincat.modeling.kernels.swa.torch_chunk import chunk_swa_torch  # noqa: E402
from lincat.modeling.kernels.window_linear_attn import chunk as win_k  # noqa: E402
from lincat.modeling.kernels.window_linear_attn.torch_chunk import chunk_window_linear_attn_torch  # noqa: E402
from lincat.modeling.kernels.hedgehog_map.fused import fused_hedgehog_map  # noqa: E402
from lincat.modeling.kernels.hedgehog_map.naive import naive_hedgehog_map  # noqa: E402

try:
    from fla.ops.gla import chunk_gla as fla_chunk_gla
    from fla.ops.linear_attn import chunk_linear_attn as fla_chunk_linear_attn
    import fla

    FLA = getattr(fla, "__version__", "?")
except Exception as e:  # noqa: BLE001  (not installed, or broken on this triton)
    fla_chunk_gla = fla_chunk_linear_attn = None
    FLA = f"not importable ({type(e).__name__}: {e})"

DEV = "cuda"
BW_PEAK = 3.0e12  # bytes/s, device-to-device copy measured on the H100 here
WINDOW = 64
BF16 = torch.bfloat16
START = time.time()
LOG = []


def say(*a):
    line = " ".join(str(x) for x in a)
    LOG.append(line)
    print(line, flush=True)


def left(budget):
    return budget - (time.time() - START)


# ----------------------------------------------------------------------------------------------------------------------
# inputs


def feats(*shape):
    """Positive, normalized features like Hedgehog's / Liger's softmax maps."""
    return torch.randn(*shape, device=DEV).softmax(-1)


def make_inputs(op, b, t, h, hkv, hk, d, f, dtype, padded=False, init=False):
    r = lambda *s: torch.randn(*s, device=DEV)  # noqa: E731
    x = {}
    if op == "linear_attn":
        x = dict(qf=feats(b, t, h, f), kf=feats(b, t, hk, f), v=r(b, t, hkv, d))
    elif op == "window_linear_attn":
        x = dict(q=r(b, t, h, d), k=r(b, t, hkv, d), v=r(b, t, hkv, d), qf=feats(b, t, h, f), kf=feats(b, t, hk, f),
                 gamma=torch.rand(h, device=DEV) * 0.8 + 0.1)
    elif op == "gla":
        k = r(b, t, hk, f)
        x = dict(qf=feats(b, t, h, f), kf=k.softmax(-1), v=r(b, t, hkv, d), g=F.logsigmoid(k) / 16)
    elif op == "swa":
        x = dict(q=r(b, t, h, d), k=r(b, t, hkv, d), v=r(b, t, hkv, d))
    elif op == "hedgehog_map":  # hkv heads of x (H/4: keys mapped per query head), H weight heads (fp32)
        x = dict(x=r(b, t, hkv, d), w=r(h, d, f // 2) * d ** -0.5)
    if init and op in ("linear_attn", "window_linear_attn"):  # an fp32 initial state, as prefill after a cache
        x.update(s0=r(b, hk, f, d) * 0.1, z0=torch.rand(b, hk, f, device=DEV) + 0.5)
    elif init and op == "gla":
        x.update(s0=r(b, hk, f, d) * 0.1)
    x = {n: (v.to(dtype) if n not in ("gamma", "g", "s0", "z0", "w") else v) for n, v in x.items()}
    valid = None
    if padded:  # right padding: every query still sees a key, so the fp32 references stay well conditioned
        valid = torch.ones(b, t, dtype=torch.bool, device=DEV)
        valid[0, t - t // 8:] = False
    return x, valid


def call(op, impl, x, valid, final=False):
    """Run one op; returns a tuple of outputs (o, then final-state tensors)."""
    scale = x["q"].shape[-1] ** -0.5 if "q" in x else None
    if op == "linear_attn":
        fn = la_k.chunk_linear_attn if impl == "lincat" else chunk_linear_attn_torch
        init = (x["s0"], x["z0"]) if "s0" in x else None
        o, st = fn(x["qf"], x["kf"], x["v"], valid, init, final, None if impl == "lincat" else 64)
        return (o,) + (tuple(st) if final else ())
    if op == "window_linear_attn":
        fn = win_k.chunk_window_linear_attn if impl == "lincat" else chunk_window_linear_attn_torch
        init = (x["s0"], x["z0"]) if "s0" in x else None
        o, st = fn(x["q"], x["k"], x["v"], x["qf"], x["kf"], x["gamma"], WINDOW, scale, valid, init, final,
                   None if impl == "lincat" else 64)  # the kernels' own chunk
        return (o,) + (tuple(st) if final else ())
    if op == "gla":
        if impl == "lincat":
            o, st = gla_k.chunk_gla(x["qf"], x["kf"], x["v"], x["g"], valid, x.get("s0"), final)
        elif impl == "torch":
            o, st = chunk_gla_torch(x["qf"], x["kf"], x["v"], x["g"], valid, x.get("s0"), final)
        else:
            o, st = fla_chunk_gla(x["qf"], x["kf"], x["v"], x["g"], scale=1.0, output_final_state=final)
        return (o,) + ((st,) if final else ())
    if op == "hedgehog_map":
        if impl == "lincat":
            return (fused_hedgehog_map(x["x"], x["w"]),)
        # HedgehogFeatureMap's PyTorch form (fp32), cast to the dtype the kernels read as they do
        return (naive_hedgehog_map(x["x"], x["w"]).to(x["x"].dtype),)
    if op == "swa":
        fn = swa_k.chunk_swa if impl == "lincat" else chunk_swa_torch
        return (fn(x["q"], x["k"], x["v"], WINDOW, scale, valid, None, 64),)
    raise ValueError(op)


def fla_linear(x):
    o, _ = fla_chunk_linear_attn(x["qf"], x["kf"], x["v"], scale=1.0, normalize=True)
    return (o,)


# ----------------------------------------------------------------------------------------------------------------------
# correctness


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(op, b, t, h, hkv, hk, d, f, padded, rows, impl="lincat", init=False):
    """One implementation (bf16) against the chunked PyTorch form in fp32. Run after poison(): an output element that
    no kernel writes is NaN and fails the finiteness check. init: with an fp32 initial state (and its gradient)."""
    torch.manual_seed(0)
    x, valid = make_inputs(op, b, t, h, hkv, hk, d, f, BF16, padded, init and impl == "lincat" and op != "swa")
    final = op != "swa" and impl == "lincat"
    ours_in = {n: v.detach().clone().requires_grad_() for n, v in x.items()}
    ref_in = {n: v.detach().float().requires_grad_() for n, v in x.items()}
    if impl == "lincat":
        out = call(op, "lincat", ours_in, valid, final)
    else:  # fla: same semantics for chunk_gla (scale 1) and chunk_linear_attn (normalized, scale 1)
        out = call("gla", "fla", ours_in, None) if op == "gla" else fla_linear(ours_in)
    torch.cuda.synchronize()
    ref = call(op, "torch", ref_in, valid, final)
    ws = [torch.randn_like(r) for r in ref]
    sum((o.float() * w).sum() for o, w in zip(out[:1], ws)).backward()
    sum((o * w).sum() for o, w in zip(ref[:1], ws)).backward()
    tag = f"{op} B={b} T={t} H={h} Hkv={hkv} Hk={hk}{' padded' if padded else ''}{' +state' if 's0' in x else ''}"
    names = ["o"] + (["S", "z"] if op in ("linear_attn", "window_linear_attn") else ["S"] if op == "gla" else [])
    for n, a, r_ in zip(names, out, ref):
        rows.append((tag, impl, n, rel(a, r_), bool(torch.isfinite(a).all())))
    for n in x:
        if ours_in[n].grad is None:
            continue
        rows.append((tag, impl, "d" + n, rel(ours_in[n].grad, ref_in[n].grad),
                     bool(torch.isfinite(ours_in[n].grad).all())))
    del out, ref, ours_in, ref_in, x
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------------
# timing


def nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def bench_op(label, op, impl, b, t, h, hkv, d, f, reps):
    """Median ms of forward and forward+backward, and the minimal bytes each moves."""
    torch.manual_seed(0)
    if impl == "sdpa":
        q, k, v = (torch.randn(b, h, t, d, device=DEV, dtype=BF16) for _ in range(3))
        x = dict(q=q, k=k, v=v)

        def fn():
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return (F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True),)
    else:
        x, _ = make_inputs(op, b, t, h, hkv, hkv if op == "gla" else h, d, f, BF16)
        if impl == "fla":
            fn = (lambda: fla_linear(x)) if op == "linear_attn" else (lambda: call("gla", "fla", x, None))
        else:
            def fn():
                return call(op, impl, x, None)
    leaves = [v.requires_grad_() for v in x.values()]
    fwd = do_bench(fn, warmup=25, rep=reps, return_mode="median")
    out = fn()[0]
    do = torch.randn_like(out)

    def step():
        fn()[0].backward(do)

    both = do_bench(step, warmup=25, rep=reps, grad_to_none=leaves, return_mode="median")
    ins, outs = nbytes(leaves), nbytes([out])
    # forward: inputs in, o out; backward: inputs, o and do in, one gradient per input out
    return fwd, both, ins + outs, ins + outs + 2 * ins + 2 * outs


def poison():
    """Fill the allocator's free memory with NaN so that an output element no kernel writes shows up."""
    free = torch.cuda.mem_get_info()[0]
    x = torch.full((int(free * 0.6) // 4,), float("nan"), device=DEV)
    del x


# ----------------------------------------------------------------------------------------------------------------------
# main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="B*T = 8192, T in {2K, 8K}, fewer checks")
    ap.add_argument("--variants", action="store_true", help="also time the kernels' knobs at T = 8K")
    ap.add_argument("--ops", default="linear_attn,window_linear_attn,gla,swa,hedgehog_map")
    ap.add_argument("--no-fla", action="store_true", help="skip fla-core (its kernels autotune on first use)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds; later steps are skipped past it")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kernels.md"))
    args = ap.parse_args()
    ops = args.ops.split(",")
    total = 8192 if args.quick else 32768
    ts = [2048, 8192] if args.quick else [2048, 8192, 32768]
    h, d, f = 32, 128, 128
    reps = 50 if args.quick else 100
    props = torch.cuda.get_device_properties(0)
    say(f"# device {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton "
        f"{triton.__version__}, fla {FLA}")

    # 1. correctness at full head/feature size; then lolcats-style GQA (state per query head, H/4 k/v heads) with
    # right padding and an initial state
    rows = []
    t_chk = 2048 if args.quick else 8192

    def checks(cases, impl="lincat", which=ops):
        for op in which:
            for b, t, hq, hkv, hk, padded, init in cases:
                if op == "gla":  # the PyTorch form materializes [C, C, F] decays per chunk: keep it to 4K tokens
                    t, hk = min(t, 4096), hkv
                if left(args.budget) < (150 if impl == "fla" else 60):
                    rows.append((f"{op} T={t}", impl, "skipped (time budget)", float("nan"), False))
                    continue
                try:
                    poison()
                    check(op, b, t, hq, hkv, hk, d, f, padded, rows, impl, init)
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    rows.append((f"{op} T={t}", impl, f"error: {type(e).__name__}: {str(e)[:100]}",
                                 float("nan"), False))
                torch.cuda.empty_cache()
                say(f"checked {impl} {op} T={t} hkv={hkv} ({time.time() - START:.0f}s)")

    checks([(1, t_chk, h, h, h, False, False)])
    checks([(2, 2048 if args.quick else 4096, h, h // 4, h, True, True)])

    # 2. timing: (label, op, impl, kv heads); lincat and SDPA first, fla last (it autotunes on first use)
    names = []
    if "linear_attn" in ops:
        names += [("lincat linear_attn", "linear_attn", "lincat", h)]
    if "window_linear_attn" in ops:
        names += [("lincat window_linear_attn", "window_linear_attn", "lincat", h),
                  ("lincat window_linear_attn (Hkv=H/4)", "window_linear_attn", "lincat", h // 4)]
    if "gla" in ops:
        names += [("lincat gla", "gla", "lincat", h)]
    if "swa" in ops:
        names += [("lincat swa (W=64)", "swa", "lincat", h)]
    if "hedgehog_map" in ops:  # the feature maps the linear ops read: Triton against HedgehogFeatureMap's PyTorch
        names += [("lincat hedgehog_map", "hedgehog_map", "lincat", h),
                  ("PyTorch hedgehog map", "hedgehog_map", "torch", h),
                  ("lincat hedgehog_map (Hx=H/4)", "hedgehog_map", "lincat", h // 4),
                  ("PyTorch hedgehog map (Hx=H/4)", "hedgehog_map", "torch", h // 4)]
    names += [("SDPA flash (causal)", None, "sdpa", h)]
    fla_names = []
    if not args.no_fla:
        if "linear_attn" in ops and fla_chunk_linear_attn:
            fla_names += [("fla chunk_linear_attn", "linear_attn", "fla", h)]
        if "gla" in ops and fla_chunk_gla:
            fla_names += [("fla chunk_gla", "gla", "fla", h)]
    timing = []

    def time_rows(t, rows_, need):
        b = total // t
        for label, op, impl, hkv in rows_:
            if left(args.budget) < need:
                timing.append((t, b, label, None, "skipped (time budget)"))
                continue
            try:
                timing.append((t, b, label, bench_op(label, op, impl, b, t, h, hkv, d, f, reps), None))
                fwd, both = timing[-1][3][:2]
                say(f"T={t} {label}: fwd {fwd:.3f} ms, fwd+bwd {both:.3f} ms ({time.time() - START:.0f}s)")
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                timing.append((t, b, label, None, f"{type(e).__name__}: {str(e)[:100]}"))
            torch.cuda.empty_cache()

    for t in ts:
        time_rows(t, names, 20)
    # 3. knobs, each against the default (see TUNE in each kernel file), before fla
    variants = []
    if args.variants:
        t = 8192
        b = total // t
        knobs = {
            "window_linear_attn": (win_k, [("chunk", 128), ("fwd_bd", 64), ("num_warps", 8), ("state_tokens", 64),
                                    ("chunk", 32), ("fuse_dkv", False), ("fuse_dq", False), ("win_queries", 64),
                                    ("merge_band", False)]),
            "linear_attn": (la_k, [("chunk", 64), ("o_warps", 4), ("h_block", 128), ("h_stages", 2),
                                   ("states_fp32", True)]),
            "gla": (gla_k, [("chunk", 128), ("chunk", 32), ("o_warps", 8), ("states_fp32", True), ("bwd_block", 128)]),
        }
        for op, (mod, kn) in knobs.items():
            if op not in ops:
                continue
            nm = f"lincat {op}"
            for key, val in [(None, None)] + kn:
                if left(args.budget) < 30:
                    break
                old = mod.TUNE.get(key)
                if key:
                    mod.TUNE[key] = val
                try:
                    fwd, both = bench_op(nm, op, "lincat", b, t, h, h, d, f, reps)[:2]
                    variants.append((nm, f"{key}={val}" if key else "default", fwd, both, None))
                except Exception as e:  # noqa: BLE001
                    variants.append((nm, f"{key}={val}", None, None, f"{type(e).__name__}: {str(e)[:80]}"))
                if key:
                    mod.TUNE[key] = old
                torch.cuda.empty_cache()
                say(f"variant {nm} {key}={val} ({time.time() - START:.0f}s)")

    # 4. fla last: it autotunes on first use, which takes minutes
    for t in sorted(ts, key=lambda t: t != 8192):  # the reference shape first
        time_rows(t, fla_names, 120)
    if fla_names:
        checks([(1, t_chk, h, h, h, False, False)], "fla", [op for op in ("linear_attn", "gla") if op in ops])

    report(args, props, rows, timing, variants)


def report(args, props, rows, timing, variants):
    cmd = "python " + " ".join(sys.argv)
    lines = [
        "# lincat Triton kernels: checks and timings",
        "",
        f"- device: {props.name} ({props.multi_processor_count} SMs)",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, triton {triton.__version__}, fla-core {FLA}",
        f"- command: `{cmd}`",
        f"- wall time: {time.time() - START:.0f} s",
        "",
        "## Correctness (bf16 inputs vs the PyTorch chunked form in fp32)",
        "",
        "Relative error ||out - ref|| / ||ref||. bf16 operands land between 1e-3 and 1e-2; PASS below 2e-2 and finite.",
        "",
        "| case | impl | tensor | rel. error | |",
        "|---|---|---|---|---|",
    ]
    for tag, impl, name, err, finite in rows:
        ok = "PASS" if finite and err < 2e-2 else "FAIL"
        lines.append(f"| {tag} | {impl} | {name} | {err:.2e} | {ok} |")
    lines += [
        "",
        f"## Timing (bf16, B*T = {8192 if args.quick else 32768}, H = 32, D = F = 128, window 64; median ms)",
        "",
        "Bandwidth: minimal bytes (inputs read once, outputs written once; backward also reads o and do and writes a "
        "gradient per input) over time, against 3.0 TB/s.",
        "",
        "| T | B | kernel | fwd ms | fwd+bwd ms | fwd GB/s | fwd+bwd GB/s | % of 3.0 TB/s (fwd / both) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t, b, name, res, err in timing:
        if res is None:
            lines.append(f"| {t} | {b} | {name} | {err} | | | | |")
            continue
        fwd, both, io_f, io_b = res
        gf, gb = io_f / fwd / 1e6, io_b / both / 1e6
        lines.append(f"| {t} | {b} | {name} | {fwd:.3f} | {both:.3f} | {gf:.0f} | {gb:.0f} | "
                     f"{100 * gf * 1e9 / BW_PEAK:.0f}% / {100 * gb * 1e9 / BW_PEAK:.0f}% |")
    speed = speedups(timing)
    if speed:
        lines += ["", "## lincat vs fla (same T; their time / lincat time; target >= 1.3)", "",
                  "| T | pair | fwd | fwd+bwd |", "|---|---|---|---|"] + speed
    if variants:
        lines += ["", "## Knobs (T = 8192)", "", "| kernel | knob | fwd ms | fwd+bwd ms |", "|---|---|---|---|"]
        for nm, knob, fwd, both, err in variants:
            lines.append(f"| {nm} | {knob} | {err or f'{fwd:.3f}'} | {'' if err else f'{both:.3f}'} |")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)
    print("\n" + text, flush=True)


def speedups(timing):
    res = {(t, name): r for t, _, name, r, _ in timing if r is not None}
    out = []
    for t in sorted({t for t, _ in res}):
        for ours, theirs in (("lincat linear_attn", "fla chunk_linear_attn"), ("lincat gla", "fla chunk_gla"),
                             ("lincat window_linear_attn", "fla chunk_linear_attn"),
                             ("lincat window_linear_attn", "SDPA flash (causal)"),
                             ("lincat hedgehog_map", "PyTorch hedgehog map"),
                             ("lincat hedgehog_map (Hx=H/4)", "PyTorch hedgehog map (Hx=H/4)")):
            if (t, ours) in res and (t, theirs) in res:
                a, b_ = res[(t, ours)], res[(t, theirs)]
                out.append(f"| {t} | {ours} vs {theirs} | {b_[0] / a[0]:.2f}x | "
                           f"{(b_[1] / a[1]) if not math.isnan(a[1]) else float('nan'):.2f}x |")
    return out


if __name__ == "__main__":
    main()
