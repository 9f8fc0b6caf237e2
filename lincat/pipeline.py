"""The main job, as one function: load a base model, convert it, run stage 1 and stage 2, export the result.

Everything lands in one run folder:
  recipe.yaml         the recipe as run (--resume reads it back)
  metrics.jsonl       one line per logged step and per evaluation
  checkpoints/        training state for exact resume (trainable parameters, optimizer, scheduler, RNG, data position)
  train/              the trained deltas: attention.safetensors (stage 1) and adapter/ (stage-2 LoRA, unmerged)
  lincat_run.json     recipe, data, tokens seen, wall time, final losses
  config.json, model.safetensors, modeling files, tokenizer, README.md: the exported model (written last)
"""

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from . import __version__
from .convert import convert
from .recipe import Recipe, load_recipe
from .train.data import load_data
from .train.loop import Stage, console, write_atomic
from .train.recover import add_lora, eval_ce, recovery_loss
from .train.transfer import attention_parameters, freeze_all_but, transfer_loss


class RunError(ValueError):
    """A user-facing problem with the run's inputs (model, output folder, resume)."""


def load_base(model_id: str, dtype: torch.dtype):
    """Tokenizer and causal LM from a Hub id or a local directory, with one clear error when that fails."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_id).expanduser()
    is_local = path.exists()
    if not is_local and (model_id.startswith((".", "/", "~")) or model_id.count("/") > 1):
        raise RunError(f"model path {model_id} does not exist: pass a local model directory or a Hub id like org/name")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if is_local else model_id)
        model = AutoModelForCausalLM.from_pretrained(str(path) if is_local else model_id, dtype=dtype)
    except OSError as e:
        text = str(e)
        if not is_local and any(s in text for s in ("offline", "connect", "Connection", "cannot find the requested files", "LocalEntryNotFound", "couldn't connect")):
            raise RunError(
                f"cannot download {model_id!r} from the Hub (offline or unreachable) and it is not in the local cache: "
                "pass a local model directory instead"
            ) from None
        raise RunError(f"cannot load model {model_id!r}: {text.strip().splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


def _precision(recipe: Recipe) -> str:
    mp = recipe.runtime.mixed_precision
    if mp == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if mp != "no" and not torch.cuda.is_available():
        return "no"  # CPU runs in fp32: half precision on CPU is slow and, for fp16, unsupported
    return mp


def prepare_run_dir(out: Path, recipe, overrides, resume: bool) -> Recipe:
    if resume:
        saved = out / "recipe.yaml"
        if not saved.exists():
            raise RunError(f"nothing to resume in {out}: it has no recipe.yaml (start without --resume)")
        return load_recipe(saved, overrides)
    if out.exists() and any(out.iterdir()):
        raise RunError(f"{out} already exists and is not empty: pass --resume to continue that run, or a new --out")
    rec = load_recipe(recipe, overrides)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "recipe.yaml", lambda t: t.write_text(yaml.safe_dump(rec.to_dict(), sort_keys=False)))
    return rec


def run(model_id: str, recipe="lolcats", data: str | None = None, out: str = "lincat-out", overrides=None,
        resume: bool = False, on_step=None, export: bool = True, after_stage=None) -> dict:
    """Convert `model_id` with `recipe`, train both stages and export to `out`. Returns the run summary.

    on_step(stage) runs after every optimizer step; after_stage(name, model) after each stage (e.g. to evaluate).
    """
    from accelerate import Accelerator

    out = Path(out)
    overrides = list(overrides or [])
    if data is not None:
        overrides.append(f"data.source={data}")
    rec = prepare_run_dir(out, recipe, overrides, resume)
    torch.manual_seed(rec.runtime.seed)
    mp = _precision(rec)
    acc = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
    t_start = time.time()

    tokenizer, model = load_base(model_id, torch.bfloat16 if mp == "bf16" else torch.float32)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and rec.data.seq_len > max_pos:
        console.print(f"[yellow]data.seq_len {rec.data.seq_len} is longer than the model's context ({max_pos}); "
                      f"using {max_pos}[/yellow]")
        rec.data.seq_len = max_pos
    console.print(f"[bold]lincat[/bold] {model_id} -> {out}  recipe [cyan]{rec.name}[/cyan] ({rec.attention.kind}), "
                  f"device {acc.device}, precision {mp}")
    packed = load_data(rec.data, tokenizer)
    console.print(f"data: {packed.source}: {packed.documents} documents -> {len(packed.train)} train / "
                  f"{len(packed.val)} val sequences of {packed.seq_len} tokens")
    convert(model, rec)
    model.to(acc.device)
    model.config.use_cache = False
    summary = {"lincat_version": __version__, "base_model": model_id, "recipe": rec.to_dict(),
               "data": {"source": packed.source, "documents": packed.documents, "train_sequences": len(packed.train),
                        "val_sequences": len(packed.val), "seq_len": packed.seq_len},
               "precision": mp, "device": str(acc.device), "stages": {}}

    attn = attention_parameters(model)
    if rec.stage1.max_steps > 0 and attn:
        freeze_all_but(model, attn)
        stage = Stage("stage1", rec.stage1, rec.runtime, packed, attn, lambda b: transfer_loss(model, b),
                      lambda b: transfer_loss(model, b)[0], out, acc, on_step)
        summary["stages"]["stage1"] = vars(stage.run(resume, model))
        if after_stage is not None:
            after_stage("stage1", model)
    elif rec.stage1.max_steps > 0:
        console.print(f"[dim]stage1: skipped ({rec.attention.kind} adds no parameters to transfer)[/dim]")

    train_dir = out / "train"
    train_dir.mkdir(exist_ok=True)
    if attn and acc.is_main_process:
        write_atomic(train_dir / "attention.safetensors",
                     lambda t: save_file({n: p.detach().float().cpu().contiguous() for n, p in attn.items()}, str(t)))

    if rec.stage2.max_steps > 0:
        peft_model, params = add_lora(model, rec.stage2)
        stage = Stage("stage2", rec.stage2, rec.runtime, packed, params,
                      lambda b: recovery_loss(peft_model, b, rec.stage2), lambda b: eval_ce(peft_model, b),
                      out, acc, on_step)
        summary["stages"]["stage2"] = vars(stage.run(resume, peft_model))
        if after_stage is not None:
            after_stage("stage2", peft_model)
        if acc.is_main_process:
            write_atomic(train_dir / "adapter", lambda t: peft_model.save_pretrained(str(t)))
        model = peft_model.merge_and_unload()

    summary["tokens"] = sum(s["tokens"] for s in summary["stages"].values())
    summary["wall_time_s"] = time.time() - t_start
    summary["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    model.eval()
    if acc.is_main_process:
        write_atomic(out / "lincat_run.json", lambda t: t.write_text(json.dumps(summary, indent=1, default=str)))
        if export:
            from .export import export_model

            export_model(model, tokenizer, out, run_info=summary)
    return summary
