"""Constant-memory generation with CUDA graphs: `graph_generate` and the `DecodeGraph` it is built on.

What works (and how):
- `graph_generate(model, input_ids, max_new_tokens, ...)`: prefill once (the chunked kernels), then every further
  token is one replay of a CUDA graph that holds the whole decode step: embeddings, every layer (one fused Triton
  launch per lincat layer on the triton backend), the LM head on the last position, greedy argmax or Gumbel-max
  sampling, the EOS bookkeeping and the write of the token into an output buffer. Positions (RoPE, ring slots) are
  device tensors advanced inside the graph; nothing is read back to the host except, every `check_every` steps, the
  "all rows finished" flag when `eos_token_id` is given. On CPU (or with `cuda_graph=False`) the same static step
  runs eagerly, which is how the tests check it against `model.generate`.
- Any mix of lincat and softmax layers: models with softmax layers get a `StaticCache` (their KV preallocated for
  prompt + max_new_tokens), pure lincat models a `LincatCache` (no KV at all). Left padding works
  (attention_mask as `generate` takes it).
- `DecodeGraph` is the reusable piece: `bench/generate.py` uses it to time replays, also for the original (softmax)
  model with a `StaticCache`.
- `model.generate(..., cache_implementation="static")` also works: lincat layers installed in a StaticCache report
  static mask sizes and a device-side length, are compileable, and read padding from the static 4D mask at their
  device position; transformers then compiles the decode step with `torch.compile` on CUDA (its own rules decide).
- Eager `model.generate` with a DynamicCache (greedy, sampling, beam search: `reorder_cache`,
  `batch_repeat_interleave`) is unchanged.

Limits: one batch per graph (the batch size and, for softmax layers, max length are baked in; a new call captures
anew: a few hundred ms); greedy or plain temperature sampling only (no top-k/top-p, no logits processors); stopping
is per row by `eos_token_id` (later tokens become `pad_token_id`), the loop itself stops only at the periodic check.
"""

import torch
from transformers import StaticCache

from .cache import LincatCache, LincatLayerCache
from .modeling_lincat import LincatAttention


def lincat_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, LincatAttention)]


