"""Run folders: atomic writes, tolerant event reading, status tracking."""

from __future__ import annotations

import os

import pytest

from studio.errors import Cancelled, StudioError
from studio.events import Event
from studio.runs import RunDir, atomic_path, write_json


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "r.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text().strip().startswith("{") and sorted(os.listdir(tmp_path)) == ["r.json"]


def test_events_skip_a_partial_last_line(tmp_path):
    run = RunDir.create(tmp_path / "x", {"k": 1})
    run.log_event(Event("metric", {"epoch": 0}))
    with open(run.events_file, "a") as f:
        f.write('{"kind": "metr')  # a line being written
    assert [e["data"]["epoch"] for e in run.events("metric")] == [0]


@pytest.mark.parametrize(
    ("exc", "state"), [(None, "done"), (Cancelled(), "cancelled"), (ValueError("x"), "failed")]
)
def test_tracking_sets_the_final_state(tmp_path, exc, state):
    run = RunDir.create(tmp_path / "x", {})
    with pytest.raises(type(exc)) if exc else _nothing(), run.tracking():
        assert run.status()["state"] == "running" and run.status()["pid"] == os.getpid()
        if exc:
            raise exc
    assert run.status()["state"] == state


def test_bad_run_names_and_existing_runs(tmp_path):
    with pytest.raises(StudioError, match="not allowed"):
        RunDir(tmp_path / "../x y")
    RunDir.create(tmp_path / "a", {})
    with pytest.raises(StudioError, match="already exists"):
        RunDir.create(tmp_path / "a", {})


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
