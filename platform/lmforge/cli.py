"""The `lmforge` command line: prepare data, train, generate, evaluate, export, run services.

    lmforge cluster up
    lmforge prepare --input data/shakespeare --output ~/.lmforge/datasets/shakespeare
    lmforge train --config jobs/configs/tiny.yaml --set train.max_steps=50
    lmforge submit --config jobs/configs/tiny.yaml   # the same, as a Ray job (Jobs API)
    lmforge sweep --name lr --config jobs/configs/tiny.yaml --space space.yaml --trials 8
    lmforge generate --model models:/lmforge@best --prompt "ROMEO:"
    lmforge evaluate --model models:/lmforge@best --data datasets/shakespeare
    lmforge evaluate --model models:/lmforge@best --tasks tasks/copy.yaml,hellaswag --limit 100
    lmforge export-hf --model models:/lmforge@best --output ./gpt2-hf
    lmforge import-hf --input ./gpt2-hf --model gpt2   # a transformers folder -> models:/gpt2/1
    lmforge tracking up
    lmforge serve up --model models:/lmforge@best   # an OpenAI-compatible endpoint
    lmforge dashboard                  # http://127.0.0.1:8501

Every subcommand calls the same library functions as `jobs/*.py` and the dashboard.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

from lmforge import __version__
from lmforge.errors import LmforgeError, first_line


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user can fix: lmforge's own errors, files (OSError) and MLflow's (an unknown
    model, a store that cannot be reached). Anything else is a bug and keeps its traceback."""
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:
        return (LmforgeError, OSError)
    return (LmforgeError, OSError, MlflowException)


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
    p.add_argument("--tokenizer", metavar="SOURCE",
                   help="reuse a tokenizer instead of training one: a tokenizer.json, a folder "
                   "holding one (a checkpoint, a Hugging Face model), or a registered version "
                   "(models:/NAME/VERSION), so the data fits that model")  # fmt: skip
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow to resolve --tokenizer models:/... in (default as for --model)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    p.add_argument("--seq-tokens", type=int, default=1024, metavar="N",
                   help="tokens per packed row in the shards (default 1024)")  # fmt: skip
    p.add_argument("--rows-per-group", type=int, default=16, metavar="N",
                   help="rows per Parquet row group, the unit dealt to workers (default 16)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset dir")
    p.add_argument("--format", choices=("text", "sft", "preference"), default="text",
                   help="text (default): documents, packed; sft: .jsonl rows of prompt/completion "
                   "or messages, rendered with --template, only completion tokens are targets, "
                   "one example a row (--seq-tokens is then the longest example); preference: "
                   ".jsonl rows of prompt, chosen, rejected (strings, or TRL's conversational "
                   "form), for train.objective dpo; a pair is kept when both answers fit")  # fmt: skip
    p.add_argument("--template", metavar="NAME|FILE.jinja",
                   help="sft: plain, instruct, chat, few-shot, chain-of-thought, a Jinja2 file, or "
                   "chat_template (the one in --tokenizer's tokenizer_config.json)")  # fmt: skip
    p.add_argument("--prompt-policy", choices=("drop", "cut-prompt"), default="drop",
                   help="sft: a row longer than --seq-tokens is dropped (default) or loses its "
                   "prompt's first tokens (dropped if its completion alone is too long)")  # fmt: skip
    p.add_argument("--template-examples", type=Path, metavar="FILE.jsonl",
                   help="sft, few-shot: the worked examples (prompt/completion rows)")  # fmt: skip


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model with Ray Train + DeepSpeed ZeRO",
        description="Launch a Ray Train TorchTrainer whose workers each run a DeepSpeed engine. "
        "Uses RAY_ADDRESS, else the cluster of `lmforge cluster up`, else a private local Ray.",
    )
    add_train_args(p)
    p.add_argument("--local", action="store_true",
                   help="no Ray: run scaling.num_workers plain local processes (gloo) with the "
                   "same training loop, to try a config on a laptop; no restarts, no elastic, "
                   "a local run.storage_path")  # fmt: skip


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by `lmforge train` and `jobs/train.py`."""
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="YAML config (see jobs/configs/); defaults for anything missing")  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=100 (repeatable)")  # fmt: skip
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN",
                   help="continue a run from its latest checkpoint: the run named by run.name, "
                   "the given run name or run dir, the run that registered models:/NAME/VERSION, "
                   "or else the newest run in storage")  # fmt: skip
    p.add_argument("--init-from", metavar="MODEL",
                   help="start a new run (fine-tuning) from these weights: models:/NAME@ALIAS, "
                   "models:/NAME/VERSION or a checkpoint dir; the model shape comes from it")  # fmt: skip


def _add_submit(sub) -> None:
    p = sub.add_parser(
        "submit",
        help="submit a training job to the Ray cluster (Jobs API) and follow its log",
        description="The arguments of `lmforge train`, checked here, sent as a Ray job "
        "(`python jobs/train.py ...`, runtime env cluster/runtime_env.yaml) with the cluster's "
        "token. The job outlives this terminal: Ctrl-C stops following, not the job.",
    )
    add_train_args(p)
    p.add_argument("--address", metavar="URL",
                   help="Ray Jobs API (default: RAY_JOBS_ADDRESS, an http RAY_ADDRESS, the "
                   "cluster of `lmforge cluster up`, else http://127.0.0.1:8265)")  # fmt: skip
    p.add_argument("--no-wait", action="store_true",
                   help="print the job id and return instead of following the log")  # fmt: skip


def _add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="a hyperparameter sweep (Ray Tune): each trial a whole training job",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""Run many training jobs of one base config with values drawn from a space,
stop the worst early (ASHA) and register the best checkpoint as models:/MODEL@sweep-NAME.

Each trial is a whole lmforge job (its own Ray Train worker group of scaling.num_workers
DeepSpeed workers, its own run dir <run.storage_path>/NAME-<trial>, resumable); Tune keeps
the sweep's state in <run.storage_path>/sweeps/NAME. MLflow: a parent run sweep-NAME, a
child run per trial. SPACE.yaml maps config keys to distributions:

  train.lr: {loguniform: [1.0e-4, 3.0e-3]}
  train.warmup_steps: {choice: [0, 20, 50]}
  model.d_model: {grid: [64, 128]}        # grid: every value (every combination)
  train.weight_decay: {uniform: [0.0, 0.2]}
  train.micro_batch_size: {randint: [4, 17]}   # 4..16

Every value the space can produce is checked against the config schema, and every point
against a worker's memory (the launch estimate), before any trial starts.""",
    )
    add_sweep_args(p)
    p.add_argument("--submit", action="store_true",
                   help="run the sweep's driver as a Ray job (Jobs API), as `lmforge submit` "
                   "does; it outlives this terminal")  # fmt: skip
    p.add_argument("--address", metavar="URL", help="--submit: the Ray Jobs API (as submit)")
    p.add_argument("--no-wait", action="store_true",
                   help="--submit: print the job id and return instead of following the log")  # fmt: skip


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by `lmforge sweep` and `jobs/sweep.py`."""
    p.add_argument("--name", metavar="NAME", help="the sweep's name (required unless --resume)")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="the base config every trial starts from (see jobs/configs/)")  # fmt: skip
    p.add_argument("--space", type=Path, metavar="SPACE.yaml",
                   help="config keys -> {loguniform|uniform|randint|choice|grid: [...]}")  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the base config (repeatable)")  # fmt: skip
    p.add_argument("--trials", type=int, default=8,
                   help="trials to sample (with grid keys: per grid point); default 8")  # fmt: skip
    p.add_argument("--max-concurrent", type=int, default=2, metavar="K",
                   help="trials running at once (each takes its own workers); default 2")  # fmt: skip
    p.add_argument("--scheduler", choices=["asha", "none"], default="asha",
                   help="asha: stop the worst trials at each rung (default); none: run all out")  # fmt: skip
    p.add_argument("--search", choices=["random", "optuna"], default="random",
                   help="random sampling (default) or Optuna's TPE (Tune's OptunaSearch)")  # fmt: skip
    p.add_argument("--metric", default="val_loss",
                   help="what ranks trials, reported at each evaluation: val_loss (default), "
                   "val_perplexity, val_loss/<source>; or a score of each checkpoint's "
                   "evaluation, eval.<task>.<metric> (a task of eval.tasks; with --mode)")  # fmt: skip
    p.add_argument("--mode", choices=["min", "max"], default="min")
    p.add_argument("--grace-period", type=int, metavar="STEPS",
                   help="ASHA: steps before a trial may be stopped (default train.eval_every; "
                   "train.checkpoint_every for an eval.* metric)")  # fmt: skip
    p.add_argument("--reduction-factor", type=float, default=2.0,
                   help="ASHA: keep 1/F of the trials at each rung (default 2)")  # fmt: skip
    p.add_argument("--seed", type=int, help="the searcher's seed (reproducible sampling)")
    p.add_argument("--worker-memory", type=float, metavar="GIB",
                   help="memory a worker has, for the estimate check (default: a CPU worker's "
                   "share of the roomiest node's Ray memory)")  # fmt: skip
    p.add_argument("--init-from", metavar="MODEL",
                   help="every trial fine-tunes these weights (models:/NAME@ALIAS, a checkpoint "
                   "dir), as `lmforge train --init-from`; a space over train.lora.* needs it")  # fmt: skip
    p.add_argument("--register-all", action="store_true",
                   help="register every trial's checkpoints (default: only the best, once)")  # fmt: skip
    p.add_argument("--resume", metavar="NAME",
                   help="continue sweep NAME after its driver died (finished trials stay; "
                   "--config only to say which run storage it is in)")  # fmt: skip


def _add_model_source(p: argparse.ArgumentParser) -> None:
    """--model URI | --checkpoint DIR, shared by generate, evaluate and export-hf."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="URI",
                     help="a registered version: models:/NAME@ALIAS (latest, best) or "
                     "models:/NAME/VERSION")  # fmt: skip
    src.add_argument("--checkpoint", metavar="DIR",
                     help="a checkpoint dir, or a run dir (its latest checkpoint); "
                     "local or s3://bucket/prefix")  # fmt: skip
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow to resolve --model in (default: MLFLOW_TRACKING_URI, the "
                   "server of `lmforge tracking up`, else the SQLite store in LMFORGE_HOME)")  # fmt: skip


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a registered model or a checkpoint",
        description="Stream a continuation of the prompt to the terminal, token by token.",
    )
    _add_model_source(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="(default 200)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="0 is greedy (default 0.8)")  # fmt: skip
    p.add_argument("--top-k", type=int, default=50, metavar="K", help="(default 50; 0 disables)")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="for repeatable samples")
    p.add_argument("--n", type=int, default=1, metavar="N",
                   help="samples of the prompt, generated together in one batch (default 1; "
                   "more than one are printed one after another when done)")  # fmt: skip
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a sample at this text (not printed); repeatable")  # fmt: skip
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="> 1 discourages tokens already in the text (CTRL's; default 1: off)")  # fmt: skip
    p.add_argument("--presence-penalty", type=float, default=0.0, metavar="P",
                   help="-2..2, OpenAI's: subtracted from the logit of every token generated "
                   "so far (default 0: off)")  # fmt: skip
    p.add_argument("--frequency-penalty", type=float, default=0.0, metavar="F",
                   help="-2..2, OpenAI's: subtracted once per time a token was generated so "
                   "far (default 0: off)")  # fmt: skip
    p.add_argument("--logprobs", type=int, default=None, metavar="K",
                   help="after the text, each token's log-probability and its K most likely "
                   "alternatives")  # fmt: skip
    p.add_argument("--template", default="own", metavar="own|none|NAME",
                   help="how the prompt is given to the model: own (default) as the user turn "
                   "of the template it was trained with (its template.json, an SFT run's; raw "
                   "text without one), none (raw), or a built-in template's name")  # fmt: skip
    _add_dtype(p, "fp32")


