"""Ownership of jobs (issue #13): runs are shared by every browser session, but only the session that started a
job may cancel or resume it; others see it read-only, and the CLI (the local user) may act on any job.

The jobs are real launcher processes on a stand-in trainer (a sleeping Python process, as in
tests/test_job_processes.py), so no model is trained; the pages are driven in Streamlit's AppTest.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from studio import jobs
from studio.data import DataSpec
from studio.errors import StudioError
from studio.flows.prune import PruneSpec
from studio.models import ModelSpec
from studio.runs import read_json

pytestmark = pytest.mark.skipif(os.name != "posix", reason="process groups and /proc are POSIX")

ROOT = Path(__file__).resolve().parents[1]
A, B = "a" * 32, "b" * 32  # two browser sessions' tokens
SPEC = PruneSpec(ModelSpec("demo"), "magnitude", {"target_macs": 0.5}, DataSpec("demo"))


@pytest.fixture
def runs(tmp_path, monkeypatch) -> Iterator[Path]:
    """A runs folder with a live job of session A, one of session B and one started from the CLI; each on its
    own lock folder (one job per device), killed by pid at the end."""
    root = tmp_path / "runs"
    monkeypatch.setenv("STUDIO_RUNS", str(root))
    monkeypatch.setattr(jobs, "_command", lambda argv, device, nproc: [sys.executable, "-c", "import time; "
                        "time.sleep(120)"])  # fmt: skip
    pids = []
    for name, owner in (("job-a", A), ("job-b", B), ("job-cli", None)):
        monkeypatch.setenv("STUDIO_LOCK_DIR", str(tmp_path / f"locks-{name}"))
        pids.append(jobs.submit(SPEC, root / name, device="cpu", owner=owner).pid)
    yield root
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def test_only_the_owner_token_cancels_and_the_cli_cancels_anything(runs):
    job = read_json(runs / "job-a" / "job.json")
    assert job["owner"] == jobs.owner_id(A) and A not in json.dumps(job)  # the token itself is never stored
    with pytest.raises(StudioError, match="started from another browser session, so only it can cancel"):
        jobs.cancel_job(runs / "job-a", owner=B)
    with pytest.raises(StudioError, match="started from the command line"):
        jobs.cancel_job(runs / "job-cli", owner=A)
    assert not (runs / "job-a" / "CANCEL").exists()
    assert jobs.cancel_job(runs / "job-a", owner=A).state == "cancelling"
    assert jobs.cancel_job(runs / "job-b").state == "cancelling"  # the CLI: no token, any job
    assert {r["run"]: r["owner"] for r in jobs.run_table(runs)}["job-b"] == jobs.owner_id(B)


def _runs_page(token: str | None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
    if token is not None:
        at.query_params["owner"] = token  # a reload: the URL keeps the session's token
    at.run()
    at.switch_page("pages/8_runs.py").run()
    assert not at.exception, at.exception
    return at


def _table(at: AppTest) -> set[str]:
    return set(next(d.value for d in at.dataframe if "throughput" in d.value.columns)["run"])


def _buttons(at: AppTest) -> set[str]:
    return {b.key for b in at.button}


def test_runs_page_shows_the_session_s_own_runs_and_others_read_only(runs):
    at = _runs_page(A)
    assert _table(at) == {"job-a"}  # by default: this session's runs only
    assert "job_job-a_cancel" in _buttons(at) and "job_job-a_stop" in _buttons(at)

    at.toggle(key="runs_all").set_value(True).run()
    assert _table(at) == {"job-a", "job-b", "job-cli"}
    for other in ("job-b", "job-cli"):
        at.selectbox(key="runs_open").set_value(other).run()
        assert not at.exception, at.exception
        assert not {f"job_{other}_cancel", f"job_{other}_stop", f"job_{other}_resume"} & _buttons(at)
        assert any("Read-only" in c.value for c in at.caption), [c.value for c in at.caption]

    at.selectbox(key="runs_open").set_value("job-a").run()
    next(b for b in at.button if b.key == "job_job-a_cancel").click().run()
    assert not at.exception and (runs / "job-a" / "CANCEL").exists()
    assert not (runs / "job-b" / "CANCEL").exists()


def test_a_new_session_gets_its_own_token_and_a_bad_url_token_is_not_taken(runs):
    fresh = _runs_page(None)
    token = fresh.session_state["studio_owner_token"]
    assert len(token) == 32 and token not in (A, B) and fresh.query_params["owner"] in (token, [token])
    assert any(
        "started no runs yet" in i.value for i in fresh.info
    )  # B's and the CLI's are behind the toggle
    guessed = _runs_page("b")  # not a token: a fresh one is made instead of matching anything
    assert guessed.session_state["studio_owner_token"] not in ("b", B)
    assert any("started no runs yet" in i.value for i in guessed.info)
