"""Packing without cross-talk (issue 15): `segments` on the models' forward.

A packed window of several examples gives each example the logits it gets alone (no
attention across examples, positions restarting per example), a -100 target is no target,
and without `segments` the models compute what they did before (golden/, no git history
needed; `python -m tests.unit.test_packing` rewrites it when a change is intended)."""

import pytest
import torch

from lmforge import models
from lmforge.config import ModelConfig
from lmforge.errors import UsageError
from lmforge.models import attention
from tests.conftest import REPO

V, CTX = 61, 48
LENGTHS = (5, 11, 8)  # three examples of different lengths, packed into one window
CONFIGS = {
    "gpt2": {"arch": "gpt2", "n_layer": 2, "n_head": 4, "d_model": 32},
    "llama": {"arch": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 32},
    "lstm": {"arch": "lstm", "n_layer": 2, "d_model": 32},
}
# What the models computed before `segments` existed (45142e9; checked bit-identical when the
# file was written): segments=None must still compute it. Rewritten on purpose only, by
# `python -m tests.unit.test_packing`.
GOLDEN = REPO / "tests" / "unit" / "golden" / "models_without_segments.safetensors"


def build(arch: str):
    torch.manual_seed(0)
    cfg = ModelConfig(**CONFIGS[arch], vocab_size=V, context_length=CTX)
    return models.build(cfg).eval()


def examples() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, V, (n,), generator=g) for n in LENGTHS]


def packed(exs: list[torch.Tensor], pad: int = 0):
    """One row: the examples back to back (ids 0, 1, 2), then `pad` padding tokens (id 3)."""
    ids = torch.cat([*exs, torch.zeros(pad, dtype=torch.long)])
    seg = torch.cat(
        [torch.full((len(e),), i) for i, e in enumerate(exs)] + [torch.full((pad,), len(exs))]
    )
    return ids[None], seg[None]


def test_layout_positions_and_mask():
    seg = torch.tensor([[0, 0, 1, 1, 1, 2], [4, 4, 4, 4, 4, 4]])
    pos, mask = attention.segment_layout(seg)
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]
    assert mask.shape == (2, 1, 6, 6)
    m = mask[0, 0].int().tolist()
    assert m[1] == [1, 1, 0, 0, 0, 0]  # sees its own example up to itself
    assert m[3] == [0, 0, 1, 1, 0, 0]  # not the example before it, not the future
    assert m[5] == [0, 0, 0, 0, 0, 1]
    assert torch.equal(mask[1, 0], torch.ones(6, 6, dtype=torch.bool).tril())
    # An id that comes back after another is a new example, as its positions say.
    pos, mask = attention.segment_layout(torch.tensor([[0, 0, 1, 0]]))
    assert pos.tolist() == [[0, 1, 0, 0]] and mask[0, 0, 3].tolist() == [0, 0, 0, 1]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "lstm"])
def test_packed_window_logits_equal_each_example_alone(arch):
    model, exs = build(arch), examples()
    with torch.no_grad():
        ids, seg = packed(exs, pad=4)
        logits, _ = model(ids, segments=seg)
        # A second row packed in another order, in the same batch.
        ids2, seg2 = packed(exs[::-1], pad=4)
        logits2, _ = model(torch.cat([ids, ids2]), segments=torch.cat([seg, seg2]))
        start = 0
        for e in exs:
            alone, _ = model(e[None])
            got = logits[0, start : start + len(e)]
            assert (got - alone[0]).abs().max() < 1e-5
            assert (logits2[0, start : start + len(e)] - alone[0]).abs().max() < 1e-5
            start += len(e)
        start = 0
        for e in exs[::-1]:
            alone, _ = model(e[None])
            assert (logits2[1, start : start + len(e)] - alone[0]).abs().max() < 1e-5
            start += len(e)
        # Without segments the later examples do see the earlier ones: the test can fail.
        plain, _ = model(ids)
        assert (plain[0, : len(exs[0])] - logits[0, : len(exs[0])]).abs().max() < 1e-5
        assert (
            plain[0, len(exs[0]) : sum(LENGTHS)] - logits[0, len(exs[0]) : sum(LENGTHS)]
        ).abs().max() > 1e-3


