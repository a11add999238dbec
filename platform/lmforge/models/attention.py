"""Causal attention with an optional KV cache: the step gpt2 and llama share.

The models call `attend(q, k, v, cache, layer)` with q, k and v already projected (and, for
llama, rotated); with a cache, k and v are written at the cache's length and the queries
attend over everything it holds. Fewer key/value heads than query heads is grouped-query
attention. Imports no Ray, DeepSpeed or MLflow.

Packing without cross-talk: `segments` (B, T) ids say which example each token of a packed
window belongs to; a new example starts wherever the id changes (ids are meant to be
non-decreasing; equal ids that are not adjacent are two examples). `segment_layout` turns
them into the positions (restarting at 0 at each example's first token) and the
block-diagonal causal mask that `attend` passes to SDPA instead of its `is_causal` path.
On CPU (torch 2.13) SDPA still runs its flash kernel with that boolean mask (the profiler
names `_scaled_dot_product_flash_attention_for_cpu` both ways); on CUDA a mask rules out
the flash kernel and SDPA takes the memory-efficient one (not measured here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.errors import UsageError


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


def check_segments(segments: torch.Tensor, idx: torch.Tensor, cache=None) -> None:
    """A UsageError, one line, unless `segments` fits `idx` (B, T) as packing ids."""
    if not isinstance(segments, torch.Tensor):
        raise UsageError(f"segments: expected a (B, T) LongTensor, got {type(segments).__name__}")
    if tuple(segments.shape) != tuple(idx.shape):
        raise UsageError(
            f"segments: shape {tuple(segments.shape)} does not match the tokens' "
            f"{tuple(idx.shape)} (one segment id per token)"
        )
    if (
        segments.dtype.is_floating_point
        or segments.dtype.is_complex
        or segments.dtype == torch.bool
    ):
        raise UsageError(f"segments: expected integer ids, got dtype {segments.dtype}")
    if segments.device != idx.device:
        raise UsageError(f"segments: on {segments.device}, the tokens on {idx.device}")
    if cache is not None:
        raise UsageError("segments: packed windows are for training; not with a KV cache")


def segment_runs(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) the index of each token's example within its row: 0, 0, 1, 1, 1, 2, ..."""
    change = torch.ones_like(segments, dtype=torch.long)
    change[:, 0] = 0
    change[:, 1:] = (segments[:, 1:] != segments[:, :-1]).long()
    return change.cumsum(1)


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) each token's position within its example (0 at the example's first token)."""
    B, T = segments.shape
    t = torch.arange(T, device=segments.device).expand(B, T)
    first = torch.ones_like(segments, dtype=torch.bool)
    first[:, 1:] = segments[:, 1:] != segments[:, :-1]
    start = torch.where(first, t, torch.zeros_like(t)).cummax(1).values
    return t - start


def segment_layout(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions (B, T), mask (B, 1, T, T) bool): a query sees the keys of its own example up
    to itself; the mask broadcasts over heads. No host sync (no data-dependent shapes)."""
    runs = segment_runs(segments)
    T = segments.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    mask = (runs[:, :, None] == runs[:, None, :]) & causal
    return segment_positions(segments), mask[:, None]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: KVCache | None = None,
    layer: int = 0,
    dropout_p: float = 0.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal scaled-dot-product attention of q (B, H, T, D) over k, v (B, H_kv, T, D).

    With a `cache`, the new k and v go in at `cache.length` and the queries, which sit at
    positions length..length+T-1, see every cached key up to their own. With `mask` (B, 1,
    T, T) bool from `segment_layout`, no cache, a query sees only the keys it marks True
    (the block-diagonal causal mask of a packed window); without one, SDPA's `is_causal`.
    """
    causal = True
    if mask is not None and cache is not None:
        raise UsageError("segments: packed windows are for training; not with a KV cache")
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
