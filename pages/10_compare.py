"""Compare: accuracy vs measured throughput vs MACs over all runs, per-class change, plan diffs, which
pre-recovery signal predicted the recovered accuracy, and attention maps of the dense vs a pruned model."""

import pandas as pd
import streamlit as st

from studio.compare import (
    STAGES,
    collect,
    label,
    load_range,
    pareto_mask,
    per_class_change,
    plan_diff,
    plan_of,
    plan_table,
    speed_columns,
)
from studio.runs import RunDir
from studio.ui import attention as ui_attention
from studio.ui import cached, charts, guide, state
from studio.ui import compare as ui_compare
from studio.ui.results import group_diff

st.title("Compare runs")
st.caption(
    "Open circles: a pruned model's accuracy *before recovery* (no retraining: an estimate of where recovery "
    "starts). Filled circles: the accuracy *measured after recovery*; arrows join the two. The star is the dense "
    "model. Throughput is measured (images/s), MACs are counted."
)

with state.user_errors():
    current = state.model_spec().source
    every = st.toggle("Runs of every model (not only the current one)", key="cmp_all_models")
    rows = collect(state.runs_root(), model=None if every else current)
    if not any(r["stage"] != STAGES[0] for r in rows):
        guide.needs(
            "No finished runs yet: prune the model (and retrain it) to compare the results.",
            "pages/6_prune.py",
            "Prune",
        )
        st.stop()
    sizes = sorted({bs for r in rows for bs in (r["throughput"] or {})})
    c1, c2 = st.columns(2)
    axes = ["measured throughput", "MACs"] if sizes else ["MACs"]
    axis = c1.radio("Horizontal axis", axes, horizontal=True, key="cmp_axis")
    bs = (
        c2.selectbox("Throughput at batch size", sizes, index=len(sizes) - 1, key="cmp_bs") if sizes else None
    )
    if not sizes:
        c2.caption("No run measured throughput: prune with “Measure throughput” on to compare speed.")
    fresh = st.session_state.get("cmp_fresh", {}).get(bs) if bs else None
    if bs and fresh is None:
        loads = load_range(rows, bs)
        if loads is None or loads[1] > 1.5 * max(loads[0], 0.5):
            st.warning(
                "These throughputs were measured when each run ran, under different machine load"
                + ("" if loads is None else f" (load {loads[0]:.1f} to {loads[1]:.1f})")
                + ": they are not comparable. Re-measure them back to back below.",
                icon=":material/speed:",
            )
    df = pd.DataFrame(speed_columns(rows, bs) if bs else rows)
    if fresh is not None:  # figures measured back to back now replace the ones taken whenever each run ran
        by = {f["model"]: f["images_per_s"] for f in fresh}
        df["images_per_s"] = [by.get(r) for r in df["run"]]
        ref = by.get("dense")
        df["measured_speedup"] = [v / ref if v and ref else None for v in df["images_per_s"]]
        st.caption(f"Throughput measured back to back now (batch {bs}); runs not re-measured are left out.")
    for col in ("images_per_s", "measured_speedup"):
        if col not in df:
            df[col] = None
    x = "images_per_s" if axis == "measured throughput" else "macs"
    plot = df[df["top1"].notna() & df[x].notna()].reset_index(drop=True)
    # accuracy up; throughput up or MACs down; and the three-way front over accuracy, throughput and MACs
    front = pareto_mask(plot[["top1", x]].values.tolist(), [True, x == "images_per_s"])
    df["pareto_3d"] = pareto_mask(df[["top1", "images_per_s", "macs"]].values.tolist(), [True, True, False])
    pos = {r: i for i, r in enumerate(plot["run"])}
    links = [(pos[r["from_run"]], pos[r["run"]]) for _, r in plot.iterrows() if r["from_run"] in pos]
    fig = charts.pareto(
        plot,
        x,
        "top1",
        front=front,
        links=links,
        log_x=x == "macs",
        title="Accuracy vs " + ("measured throughput" if x == "images_per_s" else "MACs"),
        x_title=f"images/s (batch {bs})" if x == "images_per_s" else "MACs per image",
        y_title="test accuracy",
    )
    charts.show(fig, plot, key="cmp_pareto", name="pareto")

    cols = [
        "run",
        "method",
        "stage",
        "status",
        "target_macs",
        "top1_before_recovery",
        "top1",
        "params",
        "macs",
        "images_per_s",
        "measured_speedup",
        "ideal_speedup",
        "pareto_3d",
        "from_run",
    ]
    st.dataframe(
        df[[c for c in cols if c in df]],
        hide_index=True,
        key="cmp_table",
        column_config={
            "top1_before_recovery": st.column_config.NumberColumn("acc. before recovery", format="percent"),
            "top1": st.column_config.NumberColumn("accuracy", format="percent"),
            "images_per_s": st.column_config.NumberColumn("images/s", format="%.1f"),
            "measured_speedup": st.column_config.NumberColumn("measured ×", format="%.2f"),
            "ideal_speedup": st.column_config.NumberColumn("ideal ×", format="%.2f"),
            "pareto_3d": st.column_config.CheckboxColumn("on the front", help="accuracy × throughput × MACs"),
        },
    )
    charts.download_csv(df.drop(columns=["path"], errors="ignore"), "runs", key="cmp_csv")

