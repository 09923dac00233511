"""The Importance page in Streamlit's AppTest on the demo: heat maps, the budget slider, plan edits, prune run."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
PAGE = "pages/4_importance.py"
PLAN_KEY = "studio_active_plan"


def _page(method: str = "savit") -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180).run()
    # small and fast: two criteria (one the ablation ground truth), one calibration batch
    at.session_state["imp_criteria"] = ["l2", "ablation"]
    at.session_state["imp_batches"] = 1
    at.session_state["imp_method"] = method
    at.switch_page(PAGE).run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    return at


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_heatmaps_slider_edits_and_run():
    at = _page()
    assert at.title[0].value == "Importance"
    assert len(at.get("plotly_chart")) == 3  # l2 heads, ablation heads, neuron bins
    corr = at.dataframe[0].value
    assert list(corr["criterion"]) == ["l2"] and -1 <= corr["spearman vs ablation"][0] <= 1
    assert any("protect step" in c.value for c in at.caption)  # the reference bug is stated

    # the budget slider changes the planned MACs (SAViT lands within 1e-3 of the budget)
    before = _metric(at, "Planned MACs")
    at.slider(key="imp_target").set_value(0.7).run()
    assert not at.exception, at.exception
    after = _metric(at, "Planned MACs")
    assert after != before
    delta = next(m for m in at.metric if m.label == "Planned MACs").delta
    assert delta in ("70.0%", "69.9%")

    # no plan yet: a click edit (fallback widgets) starts one from the method's plan and changes it
    assert PLAN_KEY not in at.session_state or at.session_state[PLAN_KEY] is None
    at.selectbox(key="imp_edit_block").set_value(11).run()
    at.selectbox(key="imp_edit_unit").set_value("neuron bin 0").run()
    at.button(key="imp_drop").click().run()
    assert not at.exception, at.exception
    plan = at.session_state[PLAN_KEY]
    assert plan is not None and plan.params["edits"] == ["block 11 24 MLP neurons drop"]
    macs_edited = _metric(at, "Active plan MACs")
    at.selectbox(key="imp_edit_unit").set_value("head 0").run()
    at.button(key="imp_drop").click().run()
    plan2 = at.session_state[PLAN_KEY]
    assert plan2.block(11).heads is not None and 0 not in plan2.block(11).heads
    assert _metric(at, "Active plan MACs") != macs_edited
    assert at.radio(key="imp_overlay").value == "active plan"
    at.button(key="imp_keep").click().run()
    assert at.session_state[PLAN_KEY].block(11).heads == plan.block(11).heads

    # prune with the edited plan: before/after accuracy and measured throughput
    at.button(key="imp_run").click().run()
    assert not at.exception, at.exception
    labels = [m.label for m in at.metric]
    assert "Accuracy (no recovery)" in labels and "Ideal speed-up (MACs)" in labels
    speed = at.dataframe[-1].value
    assert list(speed["batch size"]) == [1, 64] and (speed["pruned images/s"] > 0).all()


def test_use_method_plan_makes_it_active():
    at = _page("magnitude")
    at.button(key="imp_use_plan").click().run()
    assert not at.exception, at.exception
    plan = at.session_state[PLAN_KEY]
    assert plan.method == "magnitude"
    assert abs(plan.summary["macs_fraction"] / 0.5 - 1) <= 0.02
    assert _metric(at, "Active plan MACs") == _metric(at, "Planned MACs")


def test_real_size_scoring_runs_as_a_job_that_a_reload_finds(monkeypatch, tmp_path):
    import json
    import time

    import studio.ui.background as background
    from studio.analysis.importance import run_importance
    from studio.flows import read_spec
    from studio.jobs import job_status
    from studio.runs import list_runs

    root = tmp_path / "runs"
    monkeypatch.setenv("STUDIO_RUNS", str(root))
    monkeypatch.setattr(background, "INLINE_MACS", 0.0)  # every model is "real size": scoring goes to a job
    at = _page()
    assert not at.get("plotly_chart"), "no heat map before the scores exist"
    assert any("background job" in i.value and "measured forward speed" in i.value for i in at.info)
    at.button(key="imp_job").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    (run,) = list_runs(root)
    spec = read_spec(run)
    assert spec.kind == "importance" and spec.criteria == ("ablation", "l2") and spec.batches == 1

    # a reload while it runs (a new session) follows the same job: never a second one
    again = _page()
    assert len(list_runs(root)) == 1 and not again.exception
    deadline = time.time() + 300
    while job_status(run.path).state != "done":
        assert job_status(run.path).state in ("created", "starting", "running"), job_status(run.path)
        assert time.time() < deadline, "the scoring job did not finish"
        time.sleep(0.5)

    done = _page()
    assert len(done.get("plotly_chart")) == 3 and len(list_runs(root)) == 1
    # the job's scores are the inline computation's
    res = json.loads(run.results_file.read_text())
    assert res["kind"] == "importance" and res["plan"] is None
    inline = run_importance(spec).get("l2")
    assert res["importance"]["scores"]["l2"]["heads"] == [list(r) for r in inline.heads]


def test_the_scoring_estimate_counts_each_criterions_passes():
    from studio.load import load_model
    from studio.models import ModelSpec
    from studio.ui.importance import scoring_macs

    base = load_model(ModelSpec("demo", device="cpu")).base
    assert scoring_macs(base, ["l1", "l2"], 256) == 0  # magnitudes read the weights only
    one = scoring_macs(base, ["taylor"], 256)
    assert one > 0 and scoring_macs(base, ["taylor", "taylor2"], 256) == one  # one shared backward pass
    ablation = scoring_macs(base, ["ablation"], 256)
    assert scoring_macs(base, ["ablation"], 256, 32) == ablation / 8  # on 32 of the 256 images
    assert ablation > one  # half a forward per head beats one forward+backward on every image
