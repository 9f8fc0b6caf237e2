"""`lincat.convert`: swap a Hugging Face causal LM's softmax attention for lincat attention, in place."""

from torch import nn

from .arch import detect_attention
from .modeling.configuration_lincat import LayerSpec
from .modeling.modeling_lincat import apply_plan, lincat_modules, set_backend
from .modeling.ops import BACKENDS
from .recipe import AttentionConfig, Recipe, RecipeError, load_recipe

# Attention implementations whose masks lincat layers can read; others are switched to SDPA on conversion.
READABLE_MASKS = ("sdpa", "eager")


def plan_layers(infos, attention: AttentionConfig) -> list[LayerSpec]:
    """One LayerSpec per detected attention layer: the recipe's kind, or softmax for `softmax_layers`."""
    n = len(infos)
    keep = set()
    for i in attention.softmax_layers:
        if not -n <= i < n:
            raise RecipeError(f"attention.softmax_layers has layer {i}, but the model has {n} layers (0..{n - 1})")
        keep.add(i % n)
    specs = []
    for i, info in enumerate(infos):
        specs.append(
            LayerSpec(
                kind="softmax" if i in keep else attention.kind,
                path=info.path,
                layer_idx=info.layer_idx,
                num_heads=info.num_heads,
                num_kv_heads=info.num_kv_heads,
                head_dim=info.head_dim,
                scaling=info.scaling,
                fused_qkv=info.fused_qkv,
                qk_norm=info.qk_norm,
                window=attention.window,
                feature_dim=attention.feature_dim,
                gqa_shared=attention.gqa_shared,
                sinks=attention.sinks,
                window_factor_init=attention.window_factor_init,
                gate_norm=attention.gate_norm,
                mix=attention.mix,
                chunk_size=attention.chunk_size,
            )
        )
    return specs


def convert(model: nn.Module, recipe: "str | Recipe | dict" = "lolcats", backend: str | None = None, **overrides) -> nn.Module:
    """Replace every softmax attention of `model` with the recipe's lincat attention, in place, and return it.

    recipe: a name in recipes/ (hedgehog, lolcats, liger, swa), a YAML path, or a Recipe.
    backend: "torch", "triton" or "auto" (Triton on CUDA when installed); None reads LINCAT_BACKEND, else "auto".
    overrides: attention settings, e.g. window=32, kind="hedgehog", softmax_layers=[0, -1], gqa_shared=True.
    The original q/k/v/o projections are reused under their names, so the base state dict still loads.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if lincat_modules(model):
        raise ValueError("this model is already converted (it has lincat attention layers)")
    rec = load_recipe(recipe, {f"attention.{k}": v for k, v in overrides.items()})
    infos = detect_attention(model)
    specs = plan_layers(infos, rec.attention)
    if getattr(model.config, "_attn_implementation", "sdpa") not in READABLE_MASKS:
        model.set_attn_implementation("sdpa")
    apply_plan(model, specs, model.config)
    model.config.lincat = {
        "recipe": rec.name,
        "attention": rec.to_dict()["attention"],
        "layers": [s.to_dict() for s in specs],
    }
    set_backend(model, backend)
    return model
