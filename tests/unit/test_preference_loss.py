"""Our DPO / IPO / SimPO losses and gradients against TRL's own (test-only dependency), and
the per-sequence log-probs of a packed batch against each pair run alone."""

from __future__ import annotations

import os
import types
from collections import defaultdict

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer

from lmforge import models
from lmforge.config import ModelConfig
from lmforge.preference.logps import sequence_logps
from lmforge.preference.loss import preference_loss
from lmforge.preference.stream import PairStream
from tests.preference_data import pairs_dataset, write_rows

P, L = 6, 9  # pairs, tokens per sequence


def batch(seed=0):
    """Per-token log-probs (2P, L-1) as TRL lays a batch (chosen rows, then rejected), an
    answer mask of varying length, and the reference's summed log-probs."""
    g = torch.Generator().manual_seed(seed)
    token_logps = -torch.rand(2 * P, L - 1, generator=g, dtype=torch.float64) * 3
    mask = torch.zeros(2 * P, L, dtype=torch.long)
    for r in range(2 * P):
        mask[r, L - 1 - int(torch.randint(1, L - 2, (1,), generator=g)) :] = 1
    ref = -torch.rand(2 * P, generator=g, dtype=torch.float64) * 20
    return token_logps, mask, ref


def trl_dpo_loss(kind, beta, token_logps, mask, ref):
    """TRL's DPOTrainer._compute_loss on a model whose per-token log-probs are given."""
    shift = mask[:, 1:]
    outputs = types.SimpleNamespace(
        log_probs=token_logps * shift,  # TRL's fused head: 0 where the label is -100
        entropy=torch.zeros_like(token_logps),
        mean_logits=torch.zeros_like(token_logps),
        is_top1=torch.zeros_like(token_logps, dtype=torch.bool),
    )
    acc = types.SimpleNamespace(device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t)
    me = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[kind], loss_weights=[1.0], beta=beta, use_weighting=False,
        label_smoothing=0.0, _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
        _tp_size=1,
    )  # fmt: skip
    inputs = {
        "input_ids": torch.zeros(2 * P, L, dtype=torch.long),
        "attention_mask": torch.ones(2 * P, L, dtype=torch.long),
        "completion_mask": mask,
        "ref_chosen_logps": ref[:P],
        "ref_rejected_logps": ref[P:],
    }
    loss = DPOTrainer._compute_loss(me, lambda **kw: outputs, inputs, False)
    return loss, {k: v[-1] for k, v in me._metrics["train"].items()}


def ours(kind, beta, gamma, token_logps, mask, ref):
    sums = (token_logps * mask[:, 1:]).sum(1)
    logps = torch.stack([sums[:P], sums[P:]], 1)
    n = mask[:, 1:].sum(1)
    refs = None if ref is None else torch.stack([ref[:P], ref[P:]], 1)
    return preference_loss(kind, beta, gamma, logps, refs, torch.stack([n[:P], n[P:]], 1))


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_and_ipo_equal_trl_with_gradients(kind, beta):
    token_logps, mask, ref = batch()
    a = token_logps.clone().requires_grad_()
    b = token_logps.clone().requires_grad_()
    want, trl_metrics = trl_dpo_loss(kind, beta, a, mask, ref)
    got, metrics = ours(kind, beta, 0.0, b, mask, ref)
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    want.backward()
    got.backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-5)
    assert a.grad.abs().sum() > 0
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected"):  # fmt: skip
        assert metrics[k].item() == pytest.approx(trl_metrics[k], abs=1e-5), k


@pytest.mark.parametrize("beta, gamma", [(2.0, 0.5), (0.1, 1.0)])
def test_simpo_equals_trl_cpo_simpo(beta, gamma):
    token_logps, mask, _ = batch(1)
    a = token_logps.clone().requires_grad_()
    b = token_logps.clone().requires_grad_()
    # TRL's CPOTrainer averages the answer's log-probs per token for SimPO.
    shift = mask[:, 1:]
    avg = (a * shift).sum(1) / shift.sum(1)
    me = types.SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta,
                               label_smoothing=0.0, accelerator=types.SimpleNamespace(device="cpu"))  # fmt: skip
    losses, chosen_r, rejected_r = CPOTrainer.cpo_loss(me, avg[:P], avg[P:])
    want = losses.mean()
    got, metrics = ours("simpo", beta, gamma, b, mask, None)
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    want.backward()
    got.backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-5) and a.grad.abs().sum() > 0
    assert metrics["rewards/chosen"].item() == pytest.approx(chosen_r.mean().item(), abs=1e-5)
    assert metrics["rewards/rejected"].item() == pytest.approx(rejected_r.mean().item(), abs=1e-5)


def test_unknown_loss_and_missing_reference():
    token_logps, mask, ref = batch()
    with pytest.raises(ValueError, match="unknown preference loss"):
        ours("hinge", 0.1, 0.0, token_logps, mask, ref)
    with pytest.raises(ValueError, match="needs the reference"):
        ours("sigmoid", 0.1, 0.0, token_logps, mask, None)


def test_objective_ipo_and_simpo_are_dpo_with_that_loss():
    from lmforge.config import ConfigError, load_config
    from tests.conftest import REPO

    tiny = REPO / "jobs" / "configs" / "tiny.yaml"
    for kind in ("ipo", "simpo"):
        t = load_config(tiny, [f"train.objective={kind}"]).train
        assert (t.objective, t.dpo.loss) == ("dpo", kind)
    t = load_config(tiny, ["train.objective=dpo", "train.dpo.loss=ipo"]).train
    assert (t.objective, t.dpo.loss) == ("dpo", "ipo")
    with pytest.raises(ConfigError, match="train.objective=ipo with train.dpo.loss=simpo"):
        load_config(tiny, ["train.objective=ipo", "train.dpo.loss=simpo"])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_logps_equal_each_pair_alone(tmp_path, arch):
    rows = [{"prompt": f"Q{i}: " + "what " * (i % 5), "chosen": "yes " * (i % 3 + 1),
             "rejected": "no " * (i % 4 + 1)} for i in range(30)]  # fmt: skip
    ds, _ = pairs_dataset(tmp_path / "ds", write_rows(tmp_path / "p.jsonl", rows))
    torch.manual_seed(0)
    model = models.build(ModelConfig(arch=arch, vocab_size=ds.vocab_size, context_length=64,
                                     d_model=32, n_layer=2, n_head=2, dropout=0.0))  # fmt: skip
    model.eval()
    packed = next(PairStream(ds, "train", 64, 2).batches())
    assert packed.n_pairs >= 3  # several pairs share a window
    with torch.no_grad():
        logits, _ = model(packed.x, segments=packed.segments)
        got, n = sequence_logps(logits, packed.labels, packed.seq, 2 * packed.n_pairs)
        for i in range(2 * packed.n_pairs):
            r = (packed.seq == i).any(1).nonzero().item()
            cols = (packed.seq[r] == i).nonzero().flatten()
            seg = packed.segments[r, cols[0]]
            where = (packed.segments[r] == seg).nonzero().flatten()
            x = packed.x[r, where].unsqueeze(0)
            y = packed.labels[r, where].unsqueeze(0)
            lo, _ = model(x)  # the sequence alone, from position 0, no packing
            one, k = sequence_logps(lo, y, torch.where(y >= 0, 0, -1), 1)
            assert one.item() == pytest.approx(got[i].item(), abs=1e-5)
            assert k.item() == n[i].item() > 0
