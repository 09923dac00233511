"""Shared plotly helpers so every page looks alike: one palette, one layout, hover templates, CSV downloads.

Stable API (pages import these):

- :data:`COLORS` — semantic colours (``dense``, ``pruned``, ``recovered``, ``attention``, ``mlp``, ``embed``,
  ``conv``, ``kept``, ``removed``, ``accent``, ``muted``); :func:`color_for` — a fixed colour per method/run name.
- :func:`style` — the studio's layout on any figure; :func:`hover` — a hover template from labelled fields.
- :func:`show` — render a figure with a "download data (CSV)" button for the frame it was drawn from;
  :func:`download_csv` — the button alone.
- :func:`bar`, :func:`line`, :func:`scatter` — thin plotly-express wrappers that apply the above.
- :func:`human`, :func:`pct` — number formatting shared by tables, metrics and hovers.

The palette is Okabe & Ito's colour-blind-safe set (Okabe, Ito 2008, "Color Universal Design").
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

PALETTE: tuple[str, ...] = (
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#D55E00",  # vermillion
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#4D4D4D",  # dark grey
)

COLORS: Mapping[str, str] = {
    "dense": "#4D4D4D",
    "pruned": "#D55E00",
    "recovered": "#009E73",
    "attention": "#0072B2",
    "mlp": "#E69F00",
    "embed": "#56B4E9",
    "linear": "#E69F00",
    "conv": "#CC79A7",
    "kept": "#0072B2",
    "removed": "#D9D9D9",
    "accent": "#CC79A7",
    "muted": "#9E9E9E",
}

# Methods keep one colour on every page; unknown names get a stable colour from their hash.
_METHOD_COLORS: Mapping[str, str] = {
    "dense": COLORS["dense"],
    "sls": "#0072B2",
    "p3b": "#009E73",
    "savit": "#CC79A7",
    "isomorphic": "#E69F00",
    "spa": "#56B4E9",
    "splora": "#56B4E9",
    "random": "#9E9E9E",
    "magnitude": "#D55E00",
    "taylor": "#F0E442",
}

FONT = "Source Sans Pro, sans-serif"


def color_for(name: str) -> str:
    """The colour of a method (or any name): fixed for known methods, stable-by-hash otherwise."""
    key = str(name).lower()
    if key in _METHOD_COLORS:
        return _METHOD_COLORS[key]
    digest = int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16)
    return PALETTE[digest % len(PALETTE)]


def color_map(names: Sequence[str]) -> dict[str, str]:
    """``{name: colour}`` for plotly-express ``color_discrete_map``."""
    return {n: color_for(n) for n in names}


MODEBAR_PX = 24  # the height of plotly's toolbar strip, kept free above a chart's title


def style(
    fig: go.Figure,
    *,
    title: str | None = None,
    height: int = 360,
    x_title: str | None = None,
    y_title: str | None = None,
    legend: bool = True,
) -> go.Figure:
    """Apply the studio's layout: white background, light grid, compact margins, horizontal legend on top."""
    # the top margin in strips: plotly's toolbar (it appears at the top right on hover), then the title, then the
    # legend, so neither the toolbar nor a long legend ever covers the title
    top = MODEBAR_PX + (34 if title else 0) + (30 if legend else 0) + 10
    fig.update_layout(
        title=dict(
            text=title,
            x=0,
            xanchor="left",
            y=1 - (MODEBAR_PX + 4) / height,
            yanchor="top",
            yref="container",
            font=dict(size=15),
        )
        if title
        else None,
        height=height,
        margin=dict(l=10, r=10, t=top, b=10),
        font=dict(family=FONT, size=13),
        plot_bgcolor="white",
        paper_bgcolor="white",
        colorway=list(PALETTE),
        showlegend=legend,
        legend=dict(orientation="h", yanchor="bottom", y=1.01, xanchor="left", x=0, title=None),
        hoverlabel=dict(font=dict(family=FONT, size=12)),
        modebar=dict(orientation="h", bgcolor="rgba(255,255,255,0.7)"),
    )
    fig.update_xaxes(showgrid=False, zeroline=False, linecolor="#BDBDBD", title=x_title)
    fig.update_yaxes(gridcolor="#EEEEEE", zeroline=False, linecolor="#BDBDBD", title=y_title)
    return fig


def legend_under_title(fig: go.Figure, height: int) -> go.Figure:
    """Move the legend up to just below the title, for figures with subplot titles (they sit where
    :func:`style` puts the legend)."""
    y = 1 - (MODEBAR_PX + 34) / height  # in container pixels: below the toolbar strip and the title
    fig.update_layout(
        legend=dict(yref="container", y=y, yanchor="top"), margin=dict(t=fig.layout.margin.t + 22)
    )
    return fig


