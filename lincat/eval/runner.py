"""`lincat eval`: run the requested tasks on a model (and its teacher), print a table, write JSON."""

import json
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .harness import run_lm_eval, write_local_tasks
from .passkey import passkey_accuracy
from .ppl import read_documents, strided_ppl, tokenize_documents
from .speed import measure_speed


class EvalError(ValueError):
    """A task name, file or option is wrong; the message says how to fix it."""


TASKS = ("ppl", "passkey", "speed", "lm-eval:<task>")


def load_any(path_or_id: str, device=None, dtype=None):
    """A lincat export (through lincat's own classes) or any causal LM, with its tokenizer."""
    from transformers import AutoTokenizer

    from ..export import load
    from ..pipeline import load_base

    path = Path(path_or_id)
    if (path / "config.json").exists() and json.loads((path / "config.json").read_text()).get("model_type") == "lincat":
        model = load(path, dtype=dtype or torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    else:
        tokenizer, model = load_base(path_or_id, dtype or torch.float32)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def parse_tasks(tasks: str) -> list[str]:
    out = [t.strip() for t in tasks.split(",") if t.strip()]
    for t in out:
        if t not in ("ppl", "passkey", "speed") and not t.startswith("lm-eval:"):
            raise EvalError(f"unknown task {t!r}: use {', '.join(TASKS)}")
    return out


def max_context(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 4096) or 4096)


def evaluate(model, tokenizer, tasks: list[str], data=None, lengths=(512, 2048, 4096), include_path=None,
             limit=None, ppl_tokens: int = 32768, passkey_trials: int = 4) -> dict:
    """{task: result} for one model. Lengths beyond the model's context are skipped."""
    ctx = max_context(model)
    usable = [n for n in lengths if n <= ctx] or [ctx]
    res = {}
    if "ppl" in tasks:
        if data is None:
            raise EvalError("ppl needs --data: a text file, .jsonl file or folder of held-out text")
        docs = tokenize_documents(read_documents(data), tokenizer)
        res["ppl"] = {n: strided_ppl(model, docs, n, max_tokens=ppl_tokens)["ppl"] for n in usable}
    if "passkey" in tasks:
        window = (getattr(model.config, "lincat", None) or {}).get("layers", [{}])[0].get("window", 64)
        plen = sorted({n for n in (window // 2, window, 2 * window, 4 * window, 8 * window) if 16 <= n <= ctx})
        res["passkey"] = passkey_accuracy(model, tokenizer, plen, trials=passkey_trials)
    if "speed" in tasks:
        res["speed"] = measure_speed(model, usable)
    lm_tasks = [t.split(":", 1)[1] for t in tasks if t.startswith("lm-eval:")]
    if lm_tasks:
        res.update({f"lm-eval:{k}": v for k, v in run_lm_eval(model, tokenizer, lm_tasks, include_path, limit).items()})
    return res


def _rows(res: dict) -> dict:
    """Flatten a result dict into {row label: value}."""
    rows = {}
    for n, v in res.get("ppl", {}).items():
        rows[f"ppl @ {n}"] = v
    for n, v in res.get("passkey", {}).items():
        rows[f"passkey @ {n}"] = v
    for r in res.get("speed", []):
        rows[f"prefill tok/s @ {r['length']}"] = r["prefill_tok_s"]
        rows[f"decode tok/s @ {r['length']}"] = r["decode_tok_s"]
        rows[f"cache MiB @ {r['length']}"] = r["cache_mib"]
    for k, v in res.items():
        if k.startswith("lm-eval:"):
            for metric, value in v.items():
                rows[f"{k[8:]} {metric}"] = value
    return rows


def print_table(results: dict, console: Console | None = None):
    console = console or Console()
    names = list(results)
    table = Table("metric", *names, *(["student / teacher"] if len(names) == 2 else []))
    rows = {name: _rows(r) for name, r in results.items()}
    labels = list(dict.fromkeys(k for r in rows.values() for k in r))
    for label in labels:
        vals = [rows[n].get(label) for n in names]
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) if v is not None else "-" for v in vals]
        if len(names) == 2:
            t, s = vals[0], vals[1]
            cells.append(f"{s / t:.3f}" if isinstance(s, (int, float)) and isinstance(t, (int, float)) and t else "-")
        table.add_row(label, *cells)
    console.print(table)


def evaluate_cli(model_dir, teacher, tasks, data, lengths, include_path, limit, json_out, bench_data=None):
    task_list = parse_tasks(tasks)
    lens = [int(x) for x in lengths.split(",") if x.strip()]
    tmp = None
    if bench_data:
        tmp = tempfile.TemporaryDirectory()
        include_path = write_local_tasks(bench_data, Path(tmp.name) / "tasks") if not include_path else include_path
    results = {}
    if teacher:
        tm, tt = load_any(teacher)
        results["teacher"] = evaluate(tm, tt, task_list, data, lens, include_path, limit)
        del tm
    model, tok = load_any(model_dir)
    results["student" if teacher else str(model_dir)] = evaluate(model, tok, task_list, data, lens, include_path, limit)
    print_table(results)
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=1, default=str))
    if tmp is not None:
        tmp.cleanup()
    return results
