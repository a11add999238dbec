"""The prepare job: raw text -> BPE tokenizer -> packed token shards + manifest.

    lmforge prepare --input data/shakespeare --output ~/.lmforge/datasets/shakespeare

Ray Data reads and tokenizes the files in parallel (the costly part); the driver receives
the token arrays in input order and packs them into shards, so the output is byte-for-byte
the same for the same input, tokenizer and seed however many workers ran. The dataset is
written to a temporary sibling dir and renamed into place at the end: a crash never leaves
a half-written dataset behind. It runs on the Ray this process is connected to; the entry
points (`lmforge prepare`, jobs/prepare.py) connect with `lmforge.cluster.connect()`.

    lmforge prepare --format sft --input rows.jsonl --template instruct --output DIR

`--format sft` reads instruction rows (`lmforge.data.sft`), renders each with a template
(`lmforge.templates`), and Ray tasks encode them into ids and a target mask; the driver
splits the examples train/val (the same seeded rule, per example) and writes one example a
row with a `targets` column beside `tokens` (`ShardWriter.add_example`). Every example ends
with the tokenizer's eos. The template is saved as `template.json` in the dataset dir and
described in the manifest's `sft` section, with the rows read, dropped and cut.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from lmforge import __version__, storage, templates
from lmforge.data import preference, sft
from lmforge.data.dataset import FORMAT, MANIFEST, SPLITS, TOKENIZER
from lmforge.data.readers import CorpusError, discover, read_documents
from lmforge.data.writer import ShardWriter
from lmforge.errors import UsageError
from lmforge.tokenizer import (
    EOT,
    TOKENIZER_EXTRAS,
    copy_tokenizer,
    eot_id,
    eot_token,
    file_sha256,
    load_tokenizer,
    read_tokenizer_files,
    tokenizer_from_files,
    train_tokenizer,
)

log = logging.getLogger(__name__)
TASKS_PER_CPU = 2  # enough to even out unequal files
TASK_BYTES = 32 << 20  # raw text a tokenize task takes at most, roughly
TASK_ROWS = 2048  # SFT rows an encode task takes at most
FORMATS = ("text", "sft", "preference")
RENDERED = ("sft", "preference")  # formats whose rows a template renders


@dataclass(frozen=True)
class PrepareOptions:
    vocab_size: int = 8192
    val_fraction: float = 0.05
    seed: int = 0
    seq_tokens: int = 1024  # tokens per packed row (and per split chunk)
    rows_per_group: int = 16  # a row group is the unit a training worker reads
    groups_per_shard: int = 64
    tokenizer: Path | None = None  # reuse this tokenizer.json instead of training one
    overwrite: bool = False
    max_tasks: int | None = None  # concurrent tokenize tasks at most (default: as CPUs allow)
    format: str = "text"  # "sft": instruction rows, one example a row, with a target mask
    template: str | None = None  # sft: a built-in template's name or a .jinja file
    prompt_policy: str = "drop"  # sft: a row longer than seq_tokens: "drop" or "cut-prompt"
    template_examples: Path | None = None  # sft, few-shot: prompt/completion JSONL
    # preference: {prompt, chosen, rejected} rows; a pair is two consecutive rows, chosen
    # first, rows_per_group pairs a row group (`lmforge.data.preference`)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)} (got {self.format!r})")
        if self.format in RENDERED and not self.template:
            raise UsageError(
                f"--format {self.format} needs --template (built in: {', '.join(templates.NAMES)}, "
                "or a .jinja file)"
            )
        if self.format == "text" and (self.template or self.template_examples):
            raise UsageError("--template is for --format sft; text is not rendered")
        if self.prompt_policy not in sft.POLICIES:
            raise UsageError(
                f"--prompt-policy must be one of {', '.join(sft.POLICIES)} "
                f"(got {self.prompt_policy!r})"
            )
        if not 0 <= self.val_fraction < 1:
            raise UsageError(f"--val-fraction must be in [0, 1) (got {self.val_fraction})")
        if self.seq_tokens < 2:
            raise UsageError(f"--seq-tokens must be >= 2 (got {self.seq_tokens})")
        if self.vocab_size < 257:
            raise UsageError(
                f"--vocab-size must be >= 257 (256 bytes + EOT; got {self.vocab_size})"
            )
        if self.rows_per_group < 1 or self.groups_per_shard < 1:
            raise UsageError("--rows-per-group and groups per shard must be >= 1")
        if self.max_tasks is not None and self.max_tasks < 1:
            raise UsageError(f"max_tasks must be >= 1 (got {self.max_tasks})")


_WORKER_TOKENIZER: dict[str, Tokenizer] = {}  # this worker process's last tokenizer


def _worker_tokenizer(tokenizer_files: dict[str, str]) -> Tokenizer:
    """The tokenizer `tokenizer_files` describe, built once per Ray worker process: Ray
    reuses its workers for the next task, so only a worker's first task pays the ~40 ms
    of JSON parsing (bench/bench_prepare.py); the key is the files' content."""
    # Ray gives each task one CPU; the parallelism is across tasks, not inside tokenizers.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    key = hashlib.sha256(json.dumps(tokenizer_files, sort_keys=True).encode()).hexdigest()
    tok = _WORKER_TOKENIZER.get(key)
    if tok is None:
        tok = tokenizer_from_files(tokenizer_files)
        _WORKER_TOKENIZER.clear()  # one at a time: a long-lived worker keeps no stale ones
        _WORKER_TOKENIZER[key] = tok
    return tok


