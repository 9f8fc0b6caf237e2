"""The one training loop both stages use: accelerate for devices and mixed precision, manual gradient
accumulation, rich progress, metrics.jsonl, atomic checkpoints with exact resume, early stopping, NaN guard."""

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file

from .data import BatchSampler, PackedData

console = Console(stderr=True)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class StageResult:
    name: str
    steps: int = 0
    tokens: int = 0
    final_loss: float = float("nan")
    best_val: float = float("nan")
    first_val: float = float("nan")
    wall_time: float = 0.0
    stopped_early: bool = False
    tokens_per_s: float = 0.0
    val_history: list = field(default_factory=list)


def write_atomic(path: Path, write: Callable[[Path], None]):
    """Write through a temporary sibling and rename, so a kill never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    write(tmp)
    if path.is_dir() and tmp.is_dir():
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def lr_lambda(warmup: int, total: int):
    """Linear warmup, then cosine decay to 10% of the peak."""
    def f(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
        progress = min(step / max(total, 1), 1.0)
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    return f


def _params_dict(params: dict) -> dict:
    return {n: p.detach().float().cpu().contiguous() for n, p in params.items()}


def _load_params(params: dict, tensors: dict):
    missing = set(params) - set(tensors)
    if missing:
        raise RuntimeError(f"checkpoint lacks parameters {sorted(missing)[:3]}...: it belongs to a different recipe")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n].to(p.dtype))


class Stage:
    """Runs one training stage. `loss_fn(batch) -> (loss, metrics)`; `eval_fn(batch) -> loss` (no grad)."""

    def __init__(self, name, cfg, runtime, data: PackedData, params: dict, loss_fn, eval_fn, run_dir: Path,
                 accelerator, on_step: Callable | None = None):
        self.name, self.cfg, self.runtime, self.data = name, cfg, runtime, data
        self.params, self.loss_fn, self.eval_fn = params, loss_fn, eval_fn
        self.dir = Path(run_dir) / "checkpoints" / name
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        self.acc = accelerator
        self.on_step = on_step
        self.optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.warmup_steps, cfg.max_steps))
        self.sampler = BatchSampler(data.train, cfg.batch_size, runtime.seed,
                                    accelerator.process_index, accelerator.num_processes)
        self.step = 0
        self.model = None
        self.best_val, self.bad_evals = float("inf"), 0
        self.best_params = None
        self.result = StageResult(name)
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * accelerator.num_processes * data.seq_len

    # --- checkpoints ---
    def save(self):
        if not self.acc.is_main_process:
            return
        state = {
            "step": self.step, "position": self.sampler.position, "best_val": self.best_val,
            "bad_evals": self.bad_evals, "result": asdict(self.result),
        }

        def write(tmp: Path):
            tmp.mkdir(parents=True)
            save_file(_params_dict(self.params), str(tmp / "params.safetensors"))
            if self.best_params is not None:
                save_file(self.best_params, str(tmp / "best.safetensors"))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "rng": torch.get_rng_state()}, tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps(state, indent=1))

        write_atomic(self.dir / "latest", write)

    def load(self) -> bool:
        ckpt = self.dir / "latest"
        if not (ckpt / "state.json").exists():
            return False
        state = json.loads((ckpt / "state.json").read_text())
        _load_params(self.params, load_file(str(ckpt / "params.safetensors")))
        if (ckpt / "best.safetensors").exists():
            self.best_params = load_file(str(ckpt / "best.safetensors"))
        opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        # The recipe's lr wins on resume, so a diverged run can continue with a lower one.
        self.scheduler.base_lrs = [self.cfg.lr for _ in self.scheduler.base_lrs]
        for g, lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            g["lr"] = lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        torch.set_rng_state(opt["rng"])
        self.step, self.sampler.position = state["step"], state["position"]
        self.best_val, self.bad_evals = state["best_val"], state["bad_evals"]
        self.result = StageResult(**state["result"])
        return True

    def done_path(self) -> Path:
        return self.dir / "done.json"

    def finish(self):
        if self.best_params is not None:
            _load_params(self.params, self.best_params)
        if self.acc.is_main_process:
            write_atomic(self.dir / "final.safetensors", lambda t: save_file(_params_dict(self.params), str(t)))
            write_atomic(self.done_path(), lambda t: t.write_text(json.dumps(asdict(self.result), indent=1)))
            latest = self.dir / "latest"
            if latest.exists():
                shutil.rmtree(latest)

    def load_finished(self) -> StageResult | None:
        if not self.done_path().exists():
            return None
        _load_params(self.params, load_file(str(self.dir / "final.safetensors")))
        self.result = StageResult(**json.loads(self.done_path().read_text()))
        return self.result

    # --- evaluation and logging ---
    @torch.no_grad()
    def evaluate(self) -> float:
        bs = self.cfg.batch_size
        val = self.data.val
        losses = []
        self.model.eval()
        try:
            for i in range(0, min(len(val), self.cfg.eval_batches * bs), bs):
                losses.append(float(self.eval_fn(val[i:i + bs].to(self.acc.device))))
        finally:
            self.model.train()
        return sum(losses) / len(losses)

    def log(self, record: dict):
        if self.acc.is_main_process:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"stage": self.name, **record}) + "\n")

    def _check(self, loss: torch.Tensor):
        if not torch.isfinite(loss):
            last = self.dir / "latest"
            where = f"the last good checkpoint ({last}) is kept" if last.exists() else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"{self.name}: loss became {loss.item()} at step {self.step + 1}; {where}. "
                f"Lower the learning rate (--set {self.name}.lr=...) and rerun with --resume"
            )

    def _eval_and_maybe_stop(self) -> bool:
        val = self.evaluate()
        if not math.isfinite(val):
            raise TrainingDiverged(f"{self.name}: validation loss became {val} at step {self.step}; "
                                   f"lower {self.name}.lr and rerun with --resume")
        if not self.result.val_history:
            self.result.first_val = val
        self.result.val_history.append((self.step, val))
        self.log({"step": self.step, "val_loss": val})
        if val < self.best_val:
            self.best_val, self.bad_evals = val, 0
            self.best_params = _params_dict(self.params)
        else:
            self.bad_evals += 1
        self.result.best_val = self.best_val
        return bool(self.cfg.patience) and self.bad_evals >= self.cfg.patience

    # --- the loop ---
    def run(self, resume: bool, model) -> StageResult:
        finished = self.load_finished() if resume else None
        if finished is not None:
            console.print(f"[dim]{self.name}: already finished, loaded its parameters[/dim]")
            return finished
        if resume and self.load():
            console.print(f"[dim]{self.name}: resuming at step {self.step}[/dim]")
        cfg, acc = self.cfg, self.acc
        model.train()
        t0 = time.time() - self.result.wall_time
        interactive = console.is_terminal
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=console, disable=not interactive)
        stopped = False
        self.model = model
        if self.step == 0 and cfg.eval_every:
            self._eval_and_maybe_stop()  # the starting point: what training has to beat
        with progress:
            task = progress.add_task(self.name, total=cfg.max_steps, completed=self.step, info="")
            while self.step < cfg.max_steps and not stopped:
                step_t = time.time()
                total = 0.0
                for micro in range(cfg.grad_accum):
                    batch = self.sampler.next().to(acc.device)
                    sync = micro == cfg.grad_accum - 1
                    with (nullcontext() if sync or acc.num_processes == 1 else acc.no_sync(model)):
                        with acc.autocast():
                            loss, metrics = self.loss_fn(batch)
                        self._check(loss.detach())
                        acc.backward(loss / cfg.grad_accum)
                    total += loss.item() / cfg.grad_accum
                if self.runtime.grad_clip:
                    acc.clip_grad_norm_(list(self.params.values()), self.runtime.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                r = self.result
                r.steps, r.tokens, r.final_loss = self.step, r.tokens + self.tokens_per_step, total
                r.wall_time = time.time() - t0
                r.tokens_per_s = r.tokens / max(r.wall_time, 1e-9)
                tps = self.tokens_per_step / max(time.time() - step_t, 1e-9)
                info = f"loss {total:.4g}  {tps:,.0f} tok/s"
                progress.update(task, completed=self.step, info=info)
                if self.step % self.runtime.log_every == 0 or self.step == cfg.max_steps:
                    rec = {"step": self.step, "loss": total, "lr": self.scheduler.get_last_lr()[0],
                           "tokens": r.tokens, "tok_per_s": tps, "time": r.wall_time, **metrics}
                    self.log(rec)
                    if not interactive:
                        console.print(f"{self.name} step {self.step}/{cfg.max_steps}  {info}")
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    stopped = self._eval_and_maybe_stop()
                if self.on_step is not None:
                    self.on_step(self)
                if self.step % self.runtime.checkpoint_every == 0 and not stopped and self.step < cfg.max_steps:
                    self.save()
        if not self.result.val_history or self.result.val_history[-1][0] != self.step:
            self._eval_and_maybe_stop()
        self.result.stopped_early = stopped
        self.finish()
        return self.result