def hover(title: str = "%{x}", **fields: str) -> str:
    """A hover template: a bold title line, then one ``label: value`` line per field.

    Example: ``hover("block %{x}", accuracy="%{y:.1%}", params="%{customdata[0]:,}")``. Underscores in labels
    become spaces. The trailing ``<extra></extra>`` hides plotly's trace-name box.
    """
    lines = [f"<b>{title}</b>"] + [f"{k.replace('_', ' ')}: {v}" for k, v in fields.items()]
    return "<br>".join(lines) + "<extra></extra>"


def download_csv(data: pd.DataFrame, name: str, *, key: str, label: str = "Download data (CSV)") -> None:
    """A download button with ``data`` as CSV (``name`` without extension)."""
    st.download_button(
        label,
        data=data.to_csv(index=False).encode("utf-8"),
        file_name=f"{name}.csv",
        mime="text/csv",
        key=key,
        icon=":material/download:",
        type="tertiary",
    )


def show(fig: go.Figure, data: pd.DataFrame | None = None, *, key: str, name: str | None = None) -> None:
    """Render ``fig`` full width; with ``data``, add a CSV download of it (the numbers behind the chart)."""
    st.plotly_chart(fig, key=f"{key}_chart", config={"displaylogo": False})
    if data is not None and len(data):
        download_csv(data, name or key, key=f"{key}_csv")


def _express(
    fn: Any, data: pd.DataFrame, *, color: str | None, colors: Mapping[str, str] | None, **kw: Any
) -> go.Figure:
    if color is not None and colors is None:
        colors = color_map([str(v) for v in data[color].unique()])
    return fn(data, color=color, color_discrete_map=dict(colors or {}), **kw)


def bar(
    data: pd.DataFrame,
    x: str,
    y: str | Sequence[str],
    *,
    color: str | None = None,
    colors: Mapping[str, str] | None = None,
    title: str | None = None,
    x_title: str | None = None,
    y_title: str | None = None,
    height: int = 360,
    barmode: str = "group",
    hovertemplate: str | None = None,
    legend: bool = True,
    **kw: Any,
) -> go.Figure:
    """A styled ``px.bar``; ``colors`` maps colour values (or wide-form column names) to colours."""
    fig = _express(px.bar, data, x=x, y=y, color=color, colors=colors, barmode=barmode, **kw)
    if color is None and isinstance(y, str):
        fig.update_traces(marker_color=(colors or {}).get(y, PALETTE[0]))
    if hovertemplate:
        fig.update_traces(hovertemplate=hovertemplate)
    return style(fig, title=title, x_title=x_title, y_title=y_title, height=height, legend=legend)


def line(
    data: pd.DataFrame,
    x: str,
    y: str | Sequence[str],
    *,
    color: str | None = None,
    colors: Mapping[str, str] | None = None,
    title: str | None = None,
    x_title: str | None = None,
    y_title: str | None = None,
    height: int = 360,
    markers: bool = True,
    hovertemplate: str | None = None,
    legend: bool = True,
    **kw: Any,
) -> go.Figure:
    """A styled ``px.line`` (with markers by default)."""
    fig = _express(px.line, data, x=x, y=y, color=color, colors=colors, markers=markers, **kw)
    if hovertemplate:
        fig.update_traces(hovertemplate=hovertemplate)
    return style(fig, title=title, x_title=x_title, y_title=y_title, height=height, legend=legend)


def scatter(
    data: pd.DataFrame,
    x: str,
    y: str,
    *,
    color: str | None = None,
    colors: Mapping[str, str] | None = None,
    title: str | None = None,
    x_title: str | None = None,
    y_title: str | None = None,
    height: int = 420,
    hovertemplate: str | None = None,
    legend: bool = True,
    **kw: Any,
) -> go.Figure:
    """A styled ``px.scatter`` with larger markers and a white outline."""
    fig = _express(px.scatter, data, x=x, y=y, color=color, colors=colors, **kw)
    fig.update_traces(marker=dict(size=11, line=dict(width=1, color="white")))
    if hovertemplate:
        fig.update_traces(hovertemplate=hovertemplate)
    return style(fig, title=title, x_title=x_title, y_title=y_title, height=height, legend=legend)


def human(n: float | int | None, unit: str = "", *, digits: int = 3) -> str:
    """``1_360_000 -> '1.36M'`` (k, M, G, T); ``None -> '–'``."""
    if n is None:
        return "–"
    v = float(n)
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.{digits}g}{suffix}{unit}"
    return f"{v:.{digits}g}{unit}"