def _tokenize_batch(batch: pa.Table, tokenizer_files: dict[str, str]) -> pa.Table:
    """Ray Data map_batches fn: read each file's documents and tokenize them, each ended by
    the eos the dataset's tokenizer files name (`tokenizer_config.json`'s, if any)."""
    tok = _worker_tokenizer(tokenizer_files)
    eot = eot_id(tok)
    keys, ids = [], []
    if "paths" in batch.column_names:  # a task's group of files (`_task_groups`)
        paths = [p for group in batch.column("paths").to_pylist() for p in group]
    else:
        paths = batch.column("path").to_pylist()
    for path in paths:
        docs = list(read_documents(Path(path)))
        encoded = tok.encode_batch([text for _, text in docs], add_special_tokens=False)
        for (key, _), enc in zip(docs, encoded, strict=True):
            keys.append(key)
            ids.append(np.append(np.asarray(enc.ids, dtype=np.int32), np.int32(eot)))
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64)
    flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)
    return pa.table(
        {"key": pa.array(keys, pa.string()), "ids": pa.LargeListArray.from_arrays(offsets, flat)}
    )


def _unwrap(err: BaseException) -> CorpusError | None:
    """The CorpusError behind a Ray Data task failure, as one line, if there is one.

    Ray wraps a task's exception (RayTaskError around UserCodeException); the original may
    sit in `__cause__`, in `.cause`, or only in the rendered traceback text.
    """
    todo, seen = [err], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, CorpusError):
            return CorpusError(str(e).strip().splitlines()[-1].split("CorpusError: ")[-1])
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    found = re.findall(r"CorpusError: (.+)", str(err))
    return CorpusError(found[-1].strip()) if found else None


def split_and_write(
    docs: Iterable[np.ndarray], out: Path, tok: Tokenizer, opts: PrepareOptions, sources: list
) -> dict:
    """Split tokenized documents (each ending in EOT) into train/val, pack, write shards and
    `manifest.json` into `out` (which already holds `tokenizer.json`). Returns the manifest.

    Documents are cut into chunks of `seq_tokens`; chunk c goes to val when
    floor((c+1)f + u) > floor(cf + u): exactly the val fraction, spread evenly through the
    corpus, with the phase u drawn from the seed.
    """
    dtype, tokenizer_sha256 = _shard_format(tok, out)
    writers = _split_writers(out, opts, dtype, tokenizer_sha256)
    phase = _split_phase(opts.seed)
    f, chunk, n_docs = opts.val_fraction, 0, 0
    for doc in docs:
        n_docs += 1
        for start in range(0, len(doc), opts.seq_tokens):
            is_val = _is_val(chunk, f, phase)
            writers["val" if is_val else "train"].add(doc[start : start + opts.seq_tokens])
            chunk += 1
    splits = {split: w.close() for split, w in writers.items()}
    n_tokens = sum(s["tokens"] for s in splits.values())
    where = _named([s["path"] for s in sources]) or "the corpus"
    if n_tokens == n_docs:  # only end-of-text markers: every document was empty
        raise CorpusError(f"{where}: the corpus is empty ({n_docs} document(s) with no text)")
    if splits["train"]["tokens"] == 0:
        raise CorpusError(f"{where}: the corpus is too small, no tokens left for the train split")
    return _write_manifest(out, tok, tokenizer_sha256, dtype, opts, sources, splits, n_docs,
                           {"chunk_tokens": opts.seq_tokens})  # fmt: skip


