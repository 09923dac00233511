"""Which pre-recovery signal predicts the recovered accuracy: Spearman per signal, the recommendation, the page."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr
from streamlit.testing.v1 import AppTest

from studio.compare import MIN_RUNS, calibration, calibration_points, rank_untried

ROOT = Path(__file__).resolve().parents[1]


def _values(v):
    """A plotly array as the page sent it: a list, or plotly's typed-array encoding (base64 ``bdata``)."""
    if isinstance(v, dict):
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).tolist()
    return list(v)


def _write(folder: Path, spec: dict, results: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "status.json").write_text(json.dumps({"state": "done"}))
    (folder / "spec.json").write_text(json.dumps(spec))
    time.sleep(0.01)  # list_runs orders by spec.json's mtime: newest first


def _prune(
    root: Path, name: str, *, top1: float, macs: int, signals: dict | None = None, data="demo"
) -> None:
    results = {
        "kind": "prune",
        "method": "magnitude",
        "before": {"top1": 0.95, "macs": 1000, "params": 100},
        "after": {"top1": top1, "macs": macs, "params": 50},
    }
    if signals is not None:
        results["signals"] = signals
    spec = {
        "kind": "prune",
        "model": {"source": "demo"},
        "params": {"target_macs": macs / 1000},
        "data": data,
    }
    _write(root / name, spec, results)


def _retrain(root: Path, name: str, parent: str, *, top1: float, data="demo") -> None:
    source = {"kind": data.split(":")[0], "path": data.partition(":")[2] or None, "limit": None, "seed": 0}
    spec = {"kind": "retrain", "model": {"source": str(root / parent / "export")}, "data": source}
    results = {"kind": "retrain", "method": "magnitude", "before": {"top1": 0.1}, "after": {"top1": top1}}
    _write(root / name, spec, results)


# six recovered plans: accuracy after pruning ranks them perfectly, MACs backwards, kNN (recorded on four) with
# one swap, the removed score on two only (too few to rank)
ACTUAL = [0.60, 0.65, 0.70, 0.75, 0.80, 0.85]
PRUNED = [0.10, 0.20, 0.30, 0.40, 0.50, 0.60]
MACS = [900, 800, 700, 600, 500, 400]
KNN = [0.5, 0.7, 0.6, 0.9, None, None]
REMOVED = [3.0, None, None, 1.0, None, None]


@pytest.fixture
def six_runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    for i in range(6):
        sig = {k: v for k, v in (("knn_top1", KNN[i]), ("removed_score", REMOVED[i])) if v is not None}
        _prune(root, f"p{i}", top1=PRUNED[i], macs=MACS[i], signals=sig or None)
    for i in range(6):
        _retrain(root, f"old-r{i}", f"p{i}", top1=0.0)  # an older recovery of each plan: the newest counts
    for i in range(6):
        _retrain(root, f"r{i}", f"p{i}", top1=ACTUAL[i])
    # other data: not ranked with the demo's; and two plans not recovered yet
    _prune(root, "other", top1=0.9, macs=100, data="imagefolder:/x")
    _retrain(root, "other-r", "other", top1=0.99, data="imagefolder:/x")
    _prune(root, "u-low", top1=0.15, macs=950)
    _prune(root, "u-high", top1=0.55, macs=450)
    return root


def test_six_runs_give_the_spearman_table_and_recommend_the_best_signal(six_runs):
    points = calibration_points(six_runs, model="demo")
    assert sorted(p["prune_run"] for p in points) == ["other", "p0", "p1", "p2", "p3", "p4", "p5"]
    assert {p["prune_run"]: p["actual"] for p in points if p["data"] == "demo"} == {
        f"p{i}": ACTUAL[i] for i in range(6)
    }
    cal = calibration(points)
    assert cal["data"] == "demo" and len(cal["points"]) == 6
    table = {t["signal"]: t for t in cal["table"]}
    assert table["top1_pruned"]["spearman"] == pytest.approx(1.0) and table["top1_pruned"]["n"] == 6
    assert table["macs"]["spearman"] == pytest.approx(-1.0) and table["macs"]["n"] == 6
    knn = spearmanr(KNN[:4], ACTUAL[:4]).statistic
    assert table["knn_pruned"]["spearman"] == pytest.approx(knn) and table["knn_pruned"]["n"] == 4
    assert 0 < knn < 1
    # removed score is negated (less removed = better): two runs, perfectly ranked, but too few to count
    assert table["removed_score"]["n"] == 2 and table["removed_score"]["spearman"] == pytest.approx(1.0)
    assert cal["recommended"] == "top1_pruned"
    assert "accuracy right after pruning ranked 6 recovered plans best (Spearman 1.00)" in cal["reason"]
    # the recommended signal sorts the untried candidates
    untried = rank_untried(six_runs, "top1_pruned", model="demo")
    assert [u["run"] for u in untried] == ["u-high", "u-low"]
    assert [u["run"] for u in rank_untried(six_runs, "macs", model="demo")] == ["u-low", "u-high"]


