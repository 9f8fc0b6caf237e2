"""Recipes: dataclasses that map one-to-one onto the YAML files in `recipes/`, with `section.key=value` overrides.

An unknown key is an error that names the key and the nearest valid one.
"""

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .modeling.configuration_lincat import KINDS

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class RecipeError(ValueError):
    """A recipe file, name or key is wrong; the message says how to fix it."""


@dataclass
class AttentionConfig:
    kind: str = "lolcats"  # hedgehog | lolcats | liger | swa | softmax
    window: int = 64  # sliding-window tokens, the current one included
    feature_dim: int = 64  # hedgehog features per side
    gqa_shared: bool = False  # share one linear state per KV head across its query-head group
    sinks: int = 0  # swa: first tokens always attended
    window_factor_init: float = 0.1  # lolcats: initial softmax-window weight gamma
    gate_norm: float = 16.0  # liger: log alpha = logsigmoid(k) / gate_norm
    mix: float = 0.5  # liger: weight of the GLA branch
    chunk_size: int = 64  # chunk of the PyTorch chunked forms (the Triton kernels pick their own); same result
    softmax_layers: list[int] = field(default_factory=list)  # layers kept as softmax; negative counts from the end


@dataclass
class DataConfig:
    source: str = "yahma/alpaca-cleaned"  # Hub dataset name, or local .txt/.jsonl/.json/.parquet files or folders
    split: str = "train"
    text_field: str = ""  # column holding plain text; empty: auto ("text", else the Alpaca template)
    template: str = "auto"  # auto | alpaca | none
    seq_len: int = 1024
    val_sequences: int = 16  # packed sequences held out for validation
    max_sequences: int = 0  # cap on packed training sequences (0: all)
    seed: int = 0


@dataclass
class Stage1Config:
    """Attention transfer: train only the new attention parameters to match the softmax teacher (MSE)."""

    max_steps: int = 0  # 0 skips the stage
    lr: float = 1e-2
    batch_size: int = 1
    grad_accum: int = 8
    warmup_steps: int = 0
    weight_decay: float = 0.0
    eval_every: int = 50
    eval_batches: int = 8
    patience: int = 5  # evals without a new best validation loss before stopping early (0: never)


@dataclass
class Stage2Config:
    """Recovery: peft LoRA on the attention projections, next-token loss and/or distillation from the teacher."""

    max_steps: int = 0
    lr: float = 1e-4
    batch_size: int = 1
    grad_accum: int = 8
    warmup_steps: int = 0
    weight_decay: float = 0.0
    eval_every: int = 50
    eval_batches: int = 8
    patience: int = 5
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    train_attention: bool = False  # also train the feature maps / window factors
    loss: str = "ce"  # ce | kd | ce+kd
    kd_temperature: float = 2.0
    kd_weight: float = 0.5  # weight of the KD term in ce+kd


@dataclass
class RuntimeConfig:
    seed: int = 0
    mixed_precision: str = "auto"  # auto (bf16 on GPUs that have it, else fp32) | bf16 | fp16 | no
    checkpoint_every: int = 50
    log_every: int = 10
    grad_clip: float = 1.0


@dataclass
class Recipe:
    name: str = "custom"
    description: str = ""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "Recipe":
        if self.attention.kind not in KINDS:
            raise RecipeError(_unknown("attention.kind value", self.attention.kind, KINDS))
        if self.stage2.loss not in ("ce", "kd", "ce+kd"):
            raise RecipeError(f"stage2.loss must be ce, kd or ce+kd, got {self.stage2.loss!r}")
        if self.runtime.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            raise RecipeError(f"runtime.mixed_precision must be auto, bf16, fp16 or no, got {self.runtime.mixed_precision!r}")
        if self.data.seq_len < 2:
            raise RecipeError(f"data.seq_len must be at least 2, got {self.data.seq_len}")
        for s in ("stage1", "stage2"):
            cfg = getattr(self, s)
            if cfg.max_steps < 0 or cfg.batch_size < 1 or cfg.grad_accum < 1:
                raise RecipeError(f"{s}: max_steps must be >= 0, batch_size and grad_accum >= 1")
        return self


def _unknown(what: str, key: str, valid) -> str:
    near = difflib.get_close_matches(str(key), [str(v) for v in valid], n=1, cutoff=0.4)
    hint = f"; did you mean {near[0]!r}?" if near else f"; valid: {', '.join(map(str, valid))}"
    return f"unknown {what} {key!r}{hint}"


def _coerce(value, tp, key: str):
    """Check/convert a YAML or --set value to the dataclass field's type."""
    origin = typing.get_origin(tp)
    if origin is list:
        if isinstance(value, (str, int)):
            value = [value] if not isinstance(value, str) else yaml.safe_load(value) if value.startswith("[") else [value]
        if not isinstance(value, list):
            raise RecipeError(f"{key} must be a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, key) for v in value]
    if isinstance(value, str) and tp is not str:
        value = yaml.safe_load(value)
        if isinstance(value, str) and tp is float:  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise RecipeError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        return str(value)
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{prefix or 'recipe'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise RecipeError(_unknown("recipe key", full, [f"{prefix}{n}" for n in names]))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def available() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_from_dict(data: dict) -> Recipe:
    return _build(Recipe, data, "").validate()


def load_recipe(recipe: "str | Path | Recipe | dict" = "lolcats", overrides: "dict | list[str] | None" = None) -> Recipe:
    """A Recipe from a name in recipes/, a YAML path, a dict or a Recipe, with overrides applied.

    overrides: {"stage1.lr": 1e-3} or ["stage1.lr=1e-3", ...] (the CLI's --set).
    """
    if isinstance(recipe, Recipe):
        data = recipe.to_dict()
    elif isinstance(recipe, dict):
        data = dict(recipe)
    else:
        path = Path(recipe)
        if path.suffix not in (".yaml", ".yml"):
            known = available()
            if str(recipe) not in known:
                raise RecipeError(_unknown("recipe", recipe, list(known)) + " (or pass a path to a .yaml file)")
            path = known[str(recipe)]
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe file {path} is not valid YAML: {e}") from None
        data.setdefault("name", path.stem)
    for key, value in _parse_overrides(overrides).items():
        _set(data, key, value)
    return recipe_from_dict(data)


def _parse_overrides(overrides) -> dict:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return overrides
    out = {}
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set takes key=value (e.g. stage1.lr=1e-3), got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _set(data: dict, dotted: str, value):
    parts = dotted.split(".")
    cls, node, prefix = Recipe, data, ""
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise RecipeError(_unknown("recipe key", prefix + part, [prefix + n for n in names]))
        tp = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                first = dataclasses.fields(tp)[0].name
                raise RecipeError(f"{dotted} is a section; set one of its keys, e.g. {dotted}.{first}=...")
            node[part] = value
            return
        if not dataclasses.is_dataclass(tp):
            raise RecipeError(f"{prefix + part} is not a section, so {dotted} does not exist")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node, cls, prefix = node[part], tp, prefix + part + "."