def _write_manifest(
    out: Path,
    tok: Tokenizer,
    tokenizer_sha256: str,
    dtype: str,
    opts: PrepareOptions,
    sources: list,
    splits: dict,
    documents: int,
    split: dict,
    data_format: str | None = None,
    section: dict | None = None,
) -> dict:
    """Write `out/manifest.json` and return it: what every dataset's manifest holds, how
    its train/val split was made (`split`: its unit), and for SFT and preference data their
    `data_format` and the section of that name (`section`). Text has no `data_format`."""
    manifest: dict[str, Any] = {"format": FORMAT}
    if data_format:
        manifest["data_format"] = data_format
    manifest |= {
        "created_by": f"lmforge {__version__}",
        "sources": sources,
        "documents": documents,
        "tokens": sum(s["tokens"] for s in splits.values()),
        "token_dtype": dtype,
        "seq_tokens": opts.seq_tokens,
        "tokenizer": _tokenizer_entry(out, tok, tokenizer_sha256),
        "split": {"val_fraction": opts.val_fraction, "seed": opts.seed, **split},
        "splits": splits,
    }
    if data_format and section is not None:
        manifest[data_format] = section
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _saved_template(template: templates.Template, template_file: str | None, out: Path) -> dict:
    """Save the rows' template beside the shards; its description for the manifest."""
    templates.save(template, out)
    return {**template.describe(), "file": template_file}


def _tokenizer_entry(out: Path, tok: Tokenizer, sha256: str) -> dict:
    return {
        "file": TOKENIZER,
        "sha256": sha256,
        "vocab_size": tok.get_vocab_size(),
        "eot_id": eot_id(tok),
        "eot_token": eot_token(tok),
        "files": [TOKENIZER, *(n for n in TOKENIZER_EXTRAS if (out / n).is_file())],
    }


def _shard_format(tok: Tokenizer, out: Path) -> tuple[str, str]:
    """The token dtype the shards store and the sha256 of `out`'s tokenizer.json."""
    dtype = "uint16" if tok.get_vocab_size() <= 1 << 16 else "uint32"
    return dtype, file_sha256(out / TOKENIZER)


def _split_writers(
    out: Path,
    opts: PrepareOptions,
    dtype: str,
    tokenizer_sha256: str,
    targets: bool = False,
    rows_per_pair: int = 1,
) -> dict[str, ShardWriter]:
    """One shard writer per split, under out/<split>/ (with a `targets` column for SFT and
    pairs; a pair is `rows_per_pair` rows, `opts.rows_per_group` pairs a row group)."""
    return {
        split: ShardWriter(
            out / split,
            dtype,
            opts.seq_tokens,
            rows_per_pair * opts.rows_per_group,
            opts.groups_per_shard,
            tokenizer_sha256,
            targets=targets,
        )
        for split in SPLITS
    }


def _is_val(index: int, f: float, phase: float) -> bool:
    """Chunk (or example) `index` goes to val: exactly the fraction f, spread evenly."""
    return int((index + 1) * f + phase) > int(index * f + phase)


def _split_phase(seed: int) -> float:
    return int.from_bytes(hashlib.sha256(f"split:{seed}".encode()).digest()[:8]) / 2**64


