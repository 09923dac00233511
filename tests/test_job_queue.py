"""A job queue instead of refusing a busy device: a job submitted with ``queue=True`` waits as ``queued`` and
starts when the job holding its device ends (its launcher runs ``jobs dispatch``); a queued job cancels without
ever starting; without ``queue`` a busy device is still refused, leaving nothing behind."""

from __future__ import annotations

import pytest

from studio import jobs
from studio.data import DataSpec
from studio.errors import StudioError
from studio.flows.retrain import RecoverySpec
from studio.models import ModelSpec
from studio.runs import read_json
from tests.conftest import wait_until

DEMO = ModelSpec("demo", device="cpu")


def _spec(epochs: int) -> RecoverySpec:
    return RecoverySpec(
        DEMO, DataSpec("demo", limit=160), DEMO, overrides={"epochs": epochs, "batch_size": 16}, bench=False
    )


def test_a_queued_job_starts_when_the_device_frees_and_a_cancelled_one_never_does(tmp_path):
    root = tmp_path / "runs"
    first = jobs.submit(_spec(3), root / "first", device="cpu", threads=1)
    assert first.state in ("starting", "running")

    with pytest.raises(StudioError, match=r"busy.*queue this one"):
        jobs.submit(_spec(1), root / "refused", device="cpu", threads=1)
    assert not (root / "refused").exists()  # a refused start leaves no folder

    second = jobs.submit(_spec(1), root / "second", device="cpu", threads=1, queue=True, owner="tab-a")
    third = jobs.submit(_spec(1), root / "third", device="cpu", threads=1, queue=True)
    assert second.state == "queued" and second.active and second.pid is None
    assert second.waiting_for == first.run and second.owner == jobs.owner_id("tab-a")
    assert jobs.dispatch(root) == []  # the device is still busy: both keep their place

    with pytest.raises(StudioError, match="another browser session"):
        jobs.cancel_job(second.run, owner="tab-b")
    cancelled = jobs.cancel_job(third.run)
    assert cancelled.state == "cancelled" and not (root / "third" / "job.json").exists()

    # nobody dispatches here: the first job's launcher starts the queue as its trainer exits
    done = wait_until(lambda: (s := jobs.job_status(second.run)).state == "done" and s, timeout=600)
    assert jobs.job_status(first.run).state == "done"
    assert (
        read_json(root / "second" / "job.json")["started"]
        >= read_json(root / "first" / "job.json")["ended"] - 5
    )
    assert done.owner == jobs.owner_id("tab-a") and not (root / "second" / jobs.QUEUE_FILE).exists()
    assert jobs.job_status(third.run).state == "cancelled" and not (root / "third" / "job.json").exists()
    assert (root / "second" / "results.json").exists()
