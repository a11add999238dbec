"""GPT-2: the architecture `model.arch: gpt2` builds, with a KV cache for generation.

Pre-LayerNorm blocks, causal multi-head attention through
`torch.nn.functional.scaled_dot_product_attention`, a tanh-GELU MLP, learned positions,
tied input/output embeddings, biases everywhere and GPT-2's initialisation, so that the
weights map one-to-one onto Hugging Face's `GPT2LMHeadModel` (`hf_state_dict`).

This module knows nothing of distribution: no Ray, no DeepSpeed, no MLflow, no
torch.distributed. The training code wraps it in an engine; `ARCH` at the end is what the
registry in `lmforge.models` hands out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models import Architecture, ModelConfig, attention, lm_loss, vocab

LN_EPS = 1e-5


class Settings(ModelConfig):
    """gpt2: learned positions, LayerNorm, GELU MLP, tied embeddings; the shared model.*
    keys only."""


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cache: attention.KVCache | None = None,
        layer: int = 0,
        mask: torch.Tensor | None = None,
    ):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = attention.attend(q, k, v, cache, layer, p, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.c_proj = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's "gelu_new" is the tanh approximation.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=LN_EPS)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=LN_EPS)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cache: attention.KVCache | None = None,
        layer: int = 0,
        mask: torch.Tensor | None = None,
    ):
        x = x + self.attn(self.ln_1(x), cache, layer, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(vocab(cfg), cfg.d_model)
        self.wpe = nn.Embedding(cfg.context_length, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=LN_EPS)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: attention.KVCache | None = None,
        *,
        segments: torch.Tensor | None = None,
    ):
        """Logits for `idx` (B, T); with `targets`, also the mean cross-entropy loss over
        the targets that are not -100 (`models.lm_loss`).

        With a `cache`, `idx` continues the cached sequence and the cache advances. With
        `segments` (B, T), a packed window: each token attends only to the earlier tokens
        of its own example and its position restarts at 0 at the example's first token
        (`attention.segment_layout`); no cache then.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.context_length:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds model.context_length="
                f"{self.cfg.context_length}"
            )
        mask = None
        if segments is None:
            pos = (
                torch.arange(T, device=idx.device)
                if cache is None
                else cache.positions(T, idx.device)
            )
        else:
            attention.check_segments(segments, idx, cache)
            pos, mask = attention.segment_layout(segments)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for i, block in enumerate(self.h):
            x = block(x, cache, i, mask)
        x = self.ln_f(x)
        if cache is not None:
            cache.advance(T)
        logits = self.lm_head(x)
        if targets is None:
            return logits, None
        return logits, lm_loss(logits, targets)


# -- the architecture spec --------------------------------------------------------------------
def new_cache(model: GPT, batch: int, device, dtype) -> attention.KVCache:
    """Keys and values of every layer, every head, pre-allocated to the context."""
    c = model.cfg
    return attention.KVCache(
        c.n_layer, batch, c.n_head, c.context_length, c.d_model // c.n_head, device, dtype
    )