def split_and_write_sft(
    examples: Iterable[sft.Example | None],
    out: Path,
    tok: Tokenizer,
    opts: PrepareOptions,
    sources: list,
    template: templates.Template,
    template_file: str | None = None,
) -> dict:
    """Split encoded SFT examples (None: a row dropped for its length) train/val, one
    example a row with its target mask, and write the shards, `template.json` and
    `manifest.json` into `out` (which already holds `tokenizer.json`). Returns the manifest.

    Example e goes to val by the text rule over chunks, applied to examples. Every example
    ends with the eos: the template's, else one is appended (a target when the token before
    it is one, so the model learns to stop after a completion); what a template puts after
    its last eos (formatting whitespace, no target) is left out."""
    eot = eot_id(tok)
    dtype, tokenizer_sha256 = _shard_format(tok, out)
    writers = _split_writers(out, opts, dtype, tokenizer_sha256, targets=True)
    phase, f = _split_phase(opts.seed), opts.val_fraction
    n_rows = n_dropped = n_cut = n_kept = 0
    for ex in examples:
        n_rows += 1
        if ex is None:
            n_dropped += 1
            continue
        ids, targets = _end_with_eos(ex.ids, ex.targets, eot)
        n_cut += ex.cut > 0
        writers["val" if _is_val(n_kept, f, phase) else "train"].add_example(ids, targets)
        n_kept += 1
    splits = {split: w.close() for split, w in writers.items()}
    where = _named([s["path"] for s in sources]) or "the input"
    if n_rows == 0:
        raise CorpusError(f"{where}: no rows (the input is empty)")
    if n_kept == 0:
        raise CorpusError(
            f"{where}: all {n_rows} row(s) are longer than --seq-tokens {opts.seq_tokens} "
            f"(--prompt-policy {opts.prompt_policy}); raise --seq-tokens"
        )
    if splits["train"]["sequences"] == 0:
        raise CorpusError(f"{where}: too few rows ({n_kept}), none left for the train split")
    section = {
        "rows": n_rows,
        "examples": n_kept,
        "dropped_too_long": n_dropped,
        "cut": n_cut,
        "prompt_policy": opts.prompt_policy,
        "max_tokens": opts.seq_tokens,
        "target_tokens": sum(s["target_tokens"] for s in splits.values()),
        "mask": {"column": "targets", "dtype": "bool", "true": "the token is a loss target"},
        "template": _saved_template(template, template_file, out),
        "template_file": templates.TEMPLATE_FILE,
    }
    return _write_manifest(out, tok, tokenizer_sha256, dtype, opts, sources, splits, n_kept,
                           {"unit": "example"}, "sft", section)  # fmt: skip


def _end_with_eos(ids: np.ndarray, targets: np.ndarray, eot: int):
    ends = np.flatnonzero(ids == eot)
    if len(ends) and not targets[ends[-1] + 1 :].any():
        return ids[: ends[-1] + 1], targets[: ends[-1] + 1]
    return np.append(ids, eot), np.append(targets, bool(len(targets) and targets[-1]))


def resolve_template(
    spec: str, eos_token: str, tokenizer: Path | None = None, examples: Path | None = None
) -> tuple[templates.Template, str | None]:
    """`--template`: (the template, the file it came from or None). A built-in name, a
    Jinja2 file, or `chat_template`: the one in --tokenizer's tokenizer_config.json."""
    if spec.endswith(".jinja") or Path(spec).expanduser().is_file():
        path = Path(spec).expanduser().resolve()
        return templates.from_file(path, eos_token=eos_token), str(path)
    if spec == "chat_template":
        cfg = None if tokenizer is None else tokenizer.parent / "tokenizer_config.json"
        found = None if cfg is None else templates.from_tokenizer_config(cfg)
        if found is None:
            raise UsageError(
                "--template chat_template: needs a --tokenizer whose tokenizer_config.json "
                "has a chat_template"
            )
        return found, str(cfg)
    shots = []
    if examples is not None:
        shots = [{"prompt": m[0]["content"], "completion": m[-1]["content"]}
                 for _, m in sft.read_rows(examples)]  # fmt: skip
    return templates.get(spec, eos_token=eos_token, examples=shots), None


