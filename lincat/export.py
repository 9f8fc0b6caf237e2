"""Export a converted model as a self-contained Hugging Face folder that loads with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` and no lincat installed.

The remote code is the `lincat/modeling` subpackage itself. transformers' remote-code loader only follows flat
`from .module import name` imports, so nested files are renamed by path (kernels/gla/chunk.py ->
kernels_gla_chunk.py) and their relative imports rewritten to match; nothing else in them changes.
"""

import ast
import json
import math
import re
import shutil
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict

from . import __version__
from .modeling.configuration_lincat import LayerSpec, LincatConfig
from .modeling.modeling_lincat import ATTENTION_CLASSES

MODELING_DIR = Path(__file__).resolve().parent / "modeling"
ENTRY_FILES = ("modeling_lincat.py", "configuration_lincat.py")
AUTO_MAP = {
    "AutoConfig": "configuration_lincat.LincatConfig",
    "AutoModel": "modeling_lincat.LincatModel",
    "AutoModelForCausalLM": "modeling_lincat.LincatForCausalLM",
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_IMPORT = re.compile(r"^(\s*)from\s+(\.+)([\w.]*)\s+import\s+(.+)$")


class ExportError(ValueError):
    """The run folder or the requested export cannot be made; the message says why."""


def flat_name(rel: Path) -> str:
    """kernels/gla/chunk.py -> kernels_gla_chunk.py (top-level files keep their names)."""
    return "_".join(rel.with_suffix("").parts) + ".py"


def _resolve(rel: Path, dots: str, module: str) -> Path:
    """The file a relative import in `rel` (a path inside modeling/) points to."""
    base = rel.parent
    for _ in range(len(dots) - 1):
        base = base.parent
    if not module:
        raise ExportError(f"{rel}: `from {dots} import ...` cannot be flattened; import from a module by name")
    target = base.joinpath(*module.split(".")).with_suffix(".py")
    if not (MODELING_DIR / target).is_file():
        raise ExportError(f"{rel}: relative import {dots}{module} is not a file of lincat/modeling (packages cannot be exported)")
    return target


def flatten_source(rel: Path) -> tuple[str, list[Path]]:
    """The file's text with relative imports rewritten to flat names, and the files it imports."""
    lines, deps = [], []
    for line in (MODELING_DIR / rel).read_text().splitlines(keepends=True):
        m = _IMPORT.match(line.rstrip("\n"))
        if m:
            indent, dots, module, names = m.groups()
            target = _resolve(rel, dots, module)
            deps.append(target)
            line = f"{indent}from .{flat_name(target)[:-3]} import {names}\n"
        lines.append(line)
    return "".join(lines), deps


def modeling_files() -> dict[str, str]:
    """{flat file name: source} for every file the exported model needs (the import closure of the entry files)."""
    out, todo = {}, [Path(f) for f in ENTRY_FILES]
    while todo:
        rel = todo.pop()
        name = flat_name(rel)
        if name in out:
            continue
        text, deps = flatten_source(rel)
        ast.parse(text)
        out[name] = text
        todo.extend(deps)
    return out


def state_bytes(spec: LayerSpec, dtype_bytes: int) -> int:
    """Per-sequence bytes of one lincat layer's decode state (fp32 recurrent state, window ring in the model dtype of
    dtype_bytes), from the shapes the cache allocates (`pos` and `ticket` aside)."""
    dtype = {2: torch.float16, 4: torch.float32, 8: torch.float64}[dtype_bytes]  # only its size matters
    shapes = ATTENTION_CLASSES[spec.kind].state_shapes_for(spec, 1, dtype)
    return sum(math.prod(shape) * dt.itemsize for shape, dt in shapes.values())


def kv_bytes(spec: LayerSpec, context: int, dtype_bytes: int) -> int:
    return 2 * spec.num_kv_heads * spec.head_dim * context * dtype_bytes


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def model_card(config: LincatConfig, run_info: dict | None, dtype: torch.dtype, repo_hint: str, eval_table: str | None,
               license_name: str | None) -> str:
    lc = config.lincat
    specs = config.layer_specs()
    kinds = sorted({s.kind for s in specs})
    recipe = (run_info or {}).get("recipe") or {}
    base = (run_info or {}).get("base_model") or config._name_or_path or "the base model"
    nbytes = torch.finfo(dtype).bits // 8
    state = sum(state_bytes(s, nbytes) if s.kind != "softmax" else 0 for s in specs)
    soft = [s for s in specs if s.kind == "softmax"]
    rows = []
    for ctx in (4096, 32768):
        kv = sum(kv_bytes(s, ctx, nbytes) for s in specs)
        ours = state + sum(kv_bytes(s, ctx, nbytes) for s in soft)
        rows.append(f"| {ctx // 1024}K | {_mib(kv)} | {_mib(ours)} | {kv / max(ours, 1):,.1f}x |")
    lines = [
        "---",
        f"license: {license_name or 'other'}",
        f"base_model: {base}",
        "library_name: transformers",
        "tags: [lincat, linear-attention, " + ", ".join(kinds) + "]",
        "---",
        "",
        f"# {Path(repo_hint).name}: {base} with linear attention",
        "",
        f"This model is [{base}]({'https://huggingface.co/' + base if not Path(str(base)).exists() else base}) with its "
        f"softmax attention replaced by **{', '.join(kinds)}** attention by [lincat](https://github.com/lincat) "
        f"{lc.get('version', __version__)}. Decoding keeps a constant-size state per sequence instead of a growing KV cache.",
        "",
        f"License: inherited from the base model ({license_name or 'see the base model card'}).",
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_hint}", trust_remote_code=True)',
        f'tok = AutoTokenizer.from_pretrained("{repo_hint}")',
        'out = model.generate(**tok("Once upon a time", return_tensors="pt"), max_new_tokens=40)',
        "print(tok.decode(out[0]))",
        "```",
        "",
        "Runs on torch + transformers alone (Triton kernels are used when triton and a GPU are present).",
        "",
        "## Recipe",
        "",
        f"Recipe `{lc.get('recipe', '?')}`; attention per layer: "
        + ", ".join(f"{i}:{s.kind}" for i, s in enumerate(specs)) + ".",
        "",
        "```yaml",
        json.dumps(recipe or lc.get("attention", {}), indent=1),
        "```",
    ]
    if run_info:
        lines += ["", f"Training tokens: {run_info.get('tokens', 0):,} "
                  f"(data: {run_info.get('data', {}).get('source', '?')}); wall time {run_info.get('wall_time_s', 0):.0f} s."]
        for name, st in (run_info.get("stages") or {}).items():
            lines.append(f"- {name}: {st.get('steps')} steps, {st.get('tokens', 0):,} tokens, best validation loss "
                         f"{st.get('best_val', float('nan')):.4g}")
    if eval_table:
        lines += ["", "## Evaluation", "", eval_table]
    lines += [
        "", "## Decode state per sequence", "",
        f"In {str(dtype).replace('torch.', '')}, against the base model's KV cache:", "",
        "| context | base KV cache | this model | smaller by |", "|---|---|---|---|", *rows, "",
    ]
    return "\n".join(lines)


