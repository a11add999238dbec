"""Llama: the architecture `model.arch: llama` builds, with a grouped-query KV cache.

Pre-RMSNorm blocks, rotary position embeddings (no position table), causal grouped-query
attention through `torch.nn.functional.scaled_dot_product_attention` (`n_kv_head` key/value
heads shared by `n_head // n_kv_head` query heads each), a SwiGLU MLP, no biases, and tied
or untied token embeddings (`tie_embeddings`). Our module names are Hugging Face's
`LlamaForCausalLM` names without the `model.` prefix, and the rotary layout is its
`rotate_half` one (the two halves of each head rotate together, not interleaved pairs), so
the weights map one-to-one onto it with no permutation (`hf_state_dict`, `from_hf`).

The llama-only settings and their defaults are `Settings` below; two follow the sizes
when unset: `n_kv_head` = `n_head`, `ffn_hidden` = int(8·d/3) rounded up to a multiple of 32
(the SwiGLU width whose three matrices hold about the 8·d² of a 4·d GELU MLP, at a
matmul-friendly size).

This module knows nothing of distribution: no Ray, no DeepSpeed, no MLflow, no
torch.distributed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, model_validator
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models import Architecture, ModelConfig, attention, lm_loss, vocab

FFN_MULTIPLE = 32
TIED = ("lm_head.weight",)  # an alias of embed_tokens.weight when tie_embeddings


class Settings(ModelConfig):
    """llama: rotary positions, RMSNorm, SwiGLU, grouped-query attention, no biases."""

    n_kv_head: int | None = Field(
        None,
        ge=1,
        title="Key/value heads",
        description="Key/value heads (grouped-query attention), dividing n_head; "
        "n_head when unset.",
    )
    ffn_hidden: int | None = Field(
        None,
        ge=1,
        title="MLP width",
        description="SwiGLU hidden width; about 8/3 d_model when unset.",
    )
    rope_theta: float = Field(
        10000.0, gt=0, title="RoPE base", description="Base of the rotary frequencies."
    )
    norm_eps: float = Field(1e-5, gt=0, title="Norm epsilon", description="RMSNorm epsilon.")
    tie_embeddings: bool = Field(
        True,
        title="Tie input and output embeddings",
        description="The output layer shares the token embedding's weights.",
    )

    @model_validator(mode="after")
    def _kv_heads_divide_heads(self) -> Settings:
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(
                f"model.n_kv_head={self.n_kv_head} does not divide model.n_head={self.n_head}"
            )
        return self


def kv_heads(cfg: Settings) -> int:
    return cfg.n_kv_head or cfg.n_head


def ffn_hidden(cfg: Settings) -> int:
    if cfg.ffn_hidden is not None:
        return cfg.ffn_hidden
    return -(-int(8 * cfg.d_model / 3) // FFN_MULTIPLE) * FFN_MULTIPLE


class Rotary:
    """cos/sin of every position of the context, computed as transformers does (fp32).

    A plain attribute, not a buffer: `module.to(torch.bfloat16)` (DeepSpeed's) must not
    round the fp32 table, and the state dict holds weights only. One table per device.
    """

    def __init__(self, cfg: Settings) -> None:
        self.head_dim = cfg.d_model // cfg.n_head
        self.theta, self.length = cfg.rope_theta, cfg.context_length
        self.tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, start: int, T: int, device: torch.device, dtype):
        cos, sin = self._table(device)
        return cos[start : start + T].to(dtype), sin[start : start + T].to(dtype)

    def at(self, positions: torch.Tensor, dtype):
        """cos/sin (B, 1, T, head_dim) of each token's own position (B, T): a packed window."""
        cos, sin = self._table(positions.device)
        return cos[positions][:, None].to(dtype), sin[positions][:, None].to(dtype)

    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self.tables:
            dim = self.head_dim
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            pos = torch.arange(self.length, dtype=torch.float)
            freqs = pos[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self.tables[device] = (emb.cos().to(device), emb.sin().to(device))
        return self.tables[device]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    """Normalised in fp32 and cast back before the gain, as transformers' LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Settings) -> None:
        super().__init__()
        self.n_head, self.n_kv = cfg.n_head, kv_heads(cfg)
        self.head_dim = cfg.d_model // cfg.n_head
        d, kv = cfg.d_model, self.n_kv * self.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x, cos, sin, cache: attention.KVCache | None = None, layer: int = 0, mask=None
    ):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        p = self.dropout if self.training else 0.0
        y = attention.attend(q, k, v, cache, layer, p, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.o_proj(y))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: Settings) -> None:
        super().__init__()
        h = ffn_hidden(cfg)
        self.gate_proj = nn.Linear(cfg.d_model, h, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, h, bias=False)
        self.down_proj = nn.Linear(h, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: Settings) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x, cos, sin, cache: attention.KVCache | None = None, layer: int = 0, mask=None
    ):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg: Settings) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(vocab(cfg), cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Residual projections scaled by 1/sqrt(2 * n_layer), as lmforge's GPT-2.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
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

        With a `cache`, `idx` continues the cached sequence (its rotary positions start at
        `cache.length`) and the cache advances. With `segments` (B, T), a packed window:
        each token attends only to the earlier tokens of its own example and its rotary
        position restarts at 0 at the example's first token (`attention.segment_layout`);
        no cache then.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.context_length:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds model.context_length="
                f"{self.cfg.context_length}"
            )
        x = self.embed_tokens(idx)
        mask = None
        if segments is None:
            if cache is not None and isinstance(cache, attention.SlotCache):
                cos, sin = self.rotary.at(cache.positions(T, idx.device), x.dtype)
            else:
                cos, sin = self.rotary(start, T, idx.device, x.dtype)
        else:
            attention.check_segments(segments, idx, cache)
            pos, mask = attention.segment_layout(segments)
            cos, sin = self.rotary.at(pos, x.dtype)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, cache, i, mask)
        x = self.norm(x)
        if cache is not None:
            cache.advance(T)
        logits = self.lm_head(x)
        if targets is None:
            return logits, None
        return logits, lm_loss(logits, targets)


# -- the architecture spec --------------------------------------------------------------------
def new_cache(model: Llama, batch: int, device, dtype) -> attention.KVCache:
    """Keys and values of every layer, only the `n_kv_head` heads (keys rotated), pre-allocated to the context."""
    c = model.cfg
    return attention.KVCache(
        c.n_layer, batch, kv_heads(c), c.context_length, c.d_model // c.n_head, device, dtype
    )


def _matmul_weights(cfg: Settings) -> int:
    """Weights of one block's matrix multiplies: q, o (d·d each), k, v (d·kv), SwiGLU (3·d·h)."""
    d = cfg.d_model
    kv = kv_heads(cfg) * (d // cfg.n_head)
    return 2 * d * d + 2 * d * kv + 3 * d * ffn_hidden(cfg)


def n_params(cfg: Settings) -> int:
    """Every parameter of `Llama(cfg)`: the tied embedding once, an untied head apart."""
    v, d, n = vocab(cfg), cfg.d_model, cfg.n_layer
    embeddings = v * d * (1 if cfg.tie_embeddings else 2)
    return embeddings + n * (_matmul_weights(cfg) + 2 * d) + d  # + two RMSNorms a block, norm


def flops_per_token(cfg: Settings) -> float:
    """Training FLOPs per token (forward + backward): 6N + 12·L·d·T (PaLM, appendix B).

    N: the blocks' matmul weights (grouped-query k and v are n_kv_head/n_head of q's size)
    and the output projection (V·d, tied or not). The token table is looked up, RMSNorm,
    SiLU and the rotation are elementwise: none is in N. Attention's scores and weighted
    sum are over every query head whatever n_kv_head is, so 12·L·d·T as for GPT-2.
    tests/unit/test_llama.py checks this against torch's FLOP counter.
    """
    v, d, t, n = vocab(cfg), cfg.d_model, cfg.context_length, cfg.n_layer
    return 6 * (n * _matmul_weights(cfg) + v * d) + 12 * n * d * t


def activation_bytes(cfg: Settings, micro_batch: int, elem: int) -> float:
    """Bytes a forward of `micro_batch` sequences keeps for backward, the logits apart.

    Korthikanti et al. 2022's per-layer count (sec. 4.1) redone for this block, in units of
    s·b·h (h = d_model) elements of `elem` bytes:
    - each RMSNorm: its fp32 input (`x.float()`, 4 bytes whatever elem), the normalised
      rows cast back and the output (2·elem), plus a fp32 rsqrt per row;
    - attention: the rotated q (1), k and v with only the n_kv_head heads (2·g, g =
      n_kv_head/n_head: grouped-query attention shrinks them) and the output (1, the o_proj
      input). The rotation keeps only the cos/sin tables. Fused SDPA (flash on CPU and GPU,
      GQA without repeating k and v) keeps a fp32 log-sum-exp per query and head, never
      the s×s scores;
    - SwiGLU: gate's output (SiLU's input), SiLU's output, up's output and their product
      (down's input): 4·ffn_hidden/h;
    - with dropout, a 1-byte mask after attention and after the MLP (CUDA's fused dropout;
      on CPU, dropout takes SDPA's math path, which stores the s×s scores and repeated k
      and v, and elem-byte masks: not counted: the CPU presets have none).
    Plus the final norm. tests/unit/test_estimate.py checks the sum against a CPU training
    step's measured peak.
    """
    s, b, d, a, n = cfg.context_length, micro_batch, cfg.d_model, cfg.n_head, cfg.n_layer
    sbh, sb = s * b * d, s * b
    norm = (4 + 2 * elem) * sbh + 4 * sb
    attn = (2 + 2 * kv_heads(cfg) / a) * sbh * elem + 4 * a * sb
    mlp = 4 * s * b * ffn_hidden(cfg) * elem
    masks = 2 * sbh if cfg.dropout > 0 else 0
    return n * (2 * norm + attn + mlp + masks) + norm


def tied(cfg: Settings) -> tuple[str, ...]:
    return TIED if cfg.tie_embeddings else ()


# Hugging Face's LlamaForCausalLM: our names with `model.` in front, lm_head as is; the same
# (out, in) layouts and the same rotate_half rotary layout, so no transpose, no permutation.
def hf_state_dict(cfg: Settings, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our weights under `LlamaForCausalLM`'s names (fp32, contiguous; lm_head only untied)."""
    out = {}
    for name, t in weights.items():
        if name in tied(cfg):
            continue
        key = name if name.startswith("lm_head.") else f"model.{name}"
        out[key] = t.detach().to("cpu", torch.float32).contiguous()
    return out


def hf_config(cfg: Settings, eot: int) -> dict:
    """`config.json` of the equivalent `LlamaForCausalLM`, as transformers 5 writes it.

    `rope_theta` and `rope_scaling: null` at the top level too, for transformers 4 readers.
    """
    theta = cfg.rope_theta
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": ffn_hidden(cfg),
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": kv_heads(cfg),
        "head_dim": cfg.d_model // cfg.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "rope_theta": theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": cfg.dropout,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "dtype": "float32",
    }


def _rope_theta_from_hf(c: dict[str, Any]) -> float:
    """The plain rotary base of a config.json (transformers 5's rope_parameters or 4's keys)."""
    if c.get("rope_scaling") is not None:
        raise ConfigError(f"config.json: rope_scaling={c['rope_scaling']} is not supported")
    params = c.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or params.get("rope_type", "default") != "default":
            raise ConfigError(
                f"config.json: rope_parameters={params} is not supported (only rope_type default)"
            )
        extra = set(params) - {"rope_type", "rope_theta", "type"}
        if extra:
            raise ConfigError(f"config.json: rope_parameters.{sorted(extra)[0]} is not supported")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    if c.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("config.json: partial_rotary_factor != 1 is not supported")
    return float(c.get("rope_theta", 10000.0))


def _fields_from_hf(c: dict[str, Any]) -> dict[str, Any]:
    try:
        d, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        fields = {
            "arch": __name__.rpartition(".")[2],  # this file's name: its model.arch
            "vocab_size": int(c["vocab_size"]),
            "context_length": int(c["max_position_embeddings"]),
            "n_layer": int(c["num_hidden_layers"]),
            "n_head": heads,
            "d_model": d,
            "n_kv_head": int(c.get("num_key_value_heads") or heads),
            "ffn_hidden": int(c["intermediate_size"]),
        }
    except KeyError as err:
        raise ConfigError(f"config.json: {err.args[0]} is missing") from None
    if c.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json: hidden_act={c['hidden_act']!r} is not supported (silu)")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise ConfigError(f"config.json: {key}=true is not supported (no biases)")
    if d % heads:
        raise ConfigError(
            f"config.json: hidden_size={d} is not divisible by num_attention_heads={heads}"
        )
    if heads % fields["n_kv_head"]:
        raise ConfigError(
            f"config.json: num_key_value_heads={fields['n_kv_head']} does not divide "
            f"num_attention_heads={heads}"
        )
    if c.get("head_dim") is not None and int(c["head_dim"]) != d // heads:
        raise ConfigError(
            f"config.json: head_dim={c['head_dim']} is not hidden_size/num_attention_heads="
            f"{d // heads}"
        )
    window = c.get("sliding_window")
    if window is not None and int(window) < fields["context_length"]:
        raise ConfigError(
            f"config.json: sliding_window={window} is shorter than max_position_embeddings="
            f"{fields['context_length']} (sliding-window attention is not supported)"
        )
    fields["rope_theta"] = _rope_theta_from_hf(c)
    fields["norm_eps"] = float(c.get("rms_norm_eps", 1e-6))  # LlamaConfig's default
    fields["tie_embeddings"] = bool(c.get("tie_word_embeddings", False))  # LlamaConfig's
    return fields


def _shapes(cfg: Settings) -> dict[str, tuple[int, ...]]:
    """Our state dict's names and shapes, without building the model."""
    d, v, h = cfg.d_model, vocab(cfg), ffn_hidden(cfg)
    kv = kv_heads(cfg) * (d // cfg.n_head)
    out: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (v, d), "norm.weight": (d,)}
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        out |= {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (d, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (h, d),
            p + "mlp.up_proj.weight": (h, d),
            p + "mlp.down_proj.weight": (d, h),
        }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (v, d)
    return out


def from_hf(
    config_json: dict[str, Any], hf_weights: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A `LlamaForCausalLM` (or an exact-layout Mistral) -> (ModelConfig fields, our weights).

    Refused, naming the key: biases, another activation, rotary scaling, a head_dim that is
    not hidden_size/num_attention_heads, a sliding window shorter than the context, and
    weights whose names or shapes do not fit the config.
    """
    fields = _fields_from_hf(config_json)
    try:
        cfg = Settings(**fields)
    except ValidationError as err:  # an out-of-range size
        problems = "; ".join(
            f"model.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"config.json: {problems}") from None
    ours: dict[str, torch.Tensor] = {}
    for key, t in hf_weights.items():
        if key.endswith("rotary_emb.inv_freq"):  # a buffer old checkpoints saved; recomputed
            continue
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue  # tied: the embedding is the head (some tied files store both)
        ours[key.removeprefix("model.")] = t
    want = _shapes(cfg)
    missing = sorted(set(want) - set(ours))
    unexpected = sorted(set(ours) - set(want))
    if missing or unexpected:
        raise ConfigError(
            f"weights do not fit config.json (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, shape in want.items():
        if tuple(ours[name].shape) != shape:
            hf_name = name if name.startswith("lm_head.") else f"model.{name}"
            raise ConfigError(
                f"{hf_name}: shape {tuple(ours[name].shape)} does not fit config.json "
                f"(expected {shape})"
            )
    return fields, ours


ARCH = Architecture(
    settings=Settings,
    build=Llama,
    n_params=n_params,
    flops_per_token=flops_per_token,
    activation_bytes=activation_bytes,
    new_cache=new_cache,
    tied=tied,
    hf_state_dict=hf_state_dict,
    hf_config=hf_config,
    hf_architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    from_hf=from_hf,
)