def n_params(cfg: ModelConfig) -> int:
    """Every parameter of `GPT(cfg)`, the tied embedding once and the position table included."""
    v, d, t, n = vocab(cfg), cfg.d_model, cfg.context_length, cfg.n_layer
    block = (
        2 * 2 * d  # two LayerNorms
        + 3 * d * d + 3 * d  # qkv
        + d * d + d  # attention projection
        + 4 * d * d + 4 * d  # MLP up
        + 4 * d * d + d  # MLP down
    )  # fmt: skip
    return v * d + t * d + n * block + 2 * d  # + ln_f


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward): 6N + 12·L·d·T (PaLM, appendix B).

    N counts the weights of the matrix multiplies: 12·d² per block and the output projection
    (V·d, tied to the token table but a real matmul). The tables looked up (tokens, positions)
    do no arithmetic, and biases and LayerNorm gains are elementwise, so neither is in N.
    12·L·d·T is attention's scores and weighted sum over the full T×T (causality not
    discounted). tests/unit/test_model.py checks this against torch's FLOP counter.
    """
    v, d, t, n = vocab(cfg), cfg.d_model, cfg.context_length, cfg.n_layer
    return 6 * (n * 12 * d * d + v * d) + 12 * n * d * t


def activation_bytes(cfg: ModelConfig, micro_batch: int, elem: int) -> float:
    """Bytes a forward of `micro_batch` sequences keeps for backward, the logits apart.

    Korthikanti et al. 2022 (sec. 4.1) count `sbh(34 + 5as/h)` bytes a layer at 16 bits;
    this is the same count for the kernels this file calls. Per layer, `elem`-byte
    elements of s·b·h: each LayerNorm's input and output (2 + 2), attention's q, k, v (the
    fused qkv output, 3), its output (1: already laid out as the c_proj input, so the
    `.contiguous()` copies nothing), and the MLP's first output and GELU's output (4 + 4):
    16 in all, Korthikanti's 32 bytes at elem = 2. Fused attention (flash or
    memory-efficient SDPA, which torch picks on CPU and GPU alike when no mask is given)
    keeps a fp32 log-sum-exp per query and head (4·a·s·b) instead of the s×s scores and
    their dropout (Korthikanti's 5as²b); LayerNorm keeps a fp32 mean and rstd per row.
    With dropout, each `nn.Dropout` keeps a 1-byte mask (CUDA's fused dropout): two a layer
    and one after the embeddings (on CPU, dropout takes SDPA's math path, which stores the
    scores, and elem-byte masks: not counted: the CPU presets have none). Plus ln_f's
    input and output and its statistics.
    tests/unit/test_estimate.py checks the sum against a CPU training step's measured peak.
    """
    s, b, d, a, n = cfg.context_length, micro_batch, cfg.d_model, cfg.n_head, cfg.n_layer
    sbh, sb = s * b * d, s * b
    masks = (2 * n + 1) * sbh if cfg.dropout > 0 else 0
    layer = 16 * sbh * elem + 2 * 2 * sb * 4 + a * sb * 4
    return n * layer + 2 * sbh * elem + 2 * sb * 4 + masks


# Hugging Face's GPT-2 keeps OpenAI's `Conv1D`, whose weight is (in, out) where `nn.Linear`'s
# is (out, in); biases are unchanged. Both split the fused c_attn output into q, k, v in that
# order, so the mapping is a renaming plus this transpose:
#
#     ours                          Hugging Face
#     wte.weight, wpe.weight        transformer.wte.weight, transformer.wpe.weight
#     h.{i}.ln_1 / ln_2 / ln_f      transformer.h.{i}.ln_1 / ln_2, transformer.ln_f
#     h.{i}.attn.c_attn.weight      transformer.h.{i}.attn.c_attn.weight, transposed
#     h.{i}.attn.c_proj.weight      transformer.h.{i}.attn.c_proj.weight, transposed
#     h.{i}.mlp.c_fc / c_proj       transformer.h.{i}.mlp.c_fc / c_proj weights, transposed
#     lm_head.weight                not written: tied to wte (tie_word_embeddings)
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TIED = ("lm_head.weight",)  # an alias of wte.weight


def hf_state_dict(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our weights under `GPT2LMHeadModel`'s names and layouts (fp32, contiguous, lm_head tied)."""
    out = {}
    for name, t in weights.items():
        if name in TIED:
            continue
        if name.endswith(TRANSPOSED):
            t = t.t()
        out[f"transformer.{name}"] = t.detach().to("cpu", torch.float32).contiguous()
    return out


def hf_config(cfg: ModelConfig, eot: int) -> dict:
    """`config.json` of the equivalent `GPT2LMHeadModel`."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,  # 4 * n_embd, as ours
        "activation_function": "gelu_new",  # the tanh GELU
        "layer_norm_epsilon": LN_EPS,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,  # 1/sqrt(head_dim), as scaled_dot_product_attention
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "tie_word_embeddings": True,
        "use_cache": True,
        "torch_dtype": "float32",
    }


# config.json keys our model fixes -> (transformers' default when the key is absent, the
# value we need); `from_hf` refuses any other value.
HF_FIXED = {
    "activation_function": ("gelu_new", "gelu_new"),  # the tanh GELU of MLP.forward
    "layer_norm_epsilon": (1e-5, LN_EPS),
    "scale_attn_weights": (True, True),  # 1/sqrt(head_dim), as scaled_dot_product_attention
    "scale_attn_by_inverse_layer_idx": (False, False),
    "reorder_and_upcast_attn": (False, False),
    "tie_word_embeddings": (True, True),  # lm_head is wte
}
HF_SIZES = {"vocab_size": "vocab_size", "n_positions": "context_length", "n_layer": "n_layer",
            "n_head": "n_head", "n_embd": "d_model"}  # fmt: skip
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # the causal mask some files hold: not weights


def from_hf(config: dict, weights: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """`GPT2LMHeadModel`'s config.json and weights -> (ModelConfig fields, our state dict):
    the inverse of `hf_config` and `hf_state_dict`. What our model cannot reproduce exactly
    is refused with a ConfigError naming the config.json key."""
    for key, (default, ours) in HF_FIXED.items():
        value = config.get(key, default)
        if value != ours:
            raise ConfigError(f"config.json {key}={value!r}: lmforge's gpt2 supports only {ours!r}")
    missing = [k for k in HF_SIZES if not isinstance(config.get(k), int)]
    if missing:
        raise ConfigError(f"config.json {missing[0]}: missing or not an integer")
    arch = __name__.rpartition(".")[2]  # this file's name: its model.arch
    fields = {"arch": arch, **{ours: config[key] for key, ours in HF_SIZES.items()}}
    inner = config.get("n_inner")
    if inner not in (None, 4 * config["n_embd"]):
        raise ConfigError(
            f"config.json n_inner={inner}: lmforge's gpt2 has an MLP of 4 * n_embd="
            f"{4 * config['n_embd']} (or null)"
        )
    ours = {}
    for name, t in weights.items():
        name = name.removeprefix("transformer.")  # the original GPT-2 files have no prefix
        if name.endswith(HF_BUFFERS) or name in TIED:  # lm_head is wte (tie_word_embeddings)
            continue
        ours[name] = t.t().contiguous() if name.endswith(TRANSPOSED) else t
    return fields, ours


ARCH = Architecture(
    settings=Settings,
    build=GPT,
    n_params=n_params,
    flops_per_token=flops_per_token,
    activation_bytes=activation_bytes,
    new_cache=new_cache,
    tied=lambda cfg: TIED,
    hf_state_dict=hf_state_dict,
    hf_config=hf_config,
    hf_architectures=("GPT2LMHeadModel",),
    from_hf=from_hf,
)
