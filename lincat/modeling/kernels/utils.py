"""Shape helpers shared by the PyTorch forms of every op.

Layout everywhere is [B, T, H, D] (fla's convention): it is what the projections give after a `view`,
so no transpose is needed before or after an op.

GQA without copies: q has H heads, the linear state has Hk heads and v has Hv heads, with H % Hk == 0
and Hk % Hv == 0. Query head h reads state head h // (H // Hk); state head j reads v head j // (Hk // Hv).
"""

import torch

# Denominators are clamped to this so that rows with no visible key (left padding) give 0, not NaN.
# All forms (parallel, chunked, recurrent, Triton) use the same value so they agree bit for bit in spirit.
DEN_EPS = 1e-30


def hedgehog_features(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Hedgehog's map, as HedgehogFeatureMap (fp32): x [..., Hw, D] (one head per weight head), w [Hw, D, Fh] ->
    [..., Hw, 2Fh]."""
    z = torch.einsum("...hd,hdf->...hf", x.float(), w.float())
    return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with den [...] broadcast over num's last dim when num has one more dim; rows whose denominator is
    below DEN_EPS (a query that sees no key: padding) give 0 with zero gradient instead of huge values."""
    if num.dim() == den.dim() + 1:
        den = den[..., None]
    ok = den > DEN_EPS
    return num * torch.where(ok, 1.0 / den.clamp_min(DEN_EPS), torch.zeros_like(den))


def group_queries(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, H, F] -> [B, T, heads, H // heads, F]: query heads grouped by the state head they read."""
    b, t, h, f = x.shape
    return x.reshape(b, t, heads, h // heads, f)


def expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, h, D] -> [B, T, heads, D] by repeating each head (heads % h == 0)."""
    h = x.shape[2]
    if h == heads:
        return x
    return x.repeat_interleave(heads // h, dim=2)


def masked_keys(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Zero the entries of padding tokens ([B, T, H, F] with valid [B, T]) so they add nothing to a state."""
    if valid is None:
        return x
    return x * valid[:, :, None, None].to(x.dtype)


def window_mask(tq: int, tk: int, window: int, offset: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks for queries at positions offset + [0, tq) against keys at [0, tk).

    Returns (in_window, older): key j is in query i's window when i - window < j <= i, and is older
    than the window when j <= i - window.
    """
    i = torch.arange(tq, device=device)[:, None] + offset
    j = torch.arange(tk, device=device)[None, :]
    in_window = (j <= i) & (j > i - window)
    older = j <= i - window
    return in_window, older


def pad_time(x: torch.Tensor, multiple: int, front: int = 0) -> torch.Tensor:
    """Zero-pad dim 1 so that front + T + back is a multiple of `multiple` (front zeros come first)."""
    t = x.shape[1]
    back = (-(front + t)) % multiple
    if front == 0 and back == 0:
        return x
    shape = list(x.shape)
    pads = []
    if front:
        shape[1] = front
        pads.append(x.new_zeros(shape))
    pads.append(x)
    if back:
        shape[1] = back
        pads.append(x.new_zeros(shape))
    return torch.cat(pads, dim=1)


def bands(x: torch.Tensor, chunk: int, prev: int) -> torch.Tensor:
    """[B, T', ...] with T' = (prev + N) * chunk -> [B, N, (prev + 1) * chunk, ...]: for each chunk, itself and the
    `prev` chunks before it (the keys a chunk of queries can see through its sliding window)."""
    span = (prev + 1) * chunk
    out = x.unfold(1, span, chunk)  # [B, N, ..., span]
    return out.movedim(-1, 2)


def valid_or_ones(valid: torch.Tensor | None, b: int, t: int, device) -> torch.Tensor:
    return torch.ones(b, t, dtype=torch.bool, device=device) if valid is None else valid


def safe_softmax_weights(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(s - max) and its row sum, for score rows that may be entirely -inf (padding): those give 0, not NaN."""
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    return e, e.sum(-1, keepdim=True)


def shift_chunks(x: torch.Tensor, back: int) -> torch.Tensor:
    """[B, N, ...] -> the same with chunk n holding chunk n - back (zeros before the first)."""
    if back == 0:
        return x
    n = x.shape[1]
    zeros = x.new_zeros(x.shape[0], min(back, n), *x.shape[2:])
    return torch.cat([zeros, x[:, : max(n - back, 0)]], dim=1)


def varlen_to_batch(cu_seqlens: torch.Tensor, *xs):
    """Packed sequences ([1, total, ...] tensors with boundaries cu_seqlens [N + 1]) -> [N, Tmax, ...] rows, each
    sequence right-aligned after left padding. Left padding keeps every op exact, final states included: padding
    tokens contribute nothing and all come before the real ones. Returns (valid [N, Tmax], idx [N, Tmax], tensors);
    idx maps each row position to its packed token (padding points at token 0 and is masked by valid)."""
    cu = cu_seqlens.to(torch.long)
    lens = cu[1:] - cu[:-1]
    tmax = int(lens.max()) if lens.numel() else 0  # one host sync
    pos = torch.arange(tmax, device=cu.device)
    start = tmax - lens
    valid = pos[None, :] >= start[:, None]
    idx = torch.where(valid, cu[:-1, None] + pos[None, :] - start[:, None], torch.zeros_like(pos)[None, :])
    return valid, idx, [None if x is None else x[0][idx] for x in xs]


def batch_to_varlen(y: torch.Tensor, valid: torch.Tensor, idx: torch.Tensor, total: int) -> torch.Tensor:
    """Inverse of varlen_to_batch for an output [N, Tmax, ...] -> [1, total, ...]."""
    out = y.new_zeros(total, *y.shape[2:])
    return out.index_put((idx[valid],), y[valid])[None]


def varlen_valid(valid: torch.Tensor | None, rows_valid: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The batched rows' mask: real tokens that are also valid in the packed [1, total] mask, if one was given."""
    return rows_valid if valid is None else rows_valid & valid[0][idx]
