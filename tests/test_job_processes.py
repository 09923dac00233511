"""Jobs are tracked by the trainer's own pid and process group, and device locks are machine-wide (issue #13).

The launcher's mechanics are tested on a stand-in trainer (a Python process that starts a child of its own and
sleeps), so no model is trained: ``jobs._command`` is replaced, everything else -- the ``/bin/sh`` wrapper, the
trainer's own session, ``job.json``, status, cancel, resume and the locks -- is the real code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from studio import jobs
from studio.errors import StudioError
from studio.runs import read_json

pytestmark = pytest.mark.skipif(os.name != "posix", reason="process groups and /proc are POSIX")

# the stand-in trainer: a child of its own (as torchrun's workers), its pid in a file, then sleep
TRAINER = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    "open(sys.argv[1] + '.tmp', 'w').write(str(child.pid))\n"
    "import os; os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
    "time.sleep(120)\n"
)


def _wait(cond: Callable[[], object], timeout: float = 30.0) -> object:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if value := cond():
            return value
        time.sleep(0.02)
    raise AssertionError("timed out")


def _alive(pid: int) -> bool:
    return jobs._alive(pid)


@pytest.fixture
def stand_in(monkeypatch, tmp_path) -> Iterator[list[int]]:
    """Replace the studio command by the stand-in trainer; kill, by pid, whatever a test left running."""
    started: list[int] = []

    def command(argv, device, nproc):
        return [sys.executable, "-c", TRAINER, str(tmp_path / f"grandchild-{len(started)}")]

    monkeypatch.setattr(jobs, "_command", command)
    yield started
    for pid in started:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _start(run: Path, started: list[int], tmp_path: Path) -> tuple[jobs.JobStatus, int]:
    n = len(started)
    st = jobs.start_job(["run", str(run)], run, device="cpu")
    job = read_json(run / "job.json")
    started += [st.pid, job["wrapper_pid"]]
    grandchild = int(
        _wait(lambda: (tmp_path / f"grandchild-{n}").exists() and (tmp_path / f"grandchild-{n}").read_text())
    )
    started.append(grandchild)
    return st, grandchild


def test_job_json_and_status_name_the_trainer_which_leads_its_own_group(tmp_path, stand_in):
    run = tmp_path / "runs" / "a"
    st, grandchild = _start(run, stand_in, tmp_path)
    job = read_json(run / "job.json")
    assert st.pid == job["pid"] == int((run / "job.pid").read_text()) != job["wrapper_pid"]
    assert st.state == "running"
    assert os.getpgid(st.pid) == st.pid == os.getsid(st.pid) == job["pgid"]  # its own group and session
    assert os.getpgid(job["wrapper_pid"]) != st.pid  # the wrapper is outside it: a group signal spares it
    assert os.getpgid(grandchild) == st.pid
    cmdline = Path(f"/proc/{st.pid}/cmdline").read_bytes().split(b"\0")
    assert b"-c" in cmdline and TRAINER.encode() in cmdline  # the trainer itself, not /bin/sh


def test_killing_the_wrapper_neither_orphans_the_run_nor_allows_a_second_trainer(tmp_path, stand_in):
    run = tmp_path / "runs" / "a"
    st, _ = _start(run, stand_in, tmp_path)
    os.kill(read_json(run / "job.json")["wrapper_pid"], signal.SIGKILL)
    time.sleep(0.2)
    st = jobs.job_status(run)
    assert st.state == "running" and st.pid == read_json(run / "job.json")["pid"]
    with pytest.raises(StudioError, match="still running"):
        jobs.resume_job(run)
    with pytest.raises(StudioError, match="already running"):
        jobs.start_job(["run", str(run)], run, device="cpu")
    os.kill(st.pid, signal.SIGKILL)
    st = _wait(lambda: (s := jobs.job_status(run)).state != "running" and s)
    assert st.state == "failed" and not st.active


def test_a_forced_cancel_signals_the_trainers_whole_group(tmp_path, stand_in):
    run = tmp_path / "runs" / "a"
    st, grandchild = _start(run, stand_in, tmp_path)
    jobs.cancel_job(run, force=True)
    _wait(lambda: not _alive(st.pid) and not _alive(grandchild))  # the trainer and its worker
    st = _wait(lambda: (s := jobs.job_status(run)).state not in jobs.ACTIVE_STATES and s)

    # the wrapper outlived the signal and records how the trainer ended (the status may see the trainer gone
    # a moment before the wrapper has written its exit code: a later status poll records it in job.json)
    def recorded() -> dict | None:
        jobs.job_status(run)
        j = read_json(run / "job.json")
        return j if j.get("exit_code") is not None else None

    job = _wait(recorded)
    assert job["exit_code"] == 128 + signal.SIGTERM
    st = jobs.job_status(run)
    assert "SIGTERM" in (st.error or ""), st


def test_the_device_lock_is_machine_wide_keyed_by_device(tmp_path, stand_in, monkeypatch):
    a, b = tmp_path / "one" / "runs" / "a", tmp_path / "two" / "elsewhere" / "b"
    st, _ = _start(a, stand_in, tmp_path)
    with pytest.raises(StudioError, match=r"Device cpu is busy: job a \(pid \d+\)"):
        jobs.start_job(["run", str(b)], b, device="cpu")  # another parent folder: the same device
    holder = jobs.device_holder("cpu")
    assert holder is not None and holder["pid"] == st.pid and holder["run"] == str(a.resolve())
    assert jobs.lock_dir(a.parent) == jobs.lock_dir(b.parent) == Path(os.environ[jobs.LOCK_DIR_ENV])
    # a foreground training command takes the same lock ...
    with pytest.raises(StudioError, match="Device cpu is busy"), jobs.device_lock("cpu", tmp_path / "fg"):
        pass
    # ... but not inside a job, whose launcher holds it for its trainer
    monkeypatch.setenv(jobs.JOB_LOCK_ENV, "1")
    with jobs.device_lock("cpu", tmp_path / "fg"):
        pass
    monkeypatch.delenv(jobs.JOB_LOCK_ENV)
    os.kill(st.pid, signal.SIGKILL)
    _wait(lambda: jobs.device_holder("cpu") is None)
    with jobs.device_lock("cpu", tmp_path / "fg"):
        assert jobs.device_holder("cpu")["pid"] == os.getpid()
    assert jobs.device_holder("cpu") is None  # released


def test_lock_dir_defaults_to_a_private_per_user_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(jobs.LOCK_DIR_ENV)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    (tmp_path / "xdg").mkdir()
    assert jobs.lock_dir() == tmp_path / "xdg" / "pruning-studio" / "locks"
    assert jobs.lock_dir(tmp_path / "any" / "runs") == jobs.lock_dir()
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path / "tmp"))
    assert jobs.lock_dir() == tmp_path / "tmp" / f"pruning-studio-{os.getuid()}" / "locks"
    folder = jobs._lock_folder()
    assert folder.is_dir() and (folder.stat().st_mode & 0o077) == 0  # no one else can take or fake a lock


def test_a_foreground_retrain_waits_for_no_one_and_is_refused_on_a_busy_device(tmp_path, capsys):
    """A direct ``retrain`` used to ignore the locks and run beside a job on the same device."""
    from studio.cli import main

    held = jobs._acquire(["cpu"], tmp_path / "runs" / "busy-job")  # held by a live process: this one
    try:
        argv = ["retrain", "--model", "demo", "--data", "demo", "--kd", "none", "--limit", "16"]
        rc = main(
            [
                *argv,
                "--epochs",
                "1",
                "--no-bench",
                "--no-export",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err[-1].startswith("error: Device cpu is busy: job busy-job"), err
    finally:
        for p in held:
            p.unlink()