def _add_dtype(p: argparse.ArgumentParser, default: str) -> None:
    """--dtype, shared by generate and serve up (lmforge.perf.inference_dtype). The choices
    are perf.INFERENCE_DTYPES written out: importing perf imports torch, too slow for --help."""
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "auto"], default=default,
                   help=f"the weights' and KV cache's dtype while generating (default {default}): "
                   "auto is bf16 on a GPU that supports it or a CPU with avx512_bf16/AMX (faster "
                   "there, half the memory), else fp32. Greedy output equals `generate` with the "
                   "same dtype; bf16's may differ from fp32's where two tokens nearly tie")  # fmt: skip


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a model: evaluation tasks (lm-evaluation-harness), or loss on a dataset",
        description="--tasks: run lm-evaluation-harness tasks (task YAML files, or the "
        "harness's task names where their data is reachable) on each --model / --checkpoint "
        "and print one table (task, metric, value ± stderr; a column per model); each "
        "--model version gets the scores as tags eval.<task>.<metric>, its run the metrics "
        "eval/<task>/<metric> at its step and the harness's results JSON. "
        "--data: loss and perplexity on the val split of a prepared dataset (same tokenizer "
        "as the model), logged to the version's run; on SFT data (prepare --format sft) the "
        "loss over completion tokens only and the exact-match accuracy of greedy answers.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="URI", action="append",
                     help="a registered version: models:/NAME@ALIAS (latest, best) or "
                     "models:/NAME/VERSION; repeat it (with --tasks) to compare versions")  # fmt: skip
    src.add_argument("--checkpoint", metavar="DIR", action="append",
                     help="a checkpoint dir, or a run dir (its latest checkpoint); "
                     "local or s3://bucket/prefix; repeatable with --tasks")  # fmt: skip
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow to resolve --model in (default: MLFLOW_TRACKING_URI, the "
                   "server of `lmforge tracking up`, else the SQLite store in LMFORGE_HOME)")  # fmt: skip
    what = p.add_mutually_exclusive_group()
    what.add_argument("--tasks", metavar="FILE.yaml[,NAME...]",
                      help="lm-evaluation-harness tasks: task YAML files (local data_files) "
                      "or task names, comma-separated; each is checked before the model is read")  # fmt: skip
    what.add_argument("--data", metavar="DIR",
                      help="a dataset dir made by lmforge prepare (relative to LMFORGE_HOME or absolute)")  # fmt: skip
    p.add_argument("--probes", metavar="FILE",
                   help="(with or without --tasks) prompts, one a line or JSON lines with a "
                   "`prompt`, answered greedily and by --probe-samples seeded samples; stored "
                   "on each --model version as an MLflow table (the Models page shows them)")  # fmt: skip
    p.add_argument("--probe-samples", type=int, default=2, metavar="N", help="(default 2)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="--tasks: at most N examples of each task (default: all)")  # fmt: skip
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                   help="--tasks: K worked examples before each question (default: the task's)")  # fmt: skip
    p.add_argument("--template", default="own", metavar="own|none|NAME",
                   help="--tasks: how prompts are given to the model, as `generate`: own "
                   "(default) its trained template (raw text without one), none, or a built-in "
                   "template's name")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="(default 8)")
    p.add_argument("--max-batches", type=int, default=None, metavar="N",
                   help="--data: stop after N batches (default: the whole val split; SFT data: "
                   "the first N * batch-size examples)")  # fmt: skip


