"""Feature maps phi(x) that turn queries and keys into positive features for linear attention."""

import torch
from torch import nn

from .kernels.utils import hedgehog_features


class HedgehogFeatureMap(nn.Module):
    """Hedgehog (arXiv 2402.04347): phi(x) = [softmax(x W_h) || softmax(-x W_h)], one W_h per head.

    W starts as an identity slice, so at init the map sees the first `feature_dim` dims of each head as is.
    Computed in fp32: the softmax of bf16 logits loses too much for attention transfer to converge.
    """

    def __init__(self, heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, head_dim, feature_dim, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            h, d, f = self.weight.shape
            self.weight.copy_(torch.eye(d, f, dtype=self.weight.dtype, device=self.weight.device).expand(h, d, f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H, D] -> [..., H, 2F] (fp32). The attention layers call ops.hedgehog_map with this weight instead
        (a Triton kernel on GPU, 11x faster forward on the H100 than this PyTorch form: bench/results/kernels.md)."""
        return hedgehog_features(x, self.weight)


def softmax_features(x: torch.Tensor) -> torch.Tensor:
    """Liger's parameter-free map: softmax over the head dimension (fp32)."""
    return torch.softmax(x.float(), dim=-1)