def test_with_too_few_or_wrongly_ordered_runs_nothing_is_recommended(six_runs):
    points = [p for p in calibration_points(six_runs) if p["data"] == "demo"]
    few = calibration(points[: MIN_RUNS - 1])
    assert few["recommended"] is None and "Recover at least 3 plans" in few["reason"]
    flipped = [{**p, "top1_pruned": -p["top1_pruned"]} for p in points]
    for p in flipped:
        p["knn_pruned"] = None
    cal = calibration(flipped)
    assert cal["recommended"] is None and "No signal ranked" in cal["reason"]
    other = calibration(calibration_points(six_runs), data="imagefolder:/x")
    assert len(other["points"]) == 1 and other["recommended"] is None


def test_compare_page_renders_the_calibration_view_from_real_tiny_runs(tmp_path, monkeypatch):
    from studio.data import DataSpec
    from studio.flows import create_run, run_folder
    from studio.flows.prune import PruneSpec
    from studio.flows.retrain import RecoverySpec
    from studio.models import ModelSpec

    root = tmp_path / "runs"
    monkeypatch.setenv("STUDIO_RUNS", str(root))
    demo, data = ModelSpec("demo", device="cpu"), DataSpec("demo", limit=96)
    for i, target in enumerate((0.4, 0.6, 0.8)):
        src = create_run(
            PruneSpec(demo, "magnitude", {"target_macs": target}, data, bench=False), root / f"p{i}"
        )
        run_folder(src)
        spec = RecoverySpec(ModelSpec(str(src.export_dir), device="cpu"), data, demo, overrides={"epochs": 1})
        run_folder(create_run(spec, root / f"r{i}"))
    points = calibration_points(root, model="demo")
    assert len(points) == 3 and all(0 <= p["actual"] <= 1 for p in points)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    at.switch_page("pages/10_compare.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "Which signal predicts the result?" in [h.value for h in at.subheader]
    table = next(d.value for d in at.dataframe if "spearman" in d.value.columns)
    rows = dict(zip(table["label"], table["n"]))
    assert rows["accuracy right after pruning"] == 3 and rows["MACs kept"] == 3
    # the prune flow records the kNN accuracy of the cut features and the share of the magnitude score the plan
    # removed (prune.signals) for the page; a smaller MACs target removes more of it
    assert all(0 <= p["knn_pruned"] <= 1 for p in points)
    assert (
        rows["kNN accuracy of the cut features"] == 3
        and rows["criterion score removed (less is better)"] == 3
    )
    removed = [
        json.loads((root / f"p{i}" / "results.json").read_text())["prune"]["signals"] for i in range(3)
    ]
    shares = [r["removed_score"] for r in removed]
    assert 1 > shares[0] > shares[1] > shares[2] > 0, shares
    expected = calibration(points)
    notes = [m.value for m in (*at.success, *at.info)]
    assert expected["reason"] in notes
    assert at.radio(key="cmp_cal_signal").value == (expected["recommended"] or "top1_pruned")
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    scatter = next(c for c in charts if "vs accuracy after recovery" in c["layout"]["title"]["text"])
    shown = sorted(float(y) for trace in scatter["data"] for y in _values(trace["y"]))
    assert shown == pytest.approx(sorted(p["actual"] for p in points))  # one point per recovered plan
    assert os.environ["STUDIO_RUNS"] == str(root)


def test_runs_that_trained_are_not_labelled_before_recovery():
    """A retrained SLS cut, P3B and SPLoRA report accuracy after training; a one-shot prune does not."""
    from studio.compare import _trained

    assert _trained("sls", {"retrain": "cpu"}, {}) and _trained("sls", {"retrain": "auto", "epochs": 3}, {})
    assert not _trained("sls", {"retrain": "none"}, {}) and not _trained(
        "sls", {"retrain": "cpu", "epochs": 0}, {}
    )
    assert _trained("p3b", {}, {}) and _trained("splora", {}, {}) and _trained("retrain", {}, {})
    assert not _trained("prune", {}, {})


def test_removed_score_is_the_share_of_each_scored_kind_removed_averaged_over_kinds():
    from studio.analysis.criteria import UnitScores
    from studio.plan import BaseArch, BlockPlan, PrunePlan
    from studio.prune.select import plan_from_scores, removed_score

    base = BaseArch(
        arch="t",
        kwargs={},
        embed_dim=8,
        depth=2,
        num_heads=(4, 4),
        head_dim=2,
        mlp_hidden=(4, 4),
        num_classes=3,
    )
    scores = UnitScores("x", heads=((1, 2, 3, 4), (5, 5, 5, 5)), mlp=((0, 0, 1, 1), (1, 1, 1, 1)))
    dense = PrunePlan.dense(base)
    assert removed_score(scores, dense) == 0.0
    # heads: block 0 loses heads 0 and 1 (3 of the 30 head score); mlp: block 1 loses 2 neurons (2 of 6)
    plan = dense.with_(blocks=(BlockPlan(0, heads=(2, 3)), BlockPlan(1, mlp=(0, 1))))
    assert removed_score(scores, plan) == pytest.approx((3 / 30 + 2 / 6) / 2, abs=1e-6)
    # a removed block removes all its units
    assert removed_score(scores, dense.with_(blocks=(BlockPlan(0),))) == pytest.approx(
        (20 / 30 + 4 / 6) / 2, abs=1e-6
    )
    # the plans the selection builds carry it, and removing the top units removes more score than the bottom
    low = plan_from_scores(base, scores, {"heads": 0.5})
    assert low.summary["removed_score"] == pytest.approx((3 + 10) / 30 / 2, abs=1e-6)
    assert removed_score(UnitScores("x"), plan) is None
