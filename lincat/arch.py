"""What a model's attention looks like, read off its structure (not its class names).

An attention module is any submodule with Linear children q_proj/k_proj/v_proj/o_proj (or a fused qkv_proj plus
o_proj) in a decoder-only causal LM whose layers receive RoPE cos/sin from the model. Heads, KV heads and head_dim
come from the projection shapes (checked against the config); q/k norms and the softmax scale from the module.
"""

from dataclasses import dataclass

from torch import nn

SUPPORTED = (
    "decoder-only causal LMs with RoPE and q_proj/k_proj/v_proj/o_proj or fused qkv_proj attention "
    "(Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, Phi-3)"
)
# Submodules we know how to carry over; anything else with parameters inside an attention module is unsupported.
KNOWN_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "q_norm", "k_norm", "rotary_emb"}
# Signatures of attention layouts we recognise but do not support, for a precise error.
OTHER_LAYOUTS = {
    "c_attn": "GPT-2-style fused Conv1D attention",
    "query_key_value": "GPT-NeoX/Falcon/Bloom-style fused query_key_value attention",
    "q_a_proj": "multi-head latent attention (MLA, DeepSeek-V2/V3)",
    "kv_a_proj_with_mqa": "multi-head latent attention (MLA, DeepSeek-V2/V3)",
    "query": "BERT-style query/key/value attention",
    "Wqkv": "fused Wqkv attention (MPT/ModernBERT)",
}


class UnsupportedModelError(ValueError):
    """The model's architecture cannot be converted; the message says why and what is supported."""


@dataclass
class AttentionInfo:
    path: str
    layer_idx: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    fused_qkv: bool
    qk_norm: bool


def _model_type(model) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def _fail(model, why: str):
    raise UnsupportedModelError(f"cannot convert model type {_model_type(model)!r}: {why}. Supported: {SUPPORTED}")


def _is_attention(mod: nn.Module) -> bool:
    ch = dict(mod.named_children())
    linear = lambda n: isinstance(ch.get(n), nn.Linear)  # noqa: E731
    return linear("o_proj") and (all(linear(n) for n in ("q_proj", "k_proj", "v_proj")) or linear("qkv_proj"))


def detect_attention(model: nn.Module) -> list[AttentionInfo]:
    """One AttentionInfo per attention layer, in layer order; UnsupportedModelError for anything else."""
    config = getattr(model, "config", None)
    if config is None:
        _fail(model, "it has no Hugging Face config")
    if getattr(config, "is_encoder_decoder", False):
        _fail(model, "it is an encoder-decoder model")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    found = [(name, mod) for name, mod in model.named_modules() if _is_attention(mod)]
    if not found:
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        layouts = sorted({desc for key, desc in OTHER_LAYOUTS.items() if key in names})
        _fail(model, f"found {' and '.join(layouts) if layouts else 'no attention with q/k/v/o projections'}")
    if getattr(text, "attn_logit_softcapping", None) or getattr(text, "final_logit_softcapping", None):
        _fail(model, "attention logit soft-capping (Gemma-2 style) has no linear-attention equivalent")
    if getattr(text, "rope_parameters", None) is None and getattr(text, "rope_theta", None) is None:
        _fail(model, "it does not use rotary position embeddings")

    infos = []
    for idx, (path, mod) in enumerate(found):
        infos.append(_inspect(model, text, path, mod, idx))
    return infos


def _inspect(model, config, path: str, mod: nn.Module, order: int) -> AttentionInfo:
    extra = [n for n, c in mod.named_children() if n not in KNOWN_CHILDREN and any(True for _ in c.parameters())]
    extra += [n for n, _ in mod.named_parameters(recurse=False)]
    if extra:
        desc = sorted({OTHER_LAYOUTS.get(n, n) for n in extra})
        _fail(model, f"attention {path} has parts lincat cannot carry over: {', '.join(desc)}")

    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(mod, "head_dim", None) or getattr(config, "head_dim", None) or config.hidden_size // heads
    fused = hasattr(mod, "qkv_proj") and not hasattr(mod, "q_proj")
    o_in = mod.o_proj.in_features
    if fused:
        total = mod.qkv_proj.out_features
        q_out, k_out = heads * head_dim, (total - heads * head_dim) // 2
    else:
        q_out, k_out = mod.q_proj.out_features, mod.k_proj.out_features
        if mod.v_proj.out_features != k_out:
            _fail(model, f"attention {path} has v_proj width {mod.v_proj.out_features} != k_proj width {k_out}")
    if q_out % head_dim or k_out % head_dim or o_in != q_out:
        _fail(model, f"attention {path} projections ({q_out}, {k_out}, o_proj in {o_in}) do not fit head_dim {head_dim}")
    n_heads, n_kv = q_out // head_dim, k_out // head_dim
    if n_heads % n_kv:
        _fail(model, f"attention {path} has {n_heads} query heads, not a multiple of {n_kv} KV heads")

    qk_norm = hasattr(mod, "q_norm") or hasattr(mod, "k_norm")
    if qk_norm:
        for n in ("q_norm", "k_norm"):
            w = getattr(getattr(mod, n, None), "weight", None)
            if w is None or w.shape[-1] != head_dim:
                _fail(model, f"attention {path}.{n} does not normalize per head (OLMo-2 style norms are unsupported)")
    return AttentionInfo(
        path=path,
        layer_idx=getattr(mod, "layer_idx", None) if getattr(mod, "layer_idx", None) is not None else order,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        scaling=float(getattr(mod, "scaling", head_dim**-0.5)),
        fused_qkv=fused,
        qk_norm=qk_norm,
    )


def rope_type(model) -> str:
    """The base model's RoPE flavour (default, llama3, yarn, ...). The base model's own rotary embedding computes
    cos/sin, so every flavour transformers implements is supported as is."""
    params = getattr(model.config, "rope_parameters", None) or {}
    return params.get("rope_type", "default") if isinstance(params, dict) else "default"
