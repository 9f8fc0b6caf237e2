"""Quality report: every recipe against the same teacher, the same data and the same token budget.

Runs on the GPU machine (device tool). For each recipe it runs the real `lincat convert` pipeline, then measures
held-out perplexity at 1K and 2K tokens (as a ratio to the teacher's), passkey retrieval inside and beyond the
sliding window, tokens used and GPU-minutes. PIQA is scored afterwards with lm-eval (`lincat eval`), from the
small trained deltas this script packs into --out (the device has no lm-eval; see bench/README.md).

  python bench/quality.py --teacher .carry/lincat-ref --train .carry/train.npy --heldout .carry/heldout \
      --out $OUT --tokens 5e6 --recipes swa,hedgehog,lolcats,liger,lolcats-kd,lolcats-hybrid
"""

import argparse
import json
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import _paths  # noqa: F401,E402  (repository root on sys.path, bench/ off it)

from lincat.eval.passkey import passkey_accuracy  # noqa: E402
from lincat.eval.ppl import read_documents, strided_ppl, tokenize_documents  # noqa: E402
from lincat.modeling.modeling_lincat import lincat_modules, set_attention_mode  # noqa: E402
from lincat.pipeline import load_base, run  # noqa: E402

# name -> (recipe, extra overrides). Two-stage recipes split the budget evenly between the stages.
VARIANTS = {
    "swa": ("swa", []),
    "hedgehog": ("hedgehog", []),
    "lolcats": ("lolcats", []),
    "liger": ("liger", []),
    "lolcats-kd": ("lolcats", ["stage2.loss=ce+kd", "stage2.kd_weight=0.5"]),
    "lolcats-shared": ("lolcats", ["attention.gqa_shared=true"]),
    "lolcats-hybrid": ("lolcats", []),  # + the 2 layers with the worst stage-1 MSE kept as softmax (from "lolcats")
    # trained on 2048-token sequences (the same tokens per step): the features see every position used at 2K
    "lolcats-2k": ("lolcats", ["data.seq_len=2048", "stage1.batch_size={half}", "stage2.batch_size={half}"]),
}
TWO_STAGE = {"hedgehog", "lolcats"}


def layer_mse(model, val: torch.Tensor, batch: int) -> list[float]:
    """Validation attention-output MSE of each lincat layer (teacher-forced), after stage 1."""
    mods = lincat_modules(model)
    sums = [0.0] * len(mods)
    set_attention_mode(model, "transfer")
    with torch.no_grad():
        for i in range(0, len(val), batch):
            model.get_decoder()(input_ids=val[i:i + batch].to(model.device), use_cache=False)
            for j, m in enumerate(mods):
                sums[j] += m.transfer_loss.item()
    set_attention_mode(model, "student")
    return [s / max(len(range(0, len(val), batch)), 1) for s in sums]