def _add_export_hf(sub) -> None:
    p = sub.add_parser(
        "export-hf",
        help="write a Hugging Face transformers GPT-2 folder",
        description="Write config.json, model.safetensors and tokenizer files that "
        "transformers' AutoModelForCausalLM / AutoTokenizer load offline.",
    )
    _add_model_source(p)
    p.add_argument("--output", required=True, type=Path, metavar="DIR", help="folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.add_argument("--merge", action="store_true",
                   help="a LoRA version: fold the adapters into the base and write a plain "
                   "model (default: a peft adapter folder for the Hugging Face base)")  # fmt: skip


def _add_import_hf(sub) -> None:
    p = sub.add_parser(
        "import-hf",
        help="register a local Hugging Face model folder as a version of a model",
        description="Read a transformers folder (config.json, model.safetensors or a sharded "
        "index, tokenizer.json) of a supported architecture, check it, and register it as a "
        "new version of the MLflow model NAME, which generate, evaluate, export-hf and "
        "train --init-from then use like a trained one. Pickled weights are never loaded.",
    )
    p.add_argument("--input", required=True, type=Path, metavar="DIR",
                   help="the Hugging Face model folder (local; nothing is downloaded)")  # fmt: skip
    p.add_argument("--model", required=True, metavar="NAME",
                   help="the registered model to add the version to (models:/NAME/N)")  # fmt: skip
    p.add_argument("--experiment", metavar="NAME",
                   help="MLflow experiment of the import run (default: the model's NAME)")  # fmt: skip
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow to register in (default: MLFLOW_TRACKING_URI, the server of "
                   "`lmforge tracking up`, else the SQLite store in LMFORGE_HOME)")  # fmt: skip


