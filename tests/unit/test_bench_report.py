"""bench/run_all.py's bookkeeping without running a benchmark: every script is a section,
and BENCHMARKS.md is written from recorded results (one section runs for real, at its tiny
size, in tests/integration/test_bench.py)."""

from __future__ import annotations

import pytest

from bench.run_all import BENCHMARKS, SECTIONS
from tests.conftest import REPO

SCRIPTS = sorted(p.stem.removeprefix("bench_") for p in (REPO / "bench").glob("bench_*.py"))


def test_every_benchmark_script_is_a_section():
    assert sorted({SECTIONS[n][0] for n in BENCHMARKS}) == SCRIPTS


def test_run_all_writes_benchmarks_md(tmp_path):
    """The report writer on a recorded result (running every benchmark twice is too slow)."""
    from bench import run_all
    from bench.common import Figure

    fig = Figure.ratio_of("x", "tokens/s", [2.0, 3.0], [4.0, 3.0], baseline="plain", target=0.9)
    results = {"data": {"figures": [fig.__dict__], "config": {"k": 1}}, "prepare": None}

    class Args:
        tiny = False

    md = run_all.to_markdown(results, {"data": 1.0, "prepare": 2.0}, Args())
    assert "| x | 2.5 (2-3) tokens/s | plain: 3.5 (3-4) | 0.75x (0.5-1) | >= 0.9x | **no** |" in md
    assert "Did not produce a result" in md and "machine:" in md


def test_run_all_keeps_the_sections_it_did_not_rerun():
    """--only reruns some sections: the others stay, each saying when it was measured."""
    from bench import run_all
    from bench.common import Figure

    class Args:
        tiny = False

    old_fig = Figure.ratio_of("old", "MB/s", [1.0], [2.0], baseline="dd")
    # A file of before the stamps: no "Measured" line under each heading, only the header's.
    old = run_all.to_markdown(
        {"data": {"figures": [old_fig.__dict__], "config": {}}, "train-llama": None},
        {"data": 1.0, "train-llama": 2.0},
        Args(),
    )
    kept = run_all.read_sections(old)
    assert list(kept) == ["train-llama", "data"]
    new_fig = Figure.ratio_of("new", "tokens/s", [9.0], [10.0], baseline="plain", target=0.9)
    md = run_all.to_markdown(
        {"train-llama": {"figures": [new_fig.__dict__], "config": {}}}, {"train-llama": 3.0},
        Args(), {"train-llama": "Measured now; machine shared."}, kept,
    )  # fmt: skip
    assert "reran train-llama; the other sections are kept" in md
    assert md.count("## ") == 2 and md.index("## train-llama") < md.index("## data")
    llama, data = md.split("## train-llama")[1].split("## data")
    assert "Measured now; machine shared." in llama and "| new |" in llama
    assert "Did not produce" not in llama  # the rerun replaced the old failed section
    assert "| old | 1 (1-1) MB/s | dd: 2 (2-2) | 0.5x (0.5-0.5) |" in data
    header_date = old.split("Written by `bench/run_all.py` on ")[1].split(" at commit")[0]
    assert f"Measured {header_date} at commit" in data  # the old file's date, now its own


def test_run_all_keeps_the_hand_written_notes_last(tmp_path):
    from bench import run_all
    from bench.common import Figure

    class Args:
        tiny = False

    fig = Figure.ratio_of("x", "tokens/s", [1.0], [1.0], baseline="plain")
    old = run_all.to_markdown(
        {"data": {"figures": [fig.__dict__], "config": {}}}, {"data": 1.0}, Args()
    )
    path = tmp_path / "B.md"
    path.write_text(old + "## Notes\n\nA profile: gloo all-reduce 115 ms a step.\n")
    assert list(run_all.kept_sections(path, rerun_all=True)) == ["Notes"]
    kept = run_all.kept_sections(path, rerun_all=False)
    assert list(kept) == ["data", "Notes"] and "Measured" not in kept["Notes"]
    md = run_all.to_markdown(
        {"train-lstm": {"figures": [fig.__dict__], "config": {}}}, {"train-lstm": 2.0},
        Args(), {}, kept,
    )  # fmt: skip
    assert md.index("## train-lstm") < md.index("## data") < md.index("## Notes")
    assert md.rstrip().endswith("A profile: gloo all-reduce 115 ms a step.")
    assert run_all.kept_sections(tmp_path / "none.md", rerun_all=False) == {}


def test_run_all_links_a_sections_plot():
    from bench import run_all
    from bench.common import Figure

    class Args:
        tiny = False

    fig = Figure("1M ZeRO 0", "tokens/s", {"min": 1.0, "median": 2.0, "max": 3.0})
    r = {"benchmark": "growth-model", "figures": [fig.__dict__],
         "config": {"plot": "bench/plots/growth-model.png"}}  # fmt: skip
    md = run_all.to_markdown({"growth-model": r}, {"growth-model": 1.0}, Args())
    assert "![growth-model](bench/plots/growth-model.png)" in md
    assert "| 1M ZeRO 0 | 2 (1-3) tokens/s |  |  |  |  |" in md


