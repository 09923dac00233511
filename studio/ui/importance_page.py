"""The Importance page's Streamlit glue: scores kept in the session's workspace, the click-to-edit callbacks
and the clickable heat map (the computing view-model is :mod:`studio.ui.importance`)."""

from __future__ import annotations

import json

import plotly.graph_objects as go
import streamlit as st

from ..analysis import importance as imp
from ..flows.importance import importance_of
from . import background, charts, state
from . import importance as vm
from .charts import COLORS


@st.cache_data(max_entries=16, show_spinner="Scoring heads and neurons…")
def _scores(spec_key: str, _spec: imp.ImportanceSpec, _loaded) -> dict:
    return imp.run_importance(_spec, loaded=_loaded).to_dict()


def scores(spec: imp.ImportanceSpec, loaded) -> imp.ImportanceResult | None:
    """The scores of ``spec``: from the session's workspace (a reload, a second tab, a restarted server), from
    a finished scoring job of the same spec, or computed inline when the work is small (the demo). Real-size
    scoring runs as a job (progress, cancel): this draws its start button or its panel and returns None until
    the job is done."""
    key = json.dumps(spec.to_dict(), sort_keys=True)
    name = f"importance:{key}"
    held = state.analysis(name)
    if held is not None:
        return imp.ImportanceResult.from_dict(held[0])
    done = background.finished(spec)
    if done is not None:
        result = importance_of(done).to_dict()
    else:
        images = spec.batches * spec.batch_size
        work = vm.scoring_macs(loaded.base, spec.criteria, images, spec.ablation_samples)
        if work > background.INLINE_MACS:
            minutes = work / _rate(json.dumps(spec.model.to_dict(), sort_keys=True), loaded) / 60
            took = "under a minute" if minutes < 1 else f"about {minutes:.0f} min"
            background.offer_job(
                spec,
                key="imp_job",
                label="Score in the background",
                why=f"Scoring {', '.join(spec.criteria)} on {images} images is about {work / 1e12:.1f} TMAC for "
                f"this model, {took} at this machine's measured forward speed: too long for the page, so it "
                "runs as a background job with progress and cancel. Fewer calibration batches or ablation "
                "images make it faster.",
                waiting="Scoring runs in the background; the heat maps appear when it is done.",
            )
            return None
        result = _scores(key, spec, loaded)
    state.keep_analysis(name, result)
    return imp.ImportanceResult.from_dict(result)


@st.cache_data(max_entries=8, ttl=600, show_spinner="Timing one forward pass…")
def _rate(spec_key: str, _loaded) -> float:
    return vm.macs_per_second(_loaded)


def set_plan(plan) -> None:
    state.set_active_plan(plan)
    st.session_state["imp_overlay"] = "active plan"


def use_or_ask(plan) -> None:
    """The method's plan becomes the active plan, or, when that would replace one, a confirmation is asked."""
    if state.active_plan() is None:
        set_plan(plan)
    else:
        st.session_state["imp_use_confirm"] = True


def replace_plan(plan) -> None:
    st.session_state.pop("imp_use_confirm", None)
    set_plan(plan)


def on_click(key: str, plan) -> None:  # a click on a head (the invisible cell markers) toggles it
    points = [p for p in st.session_state[key].selection.get("points", []) if p.get("curve_number") == 1]
    if points:
        with state.user_errors():
            set_plan(imp.toggle_head(plan, int(points[0]["y"]), int(points[0]["x"])))


def on_edit(plan, block: int, keep: bool, members) -> None:
    with state.user_errors():
        set_plan(imp.edit_unit(plan, block, st.session_state["imp_edit_unit"], keep, members))


def heatmap(z, title: str, x_title: str, removed, value: str) -> go.Figure:
    """Scores as a heat map, invisible markers on the cells (clickable: plotly heat maps emit no selection),
    and × on the units the overlay plan removes."""
    fig = go.Figure(go.Heatmap(z=z, colorscale="Blues", hoverinfo="skip", colorbar=dict(thickness=10)))
    xs, ys, vs = imp.cells(z)
    hover = charts.hover(f"block %{{y}} {x_title} %{{x}}", **{value: "%{customdata:.3g}"})
    clicks = dict(size=18, opacity=0)
    fig.add_trace(go.Scatter(x=xs, y=ys, customdata=vs, mode="markers", marker=clicks, hovertemplate=hover))
    xs, ys = imp.marked(removed)
    marker = dict(symbol="x", size=11, color=COLORS["pruned"])
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name="removed", hoverinfo="skip", marker=marker))
    fig.update_xaxes(range=[-0.5, len(z[0]) - 0.5], dtick=1)
    fig.update_yaxes(range=[len(z) - 0.5, -0.5], dtick=1)  # block 0 on top
    return charts.style(fig, title=title, x_title=x_title, y_title="block", height=420, legend=False)
