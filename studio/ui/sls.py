"""The Layer separability page's cached engine calls and figures (SLS, Han & Tang, ECCV 2024).

Caching: the features of the analysis set are cached per (model, data, split, samples); the fast curve and each
layer's 2-D embedding are cached per feature hash (and the engine also caches embeddings on disk), so moving
a slider or coming back to the page recomputes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from ..analysis.separability import (
    FastCurve,
    LayerEmbedding,
    LayerFeatures,
    SeparabilitySpec,
    embed_layer,
    fast_curve,
    features_cached,
    layer_features,
)
from ..analysis.sls_cut import Cut
from ..costs import plan_cost
from ..data import DataSpec
from ..models import LoadedModel
from ..plan import PrunePlan
from ..prune.sls import PAPER_SELECTION_NOTE
from ..summary import measure_speed
from . import background, charts, state
from .charts import COLORS, pct
from .results import speedup_note
from .run_actions import make_active_button, result_actions

PANEL_PX, LEGEND_ROW_PX = 250, 18  # an embedding panel's height; one legend entry's


@st.cache_data(max_entries=8, show_spinner="Extracting every block's CLS tokens…")
def features(
    mkey: str, dkey: str, split: str, samples: int | None, _loaded: LoadedModel, _data: DataSpec
) -> LayerFeatures:
    return layer_features(_loaded, _data, split=split, samples=samples)


def features_or_job(
    spec: SeparabilitySpec, loaded: LoadedModel, mkey: str, dkey: str
) -> LayerFeatures | None:
    """The analysis set's per-block CLS tokens: from the disk cache (a finished separability job filled it) or
    extracted inline when that is quick; at real size a separability job (features and every layer's embedding,
    with progress and cancel) is offered or followed instead, and None returned until it is done."""
    forward = plan_cost(PrunePlan.dense(loaded.base))["macs"]
    work = forward * (spec.samples or 10_000)
    if work > background.INLINE_MACS and not features_cached(loaded, spec):
        background.offer_job(
            spec,
            key="sls_job",
            label="Analyse in the background",
            why=f"Reading every block's CLS tokens of up to {spec.samples or 'all'} images is about "
            f"{work / 1e12:.1f} TMAC for this model, plus a {spec.embed} embedding per layer: too long for the page, "
            "so it runs as a background job with progress and cancel. Fewer samples make it faster.",
            waiting="The analysis runs in the background; the curves and embeddings appear when it is done.",
        )
        return None
    feats = features(mkey, dkey, spec.split, spec.samples, loaded, spec.data)
    if spec.embed != "none" and background.finished(spec) is not None:
        # the job embedded every layer too (on disk): show them as if "Embed all layers" had been pressed
        wanted = st.session_state.setdefault("sls_embedded", [])
        if f"{feats.key}:{spec.embed}" not in wanted:
            wanted.append(f"{feats.key}:{spec.embed}")
    return feats


@st.cache_data(max_entries=32, show_spinner="Scoring every layer…")
def fast(fkey: str, _feats: LayerFeatures) -> FastCurve:
    return fast_curve(_feats)


@st.cache_data(max_entries=512, show_spinner=False)
def embedding(fkey: str, block: int, method: str, _feats: LayerFeatures) -> LayerEmbedding:
    return embed_layer(_feats, block, method)


def kept_embedding(fkey: str, block: int, method: str, feats: LayerFeatures) -> LayerEmbedding:
    """One layer's embedding from the session's workspace (a reload or a second tab shows it without recomputing),
    else computed (cached in the process) and kept there: points as safetensors, the silhouette as JSON."""
    name = f"sls-embedding:{fkey}:{method}:{block}"
    held = state.analysis(name)
    if held is not None and "points" in held[1]:
        meta, arrays = held
        points = arrays["points"].numpy()
        return LayerEmbedding(block, method, points, float(meta["silhouette"]), float(meta["seconds"]), True)
    e = embedding(fkey, block, method, feats)
    state.keep_analysis(
        name, {"silhouette": float(e.silhouette), "seconds": float(e.seconds)}, {"points": e.points}
    )
    return e


@st.cache_data(max_entries=8, show_spinner="Measuring the model's throughput…")
def base_speed(mkey: str, _loaded: LoadedModel, batch_size: int = 64) -> float:
    """Measured dense images/s (the base of the page's throughput estimate)."""

    return measure_speed(_loaded, (batch_size,), warmup=3, repeats=10)[0]["images_per_s"]


def panel(e: LayerEmbedding, feats: LayerFeatures, *, legend: bool) -> go.Figure:
    """One layer's 2-D embedding coloured by class; hover gives the sample's index in its split and label."""
    df = pd.DataFrame(e.points, columns=["x", "y"])
    df["label"] = [feats.class_names[i] if i < len(feats.class_names) else str(i) for i in feats.labels]
    df["sample"] = feats.indices
    order = sorted(df["label"].unique(), key=lambda v: (len(v), v))
    fig = px.scatter(
        df,
        x="x",
        y="y",
        color="label",
        custom_data=["sample", "label"],
        category_orders={"label": order},
        color_discrete_sequence=px.colors.qualitative.Safe,
        render_mode="svg",  # a dozen WebGL contexts overflow the browser: panels go blank
    )
    fig.update_traces(
        marker=dict(size=4), hovertemplate=charts.hover("sample %{customdata[0]}", label="%{customdata[1]}")
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    # the class legend runs down the whole figure (container coordinates), not only the small plot area, so
    # every class is listed (a 250 px panel's plot area holds 7 of the demo's 10); many classes grow the panel
    n = len(order)
    height = max(PANEL_PX, LEGEND_ROW_PX * n + 40) if legend else PANEL_PX
    fig = charts.style(fig, title=f"layer {e.block + 1} · SC {e.silhouette:.3f}", height=height, legend=False)
    fig.update_layout(
        showlegend=legend,
        legend=dict(
            orientation="v",
            x=1.02,
            y=1.0,
            yref="container",
            yanchor="top",
            font=dict(size=10),
            tracegroupgap=0,
            itemsizing="constant",
            title="class",
        ),
    )
    if legend:
        fig.update_layout(margin=dict(r=60))
    return fig


def curve_frame(curve: FastCurve, silhouettes: list[float | None], method: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "layer": range(1, len(curve.knn) + 1),
            "kNN accuracy": curve.knn,
            "silhouette (high-dim)": curve.silhouette_hd,
            f"silhouette ({method}, 2-D)": silhouettes,
        }
    )


def curve_figure(df: pd.DataFrame, cut: Cut, keep: int, scored: str) -> go.Figure:
    """The separability curves with the α threshold, the suggested cut and the chosen (shaded) removal."""
    depth = len(df)
    long = df.melt("layer", var_name="score", value_name="value").dropna()
    fig = charts.line(
        long,
        "layer",
        "value",
        color="score",
        title="Separability per layer",
        height=340,
        colors=dict(zip(df.columns[1:], (COLORS["muted"], COLORS["embed"], COLORS["kept"]))),
        hovertemplate=charts.hover("layer %{x}", value="%{y:.3f}"),
    )
    fig.add_hline(
        y=cut.threshold,
        line_dash="dot",
        line_color=COLORS["accent"],
        annotation_text=f"α·SC_{depth} = {cut.threshold:.3f} ({scored})",
    )
    if keep < depth:
        fig.add_vrect(
            x0=keep + 0.5,
            x1=depth + 0.5,
            fillcolor=COLORS["removed"],
            opacity=0.35,
            line_width=0,
            annotation_text=f"removed: {depth - keep}",
        )
    fig.add_vline(
        x=cut.keep + 0.5,
        line_dash="dash",
        line_color=COLORS["pruned"],
        annotation_text=f"suggested: keep {cut.keep}",
        annotation_position="bottom right",
    )
    fig.update_xaxes(dtick=1)
    return fig


def show_result(res: dict[str, Any]) -> None:
    """Before / after cut / after retraining: accuracy, params, MACs and measured throughput (an SLS run's
    ``results.json``: the common shape, its ``sls`` section holding every stage)."""
    sec = res["sls"]
    stages = sec["stages"]
    dense, cut = stages["dense"], stages["cut"]
    re = stages.get("retrained")
    st.markdown(f"##### Result: {sec['keep']} of {sec['depth']} blocks kept")
    k = st.columns(4)
    k[0].metric("Dense test accuracy", pct(dense["test_top1"]))
    k[1].metric(
        "After the cut", pct(cut["test_top1"]), f"{100 * (cut['test_top1'] - dense['test_top1']):+.1f} pts"
    )
    k[2].metric(
        "After retraining",
        pct(re["test_top1"]) if re else "–",
        f"{100 * (re['test_top1'] - dense['test_top1']):+.1f} pts" if re else None,
    )
    k[3].metric(
        "Measured speed-up",
        " · ".join(f"×{v:.2f} bs{b}" for b, v in res["speedup"].items()) or "–",
        help=f"measured images/s of the cut model / the dense model; ideal from MACs ×{res['ideal_speedup']:.2f}",
    )
    note = speedup_note(res)
    if note:
        st.info(note, icon=":material/speed:")
    table = pd.DataFrame(sec["table"])
    st.dataframe(
        table,
        hide_index=True,
        key="sls_result_table",
        column_config={c: st.column_config.NumberColumn(format="%.3f") for c in table if "top-1" in c},
    )
    st.caption(
        " ".join([PAPER_SELECTION_NOTE, *[n for n in sec.get("notes", []) if n != PAPER_SELECTION_NOTE]])
    )
    run = Path(res["export"]).parent if res.get("export") else None
    if (
        run is not None and run.is_dir()
    ):  # make active (with the retrained weights as its source), retrain, export
        result_actions(run, key="sls_result")
    else:  # an SLS run without an export: only its structure can be taken on
        make_active_button(PrunePlan.from_dict(res["plan"]), key="sls_make_active")
