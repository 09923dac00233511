"""The studio's thread policy under load: the demo's batch-1 forward time with the server idle and with one
training job running beside it (issue 16: at most 2x slower).

The server process times the forward pass with the threads :func:`studio.threads.server_threads` gives it;
the job is a real background retraining of the demo (``jobs.submit``), started with the threads
:func:`studio.threads.job_threads` gives a job beside the server. Each figure is the median of several
rounds of 50 timed passes after 10 warm-up passes; the job is cancelled at the end and its folder removed.
For comparison, the same is measured with the job using every core (what happens without the policy)::

    .venv/bin/python bench/contention.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studio import jobs, threads
from studio.bench import measure_throughput
from studio.data import DataSpec
from studio.flows.retrain import RecoverySpec
from studio.load import load_model
from studio.models import ModelSpec


def forward_ms(model: torch.nn.Module, input_size: list[int], rounds: int) -> float:
    """Median batch-1 latency (ms) over ``rounds`` rounds of 50 passes."""
    return statistics.median(
        measure_throughput(model, input_size, batch_size=1, warmup=10, repeats=50).latency_ms
        for _ in range(rounds)
    )


def with_job(job_threads: int, work: Path, name: str, model, size, rounds: int) -> float:
    """Batch-1 latency while a demo retraining job with ``job_threads`` threads trains beside it."""
    spec = RecoverySpec(
        model=ModelSpec("demo", device="cpu"),
        data=DataSpec("demo"),
        overrides={"epochs": 200, "kd": "none"},
        bench=False,
        export=False,
    )
    run = work / name
    jobs.submit(spec, run, device="cpu", threads=job_threads)
    try:
        for _ in range(120):  # wait until it trains (the first epoch's progress event)
            st = jobs.job_status(run)
            if st.state == "running" and st.progress:
                break
            if st.state in ("failed", "done", "cancelled"):
                raise SystemExit(f"the background job ended early: {st.state} {jobs.last_error(run)}")
            time.sleep(0.5)
        return forward_ms(model, size, rounds)
    finally:
        jobs.cancel_job(run, force=True)
        for _ in range(60):
            if jobs.job_status(run).state not in ("running", "cancelling", "starting"):
                break
            time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    cores = threads.budget()
    job_n = threads.job_threads([], server=True, cores=cores)
    server_n = threads.server_threads([job_n], cores=cores)
    loaded = load_model(ModelSpec("demo", device="cpu"))
    size = loaded.data_config["input_size"]
    work = Path(tempfile.mkdtemp(prefix="contention-"))
    os.environ["STUDIO_LOCK_DIR"] = str(
        work / ".locks"
    )  # a private device lock: never blocks the user's jobs
    try:
        torch.set_num_threads(threads.server_threads([], cores=cores))
        idle = forward_ms(loaded.model, size, args.rounds)
        torch.set_num_threads(server_n)
        policy = with_job(job_n, work, "policy", loaded.model, size, args.rounds)
        torch.set_num_threads(cores)
        naive = with_job(cores, work, "naive", loaded.model, size, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{cores} cores; policy: server {server_n} thread(s), job {job_n} thread(s)\n")
    print("| condition | server threads | job threads | batch-1 forward ms | slowdown |")
    print("|---|---|---|---|---|")
    print(f"| server idle | {threads.server_threads([], cores=cores)} | – | {idle:.2f} | 1.00x |")
    print(f"| one job, studio policy | {server_n} | {job_n} | {policy:.2f} | {policy / idle:.2f}x |")
    print(f"| one job, every core each (no policy) | {cores} | {cores} | {naive:.2f} | {naive / idle:.2f}x |")


if __name__ == "__main__":
    main()
