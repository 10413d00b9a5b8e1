"""Building blocks shared by the tests' tiny synthetic models (no family's code: the shapes graphred must read)."""
from __future__ import annotations

import torch
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


class ImageTextDecoder(nn.Module):
    """Token embeddings with projected image features scattered in at the placeholder id, ``n_layers`` layers made
    by ``make_layer()``, a vocabulary head."""

    def __init__(self, vocab: int, dim: int, image_id: int, make_layer, n_layers: int = 2, feature_dim: int = 12):
        super().__init__()
        self.image_id = image_id
        self.embed, self.vis, self.head = nn.Embedding(vocab, dim), nn.Linear(feature_dim, dim), nn.Linear(dim, vocab)
        self.layers = nn.ModuleList([make_layer() for _ in range(n_layers)])

    def forward(self, input_ids, pixel_values):
        x = self.embed(input_ids)
        x = x.masked_scatter((input_ids == self.image_id).unsqueeze(-1).expand_as(x), self.vis(pixel_values))
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def image_text_inputs(vocab: int, image_id: int, n_image: int, feature_dim: int = 12) -> dict:
    """Two seeded prompts of 10 ids with ``n_image`` image placeholders at positions 2.., and their features."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab - 2, (2, 10), generator=g)
    ids[:, 2:2 + n_image] = image_id
    return {"input_ids": ids, "pixel_values": torch.randn(2, n_image, feature_dim, generator=g)}
