"""LSTM: the recurrent language model `model.arch: lstm` builds, the baseline Transformers replaced.

Token embedding (d_model) -> n_layer `torch.nn.LSTM` layers (hidden size d_model, dropout
between layers) -> dropout -> linear head, tied to the embedding unless
`model.tie_embeddings: false` (Press & Wolf 2017; Zaremba et al. 2014 for the dropout on the
non-recurrent connections). No positions: order lives in the recurrent state.

Generation carries that state `(h, c)` from call to call (`LSTMState`, the "cache" of the
models interface): feeding a sequence in pieces gives the logits of feeding it whole (to
float rounding), and there is no context limit: `capacity` is infinite and a prompt is fed
whole. How well it continues past `context_length` (the longest it was trained on) is another
matter.

No Hugging Face equivalent (transformers has no LSTM LM): `lmforge export-hf` refuses it.
It trains under every ZeRO stage, 3 included: nn.LSTM's flat-weights list holds the very
Parameter objects ZeRO 3 empties and gathers back around each forward (tests/unit/test_lstm.py
and tests/integration/test_lstm_train.py run it on CPU). On CUDA, cuDNN would find gathered
weights outside one contiguous buffer and copy them at each call (a warning, a slowdown);
not measured yet.
This module knows nothing of distribution: no Ray, DeepSpeed, MLflow or torch.distributed.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from lmforge.models import Architecture, ModelConfig, attention, lm_loss, vocab


class Settings(ModelConfig):
    """lstm: a recurrent baseline (embedding, LSTM layers, linear head); no attention."""

    unused = frozenset({"n_head"})  # no heads to divide d_model
    tie_embeddings: bool = Field(
        True,
        title="Tie input and output embeddings",
        description="The output layer shares the token embedding's weights.",
    )


class LSTMState:
    """The recurrent state of every layer for a batch: what generation carries across calls."""

    def __init__(self, cfg: Settings, batch: int, device, dtype) -> None:
        shape = (cfg.n_layer, batch, cfg.d_model)
        self.h = torch.zeros(shape, device=device, dtype=dtype)
        self.c = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # tokens consumed so far
        self.capacity = math.inf  # a state never fills up: generation never refills it


class LSTMSlots:
    """The recurrent states of a server's running batch (lmforge.serving.engine), one slot
    a row, the first `rows` in use: what `attention.SlotCache` is to attention. The model
    reads and writes `h`/`c` as it does an `LSTMState`'s; a row's state after its prompt is
    copied in (`put`), a finished row's slot taken by the last row (`move`)."""

    capacity = math.inf  # a state never fills up

    def __init__(self, cfg: Settings, slots: int, device, dtype) -> None:
        shape = (cfg.n_layer, slots, cfg.d_model)
        self._h = torch.zeros(shape, device=device, dtype=dtype)
        self._c = torch.zeros(shape, device=device, dtype=dtype)
        self.rows = 0
        self.length = 0  # unused: every row continues from its own state

    def use(self, rows: int) -> None:
        self.rows = rows

    def put(self, slot: int, state: LSTMState, row: int = 0) -> None:
        self._h[:, slot] = state.h[:, row]
        self._c[:, slot] = state.c[:, row]

    def move(self, src: int, dst: int) -> None:
        self._h[:, dst] = self._h[:, src]
        self._c[:, dst] = self._c[:, src]

    @property
    def h(self) -> torch.Tensor:
        return self._h[:, : self.rows].contiguous()  # nn.LSTM takes contiguous states

    @h.setter
    def h(self, value: torch.Tensor) -> None:
        self._h[:, : self.rows] = value

    @property
    def c(self) -> torch.Tensor:
        return self._c[:, : self.rows].contiguous()

    @c.setter
    def c(self, value: torch.Tensor) -> None:
        self._c[:, : self.rows] = value


