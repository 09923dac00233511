"""The Adapters page in Streamlit's AppTest: curves of a finished tiny SPLoRA run, the empty state, the job command."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
PAGE = "pages/5_adapters.py"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A real (tiny) SPLoRA vs fine-pruning run in the runs root the page reads (conftest's STUDIO_RUNS)."""
    from studio.data import DataSpec
    from studio.demo import DEMO_DATA_CONFIG
    from studio.flows import run_folder
    from studio.flows.prune import PruneSpec
    from studio.models import LoadedModel, ModelSpec, create_vit
    from studio.runs import RunDir

    kw = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    torch.manual_seed(0)
    model = create_vit("vit_tiny_patch16_224", **kw).eval()
    loaded = LoadedModel.from_module(model, "vit_tiny_patch16_224", kw, data=DEMO_DATA_CONFIG)
    params = {
        "compare": True,
        "rank": 2,
        "epochs": 1,
        "recovery_epochs": 0,
        "prune_step": 0.1,
        "target_density": 0.3,
        "score_batches": 1,
        "scope": "mlp,embed",
    }
    spec = PruneSpec(
        model=ModelSpec("demo-backbone", num_classes=10, reset_head=True),
        method="splora",
        params=params,
        data=DataSpec("demo", limit=96),
        batch_size=32,
        bench=False,
    )
    run = RunDir.create(tmp_path_factory.getbasetemp() / "runs" / "splora-tiny", spec.to_dict())
    run_folder(run, spec=spec, loaded=loaded)
    return run.path


def _page() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180).run()
    return at.switch_page(PAGE).run()


def test_page_renders_the_curves_of_a_finished_run(finished_run):
    at = _page()
    assert not at.exception, at.exception
    assert at.title[0].value == "Adapters"
    assert finished_run.name in at.multiselect(key="adapters_runs").value
    charts = at.get("plotly_chart")
    assert len(charts) >= 2  # accuracy vs density, learned parameters vs accuracy
    table = at.dataframe[0].value
    assert set(table["series"]) == {"SPLoRA", "fine-pruning"}
    assert set(table["unit density"].round(1)) == {0.7, 0.5, 0.3}
    labels = {m.label for m in at.metric}
    assert {"SPLoRA task file", "Fine-pruned model file", "Fused + pruned vs masked"} <= labels
    at.radio(key="adapters_x").set_value("weight density").run()
    assert not at.exception and len(at.get("plotly_chart")) >= 2


def test_page_without_runs_says_how_to_start(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_RUNS", str(tmp_path / "empty"))
    at = _page()
    assert not at.exception
    assert any("No SPLoRA run yet" in i.value for i in at.info)
    assert not at.get("plotly_chart")


def test_start_button_launches_the_splora_prune_command(tmp_path, monkeypatch):
    from studio import jobs

    monkeypatch.setenv("STUDIO_RUNS", str(tmp_path / "runs"))
    started: list[tuple[list[str], Path]] = []

    def fake_start(argv, run_dir, **kw):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        started.append((list(argv), Path(run_dir)))
        return jobs.job_status(run_dir)

    monkeypatch.setattr(jobs, "start_job", fake_start)
    at = _page()
    at.slider(key="adapters_target").set_value(0.5)
    at.selectbox(key="adapters_criterion").set_value("weight")
    at.button(key="adapters_start").click().run()
    assert not at.exception, at.exception
    assert len(started) == 1
    argv, run_dir = started[0]
    assert argv == ["run", str(run_dir)] and run_dir.parent == tmp_path / "runs"
    # the job is its spec: what the page chose is in spec.json, and it reads back as the same spec
    from studio.flows import read_spec

    spec = read_spec(run_dir)
    assert spec.kind == "splora" and spec.method == "splora"
    assert spec.params["target_density"] == 0.5 and spec.params["criterion"] == "weight"
    assert spec.params["compare"] is True and spec.model.source == "demo-backbone" and spec.model.reset_head
