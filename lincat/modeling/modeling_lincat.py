"""lincat attention: linear-attention replacements for the softmax attention of a Hugging Face causal LM.

Each `LincatAttention` reuses the original module's q/k/v/o projections (and q/k norms) under the same names, so a
base checkpoint still loads. Kinds:
- `hedgehog`: normalized linear attention over learned feature maps phi(x) = [softmax(xW) || softmax(-xW)].
- `lolcats`: hedgehog plus softmax over the last `window` tokens, one shared normalizer, learned mix gamma per head.
- `liger`: gated linear attention (gates from the key projection, no new weights) averaged with sliding-window
  softmax attention.
- `swa`: sliding-window softmax attention with optional sink tokens (the baseline).
Layers planned as `softmax` keep the original module untouched.

A module runs in one of three modes: "student" (the linear attention), "teacher" (the original softmax attention of
the same weights, through SDPA) and "transfer" (returns the teacher's output and records the student's MSE to it,
so all layers of stage 1 train in one teacher-forced pass).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .cache import layer_cache, ordered_window, sinks_of, store_window, update_sinks
from .configuration_lincat import LayerSpec, LincatConfig
from .feature_maps import HedgehogFeatureMap, softmax_features
from .ops import (gla, hedgehog_map, hedgehog_step, liger_step, linear_attn, lolcats_step, preload_steps, swa,
                  swa_step, window_linear_attn)

MODES = ("student", "teacher", "transfer")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on [B, T, H, D] with cos/sin [B, T, R] from the base model's rotary embedding (any scaling type).
    R < D means partial rotary (Phi-3 style): the trailing D - R dims pass through."""
    r = cos.shape[-1]
    cos, sin = cos[:, :, None], sin[:, :, None]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    out = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out


