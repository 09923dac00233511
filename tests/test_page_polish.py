"""Issue #16's polish list, each item checked: chart toolbars clear of titles, every class in the legend, the demo's
own name, edits that a toggle back undoes, a keep slider that follows α, a speed-up above the ideal explained,
a plan diff grouped by change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")


def _ok(at: AppTest) -> None:
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]


def test_toolbar_strip_keeps_the_title_clear():
    from studio.ui.charts import MODEBAR_PX, style

    for legend in (True, False):
        fig = style(
            go.Figure(), title="A long title that runs across the whole chart", height=300, legend=legend
        )
        title_top_px = (1 - fig.layout.title.y) * 300  # the title hangs from here (yanchor top, container y)
        assert fig.layout.title.yanchor == "top" and fig.layout.title.yref == "container"
        assert title_top_px >= MODEBAR_PX  # below the toolbar's strip
        assert fig.layout.margin.t >= MODEBAR_PX + 34 + (30 if legend else 0)
        assert fig.layout.modebar.orientation == "h"


def test_embedding_legend_lists_every_class():
    from studio.analysis.separability import LayerEmbedding
    from studio.ui.sls import LEGEND_ROW_PX, panel

    class Feats:  # the two fields a panel reads, for 10 and for 30 classes
        def __init__(self, n_classes: int) -> None:
            self.labels = np.arange(3 * n_classes) % n_classes
            self.indices = np.arange(3 * n_classes)
            self.class_names = [str(i) for i in range(n_classes)]

    for n in (10, 30):
        feats = Feats(n)
        e = LayerEmbedding(11, "pca", np.random.default_rng(0).random((3 * n, 2)), 0.3, 0.0, True)
        fig = panel(e, feats, legend=True)
        assert {t.name for t in fig.data} == {str(i) for i in range(n)} and fig.layout.showlegend
        # the legend runs down the whole figure, which is tall enough for every entry
        assert fig.layout.legend.yref == "container" and fig.layout.legend.y == 1.0
        assert fig.layout.height >= LEGEND_ROW_PX * n + 20
        assert panel(e, feats, legend=False).layout.showlegend is False


def test_model_page_names_the_demo():
    at = AppTest.from_file(APP, default_timeout=180).run()
    _ok(at)
    assert at.subheader[0].value == "Digits ViT (built-in demo, fine-tuned)"
    assert "timm config vit_tiny_patch16_224" in at.caption[1].value


def test_a_toggle_back_is_not_a_second_edit():
    from studio.ui.importance import net_edits

    assert net_edits(["block 11 head 0 drop", "block 11 head 0 keep"]) == []
    assert net_edits(["block 11 head 0 drop", "block 2 head 1 drop", "block 11 head 0 keep"]) == [
        "block 2 head 1 drop"
    ]
    # a neuron bin's note names no bin: only an immediate toggle back cancels
    bins = ["block 3 24 MLP neurons drop", "block 3 24 MLP neurons keep"]
    assert net_edits(bins) == []
    apart = ["block 3 24 MLP neurons drop", "block 2 head 1 drop", "block 3 24 MLP neurons keep"]
    assert net_edits(apart) == apart
    assert net_edits(["block 1 head 2 drop", "block 1 head 2 drop"]) == ["block 1 head 2 drop"] * 2


def test_edits_metric_counts_a_toggle_back_as_none():
    at = AppTest.from_file(APP, default_timeout=240).run()
    at.session_state["imp_criteria"] = ["l2"]
    at.session_state["imp_batches"] = 1
    at.session_state["imp_method"] = "magnitude"
    at.switch_page("pages/4_importance.py").run()
    _ok(at)
    at.selectbox(key="imp_edit_block").set_value(5).run()
    at.selectbox(key="imp_edit_unit").set_value("head 2").run()
    at.button(key="imp_drop").click().run()
    _ok(at)
    edits = lambda: next(m.value for m in at.metric if m.label == "Edits")  # noqa: E731
    assert edits() == "1"
    at.button(key="imp_keep").click().run()
    _ok(at)
    assert edits() == "0"  # dropped and kept again: the plan is back where it was


@pytest.fixture
def sls_page(monkeypatch):
    """The Layer separability page on a small analysis set."""
    at = AppTest.from_file(APP, default_timeout=240).run()
    at.session_state["sls_samples"] = 100
    at.switch_page("pages/2_layer_separability.py").run()
    _ok(at)
    return at


def _suggested(at: AppTest) -> int:
    return int(
        next(m.value for m in at.markdown if "Suggested: keep" in m.value).split("keep ")[1].split()[0]
    )


def test_keep_slider_follows_alpha_until_moved_by_hand(sls_page):
    at = sls_page
    seen = set()
    for alpha in (0.1, 0.5, 0.9, 0.6):
        at.slider(key="sls_alpha").set_value(alpha).run()
        _ok(at)
        assert at.slider(key="sls_keep").value == _suggested(at), alpha
        seen.add(_suggested(at))
    assert len(seen) > 1  # α moved the suggestion, and the slider with it

    # a rerun cut short (keyboard repeat) once left the last suggestion and the slider apart: still follows
    at.session_state["sls_suggested"] = -1
    at.slider(key="sls_alpha").set_value(0.1).run()
    assert at.slider(key="sls_keep").value == _suggested(at)

    # moved by hand: α no longer moves it; "Use the suggested cut" hands it back to α
    at.slider(key="sls_keep").set_value(2).run()
    at.slider(key="sls_alpha").set_value(0.9).run()
    _ok(at)
    assert at.slider(key="sls_keep").value == 2 and _suggested(at) != 2
    at.button(key="sls_use_suggested").click().run()
    assert at.slider(key="sls_keep").value == _suggested(at)
    at.slider(key="sls_alpha").set_value(0.1).run()
    assert at.slider(key="sls_keep").value == _suggested(at)


def test_speedup_above_the_ideal_is_explained():
    from studio.ui.results import speedup_note

    res = {"ideal_speedup": 2.0, "speedup": {"1": 1.6, "64": 2.4}}
    note = speedup_note(res)
    assert note is not None and "×2.40 at batch 64" in note and "cache" in note and "×1.60" not in note
    assert speedup_note({"ideal_speedup": 2.0, "speedup": {"1": 2.05}}) is None  # within noise
    assert speedup_note({"ideal_speedup": 2.0, "speedup": {}}) is None


def test_plan_diff_groups_identical_block_lines():
    from studio.ui.results import group_diff

    lines = [
        "method: magnitude -> isomorphic",
        *[f"block {i}: mlp 384 -> 192" for i in (0, 1, 2, 3, 5, 6, 9)],
        "block 4: heads 3 -> 2",
        "block 7: mlp 384 -> 256",
        "block 8: heads 3 -> 2",
    ]
    assert group_diff(lines) == [
        "method: magnitude -> isomorphic",
        "blocks 0–3, 5–6, 9: mlp 384 -> 192",
        "blocks 4, 8: heads 3 -> 2",
        "block 7: mlp 384 -> 256",
    ]
    assert group_diff([]) == []


def test_importance_asks_before_a_method_plan_replaces_the_active_one():
    at = AppTest.from_file(APP, default_timeout=240).run()
    at.session_state["imp_criteria"] = ["l2"]
    at.session_state["imp_batches"] = 1
    at.session_state["imp_method"] = "magnitude"
    at.switch_page("pages/4_importance.py").run()
    _ok(at)
    at.button(key="imp_use_plan").click().run()  # no active plan yet: it simply becomes the active plan
    _ok(at)
    first = at.session_state["studio_active_plan"]
    assert first.method == "magnitude" and not at.warning
    assert at.button(key="imp_use_plan").disabled  # it is the active plan already

    at.slider(key="imp_target").set_value(0.7).run()
    at.button(key="imp_use_plan").click().run()
    _ok(at)
    assert at.session_state["studio_active_plan"].to_dict() == first.to_dict()  # not replaced silently
    assert any("This replaces the active plan (magnitude" in w.value for w in at.warning)
    at.button(key="imp_use_plan_no").click().run()
    assert at.session_state["studio_active_plan"].to_dict() == first.to_dict() and not at.warning

    at.button(key="imp_use_plan").click().run()
    at.button(key="imp_use_plan_yes").click().run()
    _ok(at)
    replaced = at.session_state["studio_active_plan"]
    assert replaced.to_dict() != first.to_dict() and abs(replaced.summary["macs_fraction"] / 0.7 - 1) <= 0.02
    assert not at.warning


def test_upload_limit_is_one_number_in_the_server_config_the_studio_and_the_readme():
    import re

    import tomllib

    from studio.safety import DEFAULT_MAX_UPLOAD_MB

    server = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())["server"]["maxUploadSize"]
    readme = re.search(r"STUDIO_MAX_UPLOAD_MB` \((\d+) MB\)", (ROOT / "README.md").read_text())
    assert readme is not None
    # Streamlit's box says "Limit <maxUploadSize> MB per file"; the picker's label says the studio's own limit
    assert server == DEFAULT_MAX_UPLOAD_MB == int(readme.group(1)) == 512
