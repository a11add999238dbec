"""Job start: seconds from submitting a training job (the Jobs API that `ray job submit`
uses) to its first finished training step, on a warm local cluster, with the breakdown.

    .venv/bin/python bench/bench_jobstart.py           # 3 submissions of the tiny config
    .venv/bin/python bench/bench_jobstart.py --tiny    # one

Uses the cluster of `lmforge cluster up` (started here if none runs, and then stopped at
the end), warmed by one job that is not counted. The breakdown comes from the job itself: Ray's job start time,
and the `startup |` line rank 0 prints (worker start, engine ready, first step), all on this
machine's clock. Target (issue 31; issue 16 had < 15 s): < 10 s from submit to the first step.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, Figure, bench_args, machine_info, report, spread  # noqa: E402

STARTUP = re.compile(
    r"startup \| workers up (?P<up>[\d.]+) s after the launcher \| worker began at "
    r"unix (?P<began>[\d.]+) \| engine ready \+(?P<ready>[\d.]+) s"
    r".*first step done \+(?P<first>[\d.]+) s"
)


def _dataset(given: str | None) -> Path:
    if given:
        return Path(given)
    from lmforge import paths
    from lmforge.data.prepare import PrepareOptions, prepare

    out = paths.home() / "bench" / "jobstart-plays"
    if not (out / "manifest.json").is_file():
        plays = sorted((REPO / "data" / "shakespeare").glob("*.txt"))[:3]
        prepare(plays, out, PrepareOptions(vocab_size=512, seq_tokens=128, rows_per_group=4))
    return out


def submit_once(client, dataset: Path, name: str) -> dict[str, float]:
    import yaml
    from ray.job_submission import JobStatus

    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["working_dir"] = str(REPO)
    runtime_env["py_modules"] = [str(REPO / m) for m in runtime_env["py_modules"]]
    entrypoint = (
        "python jobs/train.py --config jobs/configs/tiny.yaml "
        f"--set data.path={dataset} --set run.name={name} --set train.max_steps=2 "
        "--set train.warmup_steps=0 --set train.eval_every=2 --set train.checkpoint_every=2 "
        "--set tracking.enabled=false"
    )
    t_submit = time.time()
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(0.5)
    logs = client.get_job_logs(job_id)
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"job {job_id} {status}: {logs[-2000:]}")
    m = STARTUP.search(logs)
    if m is None:
        raise RuntimeError(f"job {job_id}: no startup line in its log")
    began = float(m["began"])
    job_started = client.get_job_info(job_id).start_time / 1000
    return {
        "total": began + float(m["first"]) - t_submit,
        "job driver starts": job_started - t_submit,
        "driver: imports, checks, connect": began - float(m["up"]) - job_started,
        "Ray Train controller + workers up": float(m["up"]),
        "engine ready (data, model, DeepSpeed)": float(m["ready"]),
        "first batch + step": float(m["first"]) - float(m["ready"]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = bench_args(__doc__.splitlines()[0])
    parser.add_argument("--data", help="a prepared dataset dir to train on (default: 3 plays)")
    args = parser.parse_args(argv)
    repeats = 1 if args.tiny else args.repeats
    from lmforge import cluster

    info = cluster.running()
    ours = info is None  # started here: stopped again at the end, whatever happens
    info = info or cluster.up()
    try:
        measure(args, info, repeats)
    finally:
        if ours:
            cluster.down()


def measure(args, info, repeats: int) -> None:
    from ray.job_submission import JobSubmissionClient

    from lmforge import cluster

    cluster.connect()  # sets RAY_AUTH_MODE=token, so the client sends the token
    dataset = _dataset(args.data)
    client = JobSubmissionClient(info.dashboard_url)
    stamp = time.strftime("%H%M%S")
    if not args.tiny:
        print("warming the cluster with one job (not counted) ...", flush=True)
        submit_once(client, dataset, f"jobstart-warm-{stamp}")
    runs = []
    for i in range(repeats):
        r = submit_once(client, dataset, f"jobstart-{stamp}-{i}")
        print(" | ".join(f"{k} {v:.2f} s" for k, v in r.items()), flush=True)
        runs.append(r)
    figures = [
        Figure(
            name="submit to first step", unit="s", value=spread([r["total"] for r in runs]),
            target="< 10 s", met=spread([r["total"] for r in runs])["median"] < 10,
        )
    ] + [
        Figure(name=f"  {k}", unit="s", value=spread([r[k] for r in runs]))
        for k in runs[0] if k != "total"
    ]  # fmt: skip
    report("jobstart", figures, config={"config": "jobs/configs/tiny.yaml", "workers": 2,
                                        "machine": machine_info()})  # fmt: skip


if __name__ == "__main__":
    main()
