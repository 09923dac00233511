"""The P3B (Block benefit) and Adapters pages follow the job they show: a cancelled run with a checkpoint offers
Resume, Resume runs it to the end (the old ``CANCEL`` does not stop attempt 2), and a finished result offers
Make active / Retrain / Export. Real jobs (``python -m studio run``) on the demo with tiny settings."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from studio import jobs
from studio.data import DataSpec
from studio.flows.prune import PruneSpec
from studio.models import ModelSpec
from studio.runs import RunDir

ROOT = Path(__file__).resolve().parents[1]
DATA = DataSpec("demo", limit=96)
DEMO = ModelSpec("demo", device="cpu")
TOKEN = "0123456789abcdef" * 2  # the browser session that started the jobs (only it may resume them)


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    runs = tmp_path / "runs"
    monkeypatch.setenv("STUDIO_RUNS", str(runs))
    monkeypatch.setenv("STUDIO_LOCK_DIR", str(tmp_path / "locks"))
    return runs


def _cancelled_job(spec: PruneSpec, run: Path) -> RunDir:
    """Submit ``spec`` as a job and cancel it at once: it stops at its first training step with a checkpoint."""
    jobs.submit(spec, run, device="cpu", threads=1, owner=TOKEN)
    jobs.cancel_job(run)
    _wait(run, lambda s: not s.active)
    st = jobs.job_status(run)
    assert st.state == "cancelled", (st, (run / "stderr.log").read_text()[-2000:])
    assert RunDir(run).has_checkpoint, sorted(p.name for p in run.iterdir())
    return RunDir(run)


def _wait(run: Path, cond, timeout: float = 300.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond(jobs.job_status(run)):
            return
        time.sleep(0.5)
    raise AssertionError(f"{run.name}: {jobs.job_status(run)}; {(run / 'stderr.log').read_text()[-2000:]}")


def _page(path: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
    at.session_state["studio_data_spec"] = DATA
    at.query_params["owner"] = TOKEN  # the session's owner token, as the URL keeps it over a reload
    at.run()
    at.switch_page(path).run()
    assert not at.exception, at.exception
    return at


def _buttons(at: AppTest) -> dict[str, object]:
    return {b.key: b for b in at.button}


@pytest.mark.slow
def test_block_benefit_page_resumes_a_cancelled_p3b_job_and_acts_on_its_result(root):
    params = {"prune_ratio": 0.5, "epochs": 4, "probe": "mean", "steps_per_update": 2}
    spec = PruneSpec(DEMO, "p3b", params, DATA, batch_size=32, bench=False)
    run = _cancelled_job(spec, root / "p3b-cancelled")

    at = _page("pages/3_block_benefit.py")
    assert at.selectbox(key="bb_run").value == run.path.name
    key = f"job_{run.path.name}"
    assert f"{key}_resume" in _buttons(at), [b.key for b in at.button]  # its checkpoint is recognised
    assert any("Resume continues" in w.value for w in at.warning)

    _buttons(at)[f"{key}_resume"].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert jobs.job_status(run.path).attempt == 2
    _wait(run.path, lambda s: s.state in jobs.FINAL_STATES)
    st = jobs.job_status(run.path)
    assert st.state == "done", (st, (run.path / "stderr.log").read_text()[-2000:])  # not cancelled again
    assert run.results()["p3b"]["schedule"]["finalize_epoch"] == 2

    at.run()
    assert not at.exception, at.exception
    b = _buttons(at)
    assert {"bb_result_active", "bb_result_retrain", "bb_result_export"} <= set(b)
    assert not any(b[k].disabled for k in ("bb_result_active", "bb_result_retrain", "bb_result_export"))
    b["bb_result_active"].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "Active plan" in " ".join(m.value for m in at.sidebar.markdown)
    assert str(at.session_state["studio_active_plan_source"][1]) == str(run.path)

    _buttons(at)["bb_result_export"].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.title[0].value == "Export"
    assert at.selectbox(key="export_run").value == str(run.path)


@pytest.mark.slow
def test_adapters_page_follows_a_cancelled_splora_job_and_offers_resume(root):
    params = {"epochs": 2, "recovery_epochs": 0, "prune_step": 0.5, "score_batches": 1, "rank": 2.0}
    spec = PruneSpec(DEMO, "splora", {**params, "target_density": 0.5}, DATA, batch_size=32, bench=False)
    run = _cancelled_job(spec, root / "splora-cancelled")
    # the adapter training is kept (the default ViT protocol's head-only first half)
    assert [p.name for p in run.checkpoints()] == ["splora-splora.step0.head.pt"]

    at = _page("pages/5_adapters.py")  # a fresh session: nothing started here, the page finds the job
    assert not at.error, [e.value for e in at.error]
    key = f"job_{run.path.name}"
    assert f"{key}_resume" in _buttons(at), [b.key for b in at.button]
    assert any(run.path.name in m.value for m in at.markdown)


@pytest.mark.slow
def test_start_p3b_shows_the_new_run_with_progress_and_cancel_then_resume(root):
    at = _page("pages/3_block_benefit.py")
    assert any("No P3B run yet" in i.value for i in at.info)
    at.button(key="bb_new_start").click().run()  # the default 40 epochs: it is cancelled long before the end
    assert not at.exception and not at.error, [e.value for e in at.error]
    run = Path(at.session_state["bb_new_start_run"])
    assert at.selectbox(key="bb_run").value == run.name  # the run just started, not "no run yet"
    assert not any("No P3B run yet" in i.value for i in at.info)
    key = f"job_{run.name}"
    assert jobs.job_status(run).active and f"{key}_cancel" in _buttons(at), [b.key for b in at.button]
    _buttons(at)[f"{key}_cancel"].click().run()
    assert not at.exception, at.exception
    _wait(run, lambda s: not s.active)
    at.run()
    assert jobs.job_status(run).state == "cancelled"
    assert f"{key}_resume" in _buttons(at), [b.key for b in at.button]


def test_a_start_on_a_busy_device_queues_the_job_and_the_page_says_behind_what(root):
    busy = root / "busy"
    jobs.submit(PruneSpec(DEMO, "p3b", {"epochs": 40}, DATA, batch_size=32, bench=False), busy, threads=1)
    try:
        at = _page("pages/3_block_benefit.py")
        at.button(key="bb_new_start").click().run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        run = Path(at.session_state["bb_new_start_run"])
        st = jobs.job_status(run)
        assert st.state == "queued" and st.waiting_for == str(busy.resolve())
        said = [i.value for i in at.info if i.value.startswith("Queued")]
        assert said and f"when {busy.name} ends" in said[0]
        key = f"job_{run.name}"
        _buttons(at)[f"{key}_cancel"].click().run()  # the owner takes it out of the queue
        assert jobs.job_status(run).state == "cancelled" and not (run / "job.json").exists()
    finally:
        jobs.cancel_job(busy)
        _wait(busy, lambda s: not s.active)
