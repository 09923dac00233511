"""The model card and the export zip (issue #16, polish): the unpruned "before", the user's own budget instead of
a solver's internal ratios, a reproduce command over the whole lineage relative to the runs folder, ONNX in
the zip."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from studio.modelcard import (
    dense_cost,
    export_zip,
    lineage,
    lineage_command,
    lineage_specs,
    model_card,
    user_params,
)


@pytest.fixture
def iso_plan(demo_loaded):
    """A magnitude plan dressed as an Isomorphic one whose bisection rescaled the user's ratios."""
    from studio.costs import with_summary
    from studio.prune import PruneRequest, make_plan

    plan = with_summary(make_plan("magnitude", PruneRequest(demo_loaded, {"target_macs": 0.5}, [], 0)))
    internal = {
        "target_macs": 0.5,
        "ratio": 0.4992187,
        "head_ratio": 0.2496094,
        "scale": 0.998437,
        "base_ratios": {"ratio": 0.5, "head_ratio": 0.25},
        "solved": {"target": 0.5, "macs_fraction": 0.5004},
        "edits": ["block 3 head 1 keep"],
    }
    return plan.with_(method="isomorphic", params=internal)


def _write_run(root: Path, name: str, spec: dict) -> Path:
    run = root / name
    (run / "export").mkdir(parents=True)
    (run / "spec.json").write_text(json.dumps(spec))
    return run


def _lineage(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = tmp_path / "runs"
    prune = _write_run(
        root,
        "20260101-prune",
        {
            "kind": "prune",
            "model": {"source": "demo"},
            "method": "isomorphic",
            "params": {"target_macs": 0.5, "ratio": 0.5, "head_ratio": 0.25},
        },
    )
    retrain = _write_run(
        root,
        "20260101-prune-retrain",
        {
            "kind": "retrain",
            "model": {"source": str(prune / "export")},
            "teacher": {"source": "demo"},
            "overrides": {"epochs": 5},
        },
    )
    return root, prune, retrain


def test_lineage_follows_exports_back_and_replays_relative_to_the_runs_folder(tmp_path):
    root, prune, retrain = _lineage(tmp_path)
    assert lineage(retrain) == [prune.resolve(), retrain.resolve()]
    assert lineage(prune) == [prune.resolve()]
    steps = lineage_specs(lineage(retrain), root=root)
    (n1, s1, out1), (n2, s2, out2) = steps
    assert (n1, out1) == ("lineage/1-20260101-prune.json", "runs/20260101-prune-replay")
    assert (n2, out2) == ("lineage/2-20260101-prune-retrain.json", "runs/20260101-prune-retrain-replay")
    # the retraining replays from the replayed prune, not from the original (absolute) folder
    assert s2["model"]["source"] == "runs/20260101-prune-replay/export"
    assert s2["teacher"]["source"] == "demo" and s1["model"]["source"] == "demo"
    assert json.loads((retrain / "spec.json").read_text())["model"]["source"] == str(prune / "export")
    command = lineage_command(steps)
    assert command.splitlines() == [
        "# 2 step(s): prune -> retrain",
        "python -m studio run --spec lineage/1-20260101-prune.json --out runs/20260101-prune-replay",
        "python -m studio run --spec lineage/2-20260101-prune-retrain.json --out runs/20260101-prune-retrain-replay",
    ]
    assert str(tmp_path) not in command  # nothing absolute


def test_card_shows_the_users_budget_and_the_unpruned_before(tmp_path, iso_plan):
    spec = {
        "kind": "prune",
        "method": "isomorphic",
        "params": {"target_macs": 0.5, "ratio": 0.5, "head_ratio": 0.25},
    }
    assert user_params(iso_plan, spec) == spec["params"]
    # without a spec: the plan's own params minus what the solver wrote
    assert user_params(iso_plan, None) == {"target_macs": 0.5, "ratio": 0.4992187, "head_ratio": 0.2496094}
    manifest = {
        "base": iso_plan.base.to_dict(),
        "plan": iso_plan.to_dict(),
        "data_config": {},
        "class_names": [],
    }
    after = {"params": 1000, "macs": 2000, "top1": 0.9}
    card = model_card(
        manifest,
        name="r",
        spec=spec,
        results={"kind": "retrain", "before": {"params": 1000, "macs": 2000, "top1": 0.5}, "after": after},
        command="python -m studio run --spec lineage/1-a.json --out runs/a-replay",
    )
    assert "head_ratio=0.25" in card and "0.2496" not in card and "ratio=0.5," in card
    assert "Hand edits** (1): block 3 head 1 keep" in card
    dense = dense_cost(iso_plan.base)
    params_row = next(line for line in card.splitlines() if line.startswith("| params |"))
    assert (
        params_row == f"| params | {dense['params']:,} | 1,000 |"
    )  # the unpruned base, not the retrain's start
    macs_row = next(line for line in card.splitlines() if line.startswith("| MACs"))
    assert f"{dense['macs']:,}" in macs_row
    top1_row = next(line for line in card.splitlines() if line.startswith("| test top-1 |"))
    assert (
        top1_row == "| test top-1 | – | 90.0% |"
    )  # the retrain's "before" (the pruned start) is not shown as unpruned
    assert "runs/a-replay" in card


def test_zip_carries_the_onnx_graph_when_the_export_has_one(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    for name, data in (("manifest.json", b"{}"), ("model.safetensors", b"w")):
        (export / name).write_bytes(data)
    with zipfile.ZipFile(io.BytesIO(export_zip(export, {"README.md": "card"}))) as z:
        assert set(z.namelist()) == {"manifest.json", "model.safetensors", "README.md"}
    (export / "model.onnx").write_bytes(b"graph")
    (export / "onnx.json").write_text('{"checked": true}')
    with zipfile.ZipFile(io.BytesIO(export_zip(export, {"lineage/1-a.json": "{}"}))) as z:
        names = set(z.namelist())
        assert {"model.onnx", "onnx.json", "lineage/1-a.json"} <= names
        assert z.read("model.onnx") == b"graph"
