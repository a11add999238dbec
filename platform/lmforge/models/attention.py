"""Causal attention with an optional KV cache: the step gpt2 and llama share.

The models call `attend(q, k, v, cache, layer)` with q, k and v already projected (and, for
llama, rotated); with a cache, k and v are written at the cache's length and the queries
attend over everything it holds. Fewer key/value heads than query heads is grouped-query
attention. Imports no Ray, DeepSpeed or MLflow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values of every layer for a batch, pre-allocated to the context length."""

    def __init__(
        self, n_layer: int, batch: int, heads: int, length: int, head_dim: int, device, dtype
    ) -> None:
        shape = (batch, heads, length, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.length = 0  # positions filled so far; the model advances it after its last layer
        self.capacity = length


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: KVCache | None = None,
    layer: int = 0,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Causal scaled-dot-product attention of q (B, H, T, D) over k, v (B, H_kv, T, D).

    With a `cache`, the new k and v go in at `cache.length` and the queries, which sit at
    positions length..length+T-1, see every cached key up to their own.
    """
    mask, causal = None, True
    if cache is not None:
        start, T = cache.length, q.size(2)
        cache.k[layer][:, :, start : start + T] = k
        cache.v[layer][:, :, start : start + T] = v
        k = cache.k[layer][:, :, : start + T]
        v = cache.v[layer][:, :, : start + T]
        if start > 0:
            causal = False
            q_pos = torch.arange(start, start + T, device=q.device)[:, None]
            mask = torch.arange(start + T, device=q.device)[None, :] <= q_pos
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=causal and mask is None,
        dropout_p=dropout_p,
        enable_gqa=k.size(1) != q.size(1),
    )
