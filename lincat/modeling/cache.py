"""Constant-size generation cache for lincat layers.

A `LincatLayerCache` holds one layer's fp32 recurrent state and the ring buffer of its last W keys/values (plus
sink tokens for swa). It plugs into any transformers `Cache` container: `generate` builds a `DynamicCache` or
`StaticCache`, and each lincat attention swaps its own slot for a `LincatLayerCache` on first use, while softmax
layers keep their usual KV layers. `LincatCache` builds the same thing up front.
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache


class LincatLayerCache(CacheLayerMixin):
    """One layer's state: named tensors whose batch dim is dim 0, and `seen`, the tokens consumed so far (padding
    included: left-padded rows share token indices, which keeps ring slots common to the batch)."""

    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self):
        super().__init__()
        self.state: dict[str, torch.Tensor] = {}
        self.seen = 0

    def ensure(self, shapes: dict, device) -> dict:
        """Allocate zeros for {name: (shape, dtype)} on first use; afterwards check the batch size still matches."""
        if not self.is_initialized:
            self.state = {name: torch.zeros(shape, dtype=dtype, device=device) for name, (shape, dtype) in shapes.items()}
            self.is_initialized = True
        else:
            want = next(iter(shapes.values()))[0][0]
            have = next(iter(self.state.values())).shape[0]
            if want != have:
                raise ValueError(f"lincat cache holds batch {have} but got batch {want}: use a fresh cache per batch")
        return self.state

    @property
    def batch_size(self) -> int:
        return next(iter(self.state.values())).shape[0] if self.state else -1

    def _map(self, fn):
        self.state = {name: fn(t) for name, t in self.state.items()}

    # --- transformers Cache layer API ---
    def lazy_initialization(self, key_states, value_states):
        raise NotImplementedError("lincat layers allocate their state in LincatLayerCache.ensure")

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("a lincat layer keeps a recurrent state, not a KV cache: it cannot be updated with keys/values")

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Same as a full-attention layer, so masks built for any layer of a mixed model fit; lincat layers only
        # read the columns of the new tokens.
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

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
    """This layer's LincatLayerCache inside any Cache container, installed on first use."""
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
    layers[layer_idx] = LincatLayerCache()
    return layers[layer_idx]


class LincatCache(DynamicCache):
    """A DynamicCache whose lincat layers are LincatLayerCache from the start (softmax layers stay dynamic)."""

    def __init__(self, config, **kwargs):
        super().__init__(config=config, **kwargs)
        for spec in (config.lincat or {}).get("layers", []):
            if spec["kind"] != "softmax":
                layer_cache(self, spec["layer_idx"])


def ordered_window(state: dict, seen: int, prefix: str = "win") -> tuple[torch.Tensor, ...]:
    """The ring buffer's (keys, values, valid) oldest first. Slot of absolute token index a is a % W."""
    k = state[f"{prefix}_k"]
    order = (seen + torch.arange(k.shape[1], device=k.device)) % k.shape[1]
    return k[:, order], state[f"{prefix}_v"][:, order], state[f"{prefix}_valid"][:, order]


def store_window(state: dict, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, seen_after: int):
    """Write the last W tokens of k/v/valid ([B, T, ...], ending at absolute index seen_after - 1) into the ring."""
    w = state["win_k"].shape[1]
    t = k.shape[1]
    if t < w:  # fewer tokens than the window: the missing older slots are empty
        pad = w - t
        k = torch.cat([k.new_zeros(k.shape[0], pad, *k.shape[2:]), k], 1)
        v = torch.cat([v.new_zeros(v.shape[0], pad, *v.shape[2:]), v], 1)
        valid = torch.cat([valid.new_zeros(valid.shape[0], pad), valid], 1)
    slots = (seen_after - w + torch.arange(w, device=k.device)) % w
    state["win_k"].index_copy_(1, slots, k[:, -w:].to(state["win_k"].dtype))
    state["win_v"].index_copy_(1, slots, v[:, -w:].to(state["win_v"].dtype))
    state["win_valid"].index_copy_(1, slots, valid[:, -w:])


def update_sinks(state: dict, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, pos0: int):
    """Record the first S real tokens of each sequence. Buffers have S + 1 rows: the last one absorbs the writes of
    tokens that are not sinks, which keeps this free of host syncs."""
    n_sinks = state["sink_k"].shape[1] - 1
    rank = state["n_valid"][:, None] + valid.long().cumsum(1) - 1
    idx = torch.where(valid & (rank < n_sinks), rank, torch.full_like(rank, n_sinks))
    pos = pos0 + torch.arange(k.shape[1], device=k.device).expand_as(idx)
    state["sink_k"].scatter_(1, idx[:, :, None, None].expand_as(k), k.to(state["sink_k"].dtype))
    state["sink_v"].scatter_(1, idx[:, :, None, None].expand_as(v), v.to(state["sink_v"].dtype))
    state["sink_pos"].scatter_(1, idx, pos)
    state["sink_valid"].scatter_(1, idx, idx < n_sinks)
    state["n_valid"].add_(valid.long().sum(1))


def sinks_of(state: dict, offset: int = 0):
    """(sink_k, sink_v, sink_pos - offset, sink_valid) without the spare row."""
    return (
        state["sink_k"][:, :-1],
        state["sink_v"][:, :-1],
        state["sink_pos"][:, :-1] - offset,
        state["sink_valid"][:, :-1],
    )
