"""Constant-size generation cache for lincat layers.

A `LincatLayerCache` holds one layer's fp32 recurrent state and the ring buffer of its last W keys/values (plus
sink tokens for swa). It plugs into any transformers `Cache` container: `generate` builds a `DynamicCache` or
`StaticCache`, and each lincat attention swaps its own slot for a `LincatLayerCache` on first use, while softmax
layers keep their usual KV layers. `LincatCache` builds the same thing up front.

Positions live on the device. Each layer's state holds `pos` ([B] int64, the tokens each row has consumed, padding
included) and `ticket` ([B] int32, scratch for the fused kernels; lolcats layers add `oticket` [B, Hkv] and
`opart` [B, H, 2D + 2]). Ring slots are computed from `pos` on the device, and every update is in place, so a
decode step has static shapes and addresses and no host syncs: it can be captured in a CUDA graph (see
`generation.py`). The Python int `seen` mirrors pos for transformers' host-side bookkeeping (`get_seq_length`, mask
sizes); eager calls keep it in step, graph replays and compiled steps do not (the graph runner sets it afterwards).

Ring layout: slot of absolute token index a is a % R, with R = W for swa/liger and R = W + 1 for lolcats. The extra
lolcats slot lets the fused decode step read the token leaving the window (into the linear state) while it writes
the new token elsewhere, with no ordering between the programs of one launch.
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # torch < 2.3
        return False


class LincatLayerCache(CacheLayerMixin):
    """One layer's state: named tensors whose batch dim is dim 0 (`pos` and `ticket` included), and `seen`, the
    tokens consumed so far as a host int (padding included: left-padded rows share token indices).

    In a static container (it replaced a `StaticLayer`, so `max_cache_len` is set) it reports static mask sizes and
    a device-side sequence length like a StaticLayer, and is compileable."""

    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, max_cache_len: int | None = None):
        super().__init__()
        self.state: dict[str, torch.Tensor] = {}
        self.seen = 0
        self.max_cache_len = max_cache_len
        if max_cache_len is not None:
            self.is_compileable = True

    @property
    def is_static(self) -> bool:
        return self.max_cache_len is not None

    def ensure(self, shapes: dict, device) -> dict:
        """Allocate zeros for {name: (shape, dtype)} (plus `pos` and `ticket`) on first use; afterwards check the
        batch size still matches."""
        if not self.is_initialized:
            b = next(iter(shapes.values()))[0][0]
            shapes = {**shapes, "pos": ((b,), torch.long), "ticket": ((b,), torch.int32)}
            self.state = {name: torch.zeros(shape, dtype=dtype, device=device) for name, (shape, dtype) in shapes.items()}
            if self.is_static and not _compiling():
                for t in self.state.values():  # fixed addresses for torch.compile's cudagraphs
                    torch._dynamo.mark_static_address(t)
            self.is_initialized = True
        else:
            want = next(iter(shapes.values()))[0][0]
            have = self.state["pos"].shape[0]
            if want != have:
                raise ValueError(f"lincat cache holds batch {have} but got batch {want}: use a fresh cache per batch")
        return self.state

    def advance(self, t: int):
        """Host-side count of the tokens consumed (the device-side `pos` is advanced by the step/chunk code)."""
        if not _compiling():
            self.seen += t

    @property
    def batch_size(self) -> int:
        return self.state["pos"].shape[0] if self.state else -1

    def _map(self, fn):
        self.state = {name: fn(t) for name, t in self.state.items()}

    # --- transformers Cache layer API ---
    def lazy_initialization(self, key_states, value_states):
        raise NotImplementedError("lincat layers allocate their state in LincatLayerCache.ensure")

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("a lincat layer keeps a recurrent state, not a KV cache: it cannot be updated with keys/values")

    def get_seq_length(self):
        if self.is_static:  # like StaticLayer: a device tensor, so compiled steps need no host count
            return self.state["pos"][0] if self.state else 0
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Same as a full-attention layer, so masks built for any layer of a mixed model fit; lincat layers only
        # read the columns of the new tokens.
        if self.is_static:
            return self.max_cache_len, 0
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return self.max_cache_len if self.is_static else -1

    def reset(self):
        for t in self.state.values():
            t.zero_()
        self.seen = 0

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        self._map(lambda t: t[indices])

    def crop(self, tokens_to_remove: int):
        raise NotImplementedError(
            "lincat caches cannot be cropped: a linear state cannot forget tokens. Start from a fresh cache instead "
            "(assisted generation, which needs cropping, is not supported)."
        )

    def offload(self):
        pass

    def prefetch(self):
        pass


def layer_cache(past_key_values: Cache | None, layer_idx: int) -> LincatLayerCache | None:
    """This layer's LincatLayerCache inside any Cache container, installed on first use (static when it replaces
    a layer with a `max_cache_len`, i.e. inside a StaticCache)."""
    if past_key_values is None:
        return None
    layers = past_key_values.layers
    while len(layers) <= layer_idx:
        layers.append(past_key_values.layer_class_to_replicate() if past_key_values.layer_class_to_replicate else None)
    layer = layers[layer_idx]
    if isinstance(layer, LincatLayerCache):
        return layer
    if layer is not None and getattr(layer, "is_initialized", False) and getattr(layer, "keys", None) is not None:
        if layer.keys.numel():
            raise ValueError(f"cache layer {layer_idx} already holds softmax keys; pass a fresh cache to a lincat model")
    layers[layer_idx] = LincatLayerCache(getattr(layer, "max_cache_len", None))
    return layers[layer_idx]


class LincatCache(DynamicCache):
    """A DynamicCache whose lincat layers are LincatLayerCache from the start (softmax layers stay dynamic)."""

    def __init__(self, config, **kwargs):
        super().__init__(config=config, **kwargs)
        for spec in (config.lincat or {}).get("layers", []):
            if spec["kind"] != "softmax":
                layer_cache(self, spec["layer_idx"])


def _rows(idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B, N] slot indices expanded to gather/scatter rows of `like` ([B, R, ...]) along dim 1."""
    return idx.view(*idx.shape, *([1] * (like.dim() - 2))).expand(*idx.shape, *like.shape[2:])


