"""The `lincat` command: a thin typer layer over the Python API."""

import functools
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Turn a pretrained Hugging Face causal LM into a linear-attention model.",
    epilog="Start with [bold]lincat demo[/bold] (offline, ~2 minutes on a CPU), then [bold]lincat convert[/bold].",
)
console = Console(stderr=True)


def friendly_errors(fn):
    """Known problems end the command with one line that names the problem and the fix; no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .arch import UnsupportedModelError
        from .export import ExportError
        from .hub import HubError
        from .pipeline import RunError
        from .recipe import RecipeError
        from .train.data import DataError
        from .train.loop import TrainingDiverged

        from .eval.runner import EvalError

        known = (RecipeError, DataError, RunError, ExportError, UnsupportedModelError, TrainingDiverged, HubError,
                 EvalError, FileNotFoundError)
        try:
            return fn(*args, **kwargs)
        except known as e:
            console.print(f"[bold red]error:[/bold red] {e}", soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]: finished stages and checkpoints are kept; continue with --resume")
            raise typer.Exit(130) from None
        except Exception as e:  # out-of-memory has no import-time class on CPU-only torch
            if "OutOfMemoryError" in type(e).__name__ or "out of memory" in str(e).lower():
                console.print("[bold red]error:[/bold red] out of GPU memory: lower stage1/stage2.batch_size (raise "
                              "grad_accum to keep the batch) or data.seq_len, then rerun with --resume; checkpoints are kept")
                raise typer.Exit(3) from None
            raise

    return wrapper


@app.command(epilog="""
[bold]Examples[/bold]

  lincat convert meta-llama/Llama-3.2-1B --recipe lolcats --out llama-3.2-1b-lolcats

  lincat convert ./my-model --recipe liger --data ./corpus/ --out my-liger --set stage2.max_steps=500

  lincat convert ../shared/models/stories260K --recipe lolcats --data story.txt --out X \\
      --set stage1.max_steps=30 --set stage2.max_steps=30 --set data.seq_len=128

  lincat convert ./my-model --out my-run --resume      (continue a killed run)

  accelerate launch -m lincat.cli convert ...           (several GPUs)
""")
@friendly_errors
def convert(
    model: str = typer.Argument(..., help="Hub model id or local model directory."),
    recipe: str = typer.Option("lolcats", "--recipe", "-r", help="Recipe name (see `lincat recipes`) or a YAML path."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Hub dataset or local .txt/.jsonl/.json/.parquet files/folder (default: the recipe's)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder; ends up holding the converted model."),
    set_: List[str] = typer.Option([], "--set", help="Override a recipe key, e.g. --set stage1.lr=1e-3 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
):
    """Convert MODEL to linear attention: attention transfer, LoRA recovery, export."""
    from .pipeline import run

    summary = run(model, recipe, data, str(out), set_, resume)
    stages = ", ".join(f"{n}: best val {s['best_val']:.4g} ({s['tokens']:,} tokens)" for n, s in summary["stages"].items())
    console.print(f"[green]done[/green] in {summary['wall_time_s']:.0f}s  {stages or 'no training'}  -> {out}")


@app.command(epilog="[bold]Example[/bold]\n\n  lincat recipes")
@friendly_errors
def recipes():
    """List the bundled recipes."""
    from .recipe import available, load_recipe

    table = Table("recipe", "kind", "stage 1", "stage 2", "description")
    for name in available():
        r = load_recipe(name)
        s1 = f"{r.stage1.max_steps} steps @ {r.stage1.lr:g}" if r.stage1.max_steps else "-"
        s2 = f"{r.stage2.max_steps} steps @ {r.stage2.lr:g}, LoRA r={r.stage2.lora_rank}" if r.stage2.max_steps else "-"
        table.add_row(name, r.attention.kind, s1, s2, r.description)
    Console().print(table)


@app.command(epilog="[bold]Example[/bold]\n\n  lincat demo --out lincat-demo")
@friendly_errors
def demo(
    out: Path = typer.Option(Path("lincat-demo"), "--out", "-o", help="Where to save the demo teacher and student."),
    seconds: float = typer.Option(150.0, help="Time budget for the whole demo."),
):
    """Offline end-to-end demo on a CPU: pretrain a tiny teacher, convert it with lolcats, compare."""
    from .demo import run_demo

    run_demo(out, seconds)


@app.command(epilog="""
[bold]Examples[/bold]

  lincat export runs/llama-lolcats exports/llama-lolcats --dtype bf16

  lincat export runs/llama-lolcats exports/llama-lolcats-adapter --no-merge