def _add_tracking(sub) -> None:
    p = sub.add_parser(
        "tracking",
        help="start, stop or inspect the MLflow server",
        description="Serve the embedded MLflow store (SQLite + artifacts in LMFORGE_HOME) on "
        "127.0.0.1, for the MLflow UI, the dashboard and jobs submitted to the cluster; or a "
        "shared one: a PostgreSQL store with artifacts in S3, proxied by the server.",
    )
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--port", type=int, default=5000, help="(default 5000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; see cluster/README.md "
                   "before exposing it: use --auth and TLS in front)")  # fmt: skip
    p.add_argument("--backend-store-uri", metavar="URI",
                   help="runs and the registry in this database, e.g. "
                   "postgresql://user@host:5432/mlflow (password: PGPASSWORD or ~/.pgpass; "
                   "default: the SQLite file in LMFORGE_HOME)")  # fmt: skip
    p.add_argument("--artifacts-destination", metavar="URI",
                   help="artifacts here, e.g. s3://bucket/mlflow (the server's AWS_* "
                   "variables reach it; clients go through the server; default: a folder "
                   "in LMFORGE_HOME)")  # fmt: skip
    p.add_argument("--auth", action="store_true",
                   help="MLflow's basic-auth app: clients need MLFLOW_TRACKING_USERNAME/"
                   "PASSWORD; the first start creates the admin from MLFLOW_AUTH_ADMIN_PASSWORD")  # fmt: skip


def _add_cluster(sub) -> None:
    p = sub.add_parser(
        "cluster",
        help="start, stop or inspect a local Ray cluster",
        description="A local Ray cluster with token auth: one node on 127.0.0.1, or with "
        "--nodes N a head on 127.0.0.2 and N-1 worker nodes on 127.0.0.3, ... (each its own "
        "raylet and resources, as on a real cluster). `status` lists the nodes; `add-node` "
        "starts one more worker node (--node-cpus) on the next address, e.g. to replace a "
        "lost one; `down` stops every node `up` and `add-node` started.",
    )
    p.add_argument("action", choices=["up", "down", "status", "add-node"])
    p.add_argument("--port", type=int, default=6379, help="GCS port (default 6379)")
    p.add_argument("--dashboard-port", type=int, default=8265,
                   help="dashboard / Jobs API port (default 8265)")  # fmt: skip
    p.add_argument("--nodes", type=int, default=1, metavar="N",
                   help="nodes to start, the head included (default 1)")  # fmt: skip
    p.add_argument("--num-cpus", type=float, default=None,
                   help="CPUs the head offers (default: all with one node, 0 with several)")  # fmt: skip
    p.add_argument("--node-cpus", type=float, default=1, metavar="N",
                   help="CPUs each worker node offers (default 1)")  # fmt: skip


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve versions through an OpenAI-compatible endpoint (Ray Serve)",
        description="`up` deploys the versions on the lmforge cluster (`lmforge cluster up`, "
        "or --address) as an OpenAI-compatible API (/v1/models, /v1/completions, "
        "/v1/chat/completions, streaming) and returns once it answers, printing its URL; "
        "again with the same models, it rolls each alias to its current version without "
        "dropping requests. Requests need 'Authorization: Bearer KEY': LMFORGE_SERVE_API_KEY, "
        "else the key the first `up` writes to LMFORGE_HOME/serve_api_key (mode 600). A "
        "replica holds one base and all its LoRA versions and decodes concurrent requests "
        "together (continuous batching). `status` lists deployments, replicas, versions and "
        "request figures; `down` removes the application.",
    )
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--model", action="append", default=[], metavar="URI",
                   help="a version to serve: models:/NAME@ALIAS (listed as NAME@ALIAS, the "
                   "alias resolved now) or models:/NAME/N; repeatable (up)")  # fmt: skip
    p.add_argument("--replicas", type=int, default=1, metavar="R",
                   help="replicas of each base model (default 1)")  # fmt: skip
    p.add_argument("--port", type=int, default=8000, help="(default 8000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; another one needs "
                   "LMFORGE_SERVE_API_KEY or an existing key; put TLS in front)")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=8, metavar="B",
                   help="sequences a replica decodes together (each sample of n counts; default 8)")  # fmt: skip
    res = p.add_mutually_exclusive_group()
    res.add_argument("--cpus-per-replica", type=float, default=None, metavar="C",
                     help="CPUs each replica reserves (default 1)")  # fmt: skip
    res.add_argument("--gpus-per-replica", type=float, default=None, metavar="G",
                     help="GPUs each replica reserves (it then runs on CUDA)")  # fmt: skip
    _add_dtype(p, "auto")
    p.add_argument("--address", metavar="HOST:PORT",
                   help="the Ray cluster's GCS address (default: RAY_ADDRESS, else the cluster "
                   "of `lmforge cluster up`)")  # fmt: skip
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow to resolve --model in (default: MLFLOW_TRACKING_URI, the "
                   "server of `lmforge tracking up`, else the SQLite store in LMFORGE_HOME)")  # fmt: skip