def hand_cross_entropy(logits: torch.Tensor, ids: torch.Tensor, completion: list[bool]) -> float:
    """-mean log p(next token) over the positions whose next token is a completion token."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    terms = [-logp[t, ids[t + 1]].item() for t in range(len(ids) - 1) if completion[t + 1]]
    return sum(terms) / len(terms)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "lstm"])
def test_masked_loss_is_cross_entropy_over_completion_tokens_only(arch):
    model, exs = build(arch), examples()
    prompt_len = (2, 7, 3)  # the first tokens of each example are its prompt
    completion = [[i >= p for i in range(len(e))] for e, p in zip(exs, prompt_len, strict=True)]

    def targets_of(e, comp):  # target t is token t+1, -100 unless it is a completion token
        y = torch.full((len(e),), -100)
        for t in range(len(e) - 1):
            if comp[t + 1]:
                y[t] = e[t + 1]
        return y

    with torch.no_grad():
        e, comp = exs[1], completion[1]
        logits, loss = model(e[None], targets_of(e, comp)[None])
        assert abs(loss.item() - hand_cross_entropy(logits[0], e, comp)) < 1e-5
        # Packed: the mean over every example's completion tokens, each computed alone.
        ids, seg = packed(exs, pad=3)
        y = torch.cat([targets_of(e, c) for e, c in zip(exs, completion, strict=True)])
        y = torch.cat([y, torch.full((3,), -100)])
        _, loss = model(ids, y[None], segments=seg)
        num, den = 0.0, 0
        for e, c in zip(exs, completion, strict=True):
            alone, _ = model(e[None])
            n = sum(c[1:])
            num += hand_cross_entropy(alone[0], e, c) * n
            den += n
        assert abs(loss.item() - num / den) < 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama", "lstm"])
def test_a_batch_without_targets_has_loss_zero_not_nan(arch):
    model = build(arch).train()
    ids = examples()[1][None]
    _, loss = model(ids, torch.full_like(ids, -100))
    assert loss.item() == 0.0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "lstm"])
def test_wrong_segments_are_refused_in_one_line(arch):
    model = build(arch)
    ids = torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(UsageError, match=r"segments: shape \(2, 5\) does not match .*\(2, 6\)"):
        model(ids, segments=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(UsageError, match=r"segments: shape \(6,\)"):
        model(ids, segments=torch.zeros(6, dtype=torch.long))
    with pytest.raises(UsageError, match="segments: expected integer ids, got dtype torch.float32"):
        model(ids, segments=torch.zeros(2, 6))
    arch_ = models.of(model)
    cache = arch_.new_cache(model, 2, "cpu", torch.float32)
    with pytest.raises(UsageError, match="not with a KV cache"):
        model(ids, cache=cache, segments=torch.zeros(2, 6, dtype=torch.long))


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """Three numbers that move when any element of `t` does: its sum, its norm and its dot
    product with a fixed cosine wave (in float64)."""
    x = t.detach().double().flatten()
    wave = torch.cos(torch.arange(x.numel(), dtype=torch.float64))
    return torch.stack([x.sum(), x.norm(), x @ wave])


def without_segments(arch: str) -> dict[str, torch.Tensor]:
    """What model `arch` computes without `segments`: its initial weights (fingerprints),
    logits and loss of a batch, the KV-cache path's logits, and the loss's gradients."""
    model = build(arch)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (3, 20), generator=g)
    y = torch.randint(0, V, (3, 20), generator=g)
    out = {"weights": torch.stack([fingerprint(p) for p in model.state_dict().values()])}
    with torch.no_grad():
        out["logits"], out["loss"] = model(ids, y)
        # The cache path generation uses: a prompt, then one token at a time.
        cache = models.get(arch).new_cache(model, 3, "cpu", torch.float32)
        first, _ = model(ids[:, :12], cache=cache)
        steps = [model(ids[:, t : t + 1], cache=cache)[0] for t in range(12, 15)]
        out["cached"] = torch.cat([first, *steps], dim=1)
    model.train()
    model(ids, y)[1].backward()
    out["grads"] = torch.stack([fingerprint(p.grad) for p in model.parameters()])
    return out


def write_golden() -> None:
    from safetensors.torch import save_file

    tensors = {f"{a}.{k}": v.contiguous() for a in CONFIGS for k, v in without_segments(a).items()}
    save_file(tensors, GOLDEN, metadata={"written_by": "python -m tests.unit.test_packing"})
    print(f"wrote {GOLDEN.relative_to(REPO)}")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "lstm"])
def test_without_segments_computes_what_the_models_did_before(arch):
    """Weights, logits, loss, cache path and gradients as GOLDEN holds them. Tolerances, not
    bit equality: the file travels between CPUs, whose float kernels may round apart."""
    from safetensors.torch import load_file

    golden = {k.split(".", 1)[1]: v for k, v in load_file(GOLDEN).items() if k.startswith(arch)}
    got = without_segments(arch)
    assert golden.keys() == got.keys()
    for key, want in golden.items():
        assert torch.allclose(got[key], want, rtol=1e-5, atol=1e-5), (
            f"{arch} {key} differs from {GOLDEN.name}: the model computes something new without "
            "segments. If that is intended, rewrite it: python -m tests.unit.test_packing"
        )


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_training_under_activation_checkpointing_has_the_same_gradients(arch):
    from lmforge.training.speed import checkpoint_blocks

    plain, recomputed = build(arch).train(), build(arch).train()
    assert checkpoint_blocks(recomputed) == 2
    ids, seg = packed(examples(), pad=2)
    y = torch.roll(ids, -1, 1).masked_fill(seg == len(LENGTHS), -100)
    for m in (plain, recomputed):
        m(ids, y, segments=seg)[1].backward()
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


if __name__ == "__main__":
    write_golden()
