"""The app shell in Streamlit's AppTest: the Model page on the demo, and sessions that never share plans."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")


def _app() -> AppTest:
    return AppTest.from_file(APP, default_timeout=180)


def _fmt(n: float) -> str:
    from studio.ui.charts import human

    return human(n)


def test_model_page_on_demo_shows_params_macs_accuracy(demo_loaded):
    from studio.bench import count_macs, count_params
    from studio.data import DataSpec
    from studio.summary import evaluate_split

    at = _app().run()
    assert not at.exception
    assert not at.error, [e.value for e in at.error]
    assert at.title[0].value == "Model & data"
    metrics = {m.label: m.value for m in at.metric}
    model = demo_loaded.model
    assert metrics["Parameters"] == _fmt(count_params(model))
    assert metrics["MACs / image"] == _fmt(count_macs(model, demo_loaded.data_config["input_size"])["total"])
    top1 = evaluate_split(demo_loaded, DataSpec("demo"))["top1"]
    assert metrics["Test accuracy"] == f"{100 * top1:.1f}%"
    assert metrics["Blocks"] == "12" and metrics["Width"] == "96"
    sidebar = " ".join(m.value for m in at.sidebar.markdown)
    assert (
        "demo" in sidebar
        and "Device" in sidebar
        and "No active plan" in " ".join(c.value for c in at.sidebar.caption)
    )
    # the per-block table: one row per block, 3 heads of 32 dims and 384 MLP neurons each
    table = at.dataframe[0].value
    assert len(table) == 12 and set(table["heads"]) == {3} and set(table["mlp"]) == {384}


def test_model_page_measures_throughput():
    at = _app().run()
    at.multiselect(key="model_speed_bs").set_value([1, 8])
    at.button(key="model_speed_run").click().run()
    assert not at.exception
    speed = at.dataframe[-1].value
    assert list(speed["batch_size"]) == [1, 8]
    assert (speed["images_per_s"] > 0).all()


def test_three_sessions_do_not_see_each_others_plans(demo_loaded):
    """Three sessions live side by side on one server process (shared caches), their steps interleaved.

    AppTest swaps a process-wide runtime in and out around each run, so its sessions cannot run in parallel
    threads; the real-browser test drives truly concurrent sessions on a running server.
    """
    from studio.bench import count_params

    targets = (0.4, 0.6, 0.8)
    sessions = [_app().run() for _ in targets]
    for at in sessions:
        at.switch_page("pages/6_prune.py").run()
    for at, target in zip(sessions, targets):
        at.slider(key="prune_target_macs").set_value(target)
        at.checkbox(key="prune_bench").uncheck()
        at.checkbox(key="prune_eval").uncheck()
    for at in sessions:
        at.button(key="prune_run").click().run()
        assert not at.exception and not at.error, [e.value for e in at.error]
    for at in sessions:
        at.button(key="prune_make_active").click().run()
        assert not at.exception
    fractions = []
    for at, target in zip(sessions, targets):
        plan = at.session_state["studio_active_plan"]
        fractions.append(plan.summary["macs_fraction"])
        assert plan.summary["macs_fraction"] == pytest.approx(target, rel=0.03)
        assert any("active plan" in s.value for s in at.success)
    assert len(set(fractions)) == 3
    # each session still sees its own plan after the others ran, and the cached model was never pruned in place
    for at, frac in zip(sessions, fractions):
        at.switch_page("pages/1_model.py").run()
        assert at.session_state["studio_active_plan"].summary["macs_fraction"] == frac
        assert {m.label: m.value for m in at.metric}["Parameters"] == _fmt(count_params(demo_loaded.model))
    fresh = _app().run()
    assert (
        "studio_active_plan" not in fresh.session_state or fresh.session_state["studio_active_plan"] is None
    )


def test_bad_checkpoint_path_is_a_message_and_keeps_the_selection(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_DATA_ROOTS", str(tmp_path))  # the project folder itself is not a data root
    at = _app().run()
    at.radio(key="pick_model_source").set_value("checkpoint").run()
    at.text_input(key="pick_ckpt_path").set_value(str(tmp_path / "no-such-file.pth"))
    at.button(key="pick_load").click().run()
    assert not at.exception
    assert any("does not exist" in e.value for e in at.error)
    assert at.session_state["studio_model_spec"].source == "demo"


def test_prune_benchmark_compare_export_pages(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_RUNS", str(tmp_path / "runs"))
    at = _app().run()
    at.switch_page("pages/6_prune.py").run()
    at.button(key="prune_run").click().run()
    at.button(key="prune_make_active").click().run()
    assert not at.exception and not at.error

    at.switch_page("pages/9_benchmark.py").run()
    assert len(at.multiselect(key="bench_models").value) == 2  # dense + the pruned run
    at.number_input(key="bench_repeats").set_value(3)
    at.number_input(key="bench_warmup").set_value(1)
    at.multiselect(key="bench_sizes").set_value([1, 8])
    at.multiselect(key="bench_backends").set_value(["eager", "onnxruntime"])
    at.button(key="bench_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    bench = at.dataframe[-1].value
    assert len(bench) == 8 and (bench["images_per_s"] > 0).all()
    assert set(bench["backend"]) == {"eager", "onnxruntime"}
    assert bench.groupby("model")["ideal_speedup"].first().max() == pytest.approx(2.0, rel=0.05)
    assert (bench["efficiency"] == bench["measured_speedup"] / bench["ideal_speedup"]).all()
    # the figures are a benchmark run's: a reload (a new session) shows them again instead of an empty page
    again = _app().run()
    again.switch_page("pages/9_benchmark.py").run()
    assert again.dataframe[-1].value.equals(bench)
    assert any("The last benchmark of this model" in c.value for c in again.caption)

    at.switch_page("pages/10_compare.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    table = at.dataframe[0].value
    assert list(table["stage"]) == ["pruned (before recovery)", "dense"]
    assert table["pareto_3d"].all()  # fewer MACs but lower accuracy: neither dominates the other

    at.switch_page("pages/11_export.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert {"Params", "MACs / image", "Test accuracy"} <= {m.label for m in at.metric}
    # which backends this export was checked and timed on: the eager reload, and the benchmark above
    checked = next(d.value for d in at.dataframe if "correctness" in d.value).set_index("backend")
    assert checked.loc["eager", "correctness"].startswith("reloads with the same logits")
    assert checked.loc["onnxruntime", "correctness"].startswith("not exported")
    assert "img/s" in checked.loc["eager", "timed"] and "img/s" in checked.loc["onnxruntime", "timed"]
    assert checked.loc["compile", "timed"].startswith("not timed")
    # the reproduce command covers the run's lineage (one prune step here), relative to the runs folder
    codes = [c.value.splitlines() for c in at.code]
    replay = next(c for c in codes if c[0].startswith("# 1 step(s): prune"))
    assert replay[1].startswith("python -m studio run --spec lineage/1-") and " --out runs/" in replay[1]
    at.button(key="export_active").click().run()
    assert not at.exception
    assert "export-magnitude" in at.selectbox(key="export_run").value  # the new export is selected
    assert any("python -m studio run --spec lineage/1-" in c for c in at.code.values)


def test_loading_an_exported_folder_replaces_the_selection_and_clears_the_plan(
    tmp_path, monkeypatch, demo_loaded
):
    from studio.models import ModelSpec
    from studio.plan import PrunePlan
    from studio.workflow import export_plan_run

    run = export_plan_run(demo_loaded, None, root=tmp_path, model_spec=ModelSpec("demo"))
    monkeypatch.setenv("STUDIO_DATA_ROOTS", str(tmp_path))
    at = _app().run()
    at.session_state["studio_active_plan"] = PrunePlan.dense(demo_loaded.base)
    at.radio(key="pick_model_source").set_value("export").run()
    at.text_input(key="pick_export_path").set_value(str(run.export_dir))
    at.button(key="pick_load").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.session_state["studio_model_spec"].source == str(run.export_dir.resolve())
    assert at.session_state["studio_active_plan"] is None
    assert any("Loaded vit_tiny_patch16_224" in s.value for s in at.success)
    assert {m.label: m.value for m in at.metric}["Parameters"] == "1.36M"


def test_prune_page_draws_every_registered_method():
    """Each method's options become widgets; methods that train are offered as background jobs instead."""
    from studio.prune import load_methods

    at = _app().run()
    at.switch_page("pages/6_prune.py").run()
    names = load_methods().names()
    assert {"magnitude", "random", "taylor"} <= set(names)
    for name in names:
        at.selectbox(key="prune_method").set_value(name).run()
        assert not at.exception and not at.error, (name, [e.value for e in at.error])
        trains = load_methods().get(name).trains
        buttons = {b.key for b in at.button}
        assert ("prune_job" in buttons) == trains and ("prune_run" in buttons) != trains, name


