"""Preference pairs: rows checked with file:line, written two rows a pair, streamed whole
(never split across micro-batches or workers, also after a re-sharded resume)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from lmforge.data.preference import read_pairs
from lmforge.data.prepare import PrepareOptions
from lmforge.errors import UsageError
from lmforge.preference.stream import PairStream, unit_pairs
from tests.preference_data import pairs_dataset, write_rows


def rows(n=60):
    out = []
    for i in range(n):
        out.append({"prompt": f"Is {i} even?", "chosen": "yes " * (i % 4 + 1), "rejected": "no"})
    out[5] = {  # TRL's conversational form
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": {"role": "assistant", "content": "Go away."},
    }
    return out


@pytest.mark.parametrize(
    "row, says",
    [
        ({"prompt": "p", "chosen": "c"}, "missing field 'rejected'"),
        ({"prompt": "p", "chosen": 3, "rejected": "r"}, "'chosen' must be a string"),
        ({"prompt": "p", "chosen": " ", "rejected": "r"}, "'chosen' is empty"),
        ({"prompt": [], "chosen": "c", "rejected": "r"}, "'prompt' must be a string"),
        ({"prompt": "p", "chosen": "c", "rejected": [{"role": "user", "content": "x"}]},
         "'rejected' must end with an assistant message"),
        ({"prompt": [{"role": "bot", "content": "x"}], "chosen": "c", "rejected": "r"},
         "prompt[0].role is 'bot'"),
    ],
)  # fmt: skip
def test_bad_rows_name_file_line_and_field(tmp_path, row, says):
    f = write_rows(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, row])
    with pytest.raises(UsageError, match=f"pairs.jsonl:2: .*{__import__('re').escape(says)}"):
        list(read_pairs(f))


def test_template_needed_for_preference():
    with pytest.raises(UsageError, match="--format preference needs --template"):
        PrepareOptions(format="preference")


def test_pairs_written_whole_with_answer_only_targets(tmp_path):
    data = rows()
    data[9]["chosen"] = "yes " * 200  # too long after its prompt: the pair is dropped
    f = write_rows(tmp_path / "pairs.jsonl", data)
    ds, m = pairs_dataset(tmp_path / "ds", f)
    q = m["preference"]
    assert m["data_format"] == "preference" == ds.data_format
    assert (q["rows"], q["kept"], q["dropped"]) == (60, 59, 1)
    assert m["splits"]["train"]["pairs"] + m["splits"]["val"]["pairs"] == 59
    tok = ds.tokenizer_path
    from lmforge.tokenizer import load_tokenizer

    t = load_tokenizer(tok)
    for split in ("train", "val"):
        for shard in m["splits"][split]["shards"]:
            pf = pq.ParquetFile(ds.path / shard["file"])
            for g in range(pf.metadata.num_row_groups):
                table = pf.read_row_group(g)
                assert table.num_rows % 2 == 0  # pairs never straddle a row group
                ids, masks = table.column("tokens").to_pylist(), table.column("targets").to_pylist()
                for c in range(0, len(ids), 2):
                    chosen = t.decode([i for i, k in zip(ids[c], masks[c], strict=True) if k])
                    rejected = t.decode(
                        [i for i, k in zip(ids[c + 1], masks[c + 1], strict=True) if k]
                    )
                    # Only the answers are targets; the prompts of both sides are the same.
                    assert ("yes" in chosen or "Hello" in chosen) and "Is" not in chosen
                    assert "no" in rejected or "Go away" in rejected
                    first = [i for i, k in zip(ids[c], masks[c], strict=True) if k][0]
                    n = ids[c].index(first)
                    assert ids[c][:n] == ids[c + 1][:n]


def all_pairs(stream: PairStream, n_batches: int) -> list[int]:
    it = stream.batches()
    return [int(p) for _ in range(n_batches) for p in next(it).pair_ids]


def test_stream_deals_whole_pairs_and_packs_without_splitting(tmp_path):
    ds, _ = pairs_dataset(tmp_path / "ds", write_rows(tmp_path / "p.jsonl", rows()))
    n = PairStream(ds, "train", 48, 2).n_pairs
    assert sum(unit_pairs(ds, "train")) == n
    seen = []
    for rank in (0, 1):
        s = PairStream(ds, "train", 48, 2, rank, 2, seed=3)
        mine = sum(s.pairs[i] for i, _ in s._pass(0))
        got, it = [], s.batches()
        while len(got) < mine:
            b = next(it)
            # Each pair's chosen (2i) and rejected (2i+1) answer are in this micro-batch,
            # in its windows' segments, never cut at a window's edge.
            assert set(b.seq[b.seq >= 0].tolist()) == set(range(2 * b.n_pairs))
            for i in range(2 * b.n_pairs):
                rows_of = (b.seq == i).any(dim=1).nonzero().flatten().tolist()
                assert len(rows_of) == 1
            got += b.pair_ids.tolist()
        seen += got[:mine]
    assert sorted(seen) == list(range(n))  # the two shares: disjoint, every pair


def test_resume_exact_and_resharded_keeps_pairs_whole(tmp_path):
    ds, _ = pairs_dataset(tmp_path / "ds", write_rows(tmp_path / "p.jsonl", rows(90)))
    # Uninterrupted vs resumed at the same world: the same pairs in the same batches.
    a = PairStream(ds, "train", 40, 2, 0, 2, seed=1)
    first = all_pairs(a, 3)
    state = a.state_dict()
    rest = all_pairs(a, 4)
    b = PairStream(ds, "train", 40, 2, 0, 2, seed=1)
    b.resume([state, PairStream(ds, "train", 40, 2, 1, 2, seed=1).state_dict()])
    assert all_pairs(b, 4) == rest and first
    # Two workers stop mid-epoch; three take over: every unread pair of epoch 0 is read
    # once, whole, and none already read is read again.
    olds = [PairStream(ds, "train", 40, 2, r, 2, seed=1) for r in (0, 1)]
    read = [p for s in olds for p in all_pairs(s, 2)]
    positions = [s.state_dict() for s in olds]
    news = [PairStream(ds, "train", 40, 2, r, 3, seed=1) for r in range(3)]
    later = []
    for s in news:
        s.resume(positions)
        mine = sum(s.pairs[i] - j for i, j in s._pass(s.epoch))
        got, it = [], s.batches()
        while len(got) < mine:
            got += next(it).pair_ids.tolist()
        later += got[:mine]
    assert not set(read) & set(later)
    assert sorted(read + later) == list(range(a.n_pairs))


def test_val_share_one_pass(tmp_path):
    ds, _ = pairs_dataset(tmp_path / "ds", write_rows(tmp_path / "p.jsonl", rows(90)))
    got = []
    for r in (0, 1):
        got += [
            p for b in PairStream(ds, "val", 40, 2, r, 2).one_pass() for p in b.pair_ids.tolist()
        ]
    assert sorted(got) == list(range(PairStream(ds, "val", 40, 2).n_pairs))
    assert np.all(PairStream(ds, "val", 40, 2).empty().seq.numpy() == -1)


def test_prepare_encode_task_takes_pairs_answer_only(tmp_path):
    """The Ray Data task of `prepare --format preference` (run here as a plain function):
    a pair's side comes as {"messages", "answer_turns"}, and only its answer's tokens are
    targets, even when the prompt holds an earlier assistant turn."""
    import json

    import pyarrow as pa

    from lmforge import templates
    from lmforge.data.prepare import _encode_batch
    from lmforge.tokenizer import EOT, read_tokenizer_files, train_tokenizer

    t = templates.get("chat", eos_token=EOT)
    row = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "HELLO"},
                      {"role": "user", "content": "and?"}], "chosen": "FINE", "rejected": "BAD"}  # fmt: skip
    f = write_rows(tmp_path / "p.jsonl", [row])
    ((_, c, r),) = list(read_pairs(f))
    tok = train_tokenizer([t.render(c["messages"]), t.render(r["messages"])], 300)
    tok.save(str(tmp_path / "tokenizer.json"))
    out = _encode_batch(pa.table({"rows": [json.dumps([c, r])]}),
                        read_tokenizer_files(tmp_path / "tokenizer.json"), t.describe(), 64, "drop")  # fmt: skip
    ids, masks = out.column("ids").to_pylist(), out.column("targets").to_pylist()
    answers = [
        tok.decode([i for i, k in zip(a, m, strict=True) if k])
        for a, m in zip(ids, masks, strict=True)
    ]
    assert "FINE" in answers[0] and "BAD" in answers[1]
    assert all("HELLO" not in a for a in answers)  # the prompt's assistant turn is context


def test_prepare_job_passes_preference_format():
    from lmforge import jobspec
    from lmforge.jobspec import prepare_job

    roots = jobspec.data_roots()
    spec = prepare_job([roots[0] / "in.jsonl"], roots[0] / "pairs", data_format="preference",
                       template="instruct")  # fmt: skip
    assert "--format preference --template instruct" in spec.entrypoint
