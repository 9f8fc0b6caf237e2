"""Prefill and decode throughput and memory on whatever device the model is on."""

import time

import torch
from transformers import DynamicCache


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(cache) -> int:
    """Bytes held by a cache's tensors (KV for softmax layers, states and ring buffers for lincat layers)."""
    total = 0
    for layer in cache.layers:
        tensors = list(getattr(layer, "state", {}).values())
        tensors += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if torch.is_tensor(t)]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


@torch.no_grad()
def measure_speed(model, lengths, batch: int = 1, decode_tokens: int = 32, vocab: int | None = None) -> list[dict]:
    device = next(model.parameters()).device
    vocab = vocab or model.config.vocab_size
    rows = []
    for length in lengths:
        ids = torch.randint(3, vocab, (batch, length), device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        cache = DynamicCache(config=model.config)
        _sync(device)
        t0 = time.perf_counter()
        out = model(ids, past_key_values=cache, use_cache=True)
        _sync(device)
        t1 = time.perf_counter()
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(decode_tokens):
            nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        _sync(device)
        t2 = time.perf_counter()
        rows.append({
            "length": int(length), "batch": batch,
            "prefill_tok_s": batch * length / (t1 - t0),
            "decode_tok_s": batch * decode_tokens / (t2 - t1),
            "cache_mib": cache_bytes(cache) / 2**20,
            "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        })
    return rows