def _encode_batch(batch: pa.Table, tokenizer_files: dict, template: dict, max_tokens: int,
                  policy: str) -> pa.Table:  # fmt: skip
    """Ray Data map_batches fn: encode a block of SFT rows (JSON messages lists) into ids,
    targets and the prompt tokens cut; `keep` is False for a row dropped for its length."""
    tok = _worker_tokenizer(tokenizer_files)
    tmpl = templates.Template.from_description(template)
    ids, targets, cut, keep = [], [], [], []
    for rows in batch.column("rows").to_pylist():
        for row in json.loads(rows):  # messages, or a pair's {"messages", "answer_turns"}
            messages, turns = (
                (row, 0) if isinstance(row, list) else (row["messages"], row["answer_turns"])
            )
            ex = sft.encode(tok, tmpl, messages, max_tokens, policy, turns)
            keep.append(ex is not None)
            ids.append(np.zeros(0, np.int32) if ex is None else ex.ids.astype(np.int32))
            targets.append(np.zeros(0, bool) if ex is None else ex.targets)
            cut.append(0 if ex is None else ex.cut)
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64)
    flat = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    mask = np.concatenate(targets) if targets else np.zeros(0, bool)
    return pa.table({
        "ids": pa.LargeListArray.from_arrays(offsets, flat),
        "targets": pa.LargeListArray.from_arrays(offsets, pa.array(mask)),
        "cut": pa.array(cut, pa.int64()),
        "keep": pa.array(keep, pa.bool_()),
    })  # fmt: skip