def test_the_navigation_lists_only_page_files_that_exist(tmp_path):
    """While pages are being written the app still runs: a missing page file is simply not in the navigation."""
    import shutil

    (tmp_path / "pages").mkdir()
    shutil.copy(ROOT / "app.py", tmp_path / "app.py")
    shutil.copy(ROOT / "pages" / "1_model.py", tmp_path / "pages" / "1_model.py")
    at = AppTest.from_file(str(tmp_path / "app.py"), default_timeout=180).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "Model & data"
    with pytest.raises(ValueError):
        at.switch_page("pages/6_prune.py")  # not registered: its file is absent here


def test_prune_page_measures_where_rounding_widths_pays_and_a_reload_shows_it(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_CACHE", str(tmp_path / "cache"))
    at = _app().run()
    at.switch_page("pages/6_prune.py").run()
    assert not any(m.value.startswith("On this device") for m in at.markdown)
    at.button(key="prune_widths_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    said = [m.value for m in at.markdown if m.value.startswith("On this device")]
    assert len(said) == 1 and "MLP widths" in said[0] and "head dims" in said[0]
    again = _app().run()  # a reload: the measurement is read back, not timed again
    again.switch_page("pages/6_prune.py").run()
    assert [m.value for m in again.markdown if m.value.startswith("On this device")] == said
    assert len(list((tmp_path / "cache" / "latency").glob("widths-*.json"))) == 1


def test_prune_page_prunes_to_a_latency_target_and_shows_target_predicted_and_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("STUDIO_CACHE", str(tmp_path / "cache"))
    at = _app().run()
    at.switch_page("pages/6_prune.py").run()
    at.radio(key="prune_budget_magnitude").set_value("Fraction of the measured latency to keep").run()
    assert at.selectbox(key="prune_lat_latency_backend").value == "eager"  # the latency's runtime is asked
    at.slider(key="prune_target_latency").set_value(0.7)
    at.number_input(key="prune_lat_latency_batch").set_value(32)  # at batch 1 the demo is overhead-bound
    at.checkbox(key="prune_eval").uncheck()
    at.checkbox(key="prune_bench").uncheck()
    at.button(key="prune_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    said = [m.value for m in [*at.success, *at.warning] if m.value.startswith("Latency target 70%")]
    assert len(said) == 1 and "predicted" in said[0] and "batch 32, eager, float32" in said[0]


def test_model_page_says_what_each_registered_method_can_prune():
    from studio.prune import load_methods

    at = _app().run()
    assert not at.exception
    units = next(d.value for d in at.dataframe if "method" in d.value.columns)
    assert list(units["method"]) == load_methods().names()  # a new method shows up here the moment it exists
    row = units.set_index("method")
    assert row.loc["sls", "blocks (depth)"] == "✓" and row.loc["sls", "heads"] == ""
    assert row.loc["savit", "heads"] == "✓" and row.loc["savit", "head dims"] == ""
    assert "ViT (class token)" in " ".join(c.value for c in at.caption)
