"""lincat.convert on every supported architecture and every attention kind."""

import pytest
import torch
import transformers
from transformers import DynamicCache

import lincat
from lincat.arch import UnsupportedModelError
from lincat.modeling.cache import LincatCache, LincatLayerCache
from lincat.modeling.modeling_lincat import LincatAttention, set_attention_mode
from conftest import ARCHS, TINY, stories_model, tiny_model

KINDS = ["hedgehog", "lolcats", "liger", "swa"]
SMALL = dict(window=8, chunk_size=8)  # small windows so short test sequences exercise the linear state


def ids_for(model, b=2, t=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (b, t), generator=g)


def incremental_logits(model, ids, split, step=1):
    """Prefill ids[:, :split], then feed the rest `step` tokens at a time through the cache."""
    cache = DynamicCache(config=model.config)
    outs = [model(ids[:, :split], past_key_values=cache, use_cache=True).logits]
    for i in range(split, ids.shape[1], step):
        outs.append(model(ids[:, i:i + step], past_key_values=cache, use_cache=True).logits)
    return torch.cat(outs, 1)


def maxdiff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_softmax_plan_reproduces_original(arch):
    model = tiny_model(arch)
    ids = ids_for(model)
    ref = model(ids).logits
    lincat.convert(model, "lolcats", kind="softmax")
    assert not any(isinstance(m, LincatAttention) for m in model.modules())
    assert maxdiff(model(ids).logits, ref) < 1e-5


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("kind", KINDS)
def test_kinds_on_every_arch(arch, kind):
    model = tiny_model(arch)
    ids = ids_for(model)
    ref = model(ids).logits
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    lincat.convert(model, "lolcats", kind=kind, **SMALL)
    layers = [m for m in model.modules() if isinstance(m, LincatAttention)]
    assert len(layers) == model.config.num_hidden_layers

    # the original weights keep their names: the base state dict loads with only new parameters missing
    result = model.load_state_dict(base_sd, strict=False)
    assert not result.unexpected_keys
    assert all("feature_map" in k or "window_factor" in k for k in result.missing_keys)

    full = model(ids).logits
    assert torch.isfinite(full).all()
    assert maxdiff(full, ref) > 1e-3  # it really is a different attention
    assert maxdiff(incremental_logits(model, ids, 20), full) < 1e-4
    assert maxdiff(incremental_logits(model, ids, 7, step=5), full) < 1e-4  # multi-token continuation

    set_attention_mode(model, "teacher")  # the same weights through SDPA give the original model back
    assert maxdiff(model(ids).logits, ref) < 1e-5
    set_attention_mode(model, "student")


def test_arch_details_are_kept():
    qwen3 = lincat.convert(tiny_model("qwen3"), "lolcats")
    attn = qwen3.model.layers[0].self_attn
    assert attn.spec.qk_norm and attn.spec.head_dim == 16
    assert "model.layers.0.self_attn.q_norm.weight" in qwen3.state_dict()
    phi3 = lincat.convert(tiny_model("phi3"), "liger")
    assert phi3.model.layers[0].self_attn.spec.fused_qkv
    assert "model.layers.0.self_attn.qkv_proj.weight" in phi3.state_dict()


def test_per_layer_plan_and_gqa_shared_states():
    model = lincat.convert(tiny_model("llama"), "lolcats", softmax_layers=[-1], gqa_shared=True, **SMALL)
    assert isinstance(model.model.layers[0].self_attn, LincatAttention)
    assert not isinstance(model.model.layers[1].self_attn, LincatAttention)
    assert [s["kind"] for s in model.config.lincat["layers"]] == ["lolcats", "softmax"]
    ids = ids_for(model)
    full = model(ids).logits
    assert maxdiff(incremental_logits(model, ids, 11), full) < 1e-4
    cache = LincatCache(model.config)
    model(ids, past_key_values=cache, use_cache=True)
    st = cache.layers[0].state
    assert st["S"].shape[1] == TINY["num_key_value_heads"]  # one state per KV head
    unshared = lincat.convert(tiny_model("llama"), "lolcats", **SMALL)
    cache2 = LincatCache(unshared.config)
    unshared(ids, past_key_values=cache2, use_cache=True)
    assert cache2.layers[0].state["S"].shape[1] == TINY["num_attention_heads"]
    assert isinstance(cache.layers[0], LincatLayerCache) and not isinstance(cache.layers[1], LincatLayerCache)


