"""The per-layer sensitivity sweep (Li et al., ICLR 2017; Distiller): the engine on the demo, its spec, the page."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from studio.analysis.criteria import calibration_batches, keep_count
from studio.analysis.importance import CRITERIA
from studio.analysis.sensitivity import sensitivity, sweep_plan
from studio.data import DataSpec, prepare
from studio.errors import Cancelled, StudioError
from studio.evaluate import evaluate, logits_of
from studio.events import CancelToken
from studio.flows import create_run, run_folder, spec_from_dict
from studio.flows.sensitivity import SensitivitySpec, sensitivity_of
from studio.models import ModelSpec
from studio.runs import RunDir, list_runs
from studio.surgery import apply_plan, pruned_widths

ROOT = Path(__file__).resolve().parents[1]
DATA = DataSpec("demo", limit=96)
PAGE = "pages/12_sensitivity.py"


@pytest.fixture(scope="module")
def eval_data(demo_loaded):
    lm = demo_loaded
    return prepare(DATA, "test", lm.data_config, lm.base.num_classes, class_names=lm.known_class_names)


@pytest.fixture(scope="module")
def heads_sweep(demo_loaded, eval_data):
    """Heads by l1 at 0 (nothing removed), 0.5 and 0.75, with the progress events it emitted."""
    before = copy.deepcopy(demo_loaded.model.state_dict())
    events: list = []
    res = sensitivity(demo_loaded, eval_data, fractions=(0.75, 0.0, 0.5), callbacks=[events.append])
    after = demo_loaded.model.state_dict()
    unchanged = all(torch.equal(before[k], after[k]) for k in before) and before.keys() == after.keys()
    return res, events, unchanged


# ------------------------------------------------------------------------------------------------- engine
def test_the_sweep_has_one_row_per_block_and_fraction_with_the_demos_unit_counts(demo_loaded, heads_sweep):
    res, events, unchanged = heads_sweep
    base = demo_loaded.base
    assert base.depth == 12 and set(base.num_heads) == {3}  # the demo: 12 blocks of 3 heads
    assert res.fractions == (0.0, 0.5, 0.75) and len(res.rows) == 12 * 3
    assert [(r.block, r.fraction) for r in res.rows] == [(b, f) for b in range(12) for f in (0.0, 0.5, 0.75)]
    kept = {0.0: 3, 0.5: 2, 0.75: 1}  # 3 - floor(f * 3), at least one head
    assert all(r.units == 3 and r.kept == kept[r.fraction] for r in res.rows)
    assert all(0.0 <= r.point.top1 <= 1.0 and r.point.n == 96 for r in [*res.rows])
    assert 0.0 <= res.dense.top1 <= 1.0 and res.dense.n == 96
    assert unchanged, "the sweep changed the loaded model"
    ticks = [e.data for e in events if e.kind == "progress" and e.data["task"] == "sensitivity"]
    assert ticks[-1]["done"] == ticks[-1]["total"] == 1 + 12 * 3


def test_removing_fraction_zero_keeps_the_dense_accuracy_exactly(demo_loaded, heads_sweep, eval_data):
    res, _, _ = heads_sweep
    assert all(r.point == res.dense for r in res.rows if r.fraction == 0.0)
    # not only reused: the fraction-0 plan is dense and its surgery reproduces the logits bit for bit
    lm = demo_loaded
    scores = CRITERIA.get("l1").fn(lm, [])
    plan = sweep_plan(lm.base, scores, "heads", 5, 0.0)
    assert plan.is_dense
    pruned = apply_plan(copy.deepcopy(lm.model), plan).eval()
    x = torch.stack([eval_data[i][0] for i in range(8)])
    with torch.inference_mode():
        assert torch.equal(logits_of(pruned, x), logits_of(lm.model, x))
    assert evaluate(pruned, eval_data).top1 == res.dense.top1


def test_each_rows_pruned_model_has_exactly_the_expected_units(demo_loaded, heads_sweep):
    res, _, _ = heads_sweep
    lm = demo_loaded
    scores = CRITERIA.get("l1").fn(lm, [])
    for r in res.rows:
        widths = pruned_widths(
            apply_plan(copy.deepcopy(lm.model), sweep_plan(lm.base, scores, "heads", r.block, r.fraction))
        )
        assert [w["heads"] for w in widths] == [r.kept if i == r.block else 3 for i in range(12)]
        assert all(w["mlp"] == 384 for w in widths)  # only heads of that one block go
    # the head a block keeps at 0.75 is its highest-scored one by l1
    plan = sweep_plan(lm.base, scores, "heads", 0, 0.75)
    assert plan.block(0).heads == (max(range(3), key=lambda h: scores.heads[0][h]),)
    assert any(r.point.top1 < res.dense.top1 for r in res.rows if r.fraction == 0.75)  # pruning costs


def test_mlp_neurons_by_taylor_prune_the_expected_width(demo_loaded, eval_data):
    lm = demo_loaded
    batches = calibration_batches(lm, DATA, "train", 1, 32)
    res = sensitivity(lm, eval_data, scope="mlp", criterion="taylor", fractions=(0.25,), batches=batches)
    assert [r.kept for r in res.rows] == [keep_count(384, 0.25)] * 12 == [288] * 12
    scores = CRITERIA.get("taylor").fn(lm, batches)
    widths = pruned_widths(apply_plan(copy.deepcopy(lm.model), sweep_plan(lm.base, scores, "mlp", 7, 0.25)))
    assert [w["mlp"] for w in widths] == [288 if i == 7 else 384 for i in range(12)]
    assert all(w["heads"] == 3 for w in widths)


def test_the_engine_refuses_bad_input_and_stops_on_cancel(demo_loaded, eval_data):
    with pytest.raises(StudioError, match="Unknown scope"):
        sensitivity(demo_loaded, eval_data, scope="qkv")
    with pytest.raises(StudioError, match="strictly between 0 and 1"):
        sensitivity(demo_loaded, eval_data, fractions=(1.0,))
    with pytest.raises(StudioError, match="needs calibration data"):
        sensitivity(demo_loaded, eval_data, criterion="taylor")
    token = CancelToken()
    token.set()
    with pytest.raises(Cancelled):
        sensitivity(demo_loaded, eval_data, fractions=(0.5,), cancel=token)


# --------------------------------------------------------------------------------------------------- spec
def test_the_spec_round_trips_through_spec_json():
    spec = SensitivitySpec(
        ModelSpec("demo", device="cpu"), DATA, scope="mlp", criterion="taylor", fractions=(0.1, 0.9), limit=50
    )
    spec.validate()
    assert spec.kind == "sensitivity"
    assert spec_from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.eval_data.limit == 50 and spec.data.limit == 96  # the smaller limit is evaluated
    assert SensitivitySpec(data=DATA, limit=500).eval_data == DATA


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"scope": "qkv"}, "Unknown scope 'qkv'"),
        ({"fractions": (0.5, 1.0)}, "strictly between 0 and 1"),
        ({"fractions": (0.0,)}, "strictly between 0 and 1"),
        ({"fractions": (-0.25,)}, "strictly between 0 and 1"),
        ({"fractions": ()}, "at least one fraction"),
        ({"criterion": "l3"}, "Unknown criterion 'l3'"),
        ({"criterion": "ablation", "scope": "mlp"}, "scores heads only"),
        ({"criterion": "taylor", "batches": 0}, "needs calibration data"),
        ({"eval_split": "dev"}, "eval_split must be one of"),
        ({"limit": 0}, "evaluation limit"),
    ],
)
def test_a_bad_spec_is_refused_in_one_sentence_before_any_work(changes, says):
    spec = SensitivitySpec(ModelSpec("demo"), DATA).with_(**changes)
    with pytest.raises(StudioError, match=says) as e:
        spec.validate()
    assert "\n" not in str(e.value)


def test_a_run_writes_the_sweep_in_the_common_results_shape(tmp_path, demo_loaded):
    spec = SensitivitySpec(ModelSpec("demo", device="cpu"), DATA, fractions=(0.75,))
    run = create_run(spec, tmp_path / "run")
    run_folder(run, loaded=demo_loaded)
    res = RunDir(run.path).results()
    assert (
        res["kind"] == "sensitivity" and res["plan"] is None and res["before"]["macs"] == res["after"]["macs"]
    )
    sweep = sensitivity_of(run)
    assert len(sweep.rows) == 12 and res["sensitivity"]["dense"]["n"] == 96
    with pytest.raises(StudioError, match="not a finished sensitivity run"):
        sensitivity_of(RunDir(tmp_path / "nothing"))


# --------------------------------------------------------------------------------------------------- page
def _page() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.session_state["studio_data_spec"] = DATA
    at.session_state["sens_fractions"] = [0.5, 0.75]
    at.run()
    at.switch_page(PAGE).run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    return at


def _figure(at: AppTest) -> dict:
    (chart,) = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    return chart


def test_the_page_draws_one_line_per_block_and_a_reload_shows_the_same_run(monkeypatch, tmp_path):
    root = tmp_path / "runs"
    monkeypatch.setenv("STUDIO_RUNS", str(root))
    at = _page()
    assert at.title[0].value == "Sensitivity"
    assert not at.get("plotly_chart"), "no chart before a sweep ran"
    at.button(key="sens_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    (run,) = list_runs(root)
    assert run.spec()["kind"] == "sensitivity" and run.spec()["fractions"] == [0.5, 0.75]
    fig = _figure(at)
    names = [t["name"] for t in fig["data"]]
    assert names == [*(f"block {b}" for b in range(12)), "dense"]
    dense = run.results()["sensitivity"]["dense"]["top1"]
    assert fig["data"][-1]["y"] == [dense, dense] and fig["data"][-1]["line"]["dash"] == "dash"
    assert fig["data"][0]["x"] == [0.0, 1 / 3, 2 / 3] and "block" in fig["data"][0]["hovertemplate"]
    assert any(b.proto.label == "Download data (CSV)" for b in at.get("download_button"))

    # a reload (a new session with the same settings) shows the same figures from the run, running nothing
    again = _page()
    assert _figure(again)["data"] == fig["data"] and len(list_runs(root)) == 1
    assert again.button(key="sens_run").label == "Run again"

    # a bad choice is said beside the widgets and nothing can start
    again.multiselect(key="sens_fractions").set_value([]).run()
    assert any("at least one fraction" in e.value for e in again.error)
    assert again.button(key="sens_run").disabled


# ---------------------------------------------------------------------------------------------------- CLI
def test_the_cli_command_runs_the_flow_into_a_run_folder(tmp_path):
    import argparse

    from studio.commands import analyze_sensitivity as cmd

    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers())
    argv = [
        "sensitivity",
        "--limit",
        "96",
        "--fractions",
        "0.75",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "r"),
    ]
    out = cmd.cmd_analyze_sensitivity(parser.parse_args(argv))
    assert out.data["kind"] == "sensitivity" and len(out.data["sensitivity"]["rows"]) == 12
    assert "dense" in out.text and "75%" in out.text and str(tmp_path / "r") in out.text
    assert spec_from_dict(RunDir(tmp_path / "r").spec()).fractions == (0.75,)
    with pytest.raises(StudioError, match="--fractions must be comma-separated numbers"):
        cmd.parse_fractions("half")


def test_a_real_size_sweep_runs_as_a_job_that_a_reload_follows(monkeypatch, tmp_path):
    import time

    import studio.ui.background as background
    from studio.jobs import job_status

    root = tmp_path / "runs"
    monkeypatch.setenv("STUDIO_RUNS", str(root))
    monkeypatch.setattr(background, "INLINE_MACS", 0.0)  # every model is "real size": the sweep goes to a job
    at = _page()
    assert not at.get("plotly_chart") and any("background job" in i.value for i in at.info)
    at.button(key="sens_job").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    (run,) = list_runs(root)
    assert spec_from_dict(run.spec()).fractions == (0.5, 0.75)
    again = _page()  # a reload while it runs follows the same job: never a second one
    assert len(list_runs(root)) == 1 and not again.exception
    deadline = time.time() + 300
    while job_status(run.path).state != "done":
        assert job_status(run.path).state in ("created", "starting", "running"), job_status(run.path)
        assert time.time() < deadline, "the sweep job did not finish"
        time.sleep(0.5)
    done = _page()
    names = [t["name"] for t in _figure(done)["data"]]
    assert len(names) == 13 and names[-1] == "dense" and len(list_runs(root)) == 1


def test_the_work_estimate_counts_only_the_models_evaluated(demo_loaded):
    from studio.costs import plan_cost
    from studio.plan import PrunePlan
    from studio.ui.background import INLINE_MACS
    from studio.ui.sensitivity import sweep_macs

    base = demo_loaded.base
    forward = plan_cost(PrunePlan.dense(base))["macs"]
    heads = SensitivitySpec(fractions=(0.25, 0.5, 0.75))  # 25 % of 3 heads removes none: not evaluated
    assert sweep_macs(base, heads, 100) == forward * 100 * (1 + 12 * 2)
    mlp = heads.with_(scope="mlp")
    assert sweep_macs(base, mlp, 100) == forward * 100 * (1 + 12 * 3)
    assert sweep_macs(base, mlp.with_(criterion="taylor"), 100) > sweep_macs(base, mlp, 100)
    assert sweep_macs(base, mlp, 270) < INLINE_MACS  # the demo's whole test split runs inline
