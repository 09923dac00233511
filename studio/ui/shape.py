"""The shape view of a pruned model (issue 16): per block, heads, head dims and MLP width kept against the base.

Netron draws a graph's layers, this draws a plan's widths: one horizontal bar panel per quantity, the base width
as a faint outlined bar with the kept width as a solid bar over it, and removed blocks marked. The frame and
figure builders are pure (they only read the plan); :func:`show_shape` draws them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from ..errors import StudioError
from ..plan import PrunePlan
from . import charts

# (column, panel title): each panel draws ``column`` kept against ``column + "_base"``
PANELS: tuple[tuple[str, str], ...] = (("heads", "Heads"), ("head_dim", "Head dims"), ("mlp", "MLP width"))
COLUMNS = ["block", "status", "heads", "heads_base", "head_dim", "head_dim_base", "mlp", "mlp_base"]


def shape_frame(plan: PrunePlan) -> pd.DataFrame:
    """One row per *base* block: ``status`` (dense | pruned | removed) and kept vs base heads, head dims, MLP.

    A removed block keeps nothing (kept counts 0), as :meth:`PrunePlan.kept` reports it.
    """
    base = plan.base
    rows = []
    for i in range(base.depth):
        b, kept = plan.block(i), plan.kept(i)
        status = "removed" if b is None else ("dense" if b.is_dense else "pruned")
        rows.append(
            {
                "block": i,
                "status": status,
                "heads": kept["heads"],
                "heads_base": base.num_heads[i],
                "head_dim": kept["head_dim"],
                "head_dim_base": base.head_dim,
                "mlp": kept["mlp"],
                "mlp_base": base.mlp_hidden[i],
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def embed_width(plan: PrunePlan) -> tuple[int, int]:
    """(kept, base) embedding (residual-stream) channels of the whole model."""
    base = plan.base.embed_dim
    return (base if plan.embed is None else len(plan.embed)), base


def _label(row: Mapping[str, Any]) -> str:
    return f"block {row['block']}" + (" · removed" if row["status"] == "removed" else "")


def shape_figure(plan: PrunePlan, *, title: str | None = None) -> go.Figure:
    """The plan's widths per block: per panel a ``base`` trace (outlined, hatched when the block is removed) and
    a ``kept`` trace over it; every bar's hover gives the block's kept/base heads, head dims and MLP width."""
    df = shape_frame(plan)
    labels = [_label(r) for r in df.to_dict("records")]
    removed = (df["status"] == "removed").to_numpy()
    custom = df[["block", "status", *COLUMNS[2:]]].to_numpy()
    tip = charts.hover(
        "block %{customdata[0]} · %{customdata[1]}",
        heads="%{customdata[2]}/%{customdata[3]}",
        head_dims="%{customdata[4]}/%{customdata[5]}",
        MLP="%{customdata[6]:,}/%{customdata[7]:,}",
    )
    fig = make_subplots(
        rows=1,
        cols=len(PANELS),
        shared_yaxes=True,
        horizontal_spacing=0.04,
        subplot_titles=[t for _, t in PANELS],
    )
    for col, (name, _) in enumerate(PANELS, start=1):
        first = col == 1  # one legend entry per trace kind, not one per panel
        fig.add_bar(
            x=df[f"{name}_base"],
            y=labels,
            orientation="h",
            name="base",
            legendgroup="base",
            showlegend=first,
            meta=f"{name} base",
            # a removed block's base bar is grey and hatched: visibly gone, with its base width still readable
            marker=dict(
                color=["rgba(0,0,0,0)" if not r else charts.COLORS["removed"] for r in removed],
                line=dict(color=charts.COLORS["muted"], width=1),
                pattern=dict(shape=["x" if r else "" for r in removed], fgcolor=charts.COLORS["muted"]),
            ),
            customdata=custom,
            hovertemplate=tip,
            row=1,
            col=col,
        )
        fig.add_bar(
            x=df[name],
            y=labels,
            orientation="h",
            name="kept",
            legendgroup="kept",
            showlegend=first,
            meta=f"{name} kept",
            marker=dict(color=charts.COLORS["kept"]),
            # the kept/base count on the bar itself, so the widths read without hovering
            text=[
                "removed" if r else f"{k:,}/{b:,}"
                for r, k, b in zip(removed, df[name], df[f"{name}_base"], strict=True)
            ],
            textposition="outside",
            cliponaxis=False,
            customdata=custom,
            hovertemplate=tip,
            row=1,
            col=col,
        )
        # room right of the base bar for the "kept/base" text
        fig.update_xaxes(range=[0, 1.35 * max(1, int(df[f"{name}_base"].max()))], row=1, col=col)
    fig.update_layout(barmode="overlay", bargap=0.25)
    fig.update_yaxes(autorange="reversed", type="category")  # block 0 at the top, as the model reads
    kept, base = embed_width(plan)
    title = title or (f"Shape: {plan.depth}/{plan.base.depth} blocks, embedding {kept:,}/{base:,} channels")
    height = max(280, 150 + 26 * plan.base.depth)
    return charts.legend_under_title(charts.style(fig, title=title, height=height), height)


def show_shape(plan: PrunePlan | Mapping[str, Any] | None, *, key: str, name: str = "shape") -> None:
    """Draw the shape view of ``plan`` (a plan or its dict, e.g. a manifest's) with a CSV of its widths."""
    if plan is None:
        st.caption("No plan: this model is the unpruned base, every block at full width.")
        return
    if not isinstance(plan, PrunePlan):
        try:
            plan = PrunePlan.from_dict(dict(plan))
        except (
            StudioError
        ) as e:  # one sentence here, and the rest of the page (downloads, ONNX) still renders
            st.warning(f"No shape view: {e}", icon=":material/warning:")
            return
    frame = shape_frame(plan)
    kept, base = embed_width(plan)
    charts.show(shape_figure(plan), frame.assign(embed=kept, embed_base=base), key=key, name=name)