def test_bad_layer_plan_and_backend():
    with pytest.raises(ValueError, match="softmax_layers"):
        lincat.convert(tiny_model("llama"), "lolcats", softmax_layers=[5])
    with pytest.raises(ValueError, match="backend"):
        lincat.convert(tiny_model("llama"), "lolcats", backend="cuda")
    with pytest.raises(ValueError, match="did you mean 'hedgehog'"):
        lincat.convert(tiny_model("llama"), "hedgehgo")
    model = lincat.convert(tiny_model("llama"), "lolcats")
    with pytest.raises(ValueError, match="already converted"):
        lincat.convert(model, "lolcats")


UNSUPPORTED = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)),
    "bert": lambda: transformers.BertLMHeadModel(transformers.BertConfig(
        num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=32, vocab_size=64, is_decoder=True)),
    "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        num_layers=1, d_model=32, num_heads=2, d_kv=16, d_ff=32, vocab_size=64)),
    "olmo2": lambda: transformers.AutoModelForCausalLM.from_config(transformers.Olmo2Config(**TINY)),
    "gemma2": lambda: transformers.AutoModelForCausalLM.from_config(transformers.Gemma2Config(**TINY, head_dim=16)),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_models_fail_in_one_clear_line(name):
    model = UNSUPPORTED[name]()
    with pytest.raises(UnsupportedModelError) as e:
        lincat.convert(model, "lolcats")
    msg = str(e.value)
    assert "\n" not in msg
    assert repr(model.config.model_type) in msg and "Supported:" in msg and "Qwen3" in msg


def test_mla_is_named():
    cfg = transformers.DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
                                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                       q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                       v_head_dim=8, n_routed_experts=2, num_experts_per_tok=1, first_k_dense_replace=1)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedModelError, match="latent attention"):
        lincat.convert(model, "lolcats")


# --- the real pretrained stories260K (Llama, GQA 8:4) ---

@pytest.mark.parametrize("kind", KINDS)
def test_stories260k_prefill_decode_and_padding(kind):
    model = lincat.convert(stories_model(), "lolcats", kind=kind, sinks=2 if kind == "swa" else 0, **SMALL)
    ids = ids_for(model, b=2, t=48)
    full = model(ids).logits
    assert maxdiff(incremental_logits(model, ids, 24), full) < 1e-4

    # a left-padded batch gives the same logits as each sequence alone (positions as generate computes them)
    a, b = ids[:1, :30], ids[1:, :17]
    pad = 30 - 17
    batch = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    out = model(batch, attention_mask=mask, position_ids=pos).logits
    assert maxdiff(out[0], model(a).logits[0]) < 1e-4
    assert maxdiff(out[1, pad:], model(b).logits[0]) < 1e-4

    # padded prefill then decode through a cache: pads leave no trace in any state
    cache = DynamicCache(config=model.config)
    model(batch, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    nxt = ids[:, 40:41]
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    step = model(nxt, attention_mask=mask2, position_ids=pos[:, -1:] + 1, past_key_values=cache, use_cache=True).logits
    alone = model(torch.cat([b, nxt[1:]], 1)).logits[0, -1]
    assert maxdiff(step[1, 0], alone) < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_generate_modes(kind):
    model = lincat.convert(stories_model(), "lolcats", kind=kind, **SMALL)
    ids = ids_for(model, b=2, t=12)
    b = ids[1:, :5]
    batch = torch.cat([ids[:1], torch.cat([torch.zeros(1, 7, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :7] = 0
    greedy = model.generate(batch, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    alone = model.generate(b, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(greedy[1, 12:], alone[0, 5:])  # batched left-padded == single

    # greedy generate == argmax of repeated full forwards
    seq = b
    for _ in range(6):
        seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(alone[0, :11], seq[0])

    torch.manual_seed(0)
    sampled = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)
    assert sampled.shape == (2, 20)
    beams = model.generate(b, max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    assert beams.shape == (2, 13)
    # the best beam scores at least as well as greedy under the model
    def logprob(seq):
        lp = model(seq).logits.log_softmax(-1)[:, 4:-1]
        return lp.gather(-1, seq[:, 5:, None]).sum().item()
    assert logprob(beams[:1]) >= logprob(alone[:, :13]) - 1e-4