def pct(x: float | None, *, digits: int = 1) -> str:
    """``0.956 -> '95.6%'``; ``None -> '–'``."""
    return "–" if x is None else f"{100 * float(x):.{digits}f}%"


def plan_blocks(table: pd.DataFrame, *, title: str | None = "What the plan keeps, per block") -> go.Figure:
    """Kept fraction of attention width and MLP neurons per block, from :func:`studio.compare.plan_table` rows.

    Removed blocks show as empty columns; the hover gives kept/base counts and heads.
    """
    df = table.copy()
    df["attention"] = df["attn_width"] / df["attn_width_base"]
    df["mlp_frac"] = df["mlp"] / df["mlp_base"]
    fig = go.Figure()
    fig.add_bar(
        x=df["block"],
        y=df["attention"],
        name="attention (heads × head dim)",
        marker_color=COLORS["attention"],
        customdata=df[["attn_width", "attn_width_base", "heads", "heads_base"]].to_numpy(),
        hovertemplate=hover(
            "block %{x} · attention",
            kept="%{customdata[0]}/%{customdata[1]} channels",
            heads="%{customdata[2]}/%{customdata[3]}",
        ),
    )
    fig.add_bar(
        x=df["block"],
        y=df["mlp_frac"],
        name="MLP neurons",
        marker_color=COLORS["mlp"],
        customdata=df[["mlp", "mlp_base"]].to_numpy(),
        hovertemplate=hover("block %{x} · MLP", kept="%{customdata[0]}/%{customdata[1]} neurons"),
    )
    fig.update_layout(barmode="group")
    fig.update_yaxes(tickformat=".0%", range=[0, 1.05])
    fig.update_xaxes(dtick=1)
    return style(fig, title=title, x_title="block", y_title="kept", height=300)


_STAGE_SYMBOLS = {"dense": "star", "pruned (before recovery)": "circle-open", "recovered": "circle"}


def pareto(
    data: pd.DataFrame,
    x: str,
    y: str,
    *,
    front: Sequence[bool],
    links: Sequence[tuple[int, int]] = (),
    title: str | None = None,
    x_title: str | None = None,
    y_title: str | None = None,
    log_x: bool = False,
) -> go.Figure:
    """Runs as points (colour = method, symbol = stage), the Pareto front as a line through its points, and an
    arrow from each pruned model's estimate before recovery to its measured result after recovery.

    ``data`` needs columns ``run``, ``method``, ``stage``, ``top1``, ``params``, ``macs`` besides ``x``/``y``;
    ``links`` are (row position from, row position to) pairs.
    """
    fig = go.Figure()
    df = data.reset_index(drop=True)
    for (method, stage), part in df.groupby(["method", "stage"], sort=False):
        fig.add_scatter(
            x=part[x],
            y=part[y],
            mode="markers",
            name=f"{method} · {stage}",
            marker=dict(
                color=color_for(method),
                symbol=_STAGE_SYMBOLS.get(stage, "circle"),
                size=16 if stage == "dense" else 12,
                line=dict(width=2, color=color_for(method)),
            ),
            customdata=part[["run", "stage", "params", "macs"]].to_numpy(),
            hovertemplate=hover(
                "%{customdata[0]}",
                stage="%{customdata[1]}",
                accuracy="%{y:.1%}" if y == "top1" else "%{y:.4g}",
                **{x_title or x: "%{x:.4g}"},
                params="%{customdata[2]:,}",
                MACs="%{customdata[3]:,}",
            ),
        )
    on = df[pd.Series(list(front), index=df.index, dtype=bool)].sort_values(x)
    if len(on) > 1:
        fig.add_scatter(
            x=on[x],
            y=on[y],
            mode="lines",
            name="Pareto front",
            line=dict(color=COLORS["muted"], dash="dot"),
            hoverinfo="skip",
        )
    for a, b in links:
        fig.add_annotation(
            x=df.loc[b, x],
            y=df.loc[b, y],
            ax=df.loc[a, x],
            ay=df.loc[a, y],
            xref="x",
            yref="y",
            axref="x",
            ayref="y",
            showarrow=True,
            arrowhead=3,
            arrowwidth=1.5,
            arrowcolor=COLORS["recovered"],
            standoff=7,
            startstandoff=7,
        )
    if log_x:
        fig.update_xaxes(type="log")
    if y == "top1":
        fig.update_yaxes(tickformat=".1%")
    return style(fig, title=title, x_title=x_title or x, y_title=y_title or y, height=460)