def evaluate(model, tokenizer, docs, args) -> dict:
    model.eval()
    short, long = (int(x) for x in args.lengths.split(","))
    ppl = {n: strided_ppl(model, docs, n, max_tokens=args.ppl_tokens)["ppl"] for n in (short, long)}
    beyond = [n for n in (256, 512, 1024) if n <= long]
    pk = passkey_accuracy(model, tokenizer, [64, *beyond], trials=args.passkey_trials)
    return {"ppl_1k": ppl[short], "ppl_2k": ppl[long], "passkey_in": pk[64],
            "passkey_beyond": sum(pk[n] for n in beyond) / len(beyond), "passkey": pk}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--train", required=True, help="training data (.npy token stream or text)")
    ap.add_argument("--heldout", required=True, help="held-out text file or folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--recipes", default="swa,hedgehog,lolcats,liger,lolcats-kd,lolcats-hybrid")
    ap.add_argument("--tokens", type=float, default=5e6, help="training tokens per recipe (all stages)")
    ap.add_argument("--label", default="", help="name of this budget in the report")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ppl-tokens", type=int, default=65536)
    ap.add_argument("--lengths", default="1024,2048", help="two perplexity context lengths (short, long)")
    ap.add_argument("--passkey-trials", type=int, default=4)
    ap.add_argument("--work", default="/tmp/lincat-quality")
    ap.add_argument("--deadline", type=float, default=0, help="seconds; recipes not started by then are skipped")
    args = ap.parse_args()

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer, teacher = load_base(args.teacher, torch.bfloat16 if device == "cuda" else torch.float32)
    docs = tokenize_documents(read_documents(args.heldout), tokenizer)
    t0 = time.time()
    results = {"teacher": {**evaluate(teacher.to(device), tokenizer, docs, args), "tokens": 0, "gpu_min": 0.0}}
    print("teacher", json.dumps(results["teacher"]), flush=True)
    del teacher
    torch.cuda.empty_cache() if device == "cuda" else None

    stream = torch.cat(docs)
    mse_windows = stream[: 16 * args.seq_len].view(16, args.seq_len)  # held-out text for per-layer stage-1 MSE
    per_step = args.batch * args.seq_len
    hybrid_layers = None
    for name in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        recipe, extra = VARIANTS[name]
        if args.deadline and time.time() - t0 > args.deadline:
            print(f"{name}: skipped (past --deadline)", flush=True)
            results[name] = {"error": "skipped: past the time budget (--deadline)"}
            continue
        stages = 2 if recipe in TWO_STAGE else 1
        steps = max(int(args.tokens / stages / per_step), 1)
        ov = [f"data.seq_len={args.seq_len}", "data.val_sequences=16", f"stage1.batch_size={args.batch}",
              f"stage2.batch_size={args.batch}", "stage1.grad_accum=1", "stage2.grad_accum=1",
              f"stage1.max_steps={steps if stages == 2 else 0}", f"stage2.max_steps={steps}",
              f"stage1.eval_every={max(steps // 4, 1)}", f"stage2.eval_every={max(steps // 4, 1)}",
              "stage1.eval_batches=2", "stage2.eval_batches=2", "runtime.checkpoint_every=100000",
              f"runtime.log_every={max(steps // 10, 1)}", *(e.format(half=max(args.batch // 2, 1)) for e in extra)]
        if name == "lolcats-hybrid":
            if hybrid_layers is None:
                print("lolcats-hybrid needs the lolcats run first (for its per-layer MSE); skipped", flush=True)
                continue
            ov.append(f"attention.softmax_layers={hybrid_layers}")
        record: dict = {}

        def after(stage, model, record=record, name=name):
            if stage == "stage1":
                record["stage1_mse"] = layer_mse(model, mse_windows, args.batch)
            record[f"after_{stage}"] = evaluate(model, tokenizer, docs, args)
            print(name, stage, json.dumps(record[f"after_{stage}"]), flush=True)
            model.train()

        start = time.time()
        try:
            summary = run(args.teacher, recipe, args.train, str(work / name), ov, export=False, after_stage=after)
        except Exception as e:  # one failing recipe must not lose the others
            print(f"{name} failed: {type(e).__name__}: {e}", flush=True)
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        final = record.get("after_stage2") or record.get("after_stage1") or {}
        results[name] = {**final, "tokens": summary["tokens"], "gpu_min": (time.time() - start) / 60,
                         "stage1": record.get("after_stage1"), "stage1_mse": record.get("stage1_mse"),
                         "tok_per_s": {k: v["tokens_per_s"] for k, v in summary["stages"].items()},
                         "softmax_layers": summary["recipe"]["attention"]["softmax_layers"]}
        if name == "lolcats" and record.get("stage1_mse"):
            mse = record["stage1_mse"]
            hybrid_layers = sorted(sorted(range(len(mse)), key=lambda i: -mse[i])[:2])
        (out / "quality.json").write_text(json.dumps(results, indent=1))
        write_report(results, args, out, time.time() - t0, show=False)  # after every recipe: a killed run keeps it
        torch.cuda.empty_cache() if device == "cuda" else None

    write_report(results, args, out, time.time() - t0)
    with tarfile.open(out / "deltas.tar.gz", "w:gz") as tar:  # trained deltas, for PIQA with lm-eval afterwards
        for d in sorted(work.iterdir()):
            for f in ("lincat_run.json", "recipe.yaml"):
                if (d / f).exists():
                    tar.add(d / f, arcname=f"{d.name}/{f}")
            if (d / "train").exists():
                tar.add(d / "train", arcname=f"{d.name}/train")


def write_report(results: dict, args, out: Path, seconds: float, show: bool = True):
    t = results["teacher"]
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    lines = [
        f"## {Path(args.teacher).name}: {args.label or f'{args.tokens / 1e6:g}M tokens per recipe'}", "",
        f"Device {dev}; {datetime.now(timezone.utc).date()}; torch {torch.__version__}; "
        f"command: `python bench/quality.py --teacher {args.teacher} --train {args.train} --heldout {args.heldout} "
        f"--tokens {args.tokens:g} --recipes {args.recipes} --seq-len {args.seq_len} --batch {args.batch} "
        f"--lengths {args.lengths}`; "
        f"total {seconds / 60:.1f} min.", "",
        f"Teacher: held-out ppl {t['ppl_1k']:.2f} (short), {t['ppl_2k']:.2f} (long); passkey {t['passkey_in']:.0%} inside "
        f"the window, {t['passkey_beyond']:.0%} beyond.", "",
        f"Perplexity columns are at {args.lengths.replace(',', ' and ')} tokens of context; passkey inside = 64-token "
        "prompts (needle within the 64-token window), beyond = 256-1024-token prompts.", "",
        "| recipe | ppl short / teacher | ppl long / teacher | passkey inside | passkey beyond | tokens | GPU-min | stage-1 ppl short / teacher |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if name == "teacher":
            continue
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:80]} | | | | | | |")
            continue
        s1 = r.get("stage1") or {}
        lines.append(
            f"| {name} | {r['ppl_1k'] / t['ppl_1k']:.3f} | {r['ppl_2k'] / t['ppl_2k']:.3f} | {r['passkey_in']:.0%} | "
            f"{r['passkey_beyond']:.0%} | {r['tokens'] / 1e6:.1f}M | {r['gpu_min']:.1f} | "
            f"{s1['ppl_1k'] / t['ppl_1k']:.3f} |" if s1 else
            f"| {name} | {r['ppl_1k'] / t['ppl_1k']:.3f} | {r['ppl_2k'] / t['ppl_2k']:.3f} | {r['passkey_in']:.0%} | "
            f"{r['passkey_beyond']:.0%} | {r['tokens'] / 1e6:.1f}M | {r['gpu_min']:.1f} | - |")
    text = "\n".join(lines) + "\n"
    (out / "quality.md").write_text(text)
    if show:
        print(text, flush=True)


if __name__ == "__main__":
    main()
