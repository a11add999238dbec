"""Serving: total generated tokens/s of `lmforge serve`'s endpoint with 8 concurrent
clients against 1 client, measured alternately in one run (the batching figure).

    .venv/bin/python bench/bench_serve.py           # gpt2: 6 layers, d 384, vocab 8192
    .venv/bin/python bench/bench_serve.py --tiny    # 2 layers, d 64, vocab 512: runs?

A random transformers GPT-2 (context 256) is imported as a version into a throwaway
LMFORGE_HOME (SQLite MLflow), served by `lmforge.serving.up` on a private local Ray (one
replica, 1 CPU, --max-batch 8), and asked over HTTP (POST /v1/completions, the API key
in the header): each client sends `REQUESTS` requests one after another, each a distinct
short prompt, greedy, `max_tokens` new tokens. 1 client: the requests run alone; 8
clients: up to 8 requests share the running batch (continuous batching). The figure is
the sum of `usage.completion_tokens` over the wall time of all clients. Target >= 4x, for
the default `--dtype auto` (bf16 on a CPU with avx512_bf16/AMX); fp32 is measured beside it
(redeployed: a roll) when auto is not fp32.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, Figure, alternate, bench_args, machine_info, report  # noqa: E402

SHAPES = {  # full, --tiny
    False: {
        "n_layer": 6,
        "n_embd": 384,
        "n_head": 6,
        "vocab": 8192,
        "max_tokens": 64,
        "requests": 4,
    },
    True: {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab": 512, "max_tokens": 32, "requests": 2},
}
CLIENTS = 8


def version(home: Path, shape: dict) -> str:
    """A random GPT-2 with a tokenizer trained on the bundled plays, imported: its URI."""
    import torch
    import transformers

    from lmforge.import_hf import import_hf
    from lmforge.tokenizer import EOT, train_tokenizer

    plays = sorted((REPO / "data" / "shakespeare").glob("*.txt"))[:3]
    tok = train_tokenizer((p.read_text() for p in plays), shape["vocab"])
    eos = tok.token_to_id(EOT)
    cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=256, n_embd=shape["n_embd"],
                                  n_layer=shape["n_layer"], n_head=shape["n_head"], bos_token_id=eos,
                                  eos_token_id=eos)  # fmt: skip
    torch.manual_seed(0)
    folder = home / "hf"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return f"models:/bench/{import_hf(folder, 'bench').version}"


def ask(url: str, key: str, prompt: str, max_tokens: int) -> int:
    body = {"model": "bench@latest", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())["usage"]["completion_tokens"]


def clients(url: str, key: str, n: int, requests: int, max_tokens: int) -> float:
    """Generated tokens/s of `n` clients each sending `requests` requests in turn."""
    words = [
        "To",
        "be",
        "or",
        "not",
        "to",
        "be",
        "that",
        "is",
        "the",
        "question",
        "whether",
        "tis",
        "nobler",
        "in",
        "the",
        "mind",
    ]

    def one(c: int) -> int:
        return sum(
            ask(url, key, " ".join(words[(c + i) % 8 : (c + i) % 8 + 4]), max_tokens)
            for i in range(requests)
        )

    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        tokens = sum(pool.map(one, range(n)))
    return tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    args = bench_args("serving: 8 concurrent clients vs 1").parse_args(argv)
    repeats = 1 if args.tiny else args.repeats
    shape = SHAPES[args.tiny]
    home = Path(tempfile.mkdtemp(prefix="lmforge-bench-serve-"))
    os.environ["LMFORGE_HOME"] = str(home)
    for k in [k for k in os.environ if k.startswith(("MLFLOW_", "RAY_ADDRESS"))]:
        del os.environ[k]
    try:
        import torch

        from lmforge import serving
        from lmforge.perf import dtype_name, inference_dtype

        port = _free_port()

        uri = version(home, shape)
        key = serving.api_key(create=True)
        mt, rq = shape["max_tokens"], shape["requests"]
        auto = dtype_name(inference_dtype("auto", torch.device("cpu")))
        figures = []
        for dtype in dict.fromkeys([auto, "fp32"]):  # the default's first; fp32 beside it
            info = serving.up([uri.rsplit("/", 1)[0] + "@latest"], port=port, max_batch=CLIENTS,
                              cpus=1, dtype=dtype)  # fmt: skip
            port, url = info.port, info.url
            clients(url, key, 2, 1, 4)  # warm-up: the first requests load lazily
            runs = alternate({"eight": lambda u=url: clients(u, key, CLIENTS, rq, mt),
                              "one": lambda u=url: clients(u, key, 1, rq * 2, mt)}, repeats)  # fmt: skip
            default = dtype == auto
            label = f"{CLIENTS} concurrent clients, total ({dtype}" + (
                ", the default: --dtype auto)" if default else ")"
            )
            figures.append(Figure.ratio_of(label, "generated tokens/s", runs["eight"], runs["one"],
                                           baseline="1 client", target=4.0 if default else None))  # fmt: skip
        report(
            "serve",
            figures,
            config={"model": {k: v for k, v in shape.items() if k not in ("max_tokens", "requests")},
                    "max_tokens": mt, "requests_per_client": {"8 clients": rq, "1 client": 2 * rq},
                    "max_batch": CLIENTS, "replica_cpus": 1, "dtype auto is": auto,
                    "repeats": repeats, "machine": machine_info()},
        )  # fmt: skip
        serving.down()
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(home, ignore_errors=True)


def _free_port() -> int:
    from lmforge.services import free_port

    return free_port()


if __name__ == "__main__":
    main()
