"""The `lmforge` command line: prepare data, train, generate, run a local cluster.

    lmforge cluster up
    lmforge prepare --input data/shakespeare --output ~/.lmforge/datasets/shakespeare
    lmforge train --config jobs/configs/tiny.yaml --set train.max_steps=50
    lmforge generate --checkpoint ~/.lmforge/runs/RUN --prompt "ROMEO:"

Every subcommand calls the same library functions as `jobs/*.py` and the dashboard.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lmforge import __version__
from lmforge.cluster import ClusterError

# Errors a user can fix (bad config, data, paths, an unreachable cluster): one line, no
# traceback. ValueError covers ConfigError, CorpusError, DatasetError and CheckpointError.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ClusterError)


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenize raw text into a dataset dir of Arrow (Parquet) shards",
        description="Train (or reuse) a byte-level BPE tokenizer, tokenize the corpus in "
        "parallel with Ray Data, pack it into token shards and split train/val.",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help=".txt files (one document each), .jsonl (a 'text' field a line), "
                   ".parquet (a 'text' column), or folders of them")  # fmt: skip
    p.add_argument("--output", required=True, metavar="DIR", help="the dataset dir to write")
    p.add_argument("--vocab-size", type=int, default=8192, metavar="N",
                   help="BPE vocabulary size, including 256 bytes and <|endoftext|> (default 8192)")  # fmt: skip
    p.add_argument("--val-fraction", type=float, default=0.05, metavar="F",
                   help="share of the tokens held out for validation (default 0.05)")  # fmt: skip
    p.add_argument("--tokenizer", type=Path, metavar="FILE",
                   help="reuse this tokenizer.json instead of training one (e.g. to keep a "
                   "checkpoint's tokenizer)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    p.add_argument("--seq-tokens", type=int, default=1024, metavar="N",
                   help="tokens per packed row in the shards (default 1024)")  # fmt: skip
    p.add_argument("--rows-per-group", type=int, default=16, metavar="N",
                   help="rows per Parquet row group, the unit dealt to workers (default 16)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset dir")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model with Ray Train + DeepSpeed ZeRO",
        description="Launch a Ray Train TorchTrainer whose workers each run a DeepSpeed engine. "
        "Uses RAY_ADDRESS, else the cluster of `lmforge cluster up`, else a private local Ray.",
    )
    add_train_args(p)


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by `lmforge train` and `jobs/train.py`."""
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="YAML config (see jobs/configs/); defaults for anything missing")  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=100 (repeatable)")  # fmt: skip
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN",
                   help="continue a run from its latest checkpoint: the run named by run.name, "
                   "the given run name or run dir, or else the newest run in storage")  # fmt: skip


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint")
    p.add_argument("--checkpoint", required=True, type=Path, metavar="DIR",
                   help="a checkpoint dir, or a run dir (its latest checkpoint)")  # fmt: skip
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="(default 200)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="0 is greedy (default 0.8)")  # fmt: skip
    p.add_argument("--top-k", type=int, default=50, metavar="K", help="(default 50; 0 disables)")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="for repeatable samples")


def _add_cluster(sub) -> None:
    p = sub.add_parser("cluster", help="start, stop or inspect a local Ray cluster")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--port", type=int, default=6379, help="GCS port (default 6379)")
    p.add_argument("--dashboard-port", type=int, default=8265,
                   help="dashboard / Jobs API port (default 8265)")  # fmt: skip
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs to offer (default: all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="Train Transformer language models on Ray with DeepSpeed ZeRO.",
    )
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_prepare(sub)
    _add_train(sub)
    _add_generate(sub)
    _add_cluster(sub)
    return parser


def cmd_prepare(args) -> None:
    from lmforge.data.prepare import PrepareOptions, prepare

    opts = PrepareOptions(
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        seq_tokens=args.seq_tokens,
        rows_per_group=args.rows_per_group,
        tokenizer=args.tokenizer,
        overwrite=args.overwrite,
    )
    m = prepare(args.input, args.output, opts)
    s = m["splits"]
    print(
        f"dataset: {Path(args.output).expanduser().resolve()}\n"
        f"  documents {m['documents']:,} | tokens {m['tokens']:,} | vocab {m['tokenizer']['vocab_size']:,}\n"
        f"  train {s['train']['tokens']:,} tokens in {len(s['train']['shards'])} shard(s) | "
        f"val {s['val']['tokens']:,} tokens in {len(s['val']['shards'])} shard(s)"
    )


def cmd_train(args) -> None:
    from lmforge.config import load_config
    from lmforge.training.launch import run_training

    cfg = load_config(args.config, args.overrides)
    result = run_training(cfg, resume=args.resume)
    m = result.metrics
    print(f"run dir: {result.run_dir}")
    if result.checkpoint:
        print(f"latest checkpoint: {result.checkpoint}")
    if "val_loss" in m:
        print(
            f"final: step {m.get('step')} | loss {m.get('loss', float('nan')):.4f} | val_loss {m['val_loss']:.4f}"
        )


def cmd_generate(args) -> None:
    from lmforge.checkpoint import load_model
    from lmforge.generation import SamplingParams, generate_tokens
    from lmforge.tokenizer import eot_id

    model, tok, _ = load_model(args.checkpoint)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        seed=args.seed,
        stop_token=eot_id(tok),
    )
    ids = tok.encode(args.prompt, add_special_tokens=False).ids
    sys.stdout.write(args.prompt)
    out: list[int] = []
    shown = ""
    for token in generate_tokens(model, ids, params):
        out.append(token)
        text = tok.decode(out)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
            shown = text
    sys.stdout.write(tok.decode(out)[len(shown) :] + "\n")


def cmd_cluster(args) -> None:
    from lmforge import cluster

    if args.action == "up":
        info = cluster.up(args.port, args.dashboard_port, args.num_cpus)
        print(cluster.describe(info))
    elif args.action == "down":
        print(
            "stopped the local Ray cluster"
            if cluster.down()
            else "no local Ray cluster was running"
        )
    else:
        print(cluster.status())


COMMANDS = {
    "prepare": cmd_prepare,
    "train": cmd_train,
    "generate": cmd_generate,
    "cluster": cmd_cluster,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        COMMANDS[args.command](args)
    except USER_ERRORS as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(f"lmforge {args.command}: error: {first}", file=sys.stderr)
        return 2
    except Exception as err:
        message = _training_failure(err)
        if message is None:
            raise
        print(f"lmforge {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


def _training_failure(err: Exception) -> str | None:
    """One line for a Ray Train worker failure (the full traceback is in the log above)."""
    try:
        from ray.train import TrainingFailedError
    except ImportError:
        return None
    if not isinstance(err, TrainingFailedError):
        return None
    failures = getattr(err, "worker_failures", None) or {}
    for rank, exc in sorted(failures.items()):
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return f"training failed on worker {rank}: {last}"
    return f"training failed: {str(err).strip().splitlines()[-1]}"


if __name__ == "__main__":
    sys.exit(main())