def _encoded_examples(
    rows: list[list[dict]], tokenizer: Path, template: templates.Template, opts: PrepareOptions
) -> Iterator[sft.Example | None]:
    """Each row's Example (None: dropped for its length), in input order; Ray tasks encode."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    n = max(1, min(TASKS_PER_CPU * cpus, len(rows)))
    n = max(n, -(-len(rows) // TASK_ROWS))
    size = -(-len(rows) // n)
    chunks = [{"rows": json.dumps(rows[i : i + size])} for i in range(0, len(rows), size)]
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(
        _encode_batch,
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs={
            "tokenizer_files": read_tokenizer_files(tokenizer),
            "template": template.describe(),
            "max_tokens": opts.seq_tokens,
            "policy": opts.prompt_policy,
        },
        compute=ray.data.TaskPoolStrategy(size=opts.max_tasks),
    )
    ctx = ds.context  # as in _tokenized_docs: input order, no per-operator reservation
    ctx.execution_options.preserve_order = True
    ctx.op_resource_reservation_enabled = False
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        keep, cut = batch.column("keep").to_pylist(), batch.column("cut").to_pylist()
        ids = batch.column("ids").combine_chunks()
        targets = batch.column("targets").combine_chunks()
        offsets = ids.offsets.to_numpy()
        values = ids.values.to_numpy()
        mask = targets.values.to_numpy(zero_copy_only=False)
        for i in range(len(keep)):
            a, b = offsets[i], offsets[i + 1]
            yield sft.Example(values[a:b].astype(np.int64), mask[a:b], cut[i]) if keep[i] else None


def _prepare_sft(files: list[Path], out: Path, opts: PrepareOptions) -> dict:
    """Read and check every row (errors name file:line), get the tokenizer (reused, or
    trained on the rendered rows), encode with Ray and write the dataset into `out`."""
    if opts.format == "preference":
        pairs = [(c, r) for f in files for _, c, r in preference.read_pairs(f)]
        rows = [side for pair in pairs for side in pair]
    else:
        rows = [messages for f in files for _, messages in sft.read_rows(f)]
    if not rows:
        raise CorpusError(f"--input {_named(files)}: no rows (the input is empty)")
    if opts.tokenizer is not None:
        tok = load_tokenizer(opts.tokenizer)
        copy_tokenizer(opts.tokenizer, out)
        if eot_id(tok) is None:
            raise UsageError(f"--tokenizer {opts.tokenizer}: names no end token to end examples")
    else:
        template, _ = resolve_template(opts.template, EOT, None, opts.template_examples)
        tok = train_tokenizer((template.render(_messages(m)) for m in rows), opts.vocab_size)
        tok.save(str(out / TOKENIZER))
    template, template_file = resolve_template(
        opts.template, eot_token(tok) or "", opts.tokenizer, opts.template_examples
    )
    sources = [{"path": str(f), "bytes": f.stat().st_size} for f in files]
    examples = _encoded_examples(rows, out / TOKENIZER, template, opts)
    if opts.format == "preference":
        return split_and_write_pairs(examples, out, tok, opts, sources, template, template_file)
    return split_and_write_sft(examples, out, tok, opts, sources, template, template_file)


def _messages(row: list | dict) -> list:
    return row if isinstance(row, list) else row["messages"]


def split_and_write_pairs(
    examples: Iterator[sft.Example | None],
    out: Path,
    tok: Tokenizer,
    opts: PrepareOptions,
    sources: list,
    template: templates.Template,
    template_file: str | None = None,
) -> dict:
    """`split_and_write_sft` for preference pairs: `examples` alternate chosen, rejected.
    A pair is kept only when both fit (`--prompt-policy` applied to each); it goes to one
    split whole, as two consecutive rows (chosen first) of one row group (`rows_per_group`
    pairs a group), so a worker always reads both."""
    eot = eot_id(tok)
    dtype, tokenizer_sha256 = _shard_format(tok, out)
    writers = _split_writers(out, opts, dtype, tokenizer_sha256, targets=True, rows_per_pair=2)
    phase, f = _split_phase(opts.seed), opts.val_fraction
    n_rows = n_dropped = n_cut = n_kept = 0
    it = iter(examples)
    for chosen in it:
        rejected = next(it)
        n_rows += 1
        if chosen is None or rejected is None:
            n_dropped += 1
            continue
        n_cut += chosen.cut > 0 or rejected.cut > 0
        w = writers["val" if _is_val(n_kept, f, phase) else "train"]
        for ex in (chosen, rejected):
            w.add_example(*_end_with_eos(ex.ids, ex.targets, eot))
        n_kept += 1
    splits = {split: w.close() for split, w in writers.items()}
    for s in splits.values():
        s["pairs"] = s["sequences"] // 2
    where = _named([s["path"] for s in sources]) or "the input"
    if n_rows == 0:
        raise CorpusError(f"{where}: no rows (the input is empty)")
    if n_kept == 0:
        raise CorpusError(
            f"{where}: in all {n_rows} pair(s) an answer does not fit --seq-tokens "
            f"{opts.seq_tokens} after its prompt (--prompt-policy {opts.prompt_policy}); "
            "raise --seq-tokens"
        )
    if splits["train"]["pairs"] == 0:
        raise CorpusError(f"{where}: too few pairs ({n_kept}), none left for the train split")
    section = {
        "rows": n_rows,
        "kept": n_kept,
        "dropped": n_dropped,
        "dropped_too_long": n_dropped,
        "cut": n_cut,
        "prompt_policy": opts.prompt_policy,
        "max_tokens": opts.seq_tokens,
        "pairs_per_group": opts.rows_per_group,
        "layout": "a pair is two consecutive rows, chosen then rejected; "
        f"{opts.rows_per_group} pairs a row group",
        "target_tokens": sum(s["target_tokens"] for s in splits.values()),
        "mask": {"column": "targets", "dtype": "bool", "true": "an answer token"},
        "template": _saved_template(template, template_file, out),
        "template_file": templates.TEMPLATE_FILE,
    }
    return _write_manifest(out, tok, tokenizer_sha256, dtype, opts, sources, splits,
                           2 * n_kept, {"unit": "pair"}, "preference", section)  # fmt: skip


def _n_tasks(files: list[Path]) -> int:
    """How many tokenize tasks: a few per CPU of the cluster, more for a big corpus (about
    TASK_BYTES of text each), never more than the files. A task costs ~70 ms besides its
    text (tokenizer load, scheduling); one task per small file made prepare 0.6x of a
    single-process `encode_batch` on 21 plays (bench/bench_prepare.py), 2 per CPU 0.9x."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    total = sum(f.stat().st_size for f in files)
    return max(1, min(len(files), max(TASKS_PER_CPU * cpus, -(-total // TASK_BYTES)), 2000))


def _task_groups(files: list[Path], n: int) -> list[list[Path]]:
    """`files` cut into at most `n` runs, in order, of about equal bytes: a file goes to
    the run its middle byte falls in (an equal count of files per task left one CPU idle
    at the end whenever the files differ in size)."""
    sizes = [f.stat().st_size for f in files]
    total = max(sum(sizes), 1)
    groups: list[list[Path]] = [[] for _ in range(n)]
    before = 0
    for f, size in zip(files, sizes, strict=True):
        groups[min(n - 1, (2 * before + size) * n // (2 * total))].append(f)
        before += size
    return [g for g in groups if g]


def _tokenized_docs(
    files: list[Path], tokenizer: Path, max_tasks: int | None = None
) -> Iterator[np.ndarray]:
    """Each document's token ids (+ EOT), in input order; Ray Data does the tokenizing with
    the tokenizer at `tokenizer` and the transformers files beside it."""
    import ray

    # One item (a list of paths) per block, so one task per group: from_items' own split is
    # by item count, and files differ in size.
    groups = _task_groups(files, _n_tasks(files))
    ds = ray.data.from_items(
        [{"paths": [str(f) for f in g]} for g in groups], override_num_blocks=len(groups)
    ).map_batches(
        _tokenize_batch,
        batch_size=None,  # a task tokenizes its whole block: one tokenizer load per task
        batch_format="pyarrow",
        fn_kwargs={"tokenizer_files": read_tokenizer_files(tokenizer)},
        compute=ray.data.TaskPoolStrategy(size=max_tasks),
    )
    ctx = ds.context  # this dataset's own copy: the process-wide DataContext is left alone
    ctx.execution_options.preserve_order = True  # determinism: output follows input order
    # Ray Data reserves a share of the cluster per operator; with one map operator behind
    # an in-memory input that share only throttles it: on 2 CPUs the tokenize tasks ran
    # mostly one at a time ("backpressured: ResourceBudget"). bench/bench_prepare.py: 0.43x
    # -> 0.9x of encode_batch with the reservation off. Nothing else runs in this dataset.
    ctx.op_resource_reservation_enabled = False
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for ids in batch.column("ids").chunks:
                offsets, values = ids.offsets.to_numpy(), ids.values.to_numpy()
                for i in range(len(ids)):
                    yield values[offsets[i] : offsets[i + 1]]
    except Exception as err:
        cause = _unwrap(err)
        if cause is not None:
            raise cause from None
        raise


def _get_tokenizer(files: list[Path], opts: PrepareOptions, out: Path) -> Tokenizer:
    t0 = time.perf_counter()
    if opts.tokenizer is not None:
        tok = load_tokenizer(opts.tokenizer)
        copy_tokenizer(opts.tokenizer, out)  # with tokenizer_config.json: the model's own eos
        log.info("prepare: reusing tokenizer %s (vocab %d)", opts.tokenizer, tok.get_vocab_size())
        return tok
    tok = train_tokenizer((text for f in files for _, text in read_documents(f)), opts.vocab_size)
    tok.save(str(out / TOKENIZER))
    dt = time.perf_counter() - t0
    log.info("prepare: trained a BPE tokenizer, vocab %d, in %.1fs", tok.get_vocab_size(), dt)
    return tok


def check_inputs(inputs: list[str | Path], output: str | Path, opts: PrepareOptions) -> list[Path]:
    """Every check that needs no Ray (input files, their size, the output dir); the files.

    Entry points call it before they connect to Ray, so a mistake costs no cluster start.
    """
    output = output_location(output)
    files = discover(inputs)
    check_output(output, files, opts.overwrite)
    if sum(f.stat().st_size for f in files) == 0:
        raise CorpusError(
            f"--input {_named(inputs)}: the corpus is empty ({len(files)} file(s), 0 bytes)"
        )
    if opts.format in RENDERED:
        other = [f for f in files if f.suffix != ".jsonl"]
        if other:
            raise CorpusError(f"{other[0]}: --format {opts.format} reads .jsonl rows only")
        resolve_template(opts.template, "", opts.tokenizer, opts.template_examples)  # known?
    if opts.format == "preference":  # every row checked (file:line, field) before Ray starts
        for f in files:
            for _ in preference.read_pairs(f):
                pass
    return files


def prepare(inputs: list[str | Path], output: str | Path, opts: PrepareOptions) -> dict:
    """Prepare `inputs` into the dataset dir `output` on the Ray this process is connected
    to (the caller connects: `lmforge.cluster.connect()`); returns the manifest.

    `output` may be `s3://bucket/prefix`: the dataset is made in a local temp dir, then
    uploaded with `manifest.json` last (a reader never sees a dataset without all its files)."""
    output = output_location(output)
    files = check_inputs(inputs, output, opts)
    if "ray" not in sys.modules or not sys.modules["ray"].is_initialized():
        # Ray Data would start a Ray of its own here, without the cluster's address or token.
        raise RuntimeError("prepare() needs a connected Ray: call lmforge.cluster.connect()")
    total_bytes = sum(f.stat().st_size for f in files)
    log.info("prepare: %d file(s), %.1f MB of raw text", len(files), total_bytes / 1e6)
    remote = storage.is_remote(output)
    staging = Path(tempfile.mkdtemp()) if remote else output.parent  # S3: made here, uploaded
    tmp = staging / (output.name if remote else f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        if opts.format in RENDERED:
            manifest = _prepare_sft(files, tmp, opts)
        else:
            tok = _get_tokenizer(files, opts, tmp)
            t0 = time.perf_counter()
            sources = [{"path": str(f), "bytes": f.stat().st_size} for f in files]
            manifest = split_and_write(
                _tokenized_docs(files, tmp / TOKENIZER, opts.max_tasks), tmp, tok, opts, sources
            )
        dt = time.perf_counter() - t0
        s = manifest["splits"]
        log.info(
            "prepare: %d documents -> %d tokens (train %d, val %d) in %.1fs, %.2f MB/s",
            manifest["documents"], manifest["tokens"], s["train"]["tokens"],
            s["val"]["tokens"], dt, total_bytes / 1e6 / max(dt, 1e-9),
        )  # fmt: skip
        if remote:
            storage.upload_dir(tmp, output, last=MANIFEST, replace=True)
        else:
            _swap_into_place(tmp, output)
        return manifest
    finally:
        shutil.rmtree(tmp.parent if remote else tmp, ignore_errors=True)


def _named(paths: list, most: int = 3) -> str:
    """The first few paths, for a message: `a, b, c and 4 more`."""
    names = ", ".join(str(p) for p in paths[:most])
    return f"{names} and {len(paths) - most} more" if len(paths) > most else names


def check_output(output: Path, files: list[Path], overwrite: bool) -> None:
    """Never clobber what is not ours: only an empty dir or a dataset (with --overwrite)."""
    if isinstance(output, Path) and any(f.is_relative_to(output) for f in files):
        raise UsageError(f"--output {output}: holds input files; write the dataset elsewhere")
    if output.is_file():
        raise FileExistsError(f"--output {output}: is a file")
    if (output / MANIFEST).exists():
        if not overwrite:
            raise FileExistsError(
                f"--output {output}: a dataset is already there (pass --overwrite)"
            )
    elif output.is_dir() and any(output.iterdir()):
        raise FileExistsError(
            f"--output {output}: not empty and not a dataset; refusing to replace it"
        )


def output_location(output: str | Path) -> Path | storage.S3Path:
    """The dataset dir to write: a local path, or an `S3Path` for s3://bucket/prefix."""
    if storage.is_s3(output):
        return storage.resolve(output)
    return Path(output).expanduser().resolve()


def _swap_into_place(tmp: Path, output: Path) -> None:
    old = output.with_name(f".{output.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if output.exists():
        output.rename(old)
    tmp.rename(output)
    shutil.rmtree(old, ignore_errors=True)