class LSTMLM(nn.Module):
    def __init__(self, cfg: Settings) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.wte = nn.Embedding(vocab(cfg), d)
        # nn.LSTM applies its dropout between layers, not after the last one.
        self.lstm = nn.LSTM(
            d, d, num_layers=cfg.n_layer, batch_first=True, dropout=cfg.dropout * (cfg.n_layer > 1)
        )
        self.drop = nn.Dropout(cfg.dropout)  # before the head
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        # Small embeddings, as GPT-2's: a tied head then starts near uniform (loss ~ ln V).
        # The LSTM keeps torch's init, U(-1/sqrt(d), 1/sqrt(d)).
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.02)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        else:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: LSTMState | None = None,
        *,
        segments: torch.Tensor | None = None,
    ):
        """Logits for `idx` (B, T); with `targets`, also the mean cross-entropy loss over
        the targets that are not -100 (`models.lm_loss`).

        With a `cache`, `idx` continues the sequence its state has consumed, and it advances.
        With `segments` (B, T), a packed window: each example starts from a zero state
        (`_packed`); no cache then.
        """
        x = self.wte(idx)
        if segments is not None:
            attention.check_segments(segments, idx, cache)
            y = self._packed(x, segments)
        else:
            state = (cache.h, cache.c) if cache is not None else None
            y, (h, c) = self.lstm(x, state)
            if cache is not None:
                cache.h, cache.c = h, c
                cache.length += idx.size(1)
        logits = self.lm_head(self.drop(y))
        if targets is None:
            return logits, None
        return logits, lm_loss(logits, targets)

    def _packed(self, x: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """The LSTM's outputs (B, T, d) for a packed window, each example run from a zero
        state: every example becomes its own row of a (examples, longest, d) batch, right-
        padded (a recurrence never looks ahead, so the padding changes no output), one
        nn.LSTM call, and the outputs go back to their places. Exact, not an approximation;
        it costs one host sync (the batch's shape) and the padding's compute."""
        runs = attention.segment_runs(segments)
        pos = attention.segment_positions(segments)
        per_row = runs[:, -1] + 1
        row = (per_row.cumsum(0) - per_row)[:, None] + runs  # each token's example, batch-wide
        n, longest = int(per_row.sum()), int(pos.max()) + 1
        rows = x.new_zeros(n, longest, x.size(-1))
        rows[row, pos] = x
        y, _ = self.lstm(rows)
        return y[row, pos]


# -- the architecture spec --------------------------------------------------------------------
def new_cache(model: LSTMLM, batch: int, device, dtype) -> LSTMState:
    return LSTMState(model.cfg, batch, device, dtype)


def new_slots(model: LSTMLM, slots: int, device, dtype) -> LSTMSlots:
    return LSTMSlots(model.cfg, slots, device, dtype)


def n_params(cfg: Settings) -> int:
    """Every parameter of `LSTMLM(cfg)`: the embedding, each layer's input and recurrent
    weights of the four gates and their two biases (torch keeps b_ih and b_hh), and the
    head unless it is tied to the embedding."""
    v, d, n = vocab(cfg), cfg.d_model, cfg.n_layer
    layer = 4 * (d * d + d * d) + 2 * 4 * d
    return v * d + n * layer + (0 if cfg.tie_embeddings else v * d)


def flops_per_token(cfg: Settings) -> float:
    """Training FLOPs per token (forward + backward): 6N, with no attention term.

    N counts the weights of the matrix multiplies (PaLM's convention, as for gpt2): per layer
    the four gates' input and recurrent matrices, 4·(d·d + d·d), and the head's V·d (tied or
    not, it is a matmul). The embedding is a lookup and the biases, gates' nonlinearities and
    cell update are elementwise, so none is in N. tests/unit/test_lstm.py checks it against
    torch's FLOP counter.
    """
    v, d, n = vocab(cfg), cfg.d_model, cfg.n_layer
    return 6 * (n * 4 * (d * d + d * d) + v * d)


def activation_bytes(cfg: Settings, micro_batch: int, elem: int) -> float:
    """Bytes a forward of `micro_batch` sequences keeps for backward, the logits apart.

    nn.LSTM runs one layer at a time (on CPU through oneDNN's RNN primitive,
    `mkldnn_rnn_layer`) and keeps, besides the layer's input (s·b·d elements), the
    primitive's training workspace. oneDNN sizes it (`rnn_utils::set_workspace_sizes`) as,
    per layer, (layers + 1 = 2) × (s + 1) × b × d for each of five state arrays: h (elem
    bytes), c (elem), and the fp32 gradients of h, c and the layer input; plus the four
    gates of every step (4·s·b·d, elem) and h again (s·b·d, elem): about (9·elem + 24)
    bytes per hidden unit and step, fifteen fp32 values, where the recurrence needs six or
    so. cuDNN's reserve space on GPUs is another layout, not measured here. Plus the last
    layer's output and its batch-first copy, the head's input (2·s·b·d), and with dropout
    a 1-byte mask between layers and before the head.
    tests/unit/test_estimate.py checks the sum against a CPU training step's measured peak.
    """
    s, b, d, n = cfg.context_length, micro_batch, cfg.d_model, cfg.n_layer
    states = 2 * (s + 1) * b * d * (2 * elem + 3 * 4)
    workspace = states + 5 * s * b * d * elem
    masks = n * s * b * d if cfg.dropout > 0 else 0
    return n * (s * b * d * elem + workspace) + 2 * s * b * d * elem + masks


ARCH = Architecture(
    settings=Settings,
    build=LSTMLM,
    n_params=n_params,
    flops_per_token=flops_per_token,
    activation_bytes=activation_bytes,
    new_cache=new_cache,
    new_slots=new_slots,
    context_limited=False,
    tied=lambda cfg: ("lm_head.weight",) if cfg.tie_embeddings else (),
    # No transformers class to map onto: export-hf refuses it, import-hf cannot produce it.
    hf_state_dict=None,
    hf_config=None,
)
