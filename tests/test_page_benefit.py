"""The Block benefit page in Streamlit's AppTest: curves of a finished tiny P3B run, the budget slider, empty state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
PAGE = "pages/3_block_benefit.py"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A real (tiny) P3B job in the runs root the page reads (conftest's STUDIO_RUNS)."""
    from studio.data import DataSpec
    from studio.demo import DEMO_DATA_CONFIG
    from studio.flows import run_folder
    from studio.flows.prune import PruneSpec
    from studio.models import LoadedModel, ModelSpec, create_vit
    from studio.prune import get_method
    from studio.runs import RunDir

    kw = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    torch.manual_seed(0)
    model = create_vit("vit_tiny_patch16_224", **kw).eval()
    loaded = LoadedModel.from_module(model, "vit_tiny_patch16_224", kw, data=DEMO_DATA_CONFIG)
    method = get_method("p3b")
    params = method.resolve({"prune_ratio": 0.5, "epochs": 4, "steps_per_update": 2, "probe": "mean"})
    spec = PruneSpec(
        model=ModelSpec("demo-backbone", num_classes=10, reset_head=True),
        method="p3b",
        params=params,
        data=DataSpec("demo", limit=160),
        batch_size=64,
        bench=False,
        export=False,
    )
    run = RunDir.create(tmp_path_factory.getbasetemp() / "runs" / "p3b-tiny", spec.to_dict())
    run_folder(run, spec=spec, loaded=loaded)
    return run.path


def _table(at: AppTest):
    """The keep-ratio table (the page's only dataframe; AppTest does not expose dataframe keys)."""
    assert len(at.dataframe) == 1
    return at.dataframe[0].value


def _kept_total(at: AppTest) -> float:
    table = _table(at)
    return float((table["keep ratio"] * table["params"]).sum())


def test_page_renders_the_curves_and_the_slider_changes_the_keep_ratios(finished_run):
    at = AppTest.from_file(APP, default_timeout=180).run()
    at.switch_page(PAGE).run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Block benefit"
    assert at.selectbox(key="bb_run").value == finished_run.name
    assert len(at.get("plotly_chart")) >= 5  # curves, heatmap, keep ratios, kept parameters, final structure
    assert any("mean-pool" in c.value for c in at.caption)  # the deviation from the paper is flagged
    table = _table(at)
    assert list(table["block"]) == ["attn0", "mlp0", "attn1", "mlp1"]
    before = table["keep ratio"].tolist()
    at.slider(key="bb_ratio").set_value(0.3).run()
    assert not at.exception, at.exception
    after = _table(at)["keep ratio"].tolist()
    assert after != before and sum(after) > sum(before)
    # the recomputed budget meets the asked ratio over all parameters (blocks + the rest)
    from studio.analysis.block_benefit import load_history

    hist = load_history(finished_run)
    total = sum(hist.block_params) + hist.non_block_params
    assert abs(_kept_total(at) + hist.non_block_params - 0.7 * total) < 1.0
    labels = {m.label for m in at.metric}
    assert {"Parameters after", "Test top-1", "Masked → sliced top-1"} <= labels


def test_analyze_benefit_cli_recomputes_keep_ratios(finished_run, capsys):
    import json

    from studio.cli import main

    argv = ["analyze", "benefit", "--run", str(finished_run), "--prune-ratio", "0.4", "--json", "--curves"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
    assert data["epoch"] == data["epochs_recorded"][-1] and len(data["keep_ratio"]) == 4
    assert abs(data["params_after"] - 0.6 * data["params_total"]) < 1.0
    assert len(data["curves"]["benefit_cls"]) == len(data["epochs_recorded"])
    assert main(["analyze", "benefit", "--run", str(finished_run), "--epoch", "99"]) == 2
    assert "Epoch 99 has no benefit record" in capsys.readouterr().err


def test_page_without_runs_offers_to_start_one(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_RUNS", str(tmp_path / "empty"))
    at = AppTest.from_file(str(ROOT / PAGE), default_timeout=180).run()
    assert not at.exception, at.exception
    assert any("No P3B run yet" in i.value for i in at.info)
    assert any("python -m studio run --spec" in c.value for c in at.caption)
    shown = at.json[0].value  # the spec the Start button submits, as its spec.json
    spec = __import__("json").loads(shown) if isinstance(shown, str) else shown
    assert spec["kind"] == "p3b" and spec["model"]["reset_head"] and spec["params"]["prune_ratio"] == 0.5
    assert not at.button(key="bb_new_start").disabled
