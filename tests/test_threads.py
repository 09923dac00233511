"""The thread policy: the server and its jobs share the cores, never oversubscribe them; one user setting."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from studio import threads
from studio.errors import StudioError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("cores", "running", "job", "server"),
    [
        (2, [], 1, 2),  # the machine: the server keeps a core, the job gets the other; idle: both
        (2, [1], 1, 1),  # a second job: 1 thread each, and the server one
        (16, [], 15, 16),
        (16, [15], 1, 1),  # the first job took the share: the next one does not pile on
        (16, [7], 8, 9),
        (1, [], 1, 1),
    ],
)
def test_jobs_and_the_server_share_the_cores(cores, running, job, server):
    assert threads.job_threads(running, cores=cores) == job
    assert threads.server_threads(running, cores=cores) == server
    if job > 1 and not running:  # the new job and the server (once it runs) fit the cores exactly
        assert job + threads.server_threads([job], cores=cores) == cores


def test_torchrun_processes_split_the_share_and_a_setting_wins():
    assert threads.job_threads(cores=16, nproc=3) == 5
    assert threads.job_threads(cores=16, server=False) == 16
    assert threads.job_threads([15], cores=16, asked=4) == 4
    assert threads.job_threads(cores=16, asked=0) == 15  # 0: automatic


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_a_bad_setting_is_one_sentence(bad):
    with pytest.raises(StudioError, match="whole number of at least 1"):
        threads.check_threads(bad)


def test_the_budget_honours_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.budget() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.budget() >= 1


def test_the_sidebar_shows_the_setting_and_a_new_job_uses_it(monkeypatch, tmp_path):
    monkeypatch.setenv("STUDIO_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the tests' budget: one core
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180).run()
    assert not at.exception, at.exception
    box = at.sidebar.number_input(key="studio_job_threads")
    assert box.value == 0 and box.max == 1
    assert any("a new job gets 1" in c.value for c in at.sidebar.caption)
