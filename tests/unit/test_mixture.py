"""Mixtures (`lmforge.data.mixture`) through the real stream, without Ray: the realised
token shares follow the weights (and a schedule), resume is exact and a re-sharded resume
reads every rest target once, a source that runs out says so; what cannot mix is refused
before anything starts, one line each."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmforge.config import ConfigError, DataConfig, config_from_dict
from lmforge.data.dataset import Dataset, DatasetError
from lmforge.data.mixture import Mixture, MixtureStream, Weights
from lmforge.data.prepare import PrepareOptions, split_and_write
from lmforge.tokenizer import train_tokenizer

BAND = 20_000  # source s holds the ids s*BAND + 1, + 2, ... each once: a target says its source


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["a b c d e f g h"] * 5, vocab_size=300)


def make_source(path, tok, s: int, doc_len: tuple[int, int], n_tokens: int = 12_000):
    """A dataset of source `s`'s band of ids (each once), documents `doc_len` tokens long."""
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    rng = np.random.default_rng(s)
    docs, total = [], 0
    while total < n_tokens:
        n = int(rng.integers(*doc_len))
        docs.append(s * BAND + 1 + total + np.arange(n))
        total += n
    opts = PrepareOptions(val_fraction=0.1, seq_tokens=64, rows_per_group=2, groups_per_shard=4)
    split_and_write(iter(docs), path, tok, opts, sources=[])
    return Dataset(path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tok):
    """Three sources of very different document lengths (short, long, mid)."""
    root = tmp_path_factory.mktemp("mix")
    lengths = [(10, 40), (400, 900), (60, 200)]
    sizes = [12_000, 12_000, 4_000]  # the third runs out first
    return [make_source(root / f"s{s}", tok, s, lengths[s], sizes[s]) for s in range(3)]


def data_cfg(sources, weights=(0.5, 0.3, 0.2), **extra) -> DataConfig:
    raw = [
        {"path": str(ds.path), "weight": w, "name": f"s{i}"}
        for i, (ds, w) in enumerate(zip(sources, weights, strict=True))
    ]
    return DataConfig(sources=raw, **extra)


def streams(mix, world, B=4, accum=1, T=16, said=None, document_mask=False):
    return [
        MixtureStream(mix, T, B, r, world, seed=7, document_mask=document_mask,
                      windows_per_step=B * accum,
                      say=said.append if said is not None and r == 0 else None)
        for r in range(world)
    ]  # fmt: skip


def source_of(y) -> np.ndarray:
    """The source of each row of a batch's targets."""
    return (y[:, 0].numpy() - 1) // BAND