def _clean_state_dict(model) -> dict:
    """Parameters under the base model's names: peft's wrappers stripped, LoRA weights left out."""
    sd = {}
    for k, v in model.state_dict().items():
        if "lora_" in k:
            continue
        k = k.replace(".base_layer.", ".")
        if k.startswith("base_model.model."):
            k = k[len("base_model.model."):]
        sd[k] = v
    return sd


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def export_model(model, tokenizer, out_dir, dtype: str | None = None, merge: bool = True, run_info: dict | None = None,
                 eval_table: str | None = None, license_name: str | None = None, max_shard_size: str = "5GB") -> Path:
    """Write the export to `out_dir`. `model` is a converted model, optionally peft-wrapped (merged unless
    merge=False, in which case the adapter goes to `out_dir/adapter`). Files appear atomically: into a temporary
    folder first; config.json, which makes the folder loadable, is moved into place last."""
    out_dir = Path(out_dir)
    base = _base_model(model)
    lincat = dict(getattr(base.config, "lincat", None) or {})
    if not lincat.get("layers"):
        raise ExportError("this model was not converted by lincat (its config has no lincat layers)")
    is_peft = hasattr(model, "peft_config")
    if is_peft and merge:
        model = model.merge_and_unload()
        base = model
    target = DTYPES[dtype] if dtype else next(p.dtype for p in base.parameters() if p.is_floating_point())
    lincat["version"] = __version__
    config = LincatConfig.from_base(base.config, lincat)
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["LincatForCausalLM"]
    config.dtype = str(target).replace("torch.", "")
    config.use_cache = True

    tmp = out_dir.with_name(f".{out_dir.name}.export-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    sd = {k: v.detach().to("cpu", target if v.is_floating_point() else v.dtype) for k, v in _clean_state_dict(model).items()}
    if getattr(base.config, "tie_word_embeddings", False):
        for tied in getattr(base, "_tied_weights_keys", None) or {}:
            sd.pop(tied, None)
    save_torch_state_dict(sd, tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
    for name, text in modeling_files().items():
        (tmp / name).write_text(text)
    if is_peft and not merge:
        model.save_pretrained(str(tmp / "adapter"))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    gen = getattr(base, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(tmp))
    (tmp / "README.md").write_text(model_card(config, run_info, target, out_dir.name, eval_table, license_name))
    config.save_pretrained(str(tmp))  # written into tmp last: a folder without it is not a model
    _publish(tmp, out_dir)
    return out_dir


def _publish(tmp: Path, out_dir: Path):
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    # Exporting into an existing folder (a run folder): retract the old config first, move files, config.json last.
    (out_dir / "config.json").unlink(missing_ok=True)
    for stale in list(out_dir.glob("model*.safetensors")) + list(out_dir.glob("model.safetensors.index.json")):
        stale.unlink()
    if (out_dir / "adapter").is_dir():
        shutil.rmtree(out_dir / "adapter")
    for item in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
        dest = out_dir / item.name
        if dest.is_dir():
            shutil.rmtree(dest)
        item.replace(dest)
    tmp.rmdir()


def register_auto_classes():
    """Make the lincat package's own classes load `model_type: lincat` folders (no remote code involved)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .modeling.modeling_lincat import LincatForCausalLM, LincatModel

    try:
        AutoConfig.register("lincat", LincatConfig)
        AutoModel.register(LincatConfig, LincatModel)
        AutoModelForCausalLM.register(LincatConfig, LincatForCausalLM)
    except ValueError:  # already registered
        pass


def load(path, dtype=None, device_map=None, backend: str | None = None, adapter: bool = True):
    """A trainable lincat model from an export folder (a second round of training, a different stage 2, eval).

    Built from the lincat package's own classes, so every lincat API (attention modes, training) applies. A folder
    exported with --no-merge comes back with its LoRA adapter attached (a peft model).
    """
    from transformers import AutoModelForCausalLM

    from .modeling.modeling_lincat import set_backend

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ExportError(f"{path} has no config.json: it is not an exported model folder")
    if json.loads(cfg_file.read_text()).get("model_type") != "lincat":
        raise ExportError(f"{path} is not a lincat export (model_type is not 'lincat'); convert it with lincat.convert")
    register_auto_classes()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto", device_map=device_map)
    set_backend(model, backend)
    if adapter and (path / "adapter" / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(path / "adapter"), is_trainable=True)
    return model


def export_run(run_dir, out_dir, dtype: str | None = None, merge: bool = True) -> Path:
    """`lincat export RUN_DIR OUT_DIR`: rebuild the run's model from its base model and trained deltas, then export."""
    from safetensors.torch import load_file

    from .convert import convert
    from .pipeline import load_base
    from .recipe import recipe_from_dict
    from .train.transfer import attention_parameters

    run_dir = Path(run_dir)
    info_file = run_dir / "lincat_run.json"
    if not info_file.exists():
        raise ExportError(f"{run_dir} has no lincat_run.json: pass the --out folder of a finished `lincat convert` run")
    if Path(out_dir).exists():
        raise ExportError(f"{out_dir} already exists: pass a new folder")
    info = json.loads(info_file.read_text())
    tokenizer, model = load_base(info["base_model"], torch.float32)
    recipe = recipe_from_dict(info["recipe"])
    convert(model, recipe)
    attn_file = run_dir / "train" / "attention.safetensors"
    if attn_file.exists():
        tensors = load_file(str(attn_file))
        params = attention_parameters(model)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[n])
    adapter_dir = run_dir / "train" / "adapter"
    if adapter_dir.exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    elif not merge:
        raise ExportError(f"--no-merge needs a LoRA adapter, but {run_dir} has no train/adapter (stage 2 did not run)")
    return export_model(model, tokenizer, out_dir, dtype=dtype, merge=merge, run_info=info,
                        eval_table=_eval_table(run_dir))


def _eval_table(run_dir: Path) -> str | None:
    f = run_dir / "eval.md"
    return f.read_text() if f.exists() else None
