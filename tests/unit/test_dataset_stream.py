"""The dataset dir contract and the per-worker token stream, without Ray."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lmforge.data.dataset import Dataset, DatasetError
from lmforge.data.prepare import PrepareOptions, split_and_write
from lmforge.data.stream import TokenStream, redeal, worker_units
from lmforge.tokenizer import train_tokenizer


def make_dataset(path, n_docs=40, seed=0, val_fraction=0.1):
    """Documents of known token ids (doc d holds d*1000 + i), packed and split."""
    tok = train_tokenizer(["a b c d e"] * 5, vocab_size=300)
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    rng = np.random.default_rng(0)
    docs = [np.arange(int(rng.integers(20, 300)), dtype=np.int64) % 250 for _ in range(n_docs)]
    opts = PrepareOptions(val_fraction=val_fraction, seed=seed, seq_tokens=64, rows_per_group=2,
                          groups_per_shard=3)  # fmt: skip
    manifest = split_and_write(iter(docs), path, tok, opts, sources=[])
    return Dataset(path), manifest, docs


def test_manifest_counts_add_up(tmp_path):
    ds, m, docs = make_dataset(tmp_path / "ds")
    assert m["documents"] == len(docs)
    assert m["tokens"] == sum(len(d) for d in docs)
    assert m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"] == m["tokens"]
    for split in ("train", "val"):
        entry = m["splits"][split]
        assert entry["tokens"] == sum(s["tokens"] for s in entry["shards"])
        rows = 0
        for shard in entry["shards"]:
            pf = pq.ParquetFile(ds.path / shard["file"])
            assert pf.metadata.num_row_groups == len(shard["row_group_tokens"])
            col = pf.read().column("tokens")
            assert sum(len(r) for r in col.to_pylist()) == shard["tokens"]
            rows += pf.metadata.num_rows
        assert rows == entry["sequences"]
    assert len(m["splits"]["train"]["shards"]) > 1  # groups_per_shard=3 forces several shards
    # The val share is exactly the requested fraction of 64-token chunks.
    n_chunks = sum(-(-len(d) // 64) for d in docs)
    val_rows_tokens = m["splits"]["val"]["tokens"]
    assert 0 < val_rows_tokens <= 64 * (n_chunks // 10 + 1)


def test_split_is_deterministic_and_seeded(tmp_path):
    _, a, _ = make_dataset(tmp_path / "a")
    _, b, _ = make_dataset(tmp_path / "b")
    _, c, _ = make_dataset(tmp_path / "c", seed=1)
    sha = lambda m: [s["sha256"] for s in m["splits"]["train"]["shards"]]  # noqa: E731
    assert sha(a) == sha(b)
    assert sha(a) != sha(c)


def test_worker_shares_are_disjoint_and_cover_the_split(tmp_path):
    ds, _, _ = make_dataset(tmp_path / "ds", n_docs=80)
    units = ds.units("train")
    for world in (1, 2, 3):
        for epoch in (0, 1):
            shares = [worker_units(units, r, world, seed=7, epoch=epoch) for r in range(world)]
            flat = [u for s in shares for u in s]
            assert len(flat) == len(set(flat)) == len(units)
    a = worker_units(units, 0, 2, seed=7, epoch=0)
    assert a == worker_units(units, 0, 2, seed=7, epoch=0)  # deterministic
    assert a != worker_units(units, 0, 2, seed=7, epoch=1)  # reshuffled each epoch


def test_windows_cover_each_share_once_per_epoch(tmp_path):
    ds, _, _ = make_dataset(tmp_path / "ds", n_docs=80)
    T = 16
    for rank in range(2):
        s = TokenStream(ds, "train", T, batch_size=1, rank=rank, world=2, seed=3)
        units = s.my_units(0)
        stream = np.concatenate([pq.ParquetFile(u.file).read_row_group(u.row_group)
                                 .column(0).combine_chunks().flatten().to_numpy() for u in units])  # fmt: skip
        it = s.windows()
        n = (len(stream) - 1) // T
        got = [next(it) for _ in range(n)]
        assert all(len(w) == T + 1 for w in got)
        np.testing.assert_array_equal(np.concatenate([w[:-1] for w in got]), stream[: n * T])
        assert s.state_dict()["epoch"] == 0
        next(it)
        assert s.state_dict()["epoch"] == 1  # rolled over into the next epoch


def epoch_stream(s: TokenStream, epoch: int) -> np.ndarray:
    """This worker's token stream for an epoch, read straight from the shards."""
    return np.concatenate([pq.ParquetFile(u.file).read_row_group(u.row_group).column(0)
                           .combine_chunks().flatten().to_numpy() for u in s.my_units(epoch)])  # fmt: skip


