"""An SLS run (cut + retrain) ends in an exported model that reloads with identical logits, and the Export page
offers it; "Export the active plan" takes the retrained export of the run the plan came from, never the
un-retrained cut."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from studio.data import DataSpec, prepare
from studio.export import load_exported
from studio.flows import create_run, run_folder
from studio.flows.sls import SLSRunSpec
from studio.models import ModelSpec
from studio.plan import PrunePlan
from studio.runs import RunDir, list_runs
from studio.surgery import apply_plan

ROOT = Path(__file__).resolve().parents[1]
DATA = DataSpec("demo", limit=96)


@pytest.fixture(scope="module")
def sls_run(tmp_path_factory, demo_loaded) -> RunDir:
    """A finished SLS run on the demo: keep 4 of 12 blocks, retrain head + norm for 2 epochs."""
    spec = SLSRunSpec(
        model=ModelSpec("demo", device="cpu"), data=DATA, keep=4, retrain="cpu", epochs=2, bench=False
    )
    run = create_run(spec, tmp_path_factory.mktemp("sls") / "runs" / "sls-retrained")
    run_folder(run, loaded=demo_loaded)
    return run


def _batch(loaded) -> torch.Tensor:
    ds = prepare(
        DATA, "test", loaded.data_config, loaded.base.num_classes, class_names=loaded.known_class_names
    )
    return torch.stack([ds[i][0] for i in range(16)])


def test_the_retrained_cut_exports_and_reloads_with_identical_logits(sls_run, demo_loaded):
    res = sls_run.results()
    assert res["kind"] == "sls" and res["export"] == str(sls_run.export_dir)
    assert res["sls"]["retrain"]["epochs_run"] == 2
    again = load_exported(sls_run.export_dir, device="cpu")
    assert len(again.model.blocks) == 4 and again.plan is not None and again.plan.depth == 4

    # the retrained weights the run selected (its training checkpoint), on the cut structure
    plan = PrunePlan.load(sls_run.plan_file)
    trained = apply_plan(copy.deepcopy(demo_loaded.model), plan).eval()
    ckpt = torch.load(sls_run.checkpoint_file, map_location="cpu", weights_only=True)
    trained.load_state_dict(ckpt["best_weights"] or ckpt["model"])
    cut = apply_plan(copy.deepcopy(demo_loaded.model), plan).eval()

    x = _batch(demo_loaded)
    with torch.inference_mode():
        exported, retrained, untrained = again.model.eval()(x), trained(x), cut(x)
    assert torch.equal(exported, retrained)  # export -> reload is the retrained model, bit for bit
    assert not torch.allclose(exported, untrained)  # ... and not the cut before retraining
    assert again.metrics["top1"] == res["after"]["top1"] == res["sls"]["stages"]["retrained"]["test_top1"]


def test_export_page_offers_the_sls_run_and_exports_its_retrained_model_for_the_active_plan(
    sls_run, monkeypatch
):
    root = sls_run.path.parent
    monkeypatch.setenv("STUDIO_RUNS", str(root))
    plan = PrunePlan.load(sls_run.plan_file)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
    # what the SLS page's "Make active" leaves: the run's plan, with the run as its source
    at.session_state["studio_active_plan"] = plan
    at.session_state["studio_active_plan_source"] = (plan, str(sls_run.path))
    at.run()
    at.switch_page("pages/11_export.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.selectbox(key="export_run").value == str(sls_run.path)  # offered, the only export
    codes = " ".join(c.value for c in at.code)
    # the reproduce command replays the run's lineage, relative to the folder that holds the runs folder
    assert (
        f"python -m studio run --spec lineage/1-sls-retrained.json --out {root.name}/sls-retrained-replay"
        in codes
    )
    assert any("its trained weights are exported" in m.value for m in at.markdown)

    at.button(key="export_active").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.selectbox(key="export_run").value == str(sls_run.path)
    assert [r.path.name for r in list_runs(root)] == ["sls-retrained"]  # no export of the un-retrained cut

    # a hand edit makes it another plan: exporting it is then a new export of the current model
    edited = PrunePlan.from_dict({**plan.to_dict(), "params": {**plan.params, "edits": ["keep head 0.0"]}})
    at.session_state["studio_active_plan"] = edited
    at.run()
    at.button(key="export_active").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "export-sls" in at.selectbox(key="export_run").value


def test_convpass_retraining_trains_exactly_the_adapters_and_head_and_reloads(tmp_path, demo_loaded):
    """``--trainable convpass``: fresh Convpass bypasses on the kept blocks, trained with the head (the paper's
    "adapter or head" rule); the export records the adapter and reloads to the same logits, pickle-free."""
    spec = SLSRunSpec(
        model=ModelSpec("demo", device="cpu"),
        data=DATA,
        keep=3,
        retrain="cpu",
        epochs=1,
        trainable="convpass",
        bench=False,
    )
    run = create_run(spec, tmp_path / "runs" / "sls-convpass")
    run_folder(run, loaded=demo_loaded)
    res = run.results()
    assert res["sls"]["retrain"]["trainable"] == "convpass"
    again = load_exported(run.export_dir, device="cpu")
    assert again.meta["adapter"]["kind"] == "convpass" and len(again.model.blocks) == 3
    dense = demo_loaded.model.state_dict()
    changed = {
        k for k, v in again.model.state_dict().items() if k not in dense or not torch.equal(v, dense[k])
    }
    assert any(".adapter_attn." in k for k in changed) and "head.weight" in changed
    assert all(".adapter_" in k or k.startswith(("head.", "fc_norm.")) for k in changed), sorted(changed)[:5]
    x = _batch(demo_loaded)
    ckpt = torch.load(run.checkpoint_file, map_location="cpu", weights_only=True)
    from studio.petl import ConvpassSpec, add_convpass

    trained = apply_plan(copy.deepcopy(demo_loaded.model), PrunePlan.load(run.plan_file))
    add_convpass(trained, ConvpassSpec())
    trained.load_state_dict(ckpt["best_weights"] or ckpt["model"])
    with torch.inference_mode():
        assert torch.equal(again.model.eval()(x), trained.eval()(x))
