"""Overlaid training curves of several runs (issue 16), as TensorBoard draws them: one line per run per metric.

The per-epoch records come from each run's events (:func:`studio.jobs.curves`, the same records a single run's
job panel draws in :func:`studio.ui.jobs.curves_figure`). :func:`epoch_frame` and :func:`overlay_figure` are
pure; :func:`overlay_section` draws the picker, the figure and its CSV.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from .. import jobs
from . import charts

# metric -> (panel title, hover number format, axis tick format); the order is the panels' order
METRICS: Mapping[str, tuple[str, str, str | None]] = {
    "train_loss": ("Train loss", ".4f", None),
    "val_top1": ("Val top-1", ".2%", ".0%"),
    "val_loss": ("Val loss", ".4f", None),
}
DEFAULT_METRICS = ("train_loss", "val_top1")
COLUMNS = ["run", "epoch", "metric", "value"]


def epoch_frame(runs: Mapping[str, str | Path]) -> pd.DataFrame:
    """Long form ``run, epoch, metric, value`` of every run's per-epoch records (``{name: run folder}``).

    ``epoch`` counts from 1 (the records' 0-based index + 1), as the job panel shows "epoch 1 / N".
    """
    rows = []
    for name, path in runs.items():
        for record in jobs.curves(path)["epochs"]:
            for metric in METRICS:
                if record.get(metric) is not None:
                    rows.append(
                        {
                            "run": name,
                            "epoch": int(record["epoch"]) + 1,
                            "metric": metric,
                            "value": record[metric],
                        }
                    )
    return pd.DataFrame(rows, columns=COLUMNS)


def overlay_figure(frame: pd.DataFrame, metrics: Sequence[str] = DEFAULT_METRICS) -> go.Figure | None:
    """One panel per metric of ``metrics`` that ``frame`` has, one line per run in each (the run's name is the
    trace's name and the legend entry, one colour per run across panels); None if there is nothing to draw."""
    shown = [m for m in metrics if m in set(frame["metric"])]
    if not shown:
        return None
    runs = list(dict.fromkeys(frame["run"]))  # in the order picked
    # colours by position, not by name hash: two picked runs never share a colour
    colors = {r: charts.PALETTE[i % len(charts.PALETTE)] for i, r in enumerate(runs)}
    fig = make_subplots(rows=1, cols=len(shown), subplot_titles=[METRICS[m][0] for m in shown])
    legended: set[str] = set()  # one legend entry per run, in the first panel that has it
    for col, metric in enumerate(shown, start=1):
        title, fmt, ticks = METRICS[metric]
        part = frame[frame["metric"] == metric]
        for run in runs:
            line = part[part["run"] == run].sort_values("epoch")
            if line.empty:
                continue
            fig.add_scatter(
                x=line["epoch"],
                y=line["value"],
                mode="lines+markers",
                name=run,
                legendgroup=run,
                showlegend=run not in legended,
                meta=metric,
                line=dict(color=colors[run]),
                customdata=[[run]] * len(line),
                hovertemplate=charts.hover("%{customdata[0]}", epoch="%{x}", **{title: f"%{{y:{fmt}}}"}),
                row=1,
                col=col,
            )
            legended.add(run)
        # a tick per epoch while they fit; plotly's own spacing beyond (it would also label half epochs)
        fig.update_xaxes(dtick=1 if part["epoch"].max() <= 20 else None, row=1, col=col)
        if ticks:
            fig.update_yaxes(tickformat=ticks, row=1, col=col)
    fig = charts.style(fig, title="Training curves, run against run", height=400)
    fig.update_xaxes(title="epoch")  # after style(), which sets every axis title
    return charts.legend_under_title(fig, 400)


def trained(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """``{run name: folder}`` of the runs among ``rows`` (run-table rows) that logged per-epoch records."""
    return {r["run"]: r["path"] for r in rows if _epochs(r["path"], _stamp(r["path"]))}


def _stamp(path: str | Path) -> tuple[int, int]:
    """The events file's (mtime, size): a cache key that changes whenever the run logs something."""
    try:
        s = (Path(path) / "events.jsonl").stat()
    except OSError:
        return (0, 0)
    return (s.st_mtime_ns, s.st_size)


@st.cache_data(max_entries=512, show_spinner=False)
def _epochs(path: str, stamp: tuple[int, int]) -> int:
    """How many epochs a run logged; cached per events-file stamp so the page does not re-read every run's
    events on each rerun."""
    return len(jobs.curves(path)["epochs"]) if stamp != (0, 0) else 0


def overlay_section(rows: Sequence[Mapping[str, Any]], *, key: str) -> None:
    """A multiselect of the trained runs among ``rows``, their curves overlaid, and the CSV of the numbers."""
    runs = trained(rows)
    if not runs:
        st.caption("None of these runs trained (no per-epoch records), so there are no curves to overlay.")
        return
    picked = st.multiselect(
        "Runs to overlay",
        list(runs),
        default=list(runs)[:2],  # newest first: the last two trained runs, the usual comparison
        key=key,
        help="Runs that logged per-epoch records (fine-tuning, retraining, P3B, SPLoRA, SLS retrain).",
    )
    metrics = st.multiselect(
        "Metrics",
        list(METRICS),
        default=list(DEFAULT_METRICS),
        format_func=lambda m: METRICS[m][0],
        key=f"{key}_metrics",
    )
    frame = epoch_frame({name: runs[name] for name in picked})
    fig = overlay_figure(frame, metrics) if picked and metrics else None
    if fig is None:
        st.caption("Pick at least one run and one metric it logged.")
        return
    charts.show(fig, frame[frame["metric"].isin(metrics)], key=key, name="training-curves")