def window_slots(pos: torch.Tensor, n: int, ring: int) -> torch.Tensor:
    """[B, n] ring slots of the n tokens ending just before absolute index `pos` ([B])."""
    return (pos[:, None] - n + torch.arange(n, device=pos.device)) % ring


def ordered_window(state: dict, pos: torch.Tensor, window: int, prefix: str = "win") -> tuple[torch.Tensor, ...]:
    """The ring buffer's last `window` tokens (keys, values, valid), oldest first, for rows that have consumed
    `pos` ([B]) tokens. Slot of absolute token index a is a % R."""
    k, v, ok = state[f"{prefix}_k"], state[f"{prefix}_v"], state[f"{prefix}_valid"]
    slots = window_slots(pos, window, k.shape[1])
    return k.gather(1, _rows(slots, k)), v.gather(1, _rows(slots, v)), ok.gather(1, slots)


def store_window(state: dict, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, pos_after: torch.Tensor,
                 window: int):
    """Write the last `window` tokens of k/v/valid ([B, T, ...], ending at absolute index pos_after - 1) into the
    ring."""
    t = k.shape[1]
    w = window
    if t < w:  # fewer tokens than the window: the missing older slots are empty
        pad = w - t
        k = torch.cat([k.new_zeros(k.shape[0], pad, *k.shape[2:]), k], 1)
        v = torch.cat([v.new_zeros(v.shape[0], pad, *v.shape[2:]), v], 1)
        valid = torch.cat([valid.new_zeros(valid.shape[0], pad), valid], 1)
    k, v, valid = k[:, -w:], v[:, -w:], valid[:, -w:]
    slots = window_slots(pos_after, w, state["win_k"].shape[1])
    state["win_k"].scatter_(1, _rows(slots, k), k.to(state["win_k"].dtype))
    state["win_v"].scatter_(1, _rows(slots, v), v.to(state["win_v"].dtype))
    state["win_valid"].scatter_(1, slots, valid)


def update_sinks(state: dict, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, pos0):
    """Record the first S real tokens of each sequence. Buffers have S + 1 rows: the last one absorbs the writes of
    tokens that are not sinks, which keeps this free of host syncs. pos0: absolute index of k[:, 0], an int or a
    [B] tensor."""
    n_sinks = state["sink_k"].shape[1] - 1
    rank = state["n_valid"][:, None] + valid.long().cumsum(1) - 1
    idx = torch.where(valid & (rank < n_sinks), rank, torch.full_like(rank, n_sinks))
    steps = torch.arange(k.shape[1], device=k.device)
    pos = (pos0[:, None] + steps) if torch.is_tensor(pos0) else (pos0 + steps).expand_as(idx)
    state["sink_k"].scatter_(1, idx[:, :, None, None].expand_as(k), k.to(state["sink_k"].dtype))
    state["sink_v"].scatter_(1, idx[:, :, None, None].expand_as(v), v.to(state["sink_v"].dtype))
    state["sink_pos"].scatter_(1, idx, pos.expand_as(idx))
    state["sink_valid"].scatter_(1, idx, idx < n_sinks)
    state["n_valid"].add_(valid.long().sum(1))


def sinks_of(state: dict, offset=0):
    """(sink_k, sink_v, sink_pos - offset, sink_valid) without the spare row; offset: an int or a [B] tensor."""
    if torch.is_tensor(offset):
        offset = offset[:, None]
    return (
        state["sink_k"][:, :-1],
        state["sink_v"][:, :-1],
        state["sink_pos"][:, :-1] - offset,
        state["sink_valid"][:, :-1],
    )
