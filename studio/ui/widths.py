"""The Prune page's "hardware-friendly widths" panel: where rounding widths to 8, 16 or 32 pays off on this
device, measured (:func:`studio.latency.width_payoff`) rather than assumed, and shown again after a reload."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ..backends import BACKENDS
from ..latency import cached_width_payoff, width_payoff
from ..models import LoadedModel
from . import charts, state


def verdict(rows: list[dict]) -> str:
    """One sentence per unit kind: the smallest multiple that is no slower than the uneven width."""
    parts = []
    for unit, label in (("mlp", "MLP widths"), ("head_dim", "head dims")):
        pays = sorted(r["multiple"] for r in rows if r["unit"] == unit and r["pays"])
        parts.append(
            f"rounding {label} to {pays[0]} pays off" if pays else f"rounding {label} does not pay off"
        )
    return "On this device " + "; ".join(parts) + "."


def show(loaded: LoadedModel, key: str) -> None:
    """The panel: backend and batch, a Measure button, and the last measurement of this setting."""
    c1, c2, c3 = st.columns([2, 1, 1])
    backend = c1.selectbox(
        "Backend", BACKENDS.names(), index=BACKENDS.names().index("eager"), key=f"{key}_be"
    )
    batch = int(c2.number_input("Batch", 1, 512, 1, key=f"{key}_bs"))
    size = loaded.data_config["input_size"]
    if c3.button("Measure", key=f"{key}_run", icon=":material/speed:"):
        with state.user_errors():
            bar = state.StreamlitProgress("Timing rounded widths")
            width_payoff(loaded.model, loaded.base, size, batch=batch, backend=backend, callbacks=[bar])
            bar.done()
    rows = cached_width_payoff(loaded.base, size, loaded.device, batch=batch, backend=backend)
    if not rows:
        st.caption(
            "Times the model with every block at about half its MLP width and head dim, from an odd width "
            "rounded up to 8, 16 and 32 (8 timed variants): rounding pays where the rounded model is no slower "
            "despite its extra MACs."
        )
        return
    st.markdown(verdict(rows))
    df = pd.DataFrame(rows)
    fig = charts.bar(
        df.assign(multiple=df["multiple"].astype(str)),
        x="multiple",
        y="ms_vs_uneven",
        color="unit",
        custom_data=["width", "ms", "macs"],
        hovertemplate=charts.hover(
            "round to %{x}", width="%{customdata[0]}", ms="%{customdata[1]:.2f}", MACs="%{customdata[2]:,}"
        ),
        x_title="round widths up to a multiple of",
        y_title="latency vs the uneven width",
        height=280,
    )
    fig.add_hline(y=1, line_dash="dot")
    charts.show(fig, df, key=f"{key}_chart", name="widths")
