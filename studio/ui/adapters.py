"""The Adapters page's charts: SPLoRA and fine-pruning curves of finished runs."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ..prune.splora import DENSITY_DEFINITION, at_densities, curve_rows
from ..runs import RunDir
from . import charts
from .charts import human, pct

X_AXES = {"unit density": "unit_density", "weight density": "weight_density", "MACs kept": "macs_fraction"}


def show_curves(selected: list[RunDir], x_label: str) -> None:
    """Accuracy vs density and vs learned parameters of the selected SPLoRA / fine-pruning runs."""
    df = pd.DataFrame(curve_rows(selected))
    if df.empty:
        st.info("No pruning step recorded yet: the first point appears after the adapter training.")
        return
    x = X_AXES[x_label]
    hover = charts.hover(
        "%{fullData.name}",
        **{x_label: "%{x:.3f}"},
        top1="%{y:.1%}",
        learned_params="%{customdata[0]:,}",
        step="%{customdata[1]}",
    )
    fig = charts.line(
        df,
        x,
        "top1",
        color="series",
        custom_data=["learned_params", "step"],
        hovertemplate=hover,
        title=f"Accuracy vs {x_label}",
        x_title=f"{x_label} (pruning goes right)",
        y_title="top-1",
    )
    fig.update_xaxes(autorange="reversed")
    fig.update_yaxes(tickformat=".0%")
    charts.show(fig, df, key="adapters_density", name="splora_curves")
    fig = charts.line(
        df,
        "learned_params",
        "top1",
        color="series",
        log_x=True,
        custom_data=["unit_density", "step"],
        hovertemplate=charts.hover(
            "%{fullData.name}",
            learned_params="%{x:,}",
            top1="%{y:.1%}",
            unit_density="%{customdata[0]:.3f}",
            step="%{customdata[1]}",
        ),
        title="Learned parameters per task vs accuracy",
        x_title="learned parameters (log)",
        y_title="top-1",
    )
    fig.update_yaxes(tickformat=".0%")
    charts.show(fig, key="adapters_learned")
    table = pd.DataFrame(at_densities(df.to_dict("records")))
    if not table.empty:
        table = pd.DataFrame(
            {
                "series": table["series"],
                "unit density": table["unit_density"].round(3),
                "weight density": table["weight_density"].round(3),
                "MACs kept": table["macs_fraction"].map(pct),
                "top-1": table["top1"].map(pct),
                "learned params": table["learned_params"].map(human),
            }
        )
        st.markdown("##### At equal density")
        st.dataframe(table, hide_index=True, key="adapters_table")
    st.caption(f"Density: {DENSITY_DEFINITION} Accuracy: test split if evaluated, else validation.")
    for run in selected:
        res = run.results() or {}
        series = (res.get("splora") or {}).get("series") or {}
        cols = st.columns(3)
        if "splora" in series and "task" in series["splora"]:
            cols[0].metric(
                "SPLoRA task file",
                human(series["splora"]["task"]["bytes"], "B"),
                help="masks + sliced A/B + biases + norms + head (safetensors)",
            )
        if "finetune" in series and "export_bytes" in series["finetune"]:
            cols[1].metric("Fine-pruned model file", human(series["finetune"]["export_bytes"], "B"))
        diffs = [s["parity_max_abs_diff"] for s in series.values() if "parity_max_abs_diff" in s]
        if diffs:
            cols[2].metric("Fused + pruned vs masked", f"{max(diffs):.1e}", help="max |Δ logits|")