def token_validity(attention_mask, t: int, cache=None) -> torch.Tensor | None:
    """[B, t] bool, False for padding among the t new tokens, read off whatever mask the model built.

    A 4D mask's diagonal says whether each new token may see itself, i.e. whether it is a real token; the diagonal
    (not the last row) stays right under a base model's own sliding-window masks. Under a static cache the mask's
    columns are cache slots: the new tokens' columns are the layer's device-side positions (no host sync).
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"lincat layers cannot read a {type(attention_mask).__name__} attention mask: load the model with "
            "attn_implementation='sdpa' or 'eager'"
        )
    if attention_mask.dim() == 2:
        return attention_mask[:, -t:].bool()
    if attention_mask.dim() == 4:
        if cache is not None and cache.is_static and attention_mask.shape[-1] == cache.max_cache_len:
            rows = attention_mask[:, 0, -t:, :]
            pos = cache.state["pos"] if cache.state else torch.zeros(rows.shape[0], dtype=torch.long,
                                                                         device=rows.device)
            cols = pos[:, None] + torch.arange(t, device=rows.device)
            diag = rows.expand(pos.shape[0], -1, -1).gather(2, cols[:, :, None])[..., 0]
        else:
            diag = attention_mask[:, 0, -t:, -t:].diagonal(dim1=-2, dim2=-1)
        return diag if diag.dtype == torch.bool else diag == 0
    raise ValueError(f"unexpected attention mask of shape {tuple(attention_mask.shape)}")


class LincatAttention(nn.Module):
    """Projections, RoPE, teacher mode and cache plumbing shared by every kind; subclasses implement `attend`."""

    def __init__(self, spec: LayerSpec, source: nn.Module, config):
        super().__init__()
        self.spec = spec
        self.config = config
        self.layer_idx = spec.layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.num_key_value_groups = spec.num_heads // spec.num_kv_heads  # read by transformers' SDPA in teacher mode
        self.scaling = spec.scaling
        self.is_causal = True
        self.attention_dropout = 0.0
        if spec.fused_qkv:
            self.qkv_proj = source.qkv_proj
        else:
            self.q_proj, self.k_proj, self.v_proj = source.q_proj, source.k_proj, source.v_proj
        self.o_proj = source.o_proj
        if spec.qk_norm:
            self.q_norm, self.k_norm = source.q_norm, source.k_norm
        self.mode = "student"
        self.backend = None  # None: LINCAT_BACKEND or "auto"
        self.transfer_loss = None

    @property
    def _device(self):
        return self.o_proj.weight.device

    def project(self, x: torch.Tensor):
        b, t, _ = x.shape
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.spec.fused_qkv:
            q, k, v = self.qkv_proj(x).split([h * d, hkv * d, hkv * d], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = q.view(b, t, h, d), k.view(b, t, hkv, d), v.view(b, t, hkv, d)
        if self.spec.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def softmax_attention(self, q, k, v, attention_mask):
        """The original attention of these weights, through transformers' SDPA path (no T x T scores in memory
        unless the model's own mask already is one)."""
        t = q.shape[1]
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = attention_mask[..., -t:]
        elif attention_mask is not None:  # a 2D padding mask (flash-attention models): make it a causal 4D mask
            causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
            attention_mask = causal[None, None] & attention_mask[:, None, None, -t:].bool()
        out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](
            self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
            dropout=0.0, scaling=self.scaling,
        )
        return out  # [B, T, H, D]

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        b, t, _ = hidden_states.shape
        q, k, v = self.project(hidden_states)
        cos, sin = position_embeddings
        qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.mode == "student":
            cache = layer_cache(past_key_values, self.layer_idx)
            valid = token_validity(attention_mask, t, cache)
            o = self.attend(q, k, v, qr, kr, valid, cache)
        else:
            if past_key_values is not None and past_key_values.get_seq_length(self.layer_idx) > 0:
                raise ValueError("teacher/transfer mode runs whole sequences: call it without a filled cache")
            o = self.softmax_attention(qr, kr, v, attention_mask)
            if self.mode == "transfer":
                valid = token_validity(attention_mask, t)
                student = self.attend(q, k, v, qr, kr, valid, None)
                self.transfer_loss = masked_mse(student, o, valid)
        return self.o_proj(o.reshape(b, t, -1).to(hidden_states.dtype)), None

    def attend(self, q, k, v, qr, kr, valid, cache):
        """q/k/v before RoPE and qr/kr after, all [B, T, heads, D]; valid [B, T] or None -> o [B, T, H, D].

        With a cache, T == 1 is a decode step: one fused op (ops.*_step) updates the state, the ring and `pos` in
        place, with no host sync, so it can run inside a CUDA graph. T > 1 runs the chunked form from the state.
        """
        raise NotImplementedError

    @classmethod
    def state_shapes_for(cls, spec, b: int, dtype) -> dict:
        """{name: (shape, dtype)} of a layer's decode state for b sequences (the cache adds `pos` and `ticket`);
        a function of the spec alone, so the export can size it without building a layer."""
        raise NotImplementedError

    def state_shapes(self, b: int, dtype) -> dict:
        return self.state_shapes_for(self.spec, b, dtype)

    def _q_features(self, qr: torch.Tensor) -> torch.Tensor:
        return hedgehog_map(qr, self.feature_map_q.weight, backend=self.backend)

    def _k_features(self, kr: torch.Tensor) -> torch.Tensor:
        """Keys map per state head: per KV head when the state is shared, else one per query head (hedgehog_map
        reads each KV head for its group of weight heads)."""
        return hedgehog_map(kr, self.feature_map_k.weight, backend=self.backend)

    @staticmethod
    def _window_shapes(spec, b, dtype, ring=None):
        """The ring buffer: `ring` slots (default: the window) for the last W keys/values."""
        r, hkv, d = ring or spec.window, spec.num_kv_heads, spec.head_dim
        return {
            "win_k": ((b, r, hkv, d), dtype),
            "win_v": ((b, r, hkv, d), dtype),
            "win_valid": ((b, r), torch.bool),
        }

    def _begin_chunk(self, cache):
        """Eager-only bookkeeping before a multi-token call: load the fused step kernels for the decode to come."""
        preload_steps(self.backend, self._device)

    def _extend(self, cache, state, q, k, v, valid, *qlike):
        """Prepend the ring buffer (oldest first) to k/v/valid and zeros to the query-like tensors, so a chunked op
        sees the tokens still inside the window. Returns (prefix_len, k, v, valid, *qlike)."""
        b, t = k.shape[:2]
        valid = torch.ones(b, t, dtype=torch.bool, device=k.device) if valid is None else valid
        if cache.seen == 0:
            return (0, k, v, valid, q, *qlike)
        wk, wv, wok = ordered_window(state, state["pos"], self.spec.window)
        w = wk.shape[1]
        pad = lambda x: torch.cat([x.new_zeros(b, w, *x.shape[2:]), x], 1)  # noqa: E731
        return (w, torch.cat([wk.to(k.dtype), k], 1), torch.cat([wv.to(v.dtype), v], 1), torch.cat([wok, valid], 1),
                pad(q), *(pad(x) for x in qlike))


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    err = (student.float() - teacher.float().detach()).pow(2).mean(dim=(-2, -1))  # [B, T]
    if valid is None:
        return err.mean()
    w = valid.float()
    return (err * w).sum() / w.sum().clamp_min(1.0)