def _add_dashboard(sub) -> None:
    p = sub.add_parser(
        "dashboard",
        help="start the web dashboard (launch, watch, compare, try)",
        description="Run the Streamlit dashboard: launch jobs through the Ray Jobs API, "
        "watch their logs and curves, browse registered versions and generate from them.",
    )
    p.add_argument("--port", type=int, default=8501, help="(default 8501)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; see cluster/README.md "
                   "before exposing it: the dashboard has no login of its own)")  # fmt: skip
    p.add_argument("--ray-address", metavar="URL",
                   help="Ray Jobs API (default: RAY_JOBS_ADDRESS, an http RAY_ADDRESS, the "
                   "cluster of `lmforge cluster up`, else http://127.0.0.1:8265)")  # fmt: skip
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow (default: MLFLOW_TRACKING_URI, the server of `lmforge tracking "
                   "up`, else the SQLite store in LMFORGE_HOME)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="Train Transformer language models on Ray with DeepSpeed ZeRO.",
    )
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the traceback of an error")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_prepare(sub)
    _add_train(sub)
    _add_submit(sub)
    _add_sweep(sub)
    _add_generate(sub)
    _add_evaluate(sub)
    _add_export_hf(sub)
    _add_import_hf(sub)
    _add_tracking(sub)
    _add_cluster(sub)
    _add_serve(sub)
    _add_dashboard(sub)
    return parser


def tokenizer_file(source: str | None, tracking_uri: str | None = None) -> Path | None:
    """`prepare --tokenizer`: a tokenizer.json, a folder holding one, or a registered
    version's (fetched into the local cache)."""
    if source is None:
        return None
    from lmforge.tokenizer import TOKENIZER
    from lmforge.tracking.registry import is_model_uri

    if is_model_uri(source):
        from lmforge.tracking.registry import fetch_checkpoint

        return fetch_checkpoint(source, tracking_uri) / TOKENIZER
    path = Path(source).expanduser()
    return path / TOKENIZER if path.is_dir() else path


def cmd_prepare(args) -> None:
    from lmforge.cluster import connect
    from lmforge.data.prepare import PrepareOptions, check_inputs, output_location, prepare

    opts = PrepareOptions(
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        seq_tokens=args.seq_tokens,
        rows_per_group=args.rows_per_group,
        tokenizer=tokenizer_file(args.tokenizer, args.tracking_uri),
        overwrite=args.overwrite,
        format=args.format,
        template=args.template,
        prompt_policy=args.prompt_policy,
        template_examples=args.template_examples,
    )
    check_inputs(args.input, args.output, opts)  # before Ray: a mistake costs no Ray start
    where = connect()  # RAY_ADDRESS, else `lmforge cluster up`'s cluster, else a private Ray
    logging.getLogger("lmforge.data.prepare").info("prepare: on %s", where)
    m = prepare(args.input, args.output, opts)
    s = m["splits"]
    print(
        f"dataset: {output_location(args.output)}\n"
        f"  documents {m['documents']:,} | tokens {m['tokens']:,} | vocab {m['tokenizer']['vocab_size']:,}\n"
        f"  train {s['train']['tokens']:,} tokens in {len(s['train']['shards'])} shard(s) | "
        f"val {s['val']['tokens']:,} tokens in {len(s['val']['shards'])} shard(s)"
    )
    if "sft" in m:
        print(sft_summary(m))
    if "preference" in m:
        print(preference_summary(m))


def preference_summary(m: dict) -> str:
    """The pairs a preference prepare read, kept and dropped, and its template."""
    q = m["preference"]
    return (
        f"  pairs read {q['rows']:,} | kept {q['kept']:,} | dropped (an answer does not fit "
        f"{q['max_tokens']} tokens after its prompt, --prompt-policy {q['prompt_policy']}) "
        f"{q['dropped']:,} | cut {q['cut']:,} | template "
        f"{q['template']['file'] or q['template']['name']}"
    )


def sft_summary(m: dict) -> str:
    """The rows an SFT prepare read, kept, dropped and cut, and its template."""
    q = m["sft"]
    return (
        f"  rows read {q['rows']:,} | examples {q['examples']:,} | dropped (longer than "
        f"{q['max_tokens']} tokens, --prompt-policy {q['prompt_policy']}) {q['dropped_too_long']:,}"
        f" | cut {q['cut']:,} | target tokens {q['target_tokens']:,} | template "
        f"{q['template']['file'] or q['template']['name']}"
    )


def cmd_train(args) -> None:
    from lmforge.config import load_config
    from lmforge.training.launch import run_training

    cfg = load_config(args.config, args.overrides)
    result = run_training(
        cfg, resume=args.resume, init_from=args.init_from, local=getattr(args, "local", False)
    )
    m = result.metrics
    print(f"run dir: {result.run_dir}")
    if result.mlflow_run_id:
        print(
            f"MLflow run: {result.mlflow_run_id} (experiment {cfg.tracking.experiment!r}); "
            f"models: models:/{cfg.registered_model}@latest, @best"
        )
    if result.checkpoint:
        print(f"latest checkpoint: {result.checkpoint}")
    if "val_loss" in m:
        print(
            f"final: step {m.get('step')} | loss {m.get('loss', float('nan')):.4f} | val_loss {m['val_loss']:.4f}"
        )


