"""Runs: the runs under the runs folder (prune, retrain, export, ...), filterable, with plan, curves and export.

By default the page lists this browser session's own runs (those it started as jobs); "All runs" shows every
run, the other sessions' and the CLI's read-only (no Cancel or Resume: see :mod:`studio.ui.jobs`).
"""

import pandas as pd
import streamlit as st

from studio import jobs
from studio.ui import guide, state
from studio.ui.charts import human
from studio.ui.curves import overlay_section
from studio.ui.jobs import STATE_ICONS, curves_figure, job_panel, mine

st.title("Runs")
root = state.runs_root()
st.caption(
    f"Everything the studio and the CLI ran, from `{root}`: background jobs keep running when the tab closes "
    "and show up here. A job whose process is gone without finishing is marked failed, with its last error."
)

every = jobs.run_table(root)
if not every:
    guide.needs("No runs yet: prune a model to make the first one.", "pages/6_prune.py", "Prune a model")
    st.stop()
show_all = st.toggle(
    "All runs",
    key="runs_all",
    help="Off: the runs this browser session started. On: every run, including other sessions' and the "
    "command line's, read-only (only the session that started a job can cancel or resume it).",
)
rows = every if show_all else [r for r in every if mine(r)]
if not rows:
    st.info(
        f"This browser session has started no runs yet; {len(every)} run(s) by other sessions or the command "
        "line are listed with **All runs**.",
        icon=":material/info:",
    )
    st.stop()

df = pd.DataFrame(rows)
df["started"] = pd.to_datetime(df["started"], unit="s").dt.strftime("%Y-%m-%d %H:%M")
f1, f2, f3, f4 = st.columns([1, 1, 1, 2])
kinds = f1.multiselect("Kind", sorted(df["kind"].unique()), key="runs_kind")
methods = f2.multiselect("Method", sorted(m for m in df["method"].unique() if m), key="runs_method")
statuses = f3.multiselect("Status", sorted(df["status"].unique()), key="runs_status")
text = f4.text_input("Search", key="runs_search", placeholder="part of a run name")
shown = df
if kinds:
    shown = shown[shown["kind"].isin(kinds)]
if methods:
    shown = shown[shown["method"].isin(methods)]
if statuses:
    shown = shown[shown["status"].isin(statuses)]
if text:
    shown = shown[shown["run"].str.contains(text, case=False, regex=False)]

st.dataframe(
    shown[["run", "kind", "method", "budget", "top1", "params", "macs", "throughput", "status", "started"]],
    hide_index=True,
    key="runs_table",
    column_config={
        "top1": st.column_config.NumberColumn("top-1", format="percent"),
        "params": st.column_config.NumberColumn(format="compact"),
        "macs": st.column_config.NumberColumn("MACs", format="compact"),
        "throughput": st.column_config.NumberColumn("images/s", format="%.1f", help="largest measured batch"),
    },
)
st.caption(
    f"{len(shown)} of {len(df)} runs" + ("" if show_all else f" of this session ({len(every)} in all)")
)
if shown.empty:
    st.stop()

with st.expander("Compare training curves: several runs overlaid"):
    overlay_section(shown.to_dict("records"), key="runs_overlay")

name = st.selectbox("Open a run", list(shown["run"]), key="runs_open")
row = next(r for r in rows if r["run"] == name)
st.subheader(f"{STATE_ICONS.get(row['status'], '')} {name}", divider="gray")
if row["status"] == "failed":
    st.error(f"Failed: {row['error']}", icon=":material/error:")
c = st.columns(4)
c[0].metric("Top-1", "–" if row["top1"] is None else f"{100 * row['top1']:.1f}%")
c[1].metric("Params", human(row["params"]))
c[2].metric("MACs", human(row["macs"]))
c[3].metric(
    "Throughput", "–" if row["throughput"] is None else f"{row['throughput']:.0f} img/s", help="largest batch"
)

with st.expander("Job: status, curves and controls", expanded=row["status"] in jobs.ACTIVE_STATES):
    job_panel(row["path"])

with st.expander("Plan"), state.user_errors():
    plan = jobs.run_plan(row["path"])
    if plan is None:
        st.caption("This run has no plan (an unpruned model, or not a pruning run).")
    else:
        st.code(plan.describe(), language="text")
        st.json(plan.summary, expanded=False)

with st.expander("Curves"):
    fig = curves_figure(row["path"])
    if fig is None:
        st.caption("No training curves: this run did not train.")
    else:
        st.plotly_chart(fig, key="runs_curves", config={"displaylogo": False})

with st.expander("Export"):
    if not row["has_export"]:
        st.caption("This run exported no model.")
    else:
        folder = f"{row['path']}/export"
        st.markdown(f"`{folder}` (model.safetensors + manifest.json, loads without pickles)")
        st.code(
            f"python -m studio eval --model {folder} --data demo\n"
            f"python -m studio retrain --model {folder} --data demo --out runs/NAME",
            language="bash",
        )
        guide.link("pages/7_retrain.py", "Retrain this model", ":material/model_training:")
        guide.link("pages/11_export.py", "Export page", ":material/ios_share:")
