"""Building blocks shared by the tests' tiny synthetic models (no family's code: the shapes graphred must read)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class CausalLayer(nn.Module):
    """A causal self-attention layer with its residual add: two heads over ``dim`` features, SDPA."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        return x + self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, L, D))