def submit_spec(args):
    """The job `lmforge submit` sends: the config validated here (ConfigError before
    anything is sent), rendered as `python jobs/train.py --set ...`."""
    import os

    from lmforge.config import load_config
    from lmforge.jobspec import submitter_env, train_job

    cfg = load_config(args.config, args.overrides)
    # As for `lmforge train`: the config's tracking URI, else MLFLOW_TRACKING_URI; with
    # neither, the job picks its default where it runs (the local server, else SQLite).
    tracking_uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    resume = args.resume or None
    # The submitter's AWS_* (S3 data or storage) and MLflow credentials reach the job
    # through its runtime env, as `lmforge train` hands them to its workers.
    env = submitter_env(cfg, resume if isinstance(resume, str) else None, args.init_from)
    return train_job(
        cfg, tracking_uri, resume=resume, init_from=args.init_from, any_path=True, env_vars=env
    )


def cmd_submit(args) -> int:
    from lmforge.jobclient import JobClient

    spec = submit_spec(args)
    client = JobClient(args.address)
    sid = client.submit(spec)
    meta = spec.metadata
    print(
        f"submitted job {sid} to {client.address} "
        f"(run {meta['lmforge.run_name']}, experiment {meta['lmforge.experiment']})",
        flush=True,
    )
    again = (
        f"  follow: RAY_AUTH_MODE=token ray job logs --follow --address {client.address} {sid}\n"
        f"  stop:   RAY_AUTH_MODE=token ray job stop --address {client.address} {sid}\n"
        "  or the Jobs page of `lmforge dashboard`"
    )
    if args.no_wait:
        print(again)
        return 0
    try:
        for text in client.follow(sid):
            sys.stdout.write(text)
            sys.stdout.flush()
        status = client.wait(sid, timeout_s=120, poll_s=1)  # the log ends just before
    except KeyboardInterrupt:
        print(f"\nstopped following; job {sid} keeps running\n{again}", file=sys.stderr)
        return 130
    if status != "SUCCEEDED":
        from lmforge.jobclient import failure_line

        why = failure_line(client.job(sid).message)
        print(f"lmforge submit: job {sid} {status}: {why}", file=sys.stderr)
        return 1
    print(f"job {sid} SUCCEEDED")
    return 0


def sweep_plan(args):
    """The checked sweep of `lmforge sweep` (no Ray): its space from --space, or (a
    submitted job) from LMFORGE_SWEEP_SPACE."""
    import json
    import os

    from lmforge.errors import UsageError
    from lmforge.sweeps import SweepOptions, plan_sweep
    from lmforge.sweeps.submit import SPACE_ENV

    if not args.name:
        raise UsageError("--name: required (or --resume NAME)")
    space = args.space
    if space is None:
        if not os.environ.get(SPACE_ENV):
            raise UsageError("--space: required, a SPACE.yaml of config keys -> distributions")
        space = json.loads(os.environ[SPACE_ENV])
    options = SweepOptions(
        trials=args.trials,
        max_concurrent=args.max_concurrent,
        scheduler=args.scheduler,
        search=args.search,
        metric=args.metric,
        mode=args.mode,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        register_all=args.register_all,
        seed=args.seed,
        worker_memory=args.worker_memory * 1024**3 if args.worker_memory else None,
        init_from=args.init_from,
    )
    return plan_sweep(args.name, args.config, space, args.overrides, options)


def cmd_sweep(args) -> int:
    from lmforge import sweeps

    if args.resume:
        result = sweeps.resume_sweep(args.resume, args.config, args.overrides)
    else:
        plan = sweep_plan(args)
        if getattr(args, "submit", False):
            return _submit_sweep(args, plan)
        result = sweeps.run_sweep(plan)
    if result.best:
        b = result.best
        where = f"models:/{b['config']['tracking']['registered_model'] or b['config']['tracking']['experiment']}@sweep-{result.name}"
        print(
            f"best: trial {b['trial_id']} {b['metric']} {b['value']:.4f} {b['values']}"
            + (f" -> {where} (version {b['version']})" if b.get("version") else "")
        )
    else:
        print("best: none (no trial reported a finite metric)")
    return 0


def _submit_sweep(args, plan) -> int:
    import os

    from lmforge.jobclient import JobClient
    from lmforge.jobspec import submitter_env
    from lmforge.sweeps.submit import sweep_job

    cfg = plan.base_config
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    spec = sweep_job(plan.name, cfg, plan.space, plan.options, uri, any_path=True,
                     env_vars=submitter_env(cfg))  # fmt: skip
    client = JobClient(args.address)
    sid = client.submit(spec)
    print(f"submitted sweep {plan.name} as job {sid} to {client.address}", flush=True)
    if args.no_wait:
        print(
            f"  follow: RAY_AUTH_MODE=token ray job logs --follow --address {client.address} {sid}"
        )
        return 0
    try:
        for text in client.follow(sid):
            sys.stdout.write(text)
            sys.stdout.flush()
        status = client.wait(sid, timeout_s=120, poll_s=1)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {sid} keeps running", file=sys.stderr)
        return 130
    if status != "SUCCEEDED":
        from lmforge.jobclient import failure_line

        print(f"lmforge sweep: job {sid} {status}: {failure_line(client.job(sid).message)}",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"job {sid} SUCCEEDED")
    return 0


def _checkpoint_of(args) -> Path:
    """The local checkpoint dir of --model (fetched from the registry) or --checkpoint."""
    from lmforge.checkpoint import resolve_checkpoint
    from lmforge.tracking.registry import fetch_checkpoint

    if args.model:
        return fetch_checkpoint(args.model, args.tracking_uri)
    return resolve_checkpoint(args.checkpoint)