def test_batches_are_the_windows_in_order_across_epochs(tmp_path):
    """Batches are cut from whole runs of windows at once: the same windows, in the same
    order, as the stream read by hand, with the position after each batch exact."""
    ds, _, _ = make_dataset(tmp_path / "ds", n_docs=80)
    T, B = 16, 5
    s = TokenStream(ds, "train", T, batch_size=B, rank=0, world=2, seed=3)
    windows = []
    for epoch in (0, 1, 2):
        stream = epoch_stream(s, epoch)
        n = (len(stream) - 1) // T
        windows += [(epoch, (i + 1) * T, stream[i * T : i * T + T + 1]) for i in range(n)]
    it = s.batches()
    for b in range(len(windows) // B - 1):
        x, y = next(it)
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (B, T)
        want = windows[b * B : (b + 1) * B]
        np.testing.assert_array_equal(x.numpy(), np.stack([w[:-1] for _, _, w in want]))
        np.testing.assert_array_equal(y.numpy(), np.stack([w[1:] for _, _, w in want]))
        assert s.state_dict() == {"epoch": want[-1][0], "offset": want[-1][1]}


def test_one_pass_reads_the_share_once_and_leaves_the_position(tmp_path):
    ds, _, _ = make_dataset(tmp_path / "ds", n_docs=80)
    T, B = 16, 4
    s = TokenStream(ds, "val", T, batch_size=B, shuffle=False)
    stream = epoch_stream(s, 0)
    n = (len(stream) - 1) // T
    got = list(s.one_pass())
    assert [len(x) for x, _ in got] == [B] * (n // B) + ([n % B] if n % B else [])
    np.testing.assert_array_equal(torch.cat([x for x, _ in got]).flatten().numpy(), stream[: n * T])
    assert s.state_dict() == {"epoch": 0, "offset": 0}


def test_resume_continues_at_the_same_batch(tmp_path):
    ds, _, _ = make_dataset(tmp_path / "ds", n_docs=80)
    a = TokenStream(ds, "train", 16, batch_size=4, rank=1, world=2, seed=3)
    it = a.batches()
    for _ in range(13):  # past an epoch boundary of this small share
        next(it)
    state = json.loads(json.dumps(a.state_dict()))
    expected = [next(it) for _ in range(5)]
    b = TokenStream(ds, "train", 16, batch_size=4, rank=1, world=2, seed=3)
    b.load_state_dict(state)
    it_b = b.batches()
    for x, y in expected:
        bx, by = next(it_b)
        assert (bx == x).all() and (by == y).all()
        assert (x[:, 1:] == y[:, :-1]).all()


def test_dataset_dir_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        Dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="manifest.json: no manifest"):
        Dataset(tmp_path / "empty")
    ds, _, _ = make_dataset(tmp_path / "ds")
    (ds.path / "tokenizer.json").write_text("{}")
    with pytest.raises(DatasetError, match="tokenizer differs"):
        Dataset(ds.path)


def test_truncated_shard_is_a_clear_error(tmp_path):
    ds, m, _ = make_dataset(tmp_path / "ds")
    shard = ds.path / m["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:100])
    s = TokenStream(Dataset(ds.path), "train", 16, batch_size=2, world=1)
    with pytest.raises(DatasetError, match=shard.name):
        for _ in range(100):
            next(s.batches())


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_truncated_shard_is_named_before_training(tmp_path):
    """The launcher's dataset check reads every shard's footer before Ray starts."""
    from lmforge.config import load_config
    from lmforge.training.plan import build_plan
    from tests.conftest import REPO

    ds, m, _ = make_dataset(tmp_path / "ds")
    Dataset(ds.path).check_shards()
    shard = ds.path / m["splits"]["train"]["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-200])
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", [f"data.path={ds.path}"])
    with pytest.raises(DatasetError, match=f"{shard}: cannot read it as Parquet") as err:
        build_plan(cfg)
    assert "truncated or corrupt shard" in _one_line(err)


def test_corrupt_shard_is_named_when_read(tmp_path):
    """Bytes changed inside a data page (footer intact): the page checksum catches it."""
    ds, m, _ = make_dataset(tmp_path / "ds")
    shard = ds.path / m["splits"]["train"]["shards"][0]["file"]
    col = pq.ParquetFile(shard).metadata.row_group(0).column(0)
    start = col.dictionary_page_offset or col.data_page_offset
    middle = start + col.total_compressed_size // 2
    data = bytearray(shard.read_bytes())
    data[middle : middle + 8] = bytes(b ^ 0x5A for b in data[middle : middle + 8])
    shard.write_bytes(bytes(data))
    Dataset(ds.path).check_shards()  # the footer is intact: only reading finds it
    s = TokenStream(Dataset(ds.path), "train", 16, batch_size=2, world=1, shuffle=False)
    with pytest.raises(DatasetError, match=f"{shard}: cannot read row group 0") as err:
        for _ in range(100):
            next(s.batches())
    assert "a corrupt shard" in _one_line(err)


def test_shard_from_another_tokenizer_is_named(tmp_path):
    ds, m, _ = make_dataset(tmp_path / "ds")
    shard = ds.path / m["splits"]["val"]["shards"][0]["file"]
    table = pq.read_table(shard)
    other = {b"lmforge.tokenizer_sha256": b"f" * 64}  # as a shard of another dataset has
    pq.write_table(table.replace_schema_metadata(other), shard)
    with pytest.raises(DatasetError, match=f"{shard}: tokenized with tokenizer sha256 ffff") as e:
        Dataset(ds.path).check_shards()
    assert ds.tokenizer_sha256[:12] in _one_line(e)


def unique_dataset(path, n_docs=60):
    """Every token of the corpus a distinct id, so a target names its place in the data."""
    tok = train_tokenizer(["a b c d e"] * 5, vocab_size=300)
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    rng = np.random.default_rng(1)
    lengths = rng.integers(40, 300, n_docs)
    ids = np.arange(1, int(lengths.sum()) + 1)
    docs = np.split(ids, np.cumsum(lengths)[:-1])
    opts = PrepareOptions(val_fraction=0.1, seq_tokens=64, rows_per_group=2, groups_per_shard=3)
    split_and_write(iter(docs), path, tok, opts, sources=[])
    ds = Dataset(path)
    every = epoch_stream(TokenStream(ds, "train", 16, 1), 0)
    assert len(set(every.tolist())) == len(every)
    return ds, set(every.tolist())


def read_targets(stream: TokenStream, n: int | None, epoch: int) -> list[int]:
    """The targets of the next `n` batches (or of every batch left in `epoch`), read as
    training reads them: `batches()`. A batch that runs into the next epoch gives only its
    rows of `epoch`; the stream's position says how many rows of the next one it holds."""
    out, it = [], stream.batches()
    while n is None or len(out) < n * stream.batch_size * stream.T:
        _, y = next(it)
        if stream.epoch > epoch:
            spill = stream.offset // stream.T
            out += y[: len(y) - spill].flatten().tolist()
            break
        out += y.flatten().tolist()
    return out


@pytest.mark.parametrize("worlds", [(2, 3), (3, 2), (2, 1), (1, 2), (2, 3, 2)])
def test_resuming_on_another_number_of_workers_reads_each_target_once(tmp_path, worlds):
    """Workers stopped mid-epoch, resumed on another number of workers (and again) as the
    trainer resumes them (`resume`, then `batches`): the targets of the rest of the epoch
    are read once each, none twice, few left out; the next epoch is dealt as usual."""
    ds, every = unique_dataset(tmp_path / "ds")
    T, B, read = 16, 3, []
    streams = [TokenStream(ds, "train", T, B, r, worlds[0], seed=5) for r in range(worlds[0])]
    for world in worlds[1:]:
        for s in streams:
            read += read_targets(s, 3, epoch=0)
        positions = json.loads(json.dumps([s.state_dict() for s in streams]))
        streams = [TokenStream(ds, "train", T, B, r, world, seed=5) for r in range(world)]
        for s in streams:
            s.resume(positions)
            assert s.state_dict()["epoch"] == 0 and "pieces" in s.state_dict()
    for s in streams:
        read += read_targets(s, None, epoch=0)
        state = s.state_dict()
        assert state["epoch"] == 1 and "pieces" not in state  # then epochs dealt as usual:
        usual, off = epoch_stream(s, 1), state["offset"]  # this worker's share of epoch 1
        _, y = next(s.batches())
        np.testing.assert_array_equal(y.numpy(), usual[off + 1 : off + 1 + B * T].reshape(B, T))
    assert len(read) == len(set(read))  # no target read twice
    missed = every - set(read)
    passes = sum(worlds)  # each pass's first token is never a target; its tail is dropped
    assert len(missed) <= passes * (T + 1), len(missed)


def test_a_dealt_pass_resumes_exactly_from_a_checkpoint(tmp_path):
    ds, _ = unique_dataset(tmp_path / "ds")
    old = [TokenStream(ds, "train", 16, 2, r, 2, seed=5) for r in range(2)]
    for s in old:
        read_targets(s, 3, epoch=0)
    positions = [s.state_dict() for s in old]
    a = TokenStream(ds, "train", 16, 4, 1, 3, seed=5)
    a.resume(positions)
    it = a.batches()
    next(it)
    state = json.loads(json.dumps(a.state_dict()))
    expected = [next(it) for _ in range(4)]
    b = TokenStream(ds, "train", 16, 4, 1, 3, seed=5)
    b.resume([state] * 3)  # as many positions as workers: each takes its own as it is
    it_b = b.batches()
    for x, y in expected:
        bx, by = next(it_b)
        assert (bx == x).all() and (by == y).all()


def test_workers_an_epoch_apart_leave_no_share_unread(tmp_path):
    """Rank 0 began epoch 1 while rank 1 still reads epoch 0: rank 1's epoch-1 share is
    dealt too, so the new pass holds every token the old workers had yet to read."""
    ds, _ = unique_dataset(tmp_path / "ds")
    tokens = [u.tokens for u in ds.units("train")]
    old = [TokenStream(ds, "train", 16, 1, r, 2, seed=5) for r in range(2)]
    share = [[sum(u.tokens for u in s.my_units(e)) for e in (0, 1)] for s in old]
    positions = [{"epoch": 1, "offset": 32}, {"epoch": 0, "offset": share[1][0] - 40}]
    new = redeal(positions, tokens, seed=5, world=3)
    dealt = sum(tokens[i] - t for p in new for i, t in p["pieces"])
    assert dealt == (share[0][1] - 33) + (40 - 1) + share[1][1]
    assert all(p["epoch"] == 1 for p in new)
