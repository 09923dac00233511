"""Fault injection (issue #13): a real retraining job on the demo is killed 20 times at seeded random points.

The faults: SIGKILL of the trainer's process group at a random moment (start-up, training, evaluation), SIGKILL
of the ``/bin/sh`` wrapper that waits for it (the trainer lives on), and SIGKILL while a checkpoint is being
written (its temporary file exists). After each one the test checks what a user relies on:

- the status is never left at ``running`` once the trainer is dead (it reads ``failed``, resumable or not);
- while a trainer lives, a resume is refused and there is exactly one trainer process for the run;
- every file a reader may open is whole: each checkpoint loads (``weights_only``), ``status.json``,
  ``job.json`` and ``results.json`` parse, and a resume sweeps the half-written temporary files;
- at the end, resumed to completion, the run equals an uninterrupted one (same figures, same weights).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from studio import jobs
from studio.data import DataSpec
from studio.errors import StudioError
from studio.flows import create_run, run_folder
from studio.flows.prune import PruneSpec
from studio.flows.retrain import RecoverySpec
from studio.models import ModelSpec
from studio.runs import JOB_FILE, RunDir, read_json

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.name != "posix" or not Path("/proc/self/stat").exists(), reason="needs /proc"),
]

KILLS = 20
SEED = 13
DATA = DataSpec("demo", limit=64)
DEMO = ModelSpec("demo", device="cpu")


def _wait(cond: Callable[[], object], timeout: float, poll: float = 0.02) -> object:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if value := cond():
            return value
        time.sleep(poll)
    return None


def _trainers(run: Path) -> list[int]:
    """Pids of live ``python -m studio run RUN`` processes of this run (the trainers; not the wrapper)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[1:4] == [b"-m", b"studio", b"run"] and str(run).encode() in argv and jobs._alive(int(p.name)):
            out.append(int(p.name))
    return out


def _check_files(run: Path) -> None:
    """Everything a reader opens is whole (written by rename only), whatever moment the kill hit."""
    for ckpt in RunDir(run).checkpoints():
        torch.load(ckpt, map_location="cpu", weights_only=True)
    for name in ("status.json", JOB_FILE, "results.json", "spec.json", "export/manifest.json"):
        if (run / name).exists():
            json.loads((run / name).read_text())
    if (run / "export" / "manifest.json").exists():  # an export is replaced whole, never half-written
        load_file(str(run / "export" / "model.safetensors"))


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _writing_checkpoint(run: Path) -> bool:
    return any(run.glob(".checkpoint.pt.*.tmp"))


def _until_training(run: Path, since: float, pid: int, start: int | None, epochs: int = 0) -> None:
    """Wait until this attempt's training loop runs (its ``training`` status event) and has finished ``epochs``
    epochs (their ``metric`` events), or its trainer is gone: kill points counted in epochs, not seconds, so the
    run's progress per attempt is bounded whatever the machine's speed."""

    def reached() -> bool:
        events = [e for e in jobs.recent_events(run) if e.get("time", 0) >= since]
        training = any(e["kind"] == "status" and e["data"].get("state") == "training" for e in events)
        done = sum(e["kind"] == "metric" and "train_loss" in e["data"] for e in events)
        return (training and done >= epochs) or not jobs._alive(pid, start)

    _wait(reached, 120, poll=0.05)


def _figures(res: dict) -> dict:
    return {
        "plan": res["plan"],
        "after": {k: res["after"].get(k) for k in ("params", "macs", "top1", "loss")},
    }


