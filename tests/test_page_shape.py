"""The shape view (issue 16): a plan's kept widths per block, as pure frame/figure builders and on the Export page."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from studio.plan import BaseArch, BlockPlan, PrunePlan
from studio.ui.shape import shape_figure, shape_frame

ROOT = Path(__file__).resolve().parents[1]


def _values(v) -> list:
    """A plotly array as sent to the browser: a list, or plotly's typed-array encoding (base64 ``bdata``)."""
    if isinstance(v, dict):
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).tolist()
    return list(v)


@pytest.fixture
def plan() -> PrunePlan:
    """Block 0 dense, block 1 removed, block 2 keeps 2/4 heads, 8/16 head dims, 100/256 MLP; embed 40/64."""
    base = BaseArch(
        arch="vit_tiny_patch16_224",
        kwargs={},
        depth=3,
        embed_dim=64,
        num_heads=(4, 4, 4),
        head_dim=16,
        mlp_hidden=(256, 256, 256),
        num_classes=10,
    )
    blocks = (BlockPlan(0), BlockPlan(2, heads=(0, 3), head_dims=tuple(range(8)), mlp=tuple(range(100))))
    return PrunePlan(base, blocks, embed=tuple(range(40)), method="manual").validate()


def test_shape_frame_has_kept_and_base_widths_per_base_block(plan):
    df = shape_frame(plan)
    assert list(df["block"]) == [0, 1, 2]
    assert list(df["status"]) == ["dense", "removed", "pruned"]
    assert list(df["heads"]) == [4, 0, 2] and list(df["heads_base"]) == [4, 4, 4]
    assert list(df["head_dim"]) == [16, 0, 8] and list(df["head_dim_base"]) == [16, 16, 16]
    assert list(df["mlp"]) == [256, 0, 100] and list(df["mlp_base"]) == [256, 256, 256]


def test_shape_figure_traces_carry_exactly_the_kept_and_base_numbers(plan):
    fig = shape_figure(plan)
    traces = {t.meta: t for t in fig.data}
    assert set(traces) == {f"{n} {w}" for n in ("heads", "head_dim", "mlp") for w in ("base", "kept")}
    assert list(traces["heads kept"].x) == [4, 0, 2] and list(traces["heads base"].x) == [4, 4, 4]
    assert list(traces["head_dim kept"].x) == [16, 0, 8] and list(traces["head_dim base"].x) == [16, 16, 16]
    assert list(traces["mlp kept"].x) == [256, 0, 100] and list(traces["mlp base"].x) == [256, 256, 256]
    # every bar is one base block, the removed one labelled so; the text on the kept bars reads kept/base
    assert list(traces["mlp kept"].y) == ["block 0", "block 1 · removed", "block 2"]
    assert list(traces["mlp kept"].text) == ["256/256", "removed", "100/256"]
    assert list(traces["heads kept"].text) == ["4/4", "removed", "2/4"]
    # the removed block's base bar is hatched, the kept blocks' are not
    assert list(traces["heads base"].marker.pattern.shape) == ["", "x", ""]
    # hover: block, status and every kept/base pair, from customdata
    hover = traces["heads kept"].hovertemplate
    assert "heads: %{customdata[2]}/%{customdata[3]}" in hover and "MLP" in hover
    custom = [list(r) for r in traces["heads kept"].customdata]
    assert custom[1] == [1, "removed", 0, 4, 0, 16, 0, 256]
    assert custom[2] == [2, "pruned", 2, 4, 8, 16, 100, 256]
    assert "2/3 blocks, embedding 40/64 channels" in fig.layout.title.text
    assert sum(t.showlegend is not False for t in fig.data) == 2  # one "base", one "kept" legend entry


def test_a_dense_plan_keeps_every_width(plan):
    dense = PrunePlan.dense(plan.base)
    df = shape_frame(dense)
    assert set(df["status"]) == {"dense"}
    for name in ("heads", "head_dim", "mlp"):
        assert list(df[name]) == list(df[f"{name}_base"])
    assert "3/3 blocks, embedding 64/64" in shape_figure(dense).layout.title.text


@pytest.mark.slow
def test_export_page_draws_the_shape_of_the_exported_plan(tmp_path, monkeypatch):
    from studio.data import DataSpec
    from studio.flows import create_run, run_folder
    from studio.flows.prune import PruneSpec
    from studio.models import ModelSpec

    root = tmp_path / "runs"
    monkeypatch.setenv("STUDIO_RUNS", str(root))
    demo, data = ModelSpec("demo", device="cpu"), DataSpec("demo", limit=96)
    run = create_run(PruneSpec(demo, "magnitude", {"target_macs": 0.5}, data, bench=False), root / "p0")
    run_folder(run)
    plan = PrunePlan.load(run.plan_file)
    assert not plan.is_dense  # a real cut, so the chart has something to show

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    at.switch_page("pages/11_export.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.selectbox(key="export_run").value == str(run.path)
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    shape = next(c for c in charts if c["layout"]["title"]["text"].startswith("Shape:"))
    traces = {t["meta"]: t for t in shape["data"]}
    depth = plan.base.depth
    for name in ("heads", "head_dim", "mlp"):
        assert _values(traces[f"{name} kept"]["x"]) == [plan.kept(i)[name] for i in range(depth)]
    assert _values(traces["mlp base"]["x"]) == list(plan.base.mlp_hidden)
    assert _values(traces["heads base"]["x"]) == list(plan.base.num_heads)
    assert f"{plan.depth}/{depth} blocks" in shape["layout"]["title"]["text"]
    assert f"export_shape_{run.path.name}_csv" in [b.key for b in at.get("download_button")]
