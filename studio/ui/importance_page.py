"""The Importance page's Streamlit glue: scores kept in the session's workspace, the click-to-edit callbacks
and the clickable heat map (the computing view-model is :mod:`studio.ui.importance`)."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from ..analysis import importance as imp
from . import charts, state
from .charts import COLORS


@st.cache_data(max_entries=16, show_spinner="Scoring heads and neurons…")
def _scores(mkey: str, dkey: str, criteria: tuple, n: int, _loaded, _data) -> dict:
    batches = imp.calibration(_loaded, _data, "train", n, 64)
    return imp.compute_importance(_loaded, batches, criteria).to_dict()


def scores(mkey: str, dkey: str, criteria: tuple, n: int, loaded, data) -> dict:
    """The importance result, from the session's workspace when it was computed there (a reload, a second tab,
    a restarted server), else computed (and cached in the process) and kept in the workspace."""
    name = f"importance:{mkey}:{dkey}:{','.join(criteria)}:{n}"
    held = state.analysis(name)
    if held is not None:
        return held[0]
    result = _scores(mkey, dkey, criteria, n, loaded, data)
    state.keep_analysis(name, result)
    return result


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