class HedgehogAttention(LincatAttention):
    def __init__(self, spec, source, config):
        super().__init__(spec, source, config)
        dev = self._device
        with torch.device(dev):
            self.feature_map_q = HedgehogFeatureMap(spec.num_heads, spec.head_dim, spec.feature_dim)
            self.feature_map_k = HedgehogFeatureMap(spec.state_heads, spec.head_dim, spec.feature_dim)

    @classmethod
    def state_shapes_for(cls, spec, b, dtype):
        hs, f, d = spec.state_heads, 2 * spec.feature_dim, spec.head_dim
        return {"S": ((b, hs, f, d), torch.float32), "z": ((b, hs, f), torch.float32)}

    def attend(self, q, k, v, qr, kr, valid, cache):
        cs, be = self.spec.chunk_size, self.backend
        t = q.shape[1]
        if cache is not None and t == 1:
            st = cache.ensure(self.state_shapes(q.shape[0], v.dtype), v.device)
            o = hedgehog_step(qr[:, 0], kr[:, 0], v[:, 0], self.feature_map_q.weight, self.feature_map_k.weight, st,
                              None if valid is None else valid[:, 0], backend=be)[:, None]
            cache.advance(1)
            return o
        qf, kf = self._q_features(qr), self._k_features(kr)
        if cache is None:
            return linear_attn(qf, kf, v, valid, chunk_size=cs, backend=be)[0]
        st = cache.ensure(self.state_shapes(q.shape[0], v.dtype), v.device)
        self._begin_chunk(cache)
        o, (s, z) = linear_attn(qf, kf, v, valid, (st["S"], st["z"]), True, cs, backend=be)
        st["S"].copy_(s)
        st["z"].copy_(z)
        st["pos"].add_(t)
        cache.advance(t)
        return o


class LolcatsAttention(HedgehogAttention):
    def __init__(self, spec, source, config):
        super().__init__(spec, source, config)
        self.window_factor = nn.Parameter(torch.empty(spec.num_heads, device=self._device, dtype=torch.float32))
        self.reset_window_factor()

    def reset_window_factor(self):
        p = self.spec.window_factor_init
        with torch.no_grad():
            self.window_factor.fill_(math.log(p / (1 - p)))

    @classmethod
    def state_shapes_for(cls, spec, b, dtype):
        # one ring slot more than the window: the decode step reads the token leaving the window from one slot while
        # it writes the new token to another (see cache.py); oticket / opart: the fused step's per-KV-head counter
        # (zero between steps) and scratch for the window and linear partial sums (window_linear_attn/
        # fused_recurrent.py), kept here so that a step allocates nothing
        return {**super().state_shapes_for(spec, b, dtype), **cls._window_shapes(spec, b, dtype, spec.window + 1),
                "oticket": ((b, spec.num_kv_heads), torch.int32),
                "opart": ((b, spec.num_heads, 2 * spec.head_dim + 2), torch.float32)}

    def attend(self, q, k, v, qr, kr, valid, cache):
        spec, be = self.spec, self.backend
        gamma = torch.sigmoid(self.window_factor)
        t = q.shape[1]
        if cache is not None and t == 1:
            st = cache.ensure(self.state_shapes(q.shape[0], v.dtype), v.device)
            o = lolcats_step(qr[:, 0], kr[:, 0], v[:, 0], self.feature_map_q.weight, self.feature_map_k.weight, gamma,
                             self.scaling, spec.window, st, None if valid is None else valid[:, 0], backend=be)
            cache.advance(1)
            return o[:, None]
        qf = self._q_features(qr)
        if cache is None:
            return window_linear_attn(qr, kr, v, qf, self._k_features(kr), gamma, spec.window, self.scaling, valid,
                                      chunk_size=spec.chunk_size, backend=be)[0]
        st = cache.ensure(self.state_shapes(q.shape[0], v.dtype), v.device)
        self._begin_chunk(cache)
        n, k_x, v_x, ok_x, q_x, qf_x = self._extend(cache, st, qr, kr, v, valid, qf)
        o, (s, z) = window_linear_attn(q_x, k_x, v_x, qf_x, self._k_features(k_x), gamma, spec.window, self.scaling,
                                       ok_x, (st["S"], st["z"]), True, spec.chunk_size, backend=be)
        o = o[:, n:]
        st["S"].copy_(s)
        st["z"].copy_(z)
        store_window(st, k_x, v_x, ok_x, st["pos"] + t, spec.window)
        st["pos"].add_(t)
        cache.advance(t)
        return o


