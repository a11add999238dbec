"""ZeRO's parameter all-gather as broadcasts on gloo (`training.cpu_collectives`): two real
gloo ranks (processes, no Ray) get the all-gather's exact bytes, and DeepSpeed engines at
ZeRO 1, 2 and 3 train to the same losses and weights (to float rounding) with it as without; so
does ZeRO 2 with the gradient all-reduce `deepspeed_config` picks on gloo as with DeepSpeed's
reduce to each slice's owner."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from tests.conftest import REPO

TINY = REPO / "jobs" / "configs" / "tiny.yaml"
STEPS = 4


def _gathers(rank: int) -> dict[str, bool]:
    """Each case: broadcast_gather's output equals all_gather_into_tensor's."""
    import torch.distributed as tdist

    from lmforge.training.cpu_collectives import applies, broadcast_gather

    g = torch.Generator().manual_seed(rank)
    out = {}
    for name, shape, dtype in [("fp32 1001", (1001,), torch.float32),
                               ("bf16 2-d", (3, 7), torch.bfloat16)]:  # fmt: skip
        x = torch.randn(shape, generator=g).to(dtype)
        ref = torch.empty((2 * shape[0], *shape[1:]), dtype=dtype)
        tdist.all_gather_into_tensor(ref, x)
        got = torch.full_like(ref, float("nan"))
        assert applies(got, x, None)
        broadcast_gather(got, x)
        got_async = torch.full_like(ref, float("nan"))
        broadcast_gather(got_async, x, async_op=True).wait()
        out[name] = torch.equal(ref, got) and torch.equal(ref, got_async)
    # ZeRO 1/2's form: the input is this rank's slice of the output itself
    flat = torch.zeros(10)
    flat[rank * 5 : rank * 5 + 5] = float(rank + 1)
    broadcast_gather(flat, flat[rank * 5 : rank * 5 + 5])
    out["input inside the output"] = torch.equal(flat, torch.tensor([1.0] * 5 + [2.0] * 5))
    out["a strided output is left to DeepSpeed"] = not applies(
        torch.empty(4, 2).t(), torch.empty(4), None
    )
    return out


def _train(stage: int, zero: dict | None = None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """A tiny gpt2 engine as the trainer builds it, STEPS steps on a rank-seeded batch."""
    import deepspeed

    from lmforge import dist, models
    from lmforge.config import load_config
    from lmforge.training.ds_config import deepspeed_config
    from lmforge.training.engine_state import consolidated_weights
    from lmforge.training.loop import param_groups

    cfg = load_config(TINY, [f"zero.stage={stage}", "model.n_layer=2", "model.d_model=64",
                             "model.n_head=2", "model.context_length=16", "model.vocab_size=64",
                             "train.micro_batch_size=2", "train.lr=0.01"])  # fmt: skip
    torch.manual_seed(0)  # the same initial weights on both ranks and in both runs
    model = models.build(cfg.model)
    ds = deepspeed_config(cfg, world_size=2)
    ds["zero_optimization"].update(zero or {})
    eng, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.train.weight_decay), config=ds
    )
    rank = torch.distributed.get_rank()
    x = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(100 + rank))
    losses = []
    for _ in range(STEPS):  # one batch a rank, again and again: the loss must fall
        _, loss = eng(x[:, :-1], x[:, 1:])
        eng.backward(loss)
        eng.step()
        losses.append(loss.item())
    info = dist.DistInfo(rank, 2, rank, torch.device("cpu"))
    return losses, consolidated_weights(eng, info)


def _rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))  # fmt: skip
    from lmforge import dist

    dist.setup(use_gpu=False)  # DS_ACCELERATOR=cpu before deepspeed is imported
    import deepspeed

    from lmforge.training import cpu_collectives

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    result = {"gathers": _gathers(rank), "plain": {s: _train(s) for s in (1, 2, 3)}}
    # DeepSpeed's default on gloo too: a reduce of each gradient slice to its owner
    result["reduce_to_owner"] = _train(2, {"reduce_scatter": True})
    calls = []
    real = cpu_collectives.broadcast_gather
    cpu_collectives.broadcast_gather = lambda *a, **k: calls.append(1) or real(*a, **k)
    cpu_collectives.install()
    cpu_collectives.install()  # a second call must not wrap the wrapper
    result["broadcast"] = {}
    for s in (1, 2, 3):
        n = len(calls)
        result["broadcast"][s] = _train(s)
        result.setdefault("calls", {})[s] = len(calls) - n
    if rank == 0:
        torch.save(result, os.path.join(out_dir, "result.pt"))
    torch.distributed.destroy_process_group()
    dist.leave()  # ZeRO 3 engines' gloo threads can abort the interpreter's teardown


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, plain_main):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("gather")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(out)), nprocs=2)
    return torch.load(out / "result.pt", weights_only=False)


def test_broadcast_gather_gives_the_all_gathers_bytes(two_ranks):
    assert two_ranks["gathers"] == dict.fromkeys(two_ranks["gathers"], True)
    assert len(two_ranks["gathers"]) == 4


def assert_same_training(losses, weights, ref_losses, ref_weights) -> None:
    """The same losses and weights up to float rounding. Bit-identical on some CPUs; on
    others (seen on one with avx512_bf16: the second step's loss 1 ulp apart) a sum's SIMD
    kernel depends on its buffer's alignment, which the collective's temporaries change.
    Adam turns a rounding difference in a near-zero gradient into up to 2 x lr (0.01) of
    update: the weights are held to a tenth of one step's (measured: 9e-5 apart), a wrong
    or misplaced slice moves them by whole steps."""
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=0)
    assert ref_weights.keys() == weights.keys() and ref_weights
    for name, w in ref_weights.items():
        torch.testing.assert_close(weights[name], w, rtol=0, atol=1e-3)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_trains_the_same_through_broadcasts(two_ranks, stage):
    assert two_ranks["calls"][stage] >= STEPS  # DeepSpeed's gathers went through it
    plain_losses, plain_weights = two_ranks["plain"][stage]
    losses, weights = two_ranks["broadcast"][stage]
    assert_same_training(losses, weights, plain_losses, plain_weights)
    assert plain_losses[-1] < plain_losses[0]  # it trained


def test_the_gradient_all_reduce_on_gloo_trains_as_the_reduce_to_owners(two_ranks):
    from lmforge.config import load_config
    from lmforge.training.ds_config import deepspeed_config

    assert (
        deepspeed_config(load_config(TINY, []), 2)["zero_optimization"]["reduce_scatter"] is False
    )
    gpu = load_config(TINY, ["scaling.use_gpu=true"])
    assert "reduce_scatter" not in deepspeed_config(gpu, 2)["zero_optimization"]  # DeepSpeed's
    (losses, weights), (ref_losses, ref_weights) = (
        two_ranks["plain"][2],
        two_ranks["reduce_to_owner"],
    )
    assert_same_training(losses, weights, ref_losses, ref_weights)


def test_deepspeed_is_imported_without_mlflow_or_muon_and_mlflow_still_imports():
    """A worker imports DeepSpeed as `dist.import_deepspeed` does: its autotuner's optional
    mlflow import and Muon's modules (torch._inductor's compiler) are not paid for; mlflow
    imports as usual afterwards, and ZeRO's Muon checks get a class nothing is."""
    import subprocess
    import sys

    probe = (
        "import os, sys; os.environ['DS_ACCELERATOR'] = 'cpu'\n"
        "from lmforge import dist; dist.import_deepspeed()\n"
        "print('mlflow' in sys.modules, 'torch._inductor.compile_fx' in sys.modules)\n"
        "from deepspeed.autotuning import autotuner; print(autotuner.has_mlflow)\n"
        "from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam\n"
        "import torch; print(isinstance(torch.optim.AdamW([torch.zeros(1)]), MuonWithAuxAdam))\n"
        "import mlflow; print(mlflow.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False", "False", "False", "mlflow"], out.stdout