""")
@friendly_errors
def export(
    run_dir: Path = typer.Argument(..., help="The --out folder of a `lincat convert` run."),
    out_dir: Path = typer.Argument(..., help="New folder for the exported model."),
    dtype: Optional[str] = typer.Option(None, help="bf16, fp16 or fp32 (default: the weights' dtype)."),
    no_merge: bool = typer.Option(False, "--no-merge", help="Keep LoRA separate, as a peft adapter in OUT_DIR/adapter."),
):
    """Write a self-contained model folder that loads with transformers' trust_remote_code=True."""
    from .export import ExportError, export_run

    if dtype is not None and dtype not in ("bf16", "fp16", "fp32"):
        raise ExportError(f"--dtype must be bf16, fp16 or fp32, got {dtype!r}")
    export_run(run_dir, out_dir, dtype, merge=not no_merge)
    console.print(f"[green]exported[/green] {out_dir}")


@app.command(epilog="""
[bold]Examples[/bold]

  lincat push exports/llama-lolcats my-org/llama-3.2-1b-lolcats --dry-run

  lincat push exports/llama-lolcats my-org/llama-3.2-1b-lolcats --private
""")
@friendly_errors
def push(
    out_dir: Path = typer.Argument(..., help="An exported model folder."),
    repo_id: str = typer.Argument(..., help="Hub repository, e.g. my-org/my-model."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    revision: Optional[str] = typer.Option(None, help="Branch to push to."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be uploaded, upload nothing."),
):
    """Upload an exported model folder to the Hugging Face Hub."""
    from .hub import push_folder

    files = push_folder(out_dir, repo_id, private=private, revision=revision, dry_run=dry_run)
    if dry_run:
        table = Table("file", "size")
        for name, size in files:
            table.add_row(name, f"{size:,}")
        Console().print(table)
        console.print(f"dry run: {len(files)} files would go to {repo_id}")
    else:
        console.print(f"[green]pushed[/green] {len(files)} files to https://huggingface.co/{repo_id}")


@app.command(name="eval", epilog="""
[bold]Examples[/bold]

  lincat eval llama-lolcats --teacher meta-llama/Llama-3.2-1B --tasks ppl,passkey

  lincat eval runs/x --tasks ppl --data ../shared/data/corpus/heldout --json eval.json

  lincat eval runs/x --tasks lm-eval:piqa_local --bench-data ../shared/data/bench --limit 200

  lincat eval runs/x --tasks lm-eval:piqa                (Hub task, needs network)
""")
@friendly_errors
def eval_(
    model_dir: str = typer.Argument(..., help="A lincat model folder (or any causal LM)."),
    teacher: Optional[str] = typer.Option(None, help="Base model to compare against, side by side."),
    tasks: str = typer.Option("ppl,passkey", help="Comma-separated: ppl, passkey, speed, lm-eval:<task>."),
    data: Optional[str] = typer.Option(None, help="Text file or folder for ppl."),
    lengths: str = typer.Option("512,2048,4096", help="Context lengths for ppl/passkey/speed."),
    include_path: Optional[str] = typer.Option(None, "--include-path", help="Folder of lm-eval task YAMLs."),
    bench_data: Optional[str] = typer.Option(None, "--bench-data", help="Folder with piqa_validation.jsonl etc.: enables the offline tasks piqa_local, strategyqa_local, physical_intuition_local."),
    limit: Optional[int] = typer.Option(None, help="At most this many examples per lm-eval task."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
):
    """Evaluate a model (perplexity, passkey retrieval, lm-eval tasks, speed), optionally beside its teacher."""
    from .eval.runner import evaluate_cli

    evaluate_cli(model_dir, teacher, tasks, data, lengths, include_path, limit, json_out, bench_data)


def main():
    app()


if __name__ == "__main__":
    sys.exit(main())
