"""A reload restores the work (issue #16, item 3): each page in one AppTest session, then a fresh session (a
reload, or a second tab) with the same ``?ws=`` finds its active plan with an edit, its computed analysis and
its form values again, read from the workspace on disk (``<runs>/.workspaces/<id>/``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from studio.workspace import WORKSPACES, new_id

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
PLAN_KEY = "studio_active_plan"


@pytest.fixture(autouse=True)
def _entrypoint_every_run(monkeypatch):
    """Run ``app.py`` on every AppTest run, as the server does.

    AppTest builds a fresh ``PagesManager`` per run, which sees the ``pages/`` folder and reruns the last page's
    file alone (the server's manager learns from ``st.navigation`` that the entrypoint routes, and runs it every
    time). The workspace is saved around each run by the entrypoint, so these tests need the server's behaviour.
    """
    from streamlit.runtime.pages_manager import PagesManager

    init = PagesManager.__init__

    def server_like(self, *args, **kwargs):
        init(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False  # what st.navigation sets in the server

    monkeypatch.setattr(PagesManager, "__init__", server_like)


def _session(ws: str | None, page: str | None = None, **preset) -> AppTest:
    """A new browser session (a reload) opening ``page`` with ``?ws=ws``; ``preset``: session values set first."""
    at = AppTest.from_file(APP, default_timeout=240)
    if ws is not None:
        at.query_params["ws"] = ws
    at.run()
    assert not at.exception, at.exception
    for key, value in preset.items():
        at.session_state[key] = value
    if page is not None:
        at.switch_page(page).run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    return at


def _state(ws: str) -> dict:
    return json.loads((Path(os.environ["STUDIO_RUNS"]) / WORKSPACES / ws / "state.json").read_text())


def _edited_plan(demo_loaded):
    """A magnitude plan at half the MACs with one head of block 11 kept back by hand (an edit)."""
    from studio.analysis import importance as imp
    from studio.costs import with_summary
    from studio.prune import PruneRequest, make_plan

    plan = with_summary(make_plan("magnitude", PruneRequest(demo_loaded, {"target_macs": 0.5}, [], 0)))
    dropped = next(h for h in range(3) if h not in (plan.block(11).heads or range(3)))
    return imp.edit_unit(plan, 11, f"head {dropped}", True)


def test_new_session_gets_a_workspace_id_in_the_url():
    at = _session(None)
    ws = at.query_params["ws"]
    assert isinstance(ws, str) and len(ws) == 16
    assert _state(ws)["model"]["source"] == "demo"
    # an id that is not a name (a path) is not used: the session gets a fresh one
    bad = _session("../../etc")
    assert bad.query_params["ws"] != "../../etc" and len(bad.query_params["ws"]) == 16


def test_model_page_restores_plan_form_value_and_measured_speed(demo_loaded):
    ws = new_id()
    plan = _edited_plan(demo_loaded)
    at = _session(ws, None, **{PLAN_KEY: plan})
    at.multiselect(key="model_speed_bs").set_value([1, 8])
    at.button(key="model_speed_run").click().run()
    assert not at.exception, at.exception
    measured = at.dataframe[-1].value
    assert list(measured["batch_size"]) == [1, 8]

    again = _session(ws)  # a reload: a new session, the same URL
    assert again.multiselect(key="model_speed_bs").value == [1, 8]
    restored = again.session_state[PLAN_KEY]
    assert restored.to_dict() == plan.to_dict() and restored.params["edits"] == plan.params["edits"]
    assert "Active plan" in " ".join(m.value for m in again.sidebar.markdown)
    table = again.dataframe[-1].value  # the measured speed is shown, not measured again
    assert list(table["batch_size"]) == [1, 8]
    assert list(table["images_per_s"]) == list(measured["images_per_s"])


def test_layer_separability_restores_embeddings_without_recomputing(monkeypatch):
    ws = new_id()
    at = _session(ws, "pages/2_layer_separability.py", sls_samples=60, sls_embed="pca")
    at.slider(key="sls_alpha").set_value(0.5).run()
    at.button(key="sls_embed_run").click().run()
    assert not at.exception, at.exception
    titles = [c.proto.spec for c in at.get("plotly_chart")]
    assert sum("SC " in t for t in titles) == 12  # all 12 layers embedded
    keep = at.slider(key="sls_keep").value

    # nothing may be computed again: the process caches are cleared and the embedding function refuses
    st.cache_data.clear()
    st.cache_resource.clear()  # a restarted server: the workspace on disk is all there is

    def refuse(*args, **kwargs):
        raise AssertionError("an embedding was recomputed instead of restored from the workspace")

    monkeypatch.setattr("studio.ui.sls.embed_layer", refuse)
    again = _session(ws, None)
    assert again.session_state["sls_samples"] == 60 and again.session_state["sls_embed"] == "pca"
    again.switch_page("pages/2_layer_separability.py").run()
    assert not again.exception, again.exception
    assert not again.error, [e.value for e in again.error]
    assert again.slider(key="sls_alpha").value == 0.5 and again.slider(key="sls_keep").value == keep
    restored = [c.proto.spec for c in again.get("plotly_chart")]
    assert sorted(t for t in restored if "SC " in t) == sorted(t for t in titles if "SC " in t)
    assert not [b for b in again.button if b.key == "sls_embed_run"]  # shown, not offered again


def test_importance_restores_scores_edited_plan_and_form_values(monkeypatch):
    ws = new_id()
    preset = dict(imp_criteria=["l2"], imp_batches=1, imp_method="magnitude")
    at = _session(ws, "pages/4_importance.py", **preset)
    at.slider(key="imp_target").set_value(0.6).run()
    at.selectbox(key="imp_edit_block").set_value(10).run()
    at.selectbox(key="imp_edit_unit").set_value("head 1").run()
    at.button(key="imp_drop").click().run()
    assert not at.exception, at.exception
    plan = at.session_state[PLAN_KEY]
    assert plan.params["edits"] == ["block 10 head 1 drop"]
    heat = next(c.proto.spec for c in at.get("plotly_chart"))

    st.cache_data.clear()
    st.cache_resource.clear()  # a restarted server: the workspace on disk is all there is

    def refuse(*args, **kwargs):
        raise AssertionError("the importance scores were recomputed instead of restored from the workspace")

    monkeypatch.setattr("studio.analysis.importance.compute_importance", refuse)
    again = _session(ws, "pages/4_importance.py")
    assert again.slider(key="imp_target").value == 0.6
    assert again.multiselect(key="imp_criteria").value == ["l2"]
    assert again.session_state[PLAN_KEY].to_dict() == plan.to_dict()
    assert again.radio(key="imp_overlay").value == "active plan"
    assert next(m.value for m in again.metric if m.label == "Edits") == "1"
    assert next(c.proto.spec for c in again.get("plotly_chart")) == heat


def test_prune_restores_method_budget_result_and_active_plan():
    ws = new_id()
    at = _session(ws, "pages/6_prune.py", prune_method="magnitude")
    at.slider(key="prune_target_macs").set_value(0.6)
    at.checkbox(key="prune_bench").uncheck()
    at.checkbox(key="prune_eval").uncheck()
    at.button(key="prune_run").click().run()
    assert not at.exception, at.exception
    at.button(key="prune_make_active").click().run()
    assert not at.exception, at.exception
    plan = at.session_state[PLAN_KEY]
    assert plan is not None and plan.method == "magnitude"
    run = at.session_state["prune_last"]["run"]
    assert _state(ws)["kept"]["prune_last"]["run"] == run

    again = _session(ws, "pages/6_prune.py")
    assert again.selectbox(key="prune_method").value == "magnitude"
    assert again.slider(key="prune_target_macs").value == 0.6
    assert again.checkbox(key="prune_bench").value is False
    assert again.session_state[PLAN_KEY].to_dict() == plan.to_dict()
    assert any(run in c.value for c in again.caption)  # the last result is shown again
    assert any("This is the active plan" in s.value for s in again.success)


def test_a_reset_by_the_page_is_not_undone_by_the_workspace():
    """A saved value the page itself removes (Clear plan) stays removed after a reload."""
    ws = new_id()
    at = _session(ws, None)
    from studio.load import load_model
    from studio.models import ModelSpec

    plan = _edited_plan(load_model(ModelSpec("demo", device="cpu")))
    at.session_state[PLAN_KEY] = plan
    at.run()
    assert _state(ws)["plan"] is not None
    at.sidebar.button(key="sidebar_clear_plan").click().run()
    assert not at.exception, at.exception
    assert _state(ws)["plan"] is None
    again = _session(ws)
    assert PLAN_KEY not in again.session_state or again.session_state[PLAN_KEY] is None
    assert "No active plan" in " ".join(c.value for c in again.sidebar.caption)


def test_form_values_are_kept_per_model():
    """A value saved for one model is not applied to another (a slider's bounds follow the model), and comes back
    with its model."""
    from studio.models import ModelSpec

    ws = new_id()
    at = _session(ws, "pages/6_prune.py", prune_method="magnitude")
    at.slider(key="prune_target_macs").set_value(0.6).run()
    # saved although the page ended in st.stop() (no result yet), under the demo model's values
    demo_forms = [v for k, v in _state(ws)["forms"].items() if '"source": "demo"' in k]
    assert demo_forms and demo_forms[0]["prune_target_macs"] == 0.6
    at.switch_page("pages/1_model.py")
    at.session_state["studio_model_spec"] = ModelSpec("demo-backbone")
    at.run()
    assert not at.exception, at.exception
    assert _state(ws)["model"]["source"] == "demo-backbone"

    again = _session(ws, "pages/6_prune.py")  # a reload: the backbone, and no value of the other model
    assert again.session_state["studio_model_spec"].source == "demo-backbone"
    assert again.slider(key="prune_target_macs").value == 0.5
    again.switch_page("pages/1_model.py")
    again.session_state["studio_model_spec"] = ModelSpec("demo")
    again.run()
    again.switch_page("pages/6_prune.py").run()
    assert not again.exception, again.exception
    assert again.slider(key="prune_target_macs").value == 0.6  # back with its model
