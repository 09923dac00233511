"""The Compare page's sections that compute (studio.compare) and draw: the back-to-back re-measurement and
the signal calibration view. The page only lays them out."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from ..compare import SIGNALS, back_to_back, calibration, calibration_points, rank_untried
from ..jobs import list_jobs
from . import cached, charts, state


def back_to_back_section(rows: list[dict[str, Any]], bs: int | None) -> None:
    """Time the dense model and every exported run now, interleaved; keep the figures in the session."""
    st.subheader("Measure back to back", divider="gray")
    st.caption(
        "Times the dense model and every exported run now, interleaved round by round (medians), so a change "
        "in machine load hits them all alike."
    )
    busy = [j.name for j in list_jobs(state.runs_root()) if j.state in ("starting", "running")]
    if busy:
        st.warning(
            f"A studio job is running ({', '.join(busy[:3])}): it shares the CPU, so the figures would be slowed "
            "by it. Measure when it has finished.",
            icon=":material/warning:",
        )
    b1, b2 = st.columns(2)
    mbs = b1.number_input("Batch size", 1, 1024, int(bs or 1), key="cmp_b2b_bs")
    rounds = b2.number_input("Rounds", 1, 50, 7, key="cmp_b2b_rounds")
    if st.button("Re-measure back to back", key="cmp_b2b", icon=":material/speed:", disabled=bool(busy)):
        models = {"dense": state.pristine_model().model}
        for r in rows:
            if r["has_export"]:
                models[r["run"]] = cached.run_model(f"{r['path']}/export").model
        bar = state.StreamlitProgress("Measuring back to back")
        result = back_to_back(
            models,
            state.pristine_model().data_config["input_size"],
            int(mbs),
            rounds=int(rounds),
            callbacks=[bar],
        )
        bar.done()
        st.session_state.setdefault("cmp_fresh", {})[int(mbs)] = result
        st.rerun()
    for size, result in sorted(st.session_state.get("cmp_fresh", {}).items()):
        st.dataframe(pd.DataFrame(result), hide_index=True, key=f"cmp_fresh_table_{size}")


def signal_section(model: str | None) -> None:
    """Which pre-recovery signal ranked the recovered plans best, its scatter, and the untried plans by it."""
    st.subheader("Which signal predicts the result?", divider="gray")
    st.caption(
        "Each recovered plan's signals *before* recovery (accuracy right after pruning, kNN accuracy of the cut "
        "features and the criterion score removed where the run recorded them, MACs kept) against its accuracy "
        "*after* recovery. Spearman's ρ says how well a signal ranked the plans (1: perfectly); n is the number "
        "of recovered plans it was recorded for, on one data set."
    )
    cal = calibration(calibration_points(state.runs_root(), model=model))
    if not cal["points"]:
        st.info(
            "No recovered plans yet: retrain a few pruned models (Retrain page) to see which signal predicted "
            "their accuracy."
        )
    else:
        table = pd.DataFrame(cal["table"])
        st.dataframe(
            table[["label", "spearman", "n"]],
            hide_index=True,
            key="cmp_cal_table",
            column_config={
                "label": st.column_config.TextColumn("signal"),
                "spearman": st.column_config.NumberColumn("Spearman ρ", format="%.2f"),
                "n": st.column_config.NumberColumn("runs"),
            },
        )
        (st.success if cal["recommended"] else st.info)(cal["reason"])
        usable = [t["signal"] for t in cal["table"] if t["n"]]
        first = cal["recommended"] or usable[0]
        signal = st.radio(
            "Estimate",
            usable,
            index=usable.index(first),
            format_func=SIGNALS.get,
            horizontal=True,
            key="cmp_cal_signal",
        )
        pts = pd.DataFrame(cal["points"]).dropna(subset=[signal])
        fig = charts.scatter(
            pts,
            x=signal,
            y="actual",
            color="method",
            hover_data=["prune_run", "retrain_run", "target_macs"],
            title=f"{SIGNALS[signal]} vs accuracy after recovery ({cal['data']})",
            x_title=SIGNALS[signal],
            y_title="accuracy after recovery",
        )
        fig.update_yaxes(tickformat=".0%")
        charts.show(fig, pts, key="cmp_cal_scatter", name="signal_calibration")
        if cal["recommended"]:
            untried = rank_untried(state.runs_root(), cal["recommended"], model=model)
            if untried:
                st.markdown(f"**Not recovered yet**, best first by {SIGNALS[cal['recommended']]}:")
                st.dataframe(pd.DataFrame(untried), hide_index=True, key="cmp_cal_untried")
