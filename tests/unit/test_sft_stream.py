"""SFT datasets (one example a row + a target mask) and masked batches (labels, segments),
written and read without Ray; resume and re-sharded resume carry the masks."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from lmforge import templates
from lmforge.data import sft
from lmforge.data.dataset import Dataset
from lmforge.data.prepare import PrepareOptions, resolve_template, split_and_write_sft
from lmforge.data.readers import CorpusError
from lmforge.data.stream import TokenStream
from lmforge.errors import UsageError
from lmforge.templates import TemplateError
from lmforge.tokenizer import EOT, eot_id, train_tokenizer
from tests.unit.test_dataset_stream import make_dataset

PROMPT, COMPLETION = range(1, 100), range(100, 200)  # synthetic ids: which is which is visible


@pytest.fixture(scope="module")
def tok():
    text = "### Instruction:\nName a colour.\n\n### Response:\nRed, blue or green."
    return train_tokenizer([text] * 20, vocab_size=300)


def synthetic(n, seed=0):
    """Examples whose ids say what they are: prompt ids < 100, completion ids >= 100; no
    eos yet (the writer appends it, a target after a completion)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = rng.integers(1, 100, int(rng.integers(3, 30)))
        c = rng.integers(100, 200, int(rng.integers(1, 12)))
        ids = np.concatenate([p, c]).astype(np.int64)
        out.append(sft.Example(ids, ids >= 100))
    return out


def make_sft(path, tok, examples, **kw):
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    opts = PrepareOptions(format="sft", template="instruct", val_fraction=kw.pop("val", 0.1),
                          seq_tokens=64, rows_per_group=3, groups_per_shard=2, **kw)  # fmt: skip
    t = templates.get("instruct", eos_token=EOT)
    m = split_and_write_sft(iter(examples), path, tok, opts, [{"path": "rows.jsonl"}], t)
    return Dataset(path), m


def test_writer_rows_masks_manifest_and_template(tmp_path, tok):
    t = templates.get("instruct", eos_token=EOT)
    rows = [{"prompt": f"Name colour {i}.", "completion": "Red."} for i in range(30)]
    rows[7]["prompt"] = "Name a colour. " * 40  # too long for 64 tokens: dropped
    exs = [sft.encode(tok, t, templates.to_messages(r), 64, "drop") for r in rows]
    assert exs[7] is None
    ds, m = make_sft(tmp_path / "ds", tok, exs)
    q = m["sft"]
    assert (q["rows"], q["examples"], q["dropped_too_long"], q["cut"]) == (30, 29, 1, 0)
    assert m["data_format"] == "sft" == ds.data_format and m["documents"] == 29
    assert q["template"]["name"] == "instruct" and q["template"]["source"] == t.source
    assert ds.template == t  # template.json beside the manifest
    got, n_targets = [], 0
    for split in ("train", "val"):
        for shard in m["splits"][split]["shards"]:
            table = pq.read_table(ds.path / shard["file"])
            assert table.column_names == ["tokens", "targets"]
            for ids, mask in zip(table.column("tokens").to_pylist(),
                                 table.column("targets").to_pylist(), strict=True):  # fmt: skip
                assert len(ids) == len(mask) and ids[-1] == eot_id(tok)
                got.append((ids, mask))
                n_targets += sum(mask)
    assert len(got) == 29 and m["splits"]["val"]["sequences"] in (2, 3)
    assert q["target_tokens"] == n_targets
    kept = [e for e in exs if e is not None]
    # Each row is an encoded example up to its last eos (the template's "\n\n" after it
    # goes), its mask aligned.
    cut = [int(np.flatnonzero(e.ids == eot_id(tok))[-1]) + 1 for e in kept]
    by_ids = {
        tuple(e.ids[:n].tolist()): e.targets[:n].tolist() for e, n in zip(kept, cut, strict=True)
    }
    for ids, mask in got:
        assert by_ids[tuple(ids)] == mask
        assert tok.decode([i for i, t in zip(ids, mask, strict=True) if t],
                          skip_special_tokens=False).strip() == "Red." + EOT  # fmt: skip
    ds.check_shards()


def test_cut_rows_and_empty_input(tmp_path, tok):
    t = templates.get("instruct", eos_token=EOT)
    long = templates.to_messages({"prompt": "Name a colour. " * 40, "completion": "Red."})
    short = templates.to_messages({"prompt": "Hi.", "completion": "Red."})
    exs = [sft.encode(tok, t, m, 64, "cut-prompt") for m in [long, short] * 6]
    _, m = make_sft(tmp_path / "cut", tok, exs, prompt_policy="cut-prompt")
    assert (m["sft"]["rows"], m["sft"]["cut"], m["sft"]["dropped_too_long"]) == (12, 6, 0)
    with pytest.raises(CorpusError, match="rows.jsonl: no rows"):
        make_sft(tmp_path / "empty", tok, [])
    with pytest.raises(CorpusError, match="all 3 row\\(s\\) are longer than --seq-tokens 64"):
        make_sft(tmp_path / "long", tok, [None] * 3)


def test_options_and_templates_are_checked(tmp_path):
    with pytest.raises(UsageError, match="--format sft needs --template"):
        PrepareOptions(format="sft")
    with pytest.raises(UsageError, match="--prompt-policy must be one of drop, cut-prompt"):
        PrepareOptions(format="sft", template="chat", prompt_policy="trim")
    with pytest.raises(UsageError, match="--template is for --format sft"):
        PrepareOptions(template="chat")
    with pytest.raises(TemplateError, match="unknown template 'chatty'"):
        resolve_template("chatty", EOT)
    with pytest.raises(TemplateError, match="nope.jinja: template file not found"):
        resolve_template(str(tmp_path / "nope.jinja"), EOT)
    f = tmp_path / "mine.jinja"
    f.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    t, where = resolve_template(str(f), EOT)
    assert t.name == "mine" and where == str(f)