def test_realised_token_shares_follow_the_weights(sources):
    mix = Mixture(data_cfg(sources))
    said: list[str] = []
    ss = streams(mix, world=2, B=8, said=said)
    its = [s.batches() for s in ss]
    rows = np.zeros(3)
    logged = np.zeros(3)
    for _ in range(100):  # 100 steps of 2 workers x 8 windows
        for it in its:
            _, y = next(it)
            assert (source_of(y)[:, None] == (y.numpy() - 1) // BAND).all()  # rows are pure
            rows += np.bincount(source_of(y), minlength=3)
        m = ss[0].step_metrics()
        logged += [m[f"data/s{i}/tokens"] for i in range(3)]
        ss[1].step_metrics()
    shares = rows / rows.sum()
    assert np.abs(shares - [0.5, 0.3, 0.2]).max() < 0.02, shares
    # The logged tokens per source are the tokens the workers read (T targets a window).
    np.testing.assert_array_equal(logged, rows * 16)
    # s2 (4,000 tokens, 20% of 25,600) ran out and started its next epoch; the log says so.
    assert any("source s2 ran out; it starts its epoch 1" in line for line in said), said


def test_weights_follow_a_schedule_linear_or_stepwise(sources):
    points = [{"step": 0, "weights": {"s0": 1.0}}, {"step": 10, "weights": {"s1": 1.0}}]
    linear = Weights(data_cfg(sources, schedule=points))
    assert linear.at(0) == [1.0, 0.0, 0.0]
    assert linear.at(5) == pytest.approx([0.5, 0.5, 0.0])
    assert linear.at(10) == linear.at(99) == [0.0, 1.0, 0.0]
    step = Weights(data_cfg(sources, schedule=points, schedule_interpolation="step"))
    assert step.at(9) == [1.0, 0.0, 0.0] and step.at(10) == [0.0, 1.0, 0.0]
    # Through the stream: the step of a window (B*accum windows a step) picks its weights.
    mix = Mixture(data_cfg(sources, schedule=points, schedule_interpolation="step"))
    (s,) = streams(mix, world=1, B=4, accum=2)
    it = s.batches()
    per_step = [np.bincount(np.concatenate([source_of(next(it)[1]) for _ in range(2)]),
                            minlength=3) for _ in range(12)]  # fmt: skip
    assert all(c.tolist() == [8, 0, 0] for c in per_step[:10])
    assert all(c.tolist() == [0, 8, 0] for c in per_step[10:])


@pytest.mark.parametrize("T", [16, 256])  # a batch's rows gathered at once, or copied
def test_resume_continues_exactly(sources, T):
    mix = Mixture(data_cfg(sources))
    whole = [next(it) for it in [streams(mix, 1, T=T)[0].batches()] for _ in range(60)]
    first = streams(mix, 1, T=T)[0]
    it = first.batches()
    for _ in range(25):  # mid-block (16 batches a block): the position is the 25th batch's
        next(it)
    saved = json.loads(json.dumps(first.state_dict()))  # as a checkpoint keeps it
    again = streams(mix, 1, T=T)[0]
    again.resume([saved])
    it = again.batches()
    for x, y in whole[25:]:
        bx, by = next(it)
        assert (bx == x).all() and (by == y).all()


def test_a_resharded_resume_reads_every_rest_target_once(sources):
    """2 workers stop mid-run, 3 go on (the optimizer's re-sharded resume): each source's
    targets are read at most once (no source reaches its next epoch here), and the choice
    of sources goes on as an uninterrupted run's does."""
    mix = Mixture(data_cfg(sources, weights=(0.4, 0.4, 0.2)))
    B = 4
    per_source: dict[int, list[int]] = {0: [], 1: [], 2: []}
    uninterrupted = streams(mix, 2, B)[0]
    expected = [uninterrupted.counts(B) for _ in range(20)]

    def read(ss, n):
        its = [s.batches() for s in ss]
        comps = []
        for _ in range(n):
            comp = None
            for it in its:
                _, y = next(it)
                src = source_of(y)
                for row, k in zip(y.numpy(), src, strict=True):
                    per_source[int(k)] += row.tolist()
                c = np.bincount(src, minlength=3).tolist()
                assert comp in (None, c)  # every worker has the same composition
                comp = c
            comps.append(comp)
        return comps

    old = streams(mix, 2, B)
    comps = read(old, 8)
    positions = json.loads(json.dumps([s.state_dict() for s in old]))
    new = streams(mix, 3, B)
    for s in new:
        s.resume(positions)
    comps += read(new, 12)
    assert comps == expected  # which source comes next did not change
    for k, targets in per_source.items():
        assert targets, f"s{k} gave no window"
        assert len(targets) == len(set(targets)), f"s{k}: a target read twice"


def test_a_source_set_only_at_a_later_step_waits_for_it(sources):
    points = [{"step": 0, "weights": {"s0": 1.0, "s1": 0.0}}, {"step": 3, "weights": {"s1": 1.0}}]
    mix = Mixture(data_cfg(sources, schedule=points, schedule_interpolation="step"))
    (s,) = streams(mix, 1, B=2)
    assert s.counts(6) == [6, 0, 0] and s.counts(2) == [0, 2, 0]


def test_what_cannot_mix_is_refused_in_one_line(sources, tmp_path, tok):
    other = make_source(tmp_path / "other", train_tokenizer(["x y z"] * 5, 280), 0, (10, 40))
    with pytest.raises(DatasetError, match=r"s0 \(.*\) and s1 \(.*other\) were prepared with "
                       r"different tokenizers"):  # fmt: skip
        Mixture(data_cfg([sources[0], other], weights=(1, 1)))
    cfg = data_cfg(sources)
    missing = cfg.model_copy(update={"sources": [*cfg.sources[:2], cfg.sources[2].model_copy(
        update={"path": str(tmp_path / "gone")})]})  # fmt: skip
    with pytest.raises(DatasetError, match=r"data.sources\[2\] \(s2\): .*gone: dataset dir not"):
        Mixture(missing)
    for raw, message in [
        ([{"path": "a", "weight": -0.5}], r"data.sources\[0\].weight=-0.5 \(a\): must be >= 0"),
        ([{"path": "a", "weight": 0}, {"path": "b", "weight": 0}], "the weights sum to 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"data": {"sources": raw}})
    with pytest.raises(ConfigError, match=r"data.schedule\[1\].step=5: out of order"):
        config_from_dict({"data": {"sources": [{"path": "a"}], "schedule": [
            {"step": 10, "weights": {"a": 1}}, {"step": 5, "weights": {"a": 1}}]}})  # fmt: skip
    for e in (ConfigError, DatasetError):
        assert "\n" not in str(e)


def test_sft_and_text_mix_only_with_document_masks(sources, tmp_path, tok):
    from tests.unit.test_sft_stream import make_sft, synthetic

    chat, _ = make_sft(tmp_path / "chat", tok, synthetic(200))
    raw = [{"path": str(sources[0].path), "name": "text"}, {"path": str(chat.path), "name": "chat"}]
    with pytest.raises(DatasetError, match=r"chat is an SFT dataset and text is text; .*"
                       r"data.document_mask=true"):  # fmt: skip
        Mixture(DataConfig(sources=raw))
    mix = Mixture(DataConfig(sources=raw, document_mask=True))
    (s,) = streams(mix, 1, B=4, document_mask=True)
    x, y, segments = next(s.batches())  # masked batches from both: (x, labels, segments)
    assert x.shape == y.shape == segments.shape == (4, 16)