class LigerAttention(LincatAttention):
    """Liger Attention (arXiv 2503.01496): mix * GLA + (1 - mix) * sliding-window softmax. The GLA branch uses
    softmax-over-head-dim features of the pre-RoPE q/k and gates log alpha = logsigmoid(k) / gate_norm."""

    @classmethod
    def state_shapes_for(cls, spec, b, dtype):
        hs, d = spec.state_heads, spec.head_dim
        return {"S": ((b, hs, d, d), torch.float32), **cls._window_shapes(spec, b, dtype)}

    def attend(self, q, k, v, qr, kr, valid, cache):
        spec, be = self.spec, self.backend
        t = q.shape[1]
        if cache is not None and t == 1:
            st = cache.ensure(self.state_shapes(q.shape[0], v.dtype), v.device)
            o = liger_step(q[:, 0], k[:, 0], qr[:, 0], kr[:, 0], v[:, 0], spec.gate_norm, spec.mix, self.scaling, st,
                           None if valid is None else valid[:, 0], backend=be)
            cache.advance(1)
            return o[:, None]
        qf, kf = softmax_features(q), softmax_features(k)
        g = F.logsigmoid(k.float()) / spec.gate_norm
        if cache is None:
            o_gla = gla(qf, kf, v, g, valid, backend=be)[0]
            o_swa = swa(qr, kr, v, spec.window, self.scaling, valid, chunk_size=spec.chunk_size, backend=be)
        else:
            st = cache.ensure(self.state_shapes(q.shape[0], v.dtype), v.device)
            self._begin_chunk(cache)
            o_gla, s = gla(qf, kf, v, g, valid, st["S"], True, backend=be)
            st["S"].copy_(s)
            n, k_x, v_x, ok_x, q_x = self._extend(cache, st, qr, kr, v, valid)
            o_swa = swa(q_x, k_x, v_x, spec.window, self.scaling, ok_x, chunk_size=spec.chunk_size,
                        backend=be)[:, n:]
            store_window(st, k_x, v_x, ok_x, st["pos"] + t, spec.window)
            st["pos"].add_(t)
            cache.advance(t)
        return (spec.mix * o_gla.float() + (1 - spec.mix) * o_swa.float()).to(v.dtype)


class SlidingWindowAttention(LincatAttention):
    """Softmax over the last `window` tokens, plus the first `sinks` real tokens (StreamingLLM-style sinks)."""

    @classmethod
    def state_shapes_for(cls, spec, b, dtype):
        shapes = cls._window_shapes(spec, b, dtype)
        s, hkv, d = spec.sinks, spec.num_kv_heads, spec.head_dim
        if s:
            shapes.update({
                "sink_k": ((b, s + 1, hkv, d), dtype),
                "sink_v": ((b, s + 1, hkv, d), dtype),
                "sink_pos": ((b, s + 1), torch.long),
                "sink_valid": ((b, s + 1), torch.bool),
                "n_valid": ((b,), torch.long),
            })
        return shapes

    def attend(self, q, k, v, qr, kr, valid, cache):
        spec, be = self.spec, self.backend
        b, t = q.shape[:2]
        ok = torch.ones(b, t, dtype=torch.bool, device=q.device) if valid is None else valid
        if cache is None:
            sinks = None
            if spec.sinks:
                st = {n: torch.zeros(s, dtype=dt, device=q.device) for n, (s, dt) in self.state_shapes(b, v.dtype).items()}
                update_sinks(st, kr, v, ok, 0)
                sinks = sinks_of(st)
            return swa(qr, kr, v, spec.window, self.scaling, valid, sinks, spec.chunk_size, backend=be)
        st = cache.ensure(self.state_shapes(b, v.dtype), v.device)
        if t == 1:  # the step records sinks itself
            o = swa_step(qr[:, 0], kr[:, 0], v[:, 0], self.scaling, spec.window, st,
                         None if valid is None else valid[:, 0], backend=be)[:, None]
            cache.advance(1)
            return o
        self._begin_chunk(cache)
        pos = st["pos"]
        if spec.sinks:
            update_sinks(st, kr, v, ok, pos)
        n, k_x, v_x, ok_x, q_x = self._extend(cache, st, qr, kr, v, valid)
        sinks = sinks_of(st, offset=pos - n) if spec.sinks else None
        o = swa(q_x, k_x, v_x, spec.window, self.scaling, ok_x, sinks, spec.chunk_size, backend=be)[:, n:]
        store_window(st, k_x, v_x, ok_x, pos + t, spec.window)
        pos.add_(t)
        cache.advance(t)
        return o


