"""The Sensitivity page's view-model and glue: the page's choices as a
:class:`~studio.flows.sensitivity.SensitivitySpec`, the sweep run to show (the newest of this model and settings,
so a reload loses nothing), inline or as a job by its size, and the chart (one line per block).

The sweep is the per-layer sensitivity analysis of Li et al., "Pruning Filters for Efficient ConvNets" (ICLR 2017),
as Distiller popularised it: :mod:`studio.analysis.sensitivity`.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.colors import sample_colorscale

from ..analysis.criteria import keep_count
from ..analysis.importance import CRITERIA
from ..analysis.sensitivity import SensitivityResult, units_of
from ..costs import plan_cost
from ..data import DataSpec, load_split
from ..flows import start
from ..flows.sensitivity import SensitivitySpec, sensitivity_of
from ..models import LoadedModel, ModelSpec
from ..plan import BaseArch, PrunePlan
from . import background, charts, state
from .charts import COLORS
from .importance import scoring_macs

FRACTIONS = (0.1, 0.25, 0.5, 0.75, 0.9)


def sensitivity_spec(
    model: ModelSpec,
    data: DataSpec,
    scope: str,
    criterion: str,
    fractions: Sequence[float],
    *,
    limit: int = 0,
    batches: int = 4,
) -> SensitivitySpec:
    """The one form of the page's sweep (fractions sorted, so the same choices find the same run)."""
    needs = criterion in CRITERIA and CRITERIA.get(criterion).needs_data
    return SensitivitySpec(
        model=model,
        data=data,
        scope=scope,
        criterion=criterion,
        fractions=tuple(sorted({float(f) for f in fractions})),
        limit=int(limit) or None,
        batches=int(batches) if needs else 0,  # unused by l1/l2: kept out of the spec so they match any
    )


@st.cache_data(max_entries=32, show_spinner=False)
def eval_images(data_key: str, _data: DataSpec, split: str) -> int:
    """Images of the split the sweep evaluates (listing it only: no image is decoded)."""
    return len(load_split(_data, split))


def sweep_macs(base: BaseArch, spec: SensitivitySpec, images: int) -> float:
    """About how many MACs the sweep takes: a forward pass per image per evaluated model (the dense one, and each
    (block, fraction) that removes a unit), plus the criterion's scoring on the calibration images (the Importance
    page's estimate: nothing for ``l1``/``l2``, a forward+backward pass per image for ``taylor``)."""
    forward = plan_cost(PrunePlan.dense(base))["macs"]
    evaluated = 1 + sum(
        keep_count(units_of(base, spec.scope, b), f) < units_of(base, spec.scope, b)
        for b in range(base.depth)
        for f in spec.fractions
    )
    scoring = scoring_macs(base, [spec.criterion], spec.batches * spec.batch_size) if spec.needs_data else 0.0
    return forward * images * evaluated + scoring


def result(spec: SensitivitySpec, loaded: LoadedModel, problem: str | None) -> SensitivityResult | None:
    """The sweep of ``spec``: the newest finished run of it, after a start button (inline on small work, a job
    on large work, whose panel this draws while it runs); None until there is one."""
    done = background.finished(spec)
    images = eval_images(repr(spec.eval_data.to_dict()), spec.eval_data, spec.eval_split)
    work = sweep_macs(loaded.base, spec, images)
    if work <= background.INLINE_MACS:
        label = "Run again" if done is not None else "Run sweep"
        if st.button(
            label, type="primary", key="sens_run", icon=":material/show_chart:", disabled=bool(problem)
        ):
            bar = state.StreamlitProgress("Sweeping")
            done, _ = start(spec, root=state.runs_root(), loaded=loaded, callbacks=[bar])
            bar.done()
    else:
        background.offer_job(
            spec,
            key="sens_job",
            label="Sweep in the background",
            why=f"This sweep is about {work / 1e12:.1f} TMAC of evaluation on {images:,} images: too long for the "
            "page, so it runs as a background job with progress and cancel. An image limit or fewer fractions "
            "make it faster.",
            waiting="The sweep runs in the background; the chart appears when it is done.",
            device_key="sens",
        )
    return None if done is None else sensitivity_of(done)


def frame(res: SensitivityResult) -> pd.DataFrame:
    """One row per (block, fraction), with the drop from the dense accuracy (the chart's and the CSV's data)."""
    df = pd.DataFrame([r.to_dict() for r in res.rows])
    df.insert(0, "scope", res.scope)
    df.insert(1, "criterion", res.criterion)
    df["dense_top1"] = res.dense.top1
    df["drop"] = res.dense.top1 - df["top1"]
    return df


def figure(res: SensitivityResult, df: pd.DataFrame) -> go.Figure:
    """Accuracy vs fraction removed, one line per block (early blocks dark, late ones light) from the dense
    point at 0, and the dense accuracy as a dashed reference."""
    fig = go.Figure()
    depth = int(df["block"].max()) + 1
    colors = sample_colorscale("Viridis", [b / max(depth - 1, 1) * 0.9 for b in range(depth)])
    unit = "heads" if res.scope == "heads" else "neurons"
    hover = charts.hover(
        "block %{customdata[0]}",
        removed=f"%{{x:.0%}} (%{{customdata[1]}} of %{{customdata[2]}} {unit}, asked %{{customdata[3]:.0%}})",
        accuracy="%{y:.2%}",
        loss="%{customdata[4]:.4f}",
    )
    for b, rows in df.groupby("block", sort=True):
        units = int(rows["units"].iloc[0])
        x = [0.0, *rows["removed_fraction"]]
        y = [res.dense.top1, *rows["top1"]]
        data = [[b, 0, units, 0.0, res.dense.loss]]
        data += rows[["block", "removed", "units", "fraction", "loss"]].values.tolist()
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                customdata=data,
                mode="lines+markers",
                name=f"block {b}",
                line=dict(color=colors[int(b)], width=2),
                hovertemplate=hover,
            )
        )
    reference = dict(color=COLORS["dense"], dash="dash", width=1.5)
    fig.add_trace(
        go.Scatter(
            x=[0.0, max(df["removed_fraction"].max(), max(res.fractions))],
            y=[res.dense.top1] * 2,
            mode="lines",
            name="dense",
            line=reference,
            hovertemplate=charts.hover("dense model", accuracy="%{y:.2%}"),
        )
    )
    fig.update_xaxes(tickformat=".0%", rangemode="tozero")
    fig.update_yaxes(tickformat=".0%")
    title = f"Top-1 accuracy vs fraction of one block's {unit} removed ({res.criterion})"
    return charts.style(fig, title=title, x_title=f"fraction of {unit} removed", y_title="top-1", height=460)