def test_twenty_random_kills_lose_nothing_and_resume_equals_an_uninterrupted_run(tmp_path):
    src = tmp_path / "src"
    run_folder(create_run(PruneSpec(DEMO, "magnitude", {"target_macs": 0.5}, DATA, bench=False), src))
    spec = RecoverySpec(
        ModelSpec(str(src / "export"), device="cpu"),
        DATA,
        None,
        # 24 epochs: on a fast machine each attempt trains up to two before its kill, and 20 kills must land
        overrides={"epochs": 24, "batch_size": 16, "kd": "none", "early_stop": 0},
        bench=False,
    )
    full = create_run(spec, tmp_path / "full")
    torch.set_num_threads(1)  # as the job's OMP_NUM_THREADS=1: the same arithmetic
    run_folder(full)

    rng = random.Random(SEED)
    run = tmp_path / "runs" / "killed"
    kills: list[str] = []
    mid_write = 0
    try:
        jobs.submit(spec, run, device="cpu", threads=1)
        while len(kills) < KILLS:
            t_attempt = time.time()
            job = read_json(run / JOB_FILE)
            pid, wrapper, start = int(job["pid"]), int(job["wrapper_pid"]), job.get("pid_start")
            fault = rng.choice(["trainer", "wrapper", "checkpoint"])
            if fault == "wrapper":
                _until_training(run, t_attempt, pid, start)
                time.sleep(rng.uniform(0.0, 0.5))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(wrapper, signal.SIGKILL)
                kills.append("wrapper")
                if jobs._alive(pid, start):  # the trainer lives on: still one trainer, and no resume
                    assert jobs.job_status(run).active
                    assert _trainers(run) == [pid]
                    with pytest.raises(StudioError, match=r"still running|busy"):
                        jobs.resume_job(run, threads=1)
                    assert _trainers(run) == [pid]
                fault = rng.choice(["trainer", "checkpoint"])  # then the trainer itself, as below
            if fault == "checkpoint":
                # SIGKILL while the n-th checkpoint of this attempt is being written (the 2nd: progress is kept)
                nth, seen = rng.choice([1, 2]), set()

                def writing(p: int = pid, t: int | None = start, n: int = nth, names: set = seen) -> bool:
                    now = {q.name for q in run.glob(".checkpoint.pt.*.tmp")}
                    names |= now
                    return (len(names) >= n and bool(now)) or not jobs._alive(p, t)

                _wait(writing, 120, poll=0.0005)
                mid_write += _writing_checkpoint(run)
            elif rng.random() < 0.25:
                time.sleep(rng.uniform(0.0, 3.0))  # during start-up: imports, loading, data
            else:  # training (mid-epoch or just after one), evaluating, exporting
                _until_training(run, t_attempt, pid, start, epochs=rng.choice([0, 0, 1]))
                time.sleep(rng.uniform(0.0, 0.5))
            _kill(pid)
            kills.append(fault)
            # the trainer is dead: the status must say so at once (never "running" forever)
            assert _wait(lambda p=pid, t=start: not jobs._alive(p, t), 10)
            st = _wait(lambda: (s := jobs.job_status(run)) and not s.active and s, 10)
            assert st, f"status stuck at {jobs.job_status(run).state} after kill {len(kills)} ({fault})"
            assert st.state in ("failed", "done"), st
            assert _trainers(run) == []
            _check_files(run)
            if st.state == "done":
                break  # it finished before this kill landed: nothing left to interrupt
            jobs.resume_job(run, threads=1)
            assert not list(run.glob(".*.tmp")), "a resume must sweep the half-written files of a kill"
        while (st := jobs.job_status(run)).state != "done":  # let the last attempt finish
            assert st.active, st  # no more faults: it must not fail on what the kills left
            assert len(_trainers(run)) <= 1
            time.sleep(0.2)
    finally:
        with contextlib.suppress(StudioError, OSError, KeyError):
            _kill(int(read_json(run / JOB_FILE)["pid"]))
    print(f"kills: {kills}; {mid_write} during a checkpoint write")
    assert len(kills) >= KILLS, f"the run ended after {len(kills)} kills: {kills}"
    assert mid_write >= 1, f"no kill landed during a checkpoint write ({kills})"
    assert {"trainer", "wrapper", "checkpoint"} <= set(kills), kills
    _check_files(run)
    done = RunDir(run)
    assert _figures(done.results()) == _figures(full.results())
    a = load_file(str(full.export_dir / "model.safetensors"))
    b = load_file(str(done.export_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
