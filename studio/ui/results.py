"""One run's result as every page shows it: accuracy before recovery, params, MACs, ideal and measured speed-up.

It reads the common shape of ``results.json`` (:mod:`studio.flows.stages`), so the Prune and Importance pages
(and any page that shows a run) draw the same block from the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import streamlit as st

from ..compare import speed_rows
from .charts import human, pct


def show_run_result(res: Mapping[str, Any], *, key: str) -> None:
    """Four metrics, the per-batch-size speed table, and warnings for a counted cost off the plan's or a
    missed MACs target."""
    before, after = res["before"], res["after"]
    k = st.columns(4)
    if after.get("top1") is not None and before.get("top1") is not None:
        k[0].metric(
            "Accuracy (no recovery)" if res["kind"] == "prune" else "Accuracy",
            pct(after["top1"]),
            f"{100 * (after['top1'] - before['top1']):+.1f} pts",
            help=f"before: {pct(before['top1'])}; a prune run has no retraining: an estimate of what "
            "recovery starts from",
        )
    k[1].metric("Params", human(after["params"]), f"{after['params'] / before['params'] - 1:+.0%}", "inverse")
    k[2].metric("MACs", human(after["macs"]), f"{after['macs'] / before['macs'] - 1:+.0%}", "inverse")
    k[3].metric("Ideal speed-up (MACs)", f"×{res['ideal_speedup']:.2f}")
    if res["speedup"]:
        speed = pd.DataFrame(speed_rows(res))
        st.dataframe(
            speed,
            hide_index=True,
            key=f"{key}_speed_table",
            column_config={c: st.column_config.NumberColumn(format="%.2f") for c in speed.columns[1:]},
        )
    if not after.get("matches_plan", True):
        st.warning("The counted params/MACs of the pruned model differ from the plan's analytic cost.")
    solved = (res.get("params") or {}).get("solved") or {}
    if solved.get("target_missed"):
        st.warning(
            f"The closest plan keeps {pct(solved['macs_fraction'])} of the MACs: the scopes move in steps too "
            "coarse for this target. Add scopes (e.g. mlp, embed) for finer steps."
        )