def test_run_all_writes_each_section_as_it_finishes(tmp_path, monkeypatch):
    """A run stopped part-way (Ctrl-C, a crash) keeps the sections it measured and the old
    ones it had not reached yet."""
    from bench import run_all
    from bench.common import Figure

    out = tmp_path / "B.md"
    out.write_text("# Benchmarks\n\n## prepare\n\nold prepare figures\n\n## Notes\n\nmine\n")
    fig = Figure.ratio_of("x", "MB/s", [2.0], [4.0], baseline="read", target=0.5)

    def run_one(name, tiny, repeats):
        if name == "prepare":
            raise KeyboardInterrupt
        return {"figures": [fig.__dict__], "config": {}}, 1.0, ""

    monkeypatch.setattr(run_all, "run_one", run_one)
    with pytest.raises(KeyboardInterrupt):
        run_all.main(["--only", "data,prepare", "--output", str(out)])
    md = out.read_text()
    assert "## data" in md and "| x | 2 (2-2) MB/s |" in md
    assert "old prepare figures" in md and md.rstrip().endswith("mine")


def test_the_peers_get_a_column_pair_each_and_their_goals():
    """bench_train's peers (issue 31): a value and a lmforge / peer ratio column per peer,
    empty where a row has no such peer; the plain-loop columns stay."""
    from bench import run_all
    from bench.common import Figure

    class Args:
        tiny = False

    z0 = Figure.ratio_of("ZeRO 0", "tokens/s", [100.0, 120.0], [200.0, 200.0], "plain", 0.9)
    z0.add_peer("torch DDP", [100.0, 120.0], [100.0, 100.0], target=1.0)
    z2 = Figure.ratio_of("ZeRO 2", "tokens/s", [90.0], [200.0], "plain")
    z2.add_peer("plain DeepSpeed script", [90.0], [100.0], target=1.05)
    z2.add_peer("HF Trainer + DeepSpeed", [90.0], [60.0])
    mfu = Figure(name="MFU", unit="%", value={"min": 1, "median": 1, "max": 1})
    figs = [z0.__dict__, z2.__dict__, mfu.__dict__]
    md = run_all.to_markdown({"train": {"figures": figs, "config": {}}}, {"train": 1.0}, Args())
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert table[0] == (
        "| figure | lmforge | baseline | ratio | target | met | torch DDP | lmforge / torch DDP "
        "| plain DeepSpeed script | lmforge / plain DeepSpeed script | HF Trainer + DeepSpeed "
        "| lmforge / HF Trainer + DeepSpeed |"
    )
    assert all(row.count("|") == 13 for row in table)  # every row has every column
    assert "| torch DDP" not in table[2]
    assert table[2].endswith("| 100 (100-100) | 1.1x (1-1.2), goal >= 1x: yes |  |  |  |  |"), (
        table[2]
    )
    assert table[3].endswith(
        "|  |  | 100 (100-100) | 0.9x (0.9-0.9), goal >= 1.05x: **no** | 60 (60-60) "
        "| 1.5x (1.5-1.5) |"
    ), table[3]
    assert table[4].endswith("|  |  |  |  |  |  |")


def test_a_peer_that_fell_back_to_another_engine_or_stage_fails():
    """bench/peers.py: a peer reports what it really ran; anything else than asked (the HF
    Trainer silently on DDP, another ZeRO stage, not gloo) is refused, not measured."""
    from bench.peers import PeerMismatch, PeerResult, check

    def ran(peer, stage, engine, backend="gloo"):
        return PeerResult(peer, stage, engine, backend, 1000.0, [1.0], [2.0])

    assert check(ran("hf", 3, "DeepSpeedEngine"), "hf", 3).tokens_per_s == 1000.0
    assert check(ran("ddp", 0, "DistributedDataParallel"), "ddp", 0)
    with pytest.raises(PeerMismatch, match="ran DistributedDataParallel at ZeRO 0"):
        check(ran("hf", 0, "DistributedDataParallel"), "hf", 3)  # accelerate dropped DeepSpeed
    with pytest.raises(PeerMismatch, match="ZeRO 2"):
        check(ran("deepspeed", 2, "DeepSpeedEngine"), "deepspeed", 3)
    with pytest.raises(PeerMismatch, match="not gloo"):
        check(ran("deepspeed", 3, "DeepSpeedEngine", backend="ccl"), "deepspeed", 3)


def test_peers_run_beside_the_full_gpt2_fp32_stages_only():
    from types import SimpleNamespace

    from bench.bench_train import plan_peers

    runs = [(0, "fp32", 20), (1, "fp32", 20), (2, "fp32", 20), (3, "fp32", 20), (2, "bf16", 20)]
    full = SimpleNamespace(peers=None, tiny=False, shape="full")
    assert plan_peers(full, runs) == [
        ("ddp", 0), ("deepspeed", 2), ("deepspeed", 3), ("hf", 2), ("hf", 3)
    ]  # fmt: skip
    assert plan_peers(SimpleNamespace(peers=None, tiny=True, shape="full"), runs) == []
    assert plan_peers(SimpleNamespace(peers="none", tiny=False, shape="full"), runs) == []
    only = SimpleNamespace(peers="hf", tiny=True, shape="full")
    assert plan_peers(only, [(3, "fp32", 8), (3, "bf16", 8)]) == [("hf", 3)]
    # lmforge without Ray is asked for by name, at each of the fp32 stages that run
    local = SimpleNamespace(peers="local,ddp", tiny=False, shape="full")
    assert plan_peers(local, [(0, "fp32", 8), (2, "fp32", 8), (2, "bf16", 8)]) == [
        ("local", 0), ("local", 2), ("ddp", 0)
    ]  # fmt: skip