ATTENTION_CLASSES = {
    "hedgehog": HedgehogAttention,
    "lolcats": LolcatsAttention,
    "liger": LigerAttention,
    "swa": SlidingWindowAttention,
}


def _parent(model: nn.Module, path: str):
    *parents, name = path.split(".")
    mod = model
    for p in parents:
        mod = getattr(mod, p)
    return mod, name


def apply_plan(model: nn.Module, specs: list[LayerSpec], config) -> nn.Module:
    """Swap each planned attention module of `model` (in place) for its lincat version; softmax layers stay."""
    for spec in specs:
        if spec.kind == "softmax":
            continue
        parent, name = _parent(model, spec.path)
        source = getattr(parent, name)
        if isinstance(source, LincatAttention):
            raise ValueError(f"{spec.path} is already a lincat attention")
        setattr(parent, name, ATTENTION_CLASSES[spec.kind](spec, source, config))
    return model


def lincat_modules(model: nn.Module) -> list[LincatAttention]:
    return [m for m in model.modules() if isinstance(m, LincatAttention)]


def set_attention_mode(model: nn.Module, mode: str) -> None:
    """"student" (linear attention), "teacher" (the original softmax attention) or "transfer" (see module doc)."""
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}: use one of {', '.join(MODES)}")
    for m in lincat_modules(model):
        m.mode = mode
        m.transfer_loss = None


def set_backend(model: nn.Module, backend: str | None) -> None:
    for m in lincat_modules(model):
        m.backend = backend


class LincatPreTrainedModel(PreTrainedModel):
    config_class = LincatConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = []
    _skip_keys_device_placement = ["past_key_values"]

    def _init_weights(self, module):
        if isinstance(module, HedgehogFeatureMap):
            module.reset_parameters()
        elif isinstance(module, LolcatsAttention):
            module.reset_window_factor()


def _build_base(config: LincatConfig):
    """The base causal LM of `config`, with its attention swapped per the plan."""
    base_config = config.base_config()
    model = MODEL_FOR_CAUSAL_LM_MAPPING[type(base_config)](base_config)
    return apply_plan(model, config.layer_specs(), base_config)


def _adopt(wrapper: nn.Module, module: nn.Module):
    """Make `wrapper` look like `module` to `module`'s own forward: same children (hence the same parameter names)
    and the same plain attributes (vocab_size, padding_idx, ...)."""
    for name, child in module.named_children():
        wrapper.add_module(name, child)
    for key, value in vars(module).items():
        if not key.startswith("_") and key not in ("config", "training") and not isinstance(value, nn.Module):
            setattr(wrapper, key, value)
    for key in ("_tied_weights_keys", "_no_split_modules", "_can_record_outputs"):
        if getattr(module, key, None) is not None:
            setattr(wrapper, key, getattr(module, key))
    wrapper._base_forward = type(module).forward


class LincatModel(LincatPreTrainedModel):
    """The decoder stack alone (AutoModel): the base model's inner model with lincat attention."""

    def __init__(self, config: LincatConfig):
        super().__init__(config)
        _adopt(self, _build_base(config).get_decoder())
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        return self._base_forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                  **kwargs)


class LincatForCausalLM(LincatPreTrainedModel, GenerationMixin):
    """The base causal LM (built from the base config) with its attention swapped per `config.lincat`.

    Its children are the base model's own (`model`, `lm_head`), so parameter names match the base checkpoint, and
    `forward` is the base class's.
    """

    def __init__(self, config: LincatConfig):
        super().__init__(config)
        _adopt(self, _build_base(config))
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        return self._base_forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                                  use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)


__all__ = ["LincatForCausalLM", "LincatModel", "LincatPreTrainedModel", "LincatAttention", "apply_plan", "set_attention_mode"]
