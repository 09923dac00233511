"""The Retrain and Runs pages in AppTest: a job started from a page, followed live, killed; the run history."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from studio import jobs
from studio.data import DataSpec
from studio.export import export
from studio.flows import read_spec
from studio.models import ModelSpec, create_vit, describe_base
from studio.plan import BlockPlan, PrunePlan
from studio.runs import RunDir
from studio.surgery import apply_plan

ROOT = Path(__file__).resolve().parents[1]
KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
DCFG = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
        "crop_pct": 1.0, "crop_mode": "center"}  # fmt: skip


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    """A runs folder holding one prune run (a depth-cut tiny ViT, exported) and one crashed job."""
    runs = tmp_path / "runs"
    monkeypatch.setenv("STUDIO_RUNS", str(runs))
    monkeypatch.setenv("STUDIO_DATA_ROOTS", str(tmp_path))  # the teacher (base/) is read from here
    torch.manual_seed(0)
    model = create_vit("vit_tiny_patch16_224", **KW).eval()
    base = describe_base(model, "vit_tiny_patch16_224", KW)
    export(model, base, tmp_path / "base", data_config=DCFG)
    plan = PrunePlan(base, (BlockPlan(0),), method="sls")
    spec = {
        "kind": "prune",
        "method": "sls",
        "params": {"ratio": 0.5},
        "model": ModelSpec(str(tmp_path / "base")).to_dict(),
    }
    run = RunDir.create(runs / "20260101-000000-prune-sls", spec)
    plan.save(run.plan_file)
    export(apply_plan(model, plan), base, run.export_dir, plan=plan, data_config=DCFG)
    run.write_results({"method": "sls", "after": {"top1": 0.5, "params": 100, "macs": 1000}})
    run.set_status("done")
    crashed = RunDir.create(runs / "20260101-000001-retrain-x", {"kind": "retrain"})
    crashed.set_status("running", pid=2**22 + 4321)  # no such process
    (crashed.path / "stderr.log").write_text("Traceback (most recent call last):\nMemoryError: out of RAM\n")
    return runs


def _app() -> AppTest:
    return AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)


def _poll(at: AppTest, cond, timeout: float = 240.0) -> AppTest:
    t0 = time.time()
    while time.time() - t0 < timeout:
        at.run()
        assert not at.exception, at.exception
        if cond(at):
            return at
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for the page: {_texts(at)[:2000]}")


def _frame(at: AppTest, column: str):
    """The first dataframe on the page with ``column`` (AppTest does not expose dataframe keys)."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def _texts(at: AppTest) -> str:
    return " ".join(str(m.value) for m in [*at.markdown, *at.error, *at.warning, *at.success, *at.caption])


def test_runs_page_lists_filters_and_opens_runs(root):
    at = _app().run()
    at.switch_page("pages/8_runs.py").run()
    assert not at.exception, at.exception
    at.toggle(key="runs_all").set_value(
        True
    ).run()  # runs this session did not start (tests/test_ownership.py)
    table = _frame(at, "throughput")
    assert set(table["run"]) == {"20260101-000000-prune-sls", "20260101-000001-retrain-x"}
    row = table.set_index("run").loc["20260101-000000-prune-sls"]
    assert (row["method"], row["budget"], row["top1"], row["status"]) == ("sls", "ratio 0.5", 0.5, "done")
    assert table.set_index("run").loc["20260101-000001-retrain-x", "status"] == "failed"

    at.multiselect(key="runs_status").set_value(["failed"]).run()
    assert list(_frame(at, "throughput")["run"]) == ["20260101-000001-retrain-x"]
    assert any("MemoryError: out of RAM" in e.value for e in at.error)  # failed with its last error

    at.multiselect(key="runs_status").set_value([]).run()
    at.selectbox(key="runs_open").set_value("20260101-000000-prune-sls").run()
    assert not at.exception
    codes = " ".join(c.value for c in at.code)
    assert "python -m studio eval --model" in codes and "blocks" in codes.lower()  # the export and the plan


@pytest.mark.slow
def test_retrain_page_starts_a_job_follows_it_and_shows_a_killed_job_as_failed(root):
    at = _app()
    at.session_state["studio_data_spec"] = DataSpec("demo", limit=64)
    at.run()
    at.switch_page("pages/7_retrain.py").run()
    assert not at.exception, at.exception
    assert "20260101-000000-prune-sls" in at.selectbox(key="retrain_model").value
    assert at.text_input(key="retrain_teacher").value.endswith("base")  # the model the export was pruned from
    at.number_input(key="retrain_epochs").set_value(500)  # long enough to be killed while training
    at.number_input(key="retrain_patience").set_value(0)
    at.selectbox(key="retrain_device").set_value("cpu")
    at.button(key="retrain_start").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]

    run = Path(at.session_state["retrain_start_run"])
    assert run.parent == root and (run / "job.json").exists() and (run / "stdout.log").exists()
    job = jobs.job_status(run)
    assert job.active and job.command[:1] == ["run"] and read_spec(job.run).data.limit is not None

    # the polling view shows the job's events: its live state, then the training progress
    at = _poll(at, lambda a: any(p.proto.text.startswith("train") for p in a.get("progress")))
    assert f"**{run.name}** · running" in _texts(at)
    events = _frame(at, "kind")
    # the table shows the last 30 events: a fast machine may be many epochs in, with only metrics left in view
    kinds = set(events["kind"])
    assert kinds <= {"status", "log", "metric"} and ("status" in kinds or len(events) == 30), kinds
    assert len(at.get("plotly_chart")) >= 1

    # a reload (a fresh session, nothing in its state) follows the running job, not an empty page
    again = _app()
    again.session_state["studio_data_spec"] = DataSpec("demo", limit=64)
    again.run()
    again.switch_page("pages/7_retrain.py").run()
    assert not again.exception, again.exception
    assert f"**{run.name}** · running" in _texts(again)

    os.killpg(job.pid, signal.SIGKILL)
    at = _poll(at, lambda a: any("Failed" in e.value for e in a.error), timeout=60)
    assert any("killed" in e.value for e in at.error), [e.value for e in at.error]
    assert f"**{run.name}** · failed" in _texts(at)