with state.user_errors():
    ui_compare.back_to_back_section(rows, bs)

with state.user_errors():
    st.subheader("Per-class accuracy change", divider="gray")
    exported = {r["path"]: label(r) for r in rows if r["has_export"]}
    if exported:
        pick = st.selectbox("Pruned model", list(exported), format_func=exported.get, key="cmp_class_run")
        dense = cached.accuracy("test")
        other = cached.accuracy("test", loaded=cached.run_model(f"{pick}/export"), key=pick)
        change = pd.DataFrame(per_class_change(dense["per_class"], other["per_class"]))
        change["direction"] = ["better" if v > 0 else "worse" if v < 0 else "same" for v in change["change"]]
        fig = charts.bar(
            change,
            x="class",
            y="change",
            color="direction",
            colors={
                "better": charts.COLORS["recovered"],
                "worse": charts.COLORS["pruned"],
                "same": "#9E9E9E",
            },
            custom_data=["before", "after"],
            y_title="accuracy change (points)",
            title=f"Test accuracy per class: {charts.pct(dense['top1'])} → {charts.pct(other['top1'])}",
            hovertemplate=charts.hover(
                "class %{x}", change="%{y:+.1%}", before="%{customdata[0]:.1%}", after="%{customdata[1]:.1%}"
            ),
        )
        fig.update_yaxes(tickformat="+.0%")
        charts.show(fig, change, key="cmp_per_class", name="per_class_change")

with state.user_errors():
    st.subheader("Plan diff", divider="gray")
    named = {"dense": "dense"} | {r["path"]: label(r) for r in rows if r["stage"] != STAGES[0]}
    c1, c2 = st.columns(2)
    a = c1.selectbox("Plan A", list(named), format_func=named.get, key="cmp_diff_a")
    b = c2.selectbox(
        "Plan B", list(named), index=min(1, len(named) - 1), format_func=named.get, key="cmp_diff_b"
    )
    pa, pb = (None if p == "dense" else plan_of(RunDir(p)) for p in (a, b))
    changes = group_diff(plan_diff(pa, pb)) if (pa or pb) else []  # one line per change, not per block
    st.markdown("\n".join(f"- {c}" for c in changes[:60]) if changes else "Same structure.")
    for col, plan, key in ((c1, pa, "a"), (c2, pb, "b")):
        if plan is not None:
            with col:
                table = pd.DataFrame(plan_table(plan))
                charts.show(
                    charts.plan_blocks(table, title=f"{plan.method}: kept per block"),
                    table,
                    key=f"cmp_plan_{key}",
                    name=f"plan_{key}",
                )
with state.user_errors():
    ui_compare.signal_section(None if every else current)

with state.user_errors():
    st.subheader("Attention maps, dense vs pruned", divider="gray")
    st.caption(
        "Where the class token looks, per head, in the dense model (top) and the pruned one (bottom), computed by "
        "the models' own attention modules; the last column is the attention rollout over all blocks. Removed "
        "heads are marked; heads keep their base-model numbers."
    )
    exported_runs = {r["path"]: label(r) for r in rows if r["has_export"] and r["stage"] != STAGES[0]}
    if not exported_runs:
        st.info("Prune a model (with export on) to see its attention beside the dense model's.")
    else:
        pick = st.selectbox(
            "Pruned model", list(exported_runs), format_func=exported_runs.get, key="cmp_attn_run"
        )
        ui_attention.view(
            state.pristine_model(), cached.run_model(f"{pick}/export"), state.data_spec(), key="cmp_attn"
        )

guide.next_step(("pages/11_export.py", "export the model you chose"))