def _prompt_template(choice: str, ckpt: Path, tok):
    """`generate --template`: the template a prompt is put in, or None for raw text."""
    from lmforge import templates
    from lmforge.tokenizer import eot_token

    if choice == "none":
        return None
    if choice == "own":
        return templates.trained_with(ckpt)
    return templates.get(choice, eos_token=eot_token(tok) or "")


def cmd_generate(args) -> None:
    import dataclasses

    import torch

    from lmforge import templates
    from lmforge.checkpoint import load_model
    from lmforge.generation import SamplingParams, complete_samples
    from lmforge.perf import inference_dtype
    from lmforge.tokenizer import eot_id

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        seed=args.seed,
        n=args.n,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        stop=tuple(args.stop),
        logprobs=args.logprobs,
    )  # checked before the model is read
    ckpt = _checkpoint_of(args)
    model, tok, _ = load_model(ckpt, dtype=inference_dtype(args.dtype, torch.device("cpu")))
    params = dataclasses.replace(params, stop_token=eot_id(tok))
    args.prompt = templates.as_prompt(_prompt_template(args.template, ckpt, tok), args.prompt)
    ids = tok.encode(args.prompt, add_special_tokens=False).ids

    def echo(piece) -> None:  # one sample streams as it comes
        sys.stdout.write(piece.text)
        sys.stdout.flush()

    if params.n == 1:
        sys.stdout.write(args.prompt)
    samples = complete_samples(model, tok, ids, params, on_piece=echo if params.n == 1 else None)
    for i, s in enumerate(samples):
        if params.n > 1:
            sys.stdout.write(f"{'-' * 20} sample {i + 1} of {params.n}\n{args.prompt}{s.text}")
        sys.stdout.write("\n")
        if params.logprobs is not None:
            for c in s.tokens:
                alts = "  ".join(f"{tok.decode([t])!r} {lp:.2f}" for t, lp in c.top)
                sys.stdout.write(f"  {tok.decode([c.token])!r:>16} {c.logprob:7.3f}   {alts}\n")


def cmd_evaluate(args) -> None:
    if args.tasks or args.probes:
        return cmd_evaluate_tasks(args)
    if not args.data:
        from lmforge.errors import UsageError

        raise UsageError("give --tasks (and/or --probes) or --data: what to evaluate on")
    if len(args.model or args.checkpoint) > 1:
        from lmforge.errors import UsageError

        raise UsageError("--data evaluates one model: give one --model or --checkpoint")
    args.model = args.model[0] if args.model else None
    args.checkpoint = args.checkpoint[0] if args.checkpoint else None
    from lmforge.evaluate import evaluate_checkpoint, log_sft_figures

    m = evaluate_checkpoint(_checkpoint_of(args), args.data, args.batch_size, args.max_batches)
    sft = "exact_match" in m  # an SFT dataset: completion-only loss, greedy exact match
    print(
        f"val_loss {m['val_loss']:.4f} | val_perplexity {m['val_perplexity']:.2f} | "
        + (
            f"exact_match {m['exact_match']:.3f} ({m['matched']}/{m['answered']}) | "
            f"{m['tokens']:,} completion tokens of {m['examples']} examples"
            if sft
            else f"{m['tokens']:,} tokens"
        )
        + f" in {m['seconds']:.1f} s"
    )
    if args.model:
        from lmforge.tracking.registry import log_evaluation

        run_id = log_evaluation(args.model, args.tracking_uri, args.data, m)
        if sft:
            log_sft_figures(args.model, args.tracking_uri, m)
        print(f"logged to MLflow run {run_id}")


def cmd_evaluate_tasks(args) -> None:
    """`evaluate --tasks/--probes`: the tasks and probes checked first, then each model in
    turn; one table of scores, each --model version logged."""
    from lmforge import evaluation
    from lmforge.checkpoint import resolve_checkpoint
    from lmforge.errors import UsageError
    from lmforge.evaluation.harness import EvalResult, table

    sources = evaluation.check_tasks(args.tasks) if args.tasks else []
    prompts = None
    if args.probes:
        from lmforge.evaluation.probes import read_probes

        prompts = read_probes(args.probes)
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1 (got {args.limit})")

    def run(ckpt: Path):
        from lmforge.evaluation.harness import run_tasks
        from lmforge.evaluation.lm import LmforgeLM

        lm = LmforgeLM.from_checkpoint(ckpt, args.template, args.batch_size)
        result = EvalResult([])
        if sources:
            result = run_tasks(lm, sources, args.limit, args.num_fewshot)
        answers = None
        if prompts:
            from lmforge.evaluation.probes import answer

            answers = answer(lm.model, lm.tok, lm.template, prompts, args.probe_samples)
        return result, answers

    columns, logged = {}, []
    for uri in args.model or []:
        from lmforge.evaluation import record
        from lmforge.tracking.registry import fetch_checkpoint, get_version

        version = get_version(uri, args.tracking_uri)  # a wrong URI: refused before any work
        result, answers = run(fetch_checkpoint(uri, args.tracking_uri))
        if answers is not None:
            record.log_probes(version, answers, args.tracking_uri)
        if sources:
            record.log_scores(version, result.scores, result.raw, args.tracking_uri)
        columns[uri] = result
        logged.append(f"models:/{version.name}/{version.version}")
    for path in args.checkpoint or []:
        result, answers = run(resolve_checkpoint(path))
        columns[path] = result
        if answers is not None:  # no version to keep them on: printed
            for prompt, kind, text in zip(
                answers["prompt"], answers["kind"], answers["answer"], strict=True
            ):
                print(f"[{path}] {kind}: {prompt!r} -> {text!r}")
    if sources:
        print(table(columns))
    if logged:
        print(f"logged to {', '.join(logged)}")


