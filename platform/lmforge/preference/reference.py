"""The reference model's log-probs of every answer, computed once and cached.

    table = reference_table(trainer, key, splits)   # {split: (n_pairs, 2) fp32, on device}

Before the first step the policy *is* the reference (--init-from), so the same worker group
runs one no-grad pass over every pair of the train and val splits (each worker its share,
`PairStream.share`; in lockstep, as ZeRO 3's gathers need), and the shares are summed
into one table: no second model is ever alive. The table is saved beside the dataset as
`reference/<weights sha256[:16]>-<manifest sha256[:16]>.pt`: a second run with the same
reference and data loads it, as does a resumed run (whose policy has moved on).

With LoRA the reference is the base with its adapters off (`adapters_off`): no table.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from lmforge import dist, storage
from lmforge.errors import LmforgeError
from lmforge.preference.logps import sequence_logps
from lmforge.preference.stream import PairStream

CACHE_DIR = "reference"


class ReferenceError(LmforgeError):
    pass


def cache_file(dataset_path, weights_sha256: str, manifest_sha256: str):
    return dataset_path / CACHE_DIR / f"{weights_sha256[:16]}-{manifest_sha256[:16]}.pt"


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module):
    """The model as its base: every peft LoRA layer bypassed, then restored."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def _sum_(t: torch.Tensor, info) -> torch.Tensor:
    if info.world > 1:
        import torch.distributed as tdist

        tdist.all_reduce(t)
    return t


def lockstep(stream: PairStream, info, device, limit: int | None = None):
    """This worker's one-pass batches, padded with empty ones so every worker runs as many
    forward passes (ZeRO 3 gathers parameters collectively in each)."""
    it = stream.one_pass()
    n = 0
    while limit is None or n < limit:
        b = next(it, None)
        flag = torch.tensor([0.0 if b is None else 1.0], device=device)
        if _sum_(flag, info).item() == 0:
            return
        yield stream.empty() if b is None else b
        n += 1


@torch.no_grad()
def pass_logps(trainer, stream: PairStream) -> torch.Tensor:
    """(n_pairs, 2) summed answer log-probs under the current weights, on every worker."""
    info, dev = trainer.info, trainer.info.device
    table = torch.zeros(stream.n_pairs, 2, device=dev)
    seen = torch.zeros(stream.n_pairs, device=dev)
    for batch in lockstep(stream, info, dev):
        b = batch.to(dev)
        logits = trainer.engine(b.x, segments=b.segments)[0]
        sums, _ = sequence_logps(logits, b.labels, b.seq, 2 * b.n_pairs)
        table[b.pair_ids] = sums.view(-1, 2)
        seen[b.pair_ids] = 1.0
    _sum_(table, info)
    _sum_(seen, info)  # a small val split is read by every worker: count each once
    return table / seen.clamp(min=1).unsqueeze(1)


def reference_table(trainer, weights_sha256: str, streams: dict[str, PairStream]):
    """{split: table}: loaded from the cache, else computed (the policy must still be the
    reference: a fresh run) and saved by rank 0."""
    info = trainer.info
    ds = trainer.dataset
    path = cache_file(ds.path, weights_sha256, ds.manifest_sha256)
    if path.is_file():
        saved = torch.load(storage.local_file(path), map_location=info.device, weights_only=True)
        if all(
            saved.get(s) is not None and len(saved[s]) == st.n_pairs for s, st in streams.items()
        ):
            dist.print0(info, f"reference log-probs: reusing {path}")
            return {s: saved[s].to(info.device) for s in streams}, 0.0
    if trainer.step > 0:
        raise ReferenceError(
            f"{path}: the reference's log-probs are missing and this run has trained past "
            "step 0; start it again, or restore the file"
        )
    t0 = time.perf_counter()
    mode = trainer.engine.training
    trainer.engine.eval()
    tables = {s: pass_logps(trainer, st) for s, st in streams.items()}
    trainer.engine.train(mode)
    dt = time.perf_counter() - t0
    n = sum(st.n_pairs for st in streams.values())
    dist.print0(info, f"reference log-probs: {n:,} pairs in {dt:.1f} s (once; cached in {path})")
    if info.is_main:
        _save({s: t.cpu() for s, t in tables.items()}, path)
    return tables, dt


def _save(tables: dict, path) -> None:
    if storage.is_remote(path):
        import io

        buf = io.BytesIO()
        torch.save(tables, buf)
        path.write_bytes(buf.getvalue())
        return
    path = Path(path)
    try:
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(tables, tmp)
        tmp.replace(path)
    except OSError as err:  # a read-only dataset: the next run computes them again
        print(f"reference log-probs: not cached ({err})", flush=True)
