"""Overlaid training curves (issue 16): the pure frame/figure builders and the Runs page on real tiny runs."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from studio.events import Event
from studio.runs import RunDir
from studio.ui.curves import epoch_frame, overlay_figure
from studio.ui.jobs import curves_figure

ROOT = Path(__file__).resolve().parents[1]


def _values(v) -> list:
    """A plotly array as sent to the browser: a list, or plotly's typed-array encoding (base64 ``bdata``)."""
    if isinstance(v, dict):
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).tolist()
    return list(v)


def _trained_run(path: Path, records: list[dict]) -> Path:
    """A run folder whose events hold ``records`` as the trainer logs them (metric events, one per epoch)."""
    run = RunDir.create(path, {"kind": "retrain"})
    for r in records:
        run.log_event(Event("metric", r))
    return run.path


@pytest.fixture
def two(tmp_path) -> dict[str, Path]:
    a = _trained_run(
        tmp_path / "a",
        [
            {"epoch": 0, "train_loss": 2.0, "val_top1": 0.25, "val_loss": 2.1},
            {"epoch": 1, "train_loss": 1.5, "val_top1": 0.5, "val_loss": 1.7},
        ],
    )
    b = _trained_run(tmp_path / "b", [{"epoch": 0, "train_loss": 3.0, "val_top1": 0.125}])
    return {"a": a, "b": b}


def test_epoch_frame_reads_every_runs_per_epoch_records(two):
    df = epoch_frame(two)
    loss = df[df["metric"] == "train_loss"]
    assert list(zip(loss["run"], loss["epoch"], loss["value"], strict=True)) == [
        ("a", 1, 2.0),
        ("a", 2, 1.5),
        ("b", 1, 3.0),
    ]
    assert df[(df["metric"] == "val_top1") & (df["run"] == "b")]["value"].tolist() == [0.125]
    assert df[df["metric"] == "val_loss"]["run"].tolist() == ["a", "a"]  # b logged no val loss


def test_overlay_figure_has_one_line_per_run_per_metric(two):
    fig = overlay_figure(epoch_frame(two), ("train_loss", "val_top1"))
    assert fig is not None
    lines = {(t.meta, t.name): (list(t.x), list(t.y)) for t in fig.data}
    assert lines == {
        ("train_loss", "a"): ([1, 2], [2.0, 1.5]),
        ("train_loss", "b"): ([1], [3.0]),
        ("val_top1", "a"): ([1, 2], [0.25, 0.5]),
        ("val_top1", "b"): ([1], [0.125]),
    }
    # a run keeps its colour across panels, and the two runs differ; one legend entry per run
    color = {(t.meta, t.name): t.line.color for t in fig.data}
    assert color["train_loss", "a"] == color["val_top1", "a"] != color["train_loss", "b"]
    assert sorted(t.name for t in fig.data if t.showlegend is not False) == ["a", "b"]
    hover = fig.data[0].hovertemplate
    assert "%{customdata[0]}" in hover and "epoch: %{x}" in hover and "Train loss" in hover
    assert [list(c) for c in fig.data[0].customdata] == [["a"], ["a"]]  # the run's name in every hover
    assert overlay_figure(epoch_frame(two), ("val_loss",)).data[0].name == "a"  # only a logged it
    assert overlay_figure(epoch_frame({})) is None


def test_single_run_curves_count_epochs_from_one_like_the_overlay(two):
    fig = curves_figure(two["a"])
    epochs = next(t for t in fig.data if t.name == "train loss")
    assert list(epochs.x) == [1, 2]


@pytest.mark.slow
def test_runs_page_overlays_two_real_runs_curves(tmp_path, monkeypatch):
    from studio.data import DataSpec
    from studio.flows import create_run, run_folder
    from studio.flows.prune import PruneSpec
    from studio.flows.retrain import RecoverySpec
    from studio.models import ModelSpec

    root = tmp_path / "runs"
    monkeypatch.setenv("STUDIO_RUNS", str(root))
    demo, data = ModelSpec("demo", device="cpu"), DataSpec("demo", limit=96)
    src = create_run(PruneSpec(demo, "magnitude", {"target_macs": 0.5}, data, bench=False), root / "p0")
    run_folder(src)
    for name, epochs in (("r1", 1), ("r2", 2)):
        spec = RecoverySpec(
            ModelSpec(str(src.export_dir), device="cpu"), data, demo, overrides={"epochs": epochs}
        )
        run_folder(create_run(spec, root / name))

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    at.switch_page("pages/8_runs.py").run()
    at.toggle(key="runs_all").set_value(True).run()  # the runs were made here, not by this session's jobs
    assert not at.exception and not at.error, [e.value for e in at.error]
    picker = at.multiselect(key="runs_overlay")
    assert set(picker.options) == {"r1", "r2"}  # only the runs that trained: the one-shot prune has no curves
    picker.set_value(["r1", "r2"]).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    overlay = next(c for c in charts if c["layout"]["title"]["text"] == "Training curves, run against run")
    lines = {(t["meta"], t["name"]): t for t in overlay["data"]}
    assert set(lines) == {(m, r) for m in ("train_loss", "val_top1") for r in ("r1", "r2")}
    for run, epochs in (("r1", 1), ("r2", 2)):
        records = [e["data"] for e in RunDir(root / run).events("metric") if "train_loss" in e["data"]]
        assert len(records) == epochs
        assert _values(lines["train_loss", run]["x"]) == list(range(1, epochs + 1))
        assert _values(lines["train_loss", run]["y"]) == pytest.approx([r["train_loss"] for r in records])
        assert _values(lines["val_top1", run]["y"]) == pytest.approx([r["val_top1"] for r in records])
    assert "runs_overlay_csv" in [b.key for b in at.get("download_button")]

    at.multiselect(key="runs_overlay_metrics").set_value(["val_loss"]).run()
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    overlay = next(c for c in charts if c["layout"]["title"]["text"] == "Training curves, run against run")
    assert sorted(t["name"] for t in overlay["data"]) == ["r1", "r2"]
    assert {t["meta"] for t in overlay["data"]} == {"val_loss"}