def cmd_export_hf(args) -> None:
    from lmforge.export_hf import export_hf

    out = export_hf(_checkpoint_of(args), args.output, overwrite=args.overwrite, merge=args.merge)
    kind = "a peft adapter" if (out / "adapter_config.json").is_file() else "a transformers"
    print(f"wrote {kind} folder: {out}")


def cmd_import_hf(args) -> None:
    from lmforge.import_hf import import_hf

    version = import_hf(args.input, args.model, args.tracking_uri, args.experiment)
    print(f"registered models:/{args.model}/{version.version}")


def cmd_tracking(args) -> None:
    from lmforge.tracking import server

    if args.action == "up":
        info = server.up(
            port=args.port, host=args.host, backend_store_uri=args.backend_store_uri,
            artifacts_destination=args.artifacts_destination, auth=args.auth,
        )  # fmt: skip
        print(server.describe(info))
    elif args.action == "down":
        print("stopped the MLflow server" if server.down() else "no MLflow server was running")
    else:
        print(server.status())


def cmd_cluster(args) -> None:
    from lmforge import cluster

    if args.action == "up":
        info = cluster.up(
            args.port, args.dashboard_port, args.num_cpus,
            nodes=args.nodes, node_cpus=args.node_cpus,
        )  # fmt: skip
        print(cluster.describe(info))
    elif args.action == "add-node":
        node = cluster.add_node(args.node_cpus)
        print(f"started a worker node on {node.ip} ({node.num_cpus:g} CPU); log: {node.log_file}")
    elif args.action == "down":
        print(
            "stopped the local Ray cluster"
            if cluster.down()
            else "no local Ray cluster was running"
        )
    else:
        print(cluster.status())


def cmd_serve(args) -> None:
    from lmforge import serving

    if args.action == "up":
        info = serving.up(
            args.model, replicas=args.replicas, port=args.port, host=args.host,
            max_batch=args.max_batch, cpus=args.cpus_per_replica, gpus=args.gpus_per_replica,
            address=args.address, tracking_uri=args.tracking_uri, dtype=args.dtype,
        )  # fmt: skip
        names = "\n".join(f"  {n}  ({u})" for n, u in info.models.items())
        print(
            f"OpenAI-compatible endpoint: {info.url}/v1\n{names}\n"
            f"  key: {serving.deploy.KEY_ENV} or {serving.deploy.key_file()}\n"
            f'  try: curl {info.url}/v1/models -H "Authorization: Bearer $(cat '
            f'{serving.deploy.key_file()})"'
        )
    elif args.action == "down":
        print("removed the served application" if serving.down(args.address)
              else "nothing was served")  # fmt: skip
    else:
        print(serving.status(args.address))


# Streamlit options the dashboard runs with, beside the address: the tests' AppTest sets them
# too. Magic off: with it a page is parsed into Python AST objects and compiled from them on
# its session's thread, and on CPython 3.11 the AST conversion keeps one recursion counter
# per interpreter, so two threads converting at once (another session's page, a traceback
# being formatted: 3.11's carets parse the line) can fail with "SystemError: AST
# constructor recursion depth mismatch" (CPython gh-106905; it failed a dashboard test
# once). No page uses magic (every element is an st call): off, a page compiles from source.
DASHBOARD_OPTIONS = {"runner.magicEnabled": False}


def dashboard_command(args) -> tuple[list[str], dict[str, str]]:
    """The `streamlit run` command line and environment of `lmforge dashboard`."""
    import os

    from lmforge.jobclient import jobs_address
    from lmforge.jobspec import repo_root
    from lmforge.tracking import store

    app = repo_root() / "dashboard" / "app.py"
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(app),
        "--server.address", args.host, "--server.port", str(args.port),
        "--server.headless", "true", "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal",
    ]  # fmt: skip
    for key, value in DASHBOARD_OPTIONS.items():
        cmd += [f"--{key}", str(value).lower()]
    env = {
        **os.environ,
        "RAY_JOBS_ADDRESS": jobs_address(args.ray_address),
        "MLFLOW_TRACKING_URI": store.resolve_uri(args.tracking_uri),
        "RAY_AUTH_MODE": "token",
    }
    return cmd, env


def cmd_dashboard(args) -> None:
    import os

    cmd, env = dashboard_command(args)
    print(
        f"lmforge dashboard on http://{args.host}:{args.port}\n"
        f"  Ray Jobs API: {env['RAY_JOBS_ADDRESS']}\n  MLflow: {env['MLFLOW_TRACKING_URI']}",
        flush=True,
    )
    os.execve(cmd[0], cmd, env)  # Streamlit takes over this process (Ctrl-C stops it)


COMMANDS = {
    "prepare": cmd_prepare,
    "train": cmd_train,
    "submit": cmd_submit,
    "sweep": cmd_sweep,
    "generate": cmd_generate,
    "evaluate": cmd_evaluate,
    "export-hf": cmd_export_hf,
    "import-hf": cmd_import_hf,
    "tracking": cmd_tracking,
    "cluster": cmd_cluster,
    "serve": cmd_serve,
    "dashboard": cmd_dashboard,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        code = COMMANDS[args.command](args)  # None: done
    except _user_errors() as err:
        if args.verbose:
            traceback.print_exc()
        print(f"lmforge {args.command}: error: {first_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        message = _training_failure(err)
        if message is None:
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"lmforge {args.command}: error: {message}", file=sys.stderr)
        return 1
    return code or 0


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
