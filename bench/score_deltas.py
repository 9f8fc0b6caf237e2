"""Score the runs that bench/quality.py trained on the device with lm-eval tasks here (the device has no lm-eval):
rebuild each run's model from its base model and the trained deltas it packed (`lincat export`), then run the tasks
in-process. Prints a markdown table and writes JSON.

    python bench/score_deltas.py --base ../shared/models/lincat-ref --runs /tmp/deltas/ref20/lolcats /tmp/deltas/ref5a/* \
        --bench-data ../shared/data/bench --tasks piqa_local --limit 500 --json /tmp/piqa.json
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import _paths  # noqa: F401,E402  (repository root on sys.path, bench/ off it)

from lincat.eval.harness import write_local_tasks  # noqa: E402
from lincat.eval.runner import evaluate, load_any  # noqa: E402
from lincat.export import export_run  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the teacher, here (the runs name the device's path)")
    ap.add_argument("--runs", nargs="+", required=True, help="run folders (lincat_run.json + train/)")
    ap.add_argument("--bench-data", required=True)
    ap.add_argument("--tasks", default="piqa_local")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tasks = [f"lm-eval:{t}" for t in args.tasks.split(",")]
    work = Path(tempfile.mkdtemp(prefix="lincat-score-"))
    include = write_local_tasks(args.bench_data, work / "tasks")
    results = {}
    for name, path in [("teacher", args.base)] + [(f"{Path(r).parent.name}/{Path(r).name}", r) for r in args.runs]:
        if name != "teacher":
            run = work / "runs" / name.replace("/", "_")  # a copy: the base model's path is rewritten for here
            shutil.copytree(path, run)
            info = json.loads((run / "lincat_run.json").read_text())
            info["base_model"] = str(Path(args.base).resolve())
            (run / "lincat_run.json").write_text(json.dumps(info, indent=1))
            path = export_run(run, work / name.replace("/", "_"), dtype="fp32")
        model, tok = load_any(str(path), device="cpu")
        results[name] = evaluate(model, tok, tasks, include_path=include, limit=args.limit)
        print(name, json.dumps(results[name]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    metrics = sorted({m for r in results.values() for t in r.values() for m in t})
    print("| model | " + " | ".join(f"{t[8:]} {m}" for t in tasks for m in metrics) + " |")
    print("|---|" + "---|" * (len(tasks) * len(metrics)))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[t].get(m, float('nan')):.3f}" for t in tasks for m in metrics) + " |")


if __name__ == "__main__":
    main()
