"""Reference of Hedgehog's feature map with GQA: phi(x) = [softmax(x W) || softmax(-x W)], one W per weight head,
weight head j reading x head j // (Hw // Hx)."""

import torch

from ..utils import expand_heads, hedgehog_features


def naive_hedgehog_map(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [B, T, Hx, D], w [Hw, D, Fh] (Hw % Hx == 0) -> [B, T, Hw, 2Fh] (fp32)."""
    return hedgehog_features(expand_heads(x, w.shape[0]), w)