def make_cache(model, batch_size: int, max_len: int):
    """A LincatCache for a model whose attention is all lincat, else a StaticCache of `max_len` for its softmax
    layers (lincat layers take their slots on first use)."""
    cfg = model.config
    n_layers = cfg.get_text_config(decoder=True).num_hidden_layers
    if len(lincat_layers(model)) == n_layers:
        return LincatCache(cfg)
    return StaticCache(config=cfg, max_cache_len=max_len)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as `generate` computes them for left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class DecodeGraph:
    """One decode step of `model` over `cache` with static buffers, captured in a CUDA graph on CUDA.

    Buffers: `tokens` [B, 1] (the step's input, then its output), `positions` [B, 1], `out` [B, max_steps] (token of
    step i in column i), `finished` [B]. Call `start(first_tokens, positions)` after the prefill, then `step()` once
    per token. `attention_mask`: a static [B, max_len] padding mask passed to every step (needed with softmax layers
    and left padding; HF builds the step's 4D mask from it with static shapes). The first `step()` runs eagerly (it warms kernels and libraries on a side stream) and captures the
    graph; later ones replay it. Works for any model whose forward takes (input_ids, position_ids,
    past_key_values, logits_to_keep) and whose step has static shapes with that cache: lincat models with a
    LincatCache or StaticCache, softmax models with a StaticCache.
    """

    def __init__(self, model, cache, batch_size: int, max_steps: int, device, cuda_graph: bool | None = None,
                 do_sample: bool = False, temperature: float = 1.0, eos_token_id: int | None = None,
                 pad_token_id: int = 0, attention_mask: torch.Tensor | None = None):
        self.model, self.cache = model, cache
        self.mask = attention_mask  # static [B, max_len] padding mask, for caches with softmax layers
        self.cuda_graph = (device.type == "cuda") if cuda_graph is None else cuda_graph
        if self.cuda_graph and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.do_sample, self.temperature = do_sample, float(temperature)
        self.eos, self.pad = eos_token_id, int(pad_token_id)
        long = dict(dtype=torch.long, device=device)
        self.tokens = torch.zeros(batch_size, 1, **long)
        self.positions = torch.zeros(batch_size, 1, **long)
        self.out = torch.full((batch_size, max_steps), self.pad, **long)
        self.finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.index = torch.zeros(1, **long)
        self.max_steps = max_steps
        self.steps = 0
        self.graph = None

    def start(self, first_tokens: torch.Tensor, positions: torch.Tensor):
        """first_tokens [B] (the prefill's pick, already the first generated token), positions [B] of those tokens."""
        self.tokens.copy_(first_tokens.view(-1, 1))
        self.positions.copy_(positions.view(-1, 1))
        self.out[:, 0] = first_tokens
        self.index.fill_(1)
        if self.eos is not None:
            self.finished.copy_(first_tokens == self.eos)
        self.steps = 1

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.do_sample:  # Gumbel-max: graph-safe sampling from softmax(logits / T)
            u = torch.rand_like(logits).clamp_(1e-20, 1.0)
            logits = logits / self.temperature - torch.log(-torch.log(u))
        return logits.argmax(-1)

    @torch.no_grad()  # decoding never needs gradients; with them, every captured step would extend an autograd graph
    def _step(self):
        logits = self.model(input_ids=self.tokens, position_ids=self.positions, attention_mask=self.mask,
                            past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        nxt = self.pick(logits)
        if self.eos is not None:
            nxt = torch.where(self.finished, torch.full_like(nxt, self.pad), nxt)
            self.finished |= nxt == self.eos
        self.out.index_copy_(1, self.index, nxt[:, None])
        self.tokens.copy_(nxt[:, None])
        self.positions.add_(1)
        self.index.add_(1)

    def capture(self):
        """Run one real step eagerly on a side stream (warm-up: Triton compiles, cuBLAS handles), then capture the
        next in a graph (capture records, it does not run)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def step(self):
        if self.steps >= self.max_steps:
            raise RuntimeError(f"DecodeGraph was sized for {self.max_steps} tokens")
        if not self.cuda_graph:
            self._step()
        elif self.graph is None:
            self.capture()  # its warm-up is this step
        else:
            self.graph.replay()
        self.steps += 1

    def all_finished(self) -> bool:
        return self.eos is not None and bool(self.finished.all())


def sync_seen(cache, seen: int):
    """Set the host-side count of every lincat layer (graph replays advance only the device-side positions)."""
    for layer in cache.layers:
        if isinstance(layer, LincatLayerCache):
            layer.seen = seen


@torch.no_grad()
def graph_generate(model, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                   cuda_graph: bool | None = None, do_sample: bool = False, temperature: float = 1.0,
                   eos_token_id: int | None = None, pad_token_id: int | None = None, check_every: int = 64,
                   return_cache: bool = False):
    """Greedy (or temperature-sampled) generation with the decode step in a CUDA graph. Returns
    [B, T + max_new_tokens] token ids like `model.generate` (rows that hit `eos_token_id` are padded with
    `pad_token_id` after it; the result is cut after the last column anyone still needs), and the cache if asked.

    cuda_graph: None = on CUDA devices; False runs the same static step eagerly (CPU, debugging).
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    device = input_ids.device
    b, t = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    cache = make_cache(model, b, t + max_new_tokens)
    pos = positions_from_mask(attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    mask = None
    if isinstance(cache, StaticCache):  # softmax layers must not see the left padding: a static mask of all slots
        mask = torch.cat([attention_mask, attention_mask.new_ones(b, max_new_tokens)], 1)
    dec = DecodeGraph(model, cache, b, max_new_tokens, device, cuda_graph, do_sample, temperature, eos_token_id, pad,
                      mask)
    dec.start(dec.pick(logits), pos[:, -1] + 1)
    while dec.steps < max_new_tokens:
        dec.step()
        if eos_token_id is not None and dec.steps % check_every == 0 and dec.all_finished():
            break
    sync_seen(cache, t + dec.steps - 1)
    out = torch.cat([input_ids, dec.out[:, :dec.steps]], 1)
    return (out, cache) if return_cache else out
