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

    def positions(self, T: int, device) -> torch.Tensor:
        """The positions (T,) of the next T tokens: the same for every row."""
        return torch.arange(self.length, self.length + T, device=device)

    def advance(self, T: int) -> None:
        self.length += T

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new k, v (B, H, T, D) at `length`; (keys, values, mask) to attend over:
        the mask (None: causal) lets the queries at length..length+T-1 see keys up to theirs."""
        start, T = self.length, k.size(2)
        self.k[layer][:, :, start : start + T] = k
        self.v[layer][:, :, start : start + T] = v
        mask = None
        if start > 0:
            q_pos = torch.arange(start, start + T, device=k.device)[:, None]
            mask = torch.arange(start + T, device=k.device)[None, :] <= q_pos
        return self.k[layer][:, :, : start + T], self.v[layer][:, :, : start + T], mask


class SlotCache:
    """A KV cache whose rows are independent sequences (slots), each at its own length: the
    running batch of a server, where requests join and leave between decode steps.

    The model sees the first `rows` slots (`use(rows)`), one new token per row per step;
    a row's prompt is run through a `KVCache` of its own and copied in (`put`). A finished
    row's slot is taken by the last row (`move`), so the rows in use stay the first ones.
    """

    def __init__(
        self, n_layer: int, slots: int, heads: int, length: int, head_dim: int, device, dtype
    ) -> None:
        shape = (slots, heads, length, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.lengths = [0] * slots  # each slot's positions filled
        self.capacity = length
        self.rows = 0
        self._at: torch.Tensor | None = None  # this step's lengths of the rows in use

    @property
    def length(self) -> int:
        """The longest row in use (the model checks it against the context)."""
        return max(self.lengths[: self.rows], default=0)

    def use(self, rows: int) -> None:
        self.rows = rows
        self._at = torch.tensor(self.lengths[:rows], device=self.k[0].device)

    def put(self, slot: int, cache: KVCache, row: int = 0) -> None:
        """Slot `slot` continues row `row` of `cache` (a prompt just run)."""
        n = cache.length
        for layer in range(len(self.k)):
            self.k[layer][slot, :, :n] = cache.k[layer][row, :, :n]
            self.v[layer][slot, :, :n] = cache.v[layer][row, :, :n]
        self.lengths[slot] = n

    def move(self, src: int, dst: int) -> None:
        n = self.lengths[src]
        for layer in range(len(self.k)):
            self.k[layer][dst, :, :n] = self.k[layer][src, :, :n]
            self.v[layer][dst, :, :n] = self.v[layer][src, :, :n]
        self.lengths[dst] = n

    def positions(self, T: int, device) -> torch.Tensor:
        """(rows, T): each row continues at its own length."""
        return self._at[:, None] + torch.arange(T, device=device)[None, :]

    def advance(self, T: int) -> None:
        for i in range(self.rows):
            self.lengths[i] += T
        self._at = self._at + T

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if k.size(2) != 1:
            raise ValueError("a SlotCache takes one new token per row (decode steps)")
        rows = torch.arange(self.rows, device=k.device)
        self.k[layer][rows, :, self._at] = k[:, :, 0]
        self.v[layer][rows, :, self._at] = v[:, :, 0]
        span = self.length + 1
        keys = torch.arange(span, device=k.device)
        mask = (keys[None, :] <= self._at[:, None])[:, None, None, :]  # (rows, 1, 1, span)
        return self.k[layer][: self.rows, :, :span], self.v[layer][: self.rows, :, :span], mask


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
    cache: KVCache | SlotCache | None = None,
    layer: int = 0,
    dropout_p: float = 0.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal scaled-dot-product attention of q (B, H, T, D) over k, v (B, H_kv, T, D).

    With a `cache`, the new k and v go in at `cache.length` and the queries, which sit at
    positions length..length+T-1, see every cached key up to their own (a `SlotCache`: each
    row at its own length). With `mask` (B, 1,
    T, T) bool from `segment_layout`, no cache, a query sees only the keys it marks True
    (the block-diagonal causal mask of a packed window); without one, SDPA's `is_causal`.
    """
    causal = True
    if mask is not None and cache is not None:
        raise UsageError("segments: packed windows are for training; not with a KV cache")
    if cache is not None:
        k, v, mask = cache.update(layer, k, v)
        causal = mask is None
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=causal and mask is None,
        dropout_p=dropout_p,
        enable_gqa=k.size(1) != q.size(1),
    )
