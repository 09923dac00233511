"""Compare's speed figures (issue 16): re-measured back to back, interleaved, with the machine load recorded;
stored figures from different load are flagged, never plotted as comparable without a word."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from studio.compare import back_to_back, load_range
from studio.data import DataSpec
from studio.errors import StudioError
from studio.flows import create_run, run_folder
from studio.flows.prune import PruneSpec
from studio.models import ModelSpec, create_vit

ROOT = Path(__file__).resolve().parent.parent
KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)


def test_back_to_back_interleaves_the_models_and_records_the_load(monkeypatch):
    import studio.compare as cmp

    order: list[int] = []
    real = cmp.measure_throughput

    def spy(model, *a, **k):
        order.append(id(model))
        return real(model, *a, **k)

    monkeypatch.setattr(cmp, "measure_throughput", spy)
    torch.manual_seed(0)
    a, b = create_vit("vit_tiny_patch16_224", **KW).eval(), create_vit("vit_tiny_patch16_224", **KW).eval()
    rows = back_to_back({"a": a, "b": b}, [3, 32, 32], 2, rounds=4, warmup=1)
    assert [r["model"] for r in rows] == ["a", "b"] and all(r["images_per_s"] > 0 for r in rows)
    assert all(r["rounds"] == 4 and r["load_before"] >= 0 and r["load_after"] >= 0 for r in rows)
    timed = order[2:]  # after one warm-up of each
    assert len(timed) == 8 and timed[:2] != timed[2:4]  # the order rotates round to round
    with pytest.raises(StudioError):
        back_to_back({}, [3, 32, 32], 1)


def test_load_range_needs_every_figure_to_record_its_load():
    rows = [
        {"throughput": {1: 10.0}, "throughput_detail": {1: {"load_avg": 0.5}}},
        {"throughput": {1: 12.0}, "throughput_detail": {1: {"load_avg": 3.0}}},
    ]
    assert load_range(rows, 1) == (0.5, 3.0)
    assert load_range([*rows, {"throughput": {1: 9.0}, "throughput_detail": {}}], 1) is None


def test_compare_page_remeasures_back_to_back(monkeypatch, tmp_path):
    monkeypatch.setenv("STUDIO_RUNS", str(tmp_path / "runs"))
    spec = PruneSpec(
        ModelSpec("demo", device="cpu"),
        "magnitude",
        {"target_macs": 0.5},
        DataSpec("demo", limit=64),
        bench_batch_sizes=(1,),
        bench_repeats=2,
    )
    run_folder(create_run(spec, tmp_path / "runs" / "20260101-000000-prune"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    at.switch_page("pages/10_compare.py").run()
    assert not at.exception
    next(w for w in at.number_input if w.key == "cmp_b2b_rounds").set_value(2).run()
    at.button(key="cmp_b2b").click().run()
    assert not at.exception
    tables = [d.value for d in at.dataframe if "load_before" in d.value.columns]
    assert tables and set(tables[0]["model"]) == {"dense", "20260101-000000-prune"}
    assert any("measured back to back now" in c.value for c in at.caption)


def test_compare_page_flags_figures_taken_under_other_load(monkeypatch, tmp_path):
    from studio.runs import RunDir, write_json

    monkeypatch.setenv("STUDIO_RUNS", str(tmp_path / "runs"))
    spec = PruneSpec(
        ModelSpec("demo", device="cpu"),
        "magnitude",
        {"target_macs": 0.5},
        DataSpec("demo", limit=64),
        bench_batch_sizes=(1,),
        bench_repeats=2,
    )
    run = create_run(spec, tmp_path / "runs" / "20260101-000000-prune")
    run_folder(run)
    res = RunDir(run.path).results()
    res["before"]["throughput"]["1"]["load_avg"] = 0.2  # dense measured on a quiet machine,
    res["after"]["throughput"]["1"]["load_avg"] = 4.0  # the pruned one under heavy load
    write_json(run.results_file, res)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    at.switch_page("pages/10_compare.py").run()
    assert any("not comparable" in w.value and "0.2 to 4.0" in w.value for w in at.warning)