def check_masked(x, y, seg, eot):
    """A masked SFT batch against what its tokens say (synthetic ids): a label is the next
    token where that is a completion token or the eos after one, and not the first token
    of an example; segments count the examples ended before each position."""
    x, y, seg = x.numpy(), y.numpy(), seg.numpy()
    nxt = x[:, 1:]
    want = np.where(((nxt >= 100) | (nxt == eot)) & (x[:, :-1] != eot), nxt, -100)
    np.testing.assert_array_equal(y[:, :-1], want)
    assert set(np.unique(y[:, -1])) <= {-100, eot, *COMPLETION}
    ends = (x == eot).astype(np.int64)
    np.testing.assert_array_equal(seg, np.cumsum(ends, axis=1) - ends)
    assert (np.diff(seg, axis=1) >= 0).all() and (seg[:, 0] == 0).all()


def test_sft_batches_carry_labels_and_segments(tmp_path, tok):
    ds, _ = make_sft(tmp_path / "ds", tok, synthetic(200))
    eot = eot_id(tok)
    s = TokenStream(ds, "train", 32, batch_size=4, rank=0, world=2, seed=3)
    it = s.batches()
    for _ in range(20):
        x, y, seg = next(it)
        assert x.shape == y.shape == seg.shape == (4, 32)
        check_masked(x, y, seg, eot)
    assert (seg.max(dim=1).values > 0).any()  # windows hold several examples
    # The tokens are the plain stream's: the masks ride along, nothing moves.
    plain = TokenStream(ds, "train", 32, batch_size=4, rank=0, world=2, seed=3)
    plain.sft = plain.masked = False  # the same stream read without its masks
    masked = TokenStream(ds, "train", 32, batch_size=4, rank=0, world=2, seed=3).batches()
    for _, (px, py), (x, y, _) in zip(range(20), plain.batches(), masked, strict=False):
        assert np.array_equal(px.numpy(), x.numpy())
        keep = y.numpy() != -100
        assert keep.any() and np.array_equal(py.numpy()[keep], y.numpy()[keep])
    for x, y, seg in TokenStream(ds, "val", 32, 2, shuffle=False).one_pass():
        check_masked(x, y, seg, eot)


def test_resumed_and_resharded_streams_keep_the_masks(tmp_path, tok):
    ds, _ = make_sft(tmp_path / "ds", tok, synthetic(300, seed=1), val=0.05)
    a = TokenStream(ds, "train", 16, batch_size=3, rank=1, world=2, seed=5)
    it = a.batches()
    for _ in range(7):
        next(it)
    saved = json.loads(json.dumps(a.state_dict()))
    rest = [next(it) for _ in range(5)]
    b = TokenStream(ds, "train", 16, batch_size=3, rank=1, world=2, seed=5)
    b.load_state_dict(saved)
    it_b = b.batches()
    for want in rest:
        got = next(it_b)
        assert all(np.array_equal(w.numpy(), g.numpy()) for w, g in zip(want, got, strict=True))
    # Saved by 2 workers, resumed on 3: the re-dealt pieces still carry their masks.
    old = [TokenStream(ds, "train", 16, 2, r, 2, seed=5) for r in range(2)]
    for s in old:
        its = s.batches()
        for _ in range(4):
            next(its)
    positions = [s.state_dict() for s in old]
    for r in range(3):
        new = TokenStream(ds, "train", 16, 2, r, 3, seed=5)
        new.resume(positions)
        its = new.batches()
        for _ in range(10):
            check_masked(*next(its), eot_id(tok))


def test_text_document_mask_segments_after_each_eos(tmp_path):
    ds, _, _ = make_dataset(tmp_path / "ds", n_docs=80)
    eot = ds.manifest["tokenizer"]["eot_id"]
    plain = TokenStream(ds, "train", 16, batch_size=4, rank=0, world=1, seed=3).batches()
    masked = TokenStream(ds, "train", 16, 4, 0, 1, seed=3, document_mask=True).batches()
    n_docs = 0
    for _ in range(30):
        (px, py), (x, y, seg) = next(plain), next(masked)
        assert np.array_equal(px.numpy(), x.numpy()) and np.array_equal(py.numpy(), y.numpy())
        ends = (x.numpy() == eot).astype(np.int64)
        np.testing.assert_array_equal(seg.numpy(), np.cumsum(ends, axis=1) - ends)
        n_docs += int(ends.sum())
    assert n_docs > 0


def test_encode_task_returns_rows_in_order_with_drops(tmp_path, tok):
    """The Ray Data task fn, called directly: ids/targets per row, dropped rows marked."""
    import pyarrow as pa

    from lmforge.data.prepare import _encode_batch
    from lmforge.tokenizer import read_tokenizer_files

    t = templates.get("instruct", eos_token=EOT)
    rows = [templates.to_messages({"prompt": p, "completion": "Red."})
            for p in ("Hi.", "Name a colour. " * 40, "Name a colour.")]  # fmt: skip
    tok.save(str(tmp_path / "tokenizer.json"))
    files = read_tokenizer_files(tmp_path / "tokenizer.json")
    out = _encode_batch(pa.table({"rows": [json.dumps(rows)]}), files, t.describe(), 64, "drop")
    assert out.column("keep").to_pylist() == [True, False, True]
    for i in (0, 2):
        want = sft.encode(tok, t, rows[i], 64)
        assert out.column("ids")[i].as_py() == want.ids.tolist()
        assert out.column("targets")[i].as_py() == want.targets.tolist()
