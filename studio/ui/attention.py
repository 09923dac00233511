"""The attention view (issue 18): the class token's attention per head, dense vs pruned (or masked by a plan),
with removed heads marked — one figure for the Compare and Importance pages."""

from __future__ import annotations

import copy
from dataclasses import replace

import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from ..attention import AttentionPair, attention_pair
from ..data import DataSpec
from ..models import LoadedModel
from ..plan import PrunePlan
from ..surgery import apply_plan


def figure(pair: AttentionPair, block: int, image: int) -> go.Figure:
    """Dense (top row) and pruned (bottom row) CLS maps of every head of ``block``, plus the rollout."""
    H = pair.num_heads[block]
    fig = make_subplots(
        rows=2,
        cols=H + 1,
        row_titles=["dense", "pruned"],
        column_titles=[f"head {h}" for h in range(H)] + ["rollout"],
    )
    for row, maps in ((1, pair.dense), (2, pair.pruned)):
        b = maps.block(block)
        for h in range(H):
            if b is not None and h in b.heads:
                z = b.maps[0, b.heads.index(h)].tolist()
                fig.add_trace(go.Heatmap(z=z, coloraxis="coloraxis"), row=row, col=h + 1)
            else:  # removed head (or the whole block): marked, no map
                fig.add_annotation(
                    text="removed", showarrow=False, row=row, col=h + 1, font={"color": "#C62828"}
                )
        fig.add_trace(go.Heatmap(z=maps.rollout[0].tolist(), coloraxis="coloraxis"), row=row, col=H + 1)
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(
        title=f"Block {block}, test image {image} (label {pair.labels[0]})",
        coloraxis={"colorscale": "Viridis"},
        height=360,
    )
    return fig


def with_plan(dense: LoadedModel, plan: PrunePlan) -> LoadedModel:
    """``dense`` pruned by ``plan`` on a copy (the cached model is never changed)."""
    return replace(dense, model=apply_plan(copy.deepcopy(dense.model), plan).eval(), plan=plan)


def view(dense: LoadedModel, pruned: LoadedModel, data: DataSpec, *, key: str) -> None:
    """Pickers for the image and block, then the figure beside the image."""
    c1, c2 = st.columns(2)
    image = int(c1.number_input("Test image", min_value=0, value=0, step=1, key=f"{key}_image"))
    block = int(
        c2.number_input("Block", min_value=0, max_value=dense.base.depth - 1, value=0, key=f"{key}_block")
    )
    pair = attention_pair(dense, pruned, data, [image])
    c1, c2 = st.columns([1, 5])
    c1.image(pair.images[0], caption=f"image {image}", clamp=True, width=120)
    c2.plotly_chart(figure(pair, block, image), key=f"{key}_maps")
