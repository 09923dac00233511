"""Background jobs: cancel mid-epoch + resume equals an uninterrupted run; killed jobs fail; one job per device."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from studio import jobs
from studio.errors import StudioError
from studio.events import Event
from studio.flows.retrain import RecoverySpec, run_recovery
from studio.runs import RunDir, RunLogger, read_json, write_json, write_text

# 160 train images / 16 = 10 steps per epoch: a cancel after the first logged steps lands mid-epoch 0
ARGS = ["retrain", "--model", "demo", "--teacher", "demo", "--kd", "soft", "--data", "demo", "--limit", "160"]
ARGS += ["--epochs", "2", "--batch-size", "16", "--no-bench", "--seed", "3"]


def _wait(cond, timeout: float = 240.0, every: float = 0.05):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def _train_steps(run: Path) -> list[int]:
    return [e["data"]["done"] for e in RunDir(run).events("progress") if e["data"].get("task") == "train"]


@pytest.mark.slow
def test_cancel_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    root = tmp_path / "runs"
    run = root / "job"
    st = jobs.start_job([*ARGS, "--out", str(run)], run, device="cpu", threads=1)
    assert (
        st.state in ("running", "starting")
        and st.pid
        and (run / "job.pid").read_text().strip() == str(st.pid)
    )
    _wait(lambda: _train_steps(run))
    jobs.cancel_job(run)
    st = _wait(lambda: (s := jobs.job_status(run)).state not in jobs.ACTIVE_STATES and s)
    assert st.state == "cancelled" and st.resumable, (st, jobs.read_log(run))
    ckpt = torch.load(RunDir(run).checkpoint_file, weights_only=True)
    assert ckpt["epoch"] == 0 and 0 < ckpt["skip"] < 10  # stopped inside the first epoch
    assert not (run / "results.json").exists()

    st = jobs.resume_job(run)
    assert st.attempt == 2 and st.command[-1] == "--resume"
    st = _wait(lambda: (s := jobs.job_status(run)).state not in jobs.ACTIVE_STATES and s)
    assert st.state == "done", (st, jobs.read_log(run))
    resumed = read_json(run / "results.json")

    # the same spec, uninterrupted, in this process (same thread count, CPU)
    spec = RecoverySpec.from_dict(read_json(run / "spec.json"))
    ref_run = RunDir.create(root / "ref", spec.to_dict())
    ref = run_recovery(spec, run=ref_run).to_dict()
    assert resumed["after"]["top1"] == ref["after"]["top1"]
    assert resumed["after"]["loss"] == ref["after"]["loss"]
    assert resumed["retrain"]["train"]["best_val_top1"] == ref["retrain"]["train"]["best_val_top1"]

    def strip(hist):
        return [{k: v for k, v in r.items() if k != "time"} for r in hist]

    assert strip(resumed["retrain"]["train"]["history"]) == strip(ref["retrain"]["train"]["history"])
    assert len(RunDir(run).events("metric")) >= 2  # both epochs' records reached the events


@pytest.mark.slow
def test_killed_job_is_failed_with_its_error_and_frees_its_device(tmp_path):
    root = tmp_path / "runs"
    run = root / "long"
    st = jobs.start_job([*ARGS, "--epochs", "50", "--out", str(run)], run, device="cpu", threads=1)
    with pytest.raises(StudioError, match="busy"):
        jobs.start_job([*ARGS, "--out", str(root / "second")], root / "second", device="cpu")
    assert not (root / "second" / "job.json").exists()
    _wait(lambda: _train_steps(run))
    assert jobs.job_status(run).state == "running"
    assert jobs.job_status(run).rss_mb > 50

    # SIGTERM (cancel --force) is turned into the same clean stop as the CANCEL file
    jobs.cancel_job(run, force=True)
    st = _wait(lambda: (s := jobs.job_status(run)).state not in jobs.ACTIVE_STATES and s, timeout=120)
    assert st.state == "cancelled" and st.resumable, (st, jobs.read_log(run))
    seen = len(_train_steps(run))
    st = jobs.resume_job(run)
    _wait(lambda: len(_train_steps(run)) > seen)
    os.killpg(st.pid, signal.SIGKILL)
    st = _wait(lambda: (s := jobs.job_status(run)).state != "running" and s, timeout=30)
    assert st.state == "failed" and "kill" in st.error.lower(), st
    assert read_json(run / "status.json")["state"] == "running"  # the job never got to report its end
    assert [s.name for s in jobs.list_jobs(root)] == ["long"]

    # the device is free again: a job with bad input starts, fails, and says why
    bad = root / "bad"
    jobs.start_job(["retrain", "--model", str(tmp_path / "nowhere"), "--kd", "none", "--out", str(bad)], bad)
    st = _wait(lambda: (s := jobs.job_status(bad)).state not in jobs.ACTIVE_STATES and s, timeout=120)
    assert st.state == "failed" and "not found" in st.error, st
    with pytest.raises(StudioError, match="not running"):
        jobs.cancel_job(bad)


def test_status_of_runs_that_never_were_jobs(tmp_path):
    root = tmp_path / "runs"
    done = RunDir.create(
        root / "prune-a", {"kind": "prune", "method": "magnitude", "params": {"target_macs": 0.5}}
    )
    done.write_results(
        {
            "method": "magnitude",
            "after": {
                "top1": 0.9,
                "params": 10,
                "macs": 20,
                "throughput": {"1": {"images_per_s": 5.0}, "64": {"images_per_s": 50.0}},
            },
        }
    )
    prepared = RunDir.create(root / "prepared", {"kind": "retrain"})
    gone = RunDir.create(root / "gone", {"kind": "retrain"})
    gone.set_status("running", pid=2**22 + 12345)  # a pid that does not exist
    write_text(
        gone.path / "stderr.log",
        "Traceback (most recent call last):\n  File x\nRuntimeError: out of memory\n",
    )
    assert jobs.job_status(done.path).state == "done"
    assert jobs.job_status(prepared.path).state == "created"
    st = jobs.job_status(gone.path)
    assert st.state == "failed" and "RuntimeError: out of memory" in st.error
    row = jobs.run_summary(done.path)
    assert (row["method"], row["budget"], row["top1"], row["throughput"], row["throughput_bs"]) == (
        "magnitude",
        "MACs ≤ 50%",
        0.9,
        50.0,
        64,
    )
    assert {r["run"] for r in jobs.run_table(root)} == {"prune-a", "prepared", "gone"}
    with pytest.raises(StudioError, match="not running"):
        jobs.cancel_job(done.path)


def test_progress_eta_and_thinned_event_log(tmp_path):
    run = RunDir.create(tmp_path / "r", {"kind": "retrain"})
    log = RunLogger(run, progress_every=10.0, resource_every=1e9)
    t0 = time.time()
    log(Event("status", {"state": "training"}, t0))
    for i in range(1, 51):
        log(Event("progress", {"task": "train", "done": i, "total": 100, "loss": 1.0 / i}, t0 + i))
    steps = jobs.curves(run.path)["steps"]
    assert [s["step"] for s in steps] == [1, 11, 21, 31, 41]  # one line per 10 s of progress
    assert any(e["kind"] == "resource" and e["data"]["rss_mb"] > 0 for e in run.events())
    other = RunDir.create(tmp_path / "r2", {"kind": "retrain"})
    thin = RunLogger(other, progress_every=0.0, max_points=10)
    for i in range(1, 101):
        thin(Event("progress", {"task": "train", "done": i, "total": 100, "loss": 0.5}, t0 + i / 1000))
    assert [s["step"] for s in jobs.curves(other.path)["steps"]] == [
        1,
        *range(11, 101, 10),
        100,
    ]  # and the last one
    write_json(run.path / "job.json", {"pid": os.getpid(), "command": ["retrain"], "device": "cpu"})
    st = jobs.job_status(run.path)  # "alive": this test's own pid
    assert st.state == "running" and st.progress["done"] == 41
    assert st.eta_s == pytest.approx((100 - 41) * 1.0)  # 1 step per second
