"""The Layer separability page in Streamlit's AppTest: curve, embeddings, a cut picked with the slider, prune."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
PAGE = "pages/2_layer_separability.py"


def _page() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180).run()
    at.switch_page(PAGE).run()
    return at


def _ok(at: AppTest) -> None:
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]


def test_page_embeds_layers_picks_a_cut_and_prunes():
    at = _page()
    _ok(at)
    assert at.title[0].value == "Layer separability"
    at.number_input(key="sls_samples").set_value(150)
    at.selectbox(key="sls_embed").set_value("pca").run()
    _ok(at)
    assert "Suggested: keep" in " ".join(m.value for m in at.markdown)
    charts_before = len(at.get("plotly_chart"))
    at.button(key="sls_embed_run").click().run()
    _ok(at)
    assert len(at.get("plotly_chart")) == charts_before + 12  # one panel per layer
    assert "pca silhouette" in " ".join(m.value for m in at.markdown)

    at.slider(key="sls_keep").set_value(4)
    at.selectbox(key="sls_retrain").set_value("none")
    at.checkbox(key="sls_bench").uncheck().run()
    _ok(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Blocks removed"] == "8"
    at.button(key="sls_run").click().run()
    _ok(at)
    table = next(d.value for d in at.dataframe if "stage" in d.value.columns)
    assert list(table["stage"]) == ["dense", "cut"] and list(table["blocks"]) == [12, 4]
    assert table["params"].iloc[1] < table["params"].iloc[0]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Dense test accuracy"].endswith("%") and metrics["After retraining"] == "–"

    at.selectbox(key="sls_retrain").set_value("paper").run()  # the 100-epoch preset runs as a background job
    _ok(at)
    assert "job" in at.button(key="sls_job").label

    at.button(key="sls_result_active").click().run()
    _ok(at)
    assert "4/12 blocks" in " ".join(m.value for m in at.sidebar.markdown)


def test_a_real_size_analysis_runs_as_a_job_whose_caches_the_page_then_reads(monkeypatch, tmp_path):
    import time

    import studio.ui.background as background
    from studio.flows import read_spec
    from studio.jobs import job_status
    from studio.runs import list_runs

    root = tmp_path / "runs"
    monkeypatch.setenv("STUDIO_RUNS", str(root))
    monkeypatch.setenv("STUDIO_CACHE", str(tmp_path / "cache"))  # nothing extracted yet
    monkeypatch.setattr(background, "INLINE_MACS", 0.0)  # every model is "real size"
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180).run()
    at.session_state["sls_samples"] = 60
    at.session_state["sls_embed"] = "pca"
    at.switch_page(PAGE).run()
    _ok(at)
    assert not at.get("plotly_chart") and any("background job" in i.value for i in at.info)
    at.button(key="sls_job").click().run()
    _ok(at)
    (run,) = list_runs(root)
    spec = read_spec(run)
    assert spec.kind == "separability" and spec.samples == 60 and spec.embed == "pca"
    deadline = time.time() + 300
    while job_status(run.path).state != "done":
        assert job_status(run.path).state in ("created", "starting", "running"), job_status(run.path)
        assert time.time() < deadline, "the separability job did not finish"
        time.sleep(0.5)
    res = run.results()["separability"]
    assert len(res["layers"]) == 12 and all(r["silhouette"] is not None for r in res["layers"])

    # a reload: the features come from the job's disk cache (no second job), the curve and the cut are there
    again = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180).run()
    again.session_state["sls_samples"] = 60
    again.session_state["sls_embed"] = "pca"
    again.switch_page(PAGE).run()
    _ok(again)
    assert len(list_runs(root)) == 1 and again.get("plotly_chart")
    assert f"Suggested: keep {res['keep']}" in " ".join(m.value for m in again.markdown)
