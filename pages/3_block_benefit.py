"""Block benefit (P3B): per-block benefit curves over the epochs of a pruning run, and the budget they imply."""

import pandas as pd
import plotly.express as px
import streamlit as st
from plotly.colors import sample_colorscale

from studio.analysis import block_benefit as bb
from studio.errors import StudioError
from studio.flows.prune import PruneSpec
from studio.jobs import job_status
from studio.models import ModelSpec
from studio.plan import PrunePlan
from studio.ui import charts, state
from studio.ui.jobs import device_picker, start_job_button
from studio.ui.run_actions import follow, result_actions

st.title("Block benefit")
st.caption(
    "Pruning by Block Benefit (P3B, Glandorf et al. 2025) prunes *while* fine-tuning. Probe heads read the "
    "residual stream before and after every Attention and MLP block; a block's **benefit** is how much it lowers "
    "the probes' loss on the CLS token and on the patch tokens. Benefit per kept parameter sets each block's "
    "keep ratio under a global parameter budget; Taylor-ranked soft masks sharpen into hard ones, then the "
    "model is sliced and fine-tuned."
)
root = state.runs_root()
runs = bb.p3b_runs(root)

with st.expander("Start a P3B run", expanded=not runs, icon=":material/play_arrow:"):
    current = state.model_spec()
    start = st.radio(
        "Start from",
        ["demo backbone + new 10-class head", f"current model ({current.source})"],
        horizontal=True,
        key="bb_start_from",
        help="P3B starts from a pre-trained backbone and prunes during transfer fine-tuning.",
    )
    demo = {"source": "demo-backbone", "num_classes": 10, "reset_head": True}
    model = demo if start.startswith("demo") else current.to_dict()
    c1, c2, c3 = st.columns(3)
    ratio = c1.slider("Prune ratio (of all parameters)", 0.1, 0.9, 0.5, 0.05, key="bb_new_ratio")
    epochs = c2.number_input("Epochs (prune + fine-tune)", 4, 1000, 40, key="bb_new_epochs")
    probe = c3.selectbox(
        "Patch probe",
        ["auto", "conv", "mean"],
        key="bb_new_probe",
        help="conv: the paper's 2×Conv3×3 head (≈64 M parameters on DeiT-S). mean: mean-pool + linear, a cheaper "
        "deviation from the paper. auto: conv on a GPU, mean on the CPU.",
    )
    data = state.data_spec()
    device, nproc = device_picker("bb_new")

    spec = PruneSpec(
        model=ModelSpec.from_dict(model).with_(device=device),
        method="p3b",
        params={"prune_ratio": ratio, "epochs": int(epochs), "probe": probe},
        data=data,
    )
    started = start_job_button("Start P3B", spec, key="bb_new_start", device=device)
    if started is not None:  # show the run just started, not the newest one listed before it existed
        st.session_state["bb_run"] = started.name
        st.rerun()
    st.caption(
        "The same run from a shell: write this spec.json, then `python -m studio run --spec spec.json --out runs/NAME`."
    )
    st.json(spec.to_dict(), expanded=False)

runs = bb.p3b_runs(root)  # again: a run started above is listed now
if not runs:
    st.info("No P3B run yet: start one above (about 5 minutes on the demo, CPU).", icon=":material/info:")
    st.stop()

names = [r.path.name for r in runs]
if st.session_state.get("bb_run") not in names:
    st.session_state.pop("bb_run", None)  # deleted, or another runs folder
name = st.selectbox("Run", names, key="bb_run")
run = runs[names.index(name)]
# the run's job: progress, ETA, Cancel, and Resume once it is cancelled or failed with a checkpoint
run_state = follow(run.path)
live = job_status(run.path).active
if run_state == "done" and run.results_file.exists():
    st.markdown("##### The pruned, fine-tuned model")
    result_actions(run.path, key="bb_result")


def curves(df: pd.DataFrame, depth: int) -> None:
    shades = dict(zip((f"layer {i}" for i in range(depth)), sample_colorscale("Viridis", max(2, depth))))
    df = df.assign(layer="layer " + df["layer"].astype(str))
    facets = dict(facet_row="token", facet_col="branch", category_orders={"token": ["CLS", "patch"]})
    few = df["epoch"].nunique() < 3  # a line needs two points: show the first epochs as markers
    fig = charts.line(df, "epoch", "benefit", color="layer", colors=shades, markers=few, height=540, **facets)
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1]))
    fig.update_yaxes(title=None, matches=None)
    charts.show(fig, df, key="bb_curves", name=f"{name}-benefit")
    st.caption("Benefit ΔΨ = probe CE before − after the block (nats), mean over each epoch; colour = depth.")


def heatmap(hist: bb.BenefitHistory) -> None:
    token = st.radio("Token", ["CLS", "patch"], horizontal=True, key="bb_heat_token")
    blocks, epochs, z = hist.grid(token)
    lim = float(abs(z).max() or 1.0)
    fig = px.imshow(z, x=epochs, y=blocks, color_continuous_scale="RdBu", zmin=-lim, zmax=lim, aspect="auto")
    fig.update_traces(hovertemplate=charts.hover("%{y} · epoch %{x}", benefit="%{z:.4f}"))
    charts.show(charts.style(fig, height=540, x_title="epoch", y_title="block", legend=False), key="bb_heat")


def budget(hist: bb.BenefitHistory) -> None:
    c1, c2 = st.columns(2)
    own = float(hist.settings.get("prune_ratio", 0.5))
    pr = c1.slider("Prune ratio", 0.0, 0.9, own, 0.05, key="bb_ratio", help="Of ALL parameters.")
    ep = c2.select_slider("Benefits of epoch", hist.epochs, value=hist.epochs[-1], key="bb_epoch")
    with state.user_errors():
        res = bb.keep_ratios_at(hist, pr, epoch=ep)
        k = pd.DataFrame(res["rows"])
        colors = {"Attention": charts.COLORS["attention"], "MLP": charts.COLORS["mlp"]}
        fig = charts.bar(k, "block", "keep ratio", color="branch", colors=colors, hover_data=["kept params"])
        fig.add_scatter(x=k["block"], y=k["run's κ"], mode="markers", name="the run's κ at that epoch")
        charts.show(fig.update_yaxes(tickformat=".0%", range=[0, 1.05]), key="bb_kappa")
        after, total = res["params_after"], res["params_total"]
        st.metric(
            "Parameters after", charts.human(after), f"{after / total - 1:.1%} of {charts.human(total)}"
        )
        with st.expander("As a table"):
            st.dataframe(k, hide_index=True, key="bb_kappa_table")
        st.caption(
            "What-if from one epoch's benefits: scale, soft clamp, per parameter, CLS/patch blend, then the "
            "water-filling solve. The run itself smoothed its window means with an EMA (γ)."
        )


def structure(hist: bb.BenefitHistory) -> None:
    rows = pd.DataFrame(hist.structure_rows())
    if rows.empty:
        st.info("The model is sliced at the finalize epoch; the final structure appears then.")
        return
    fig = charts.bar(rows, "block", "fraction", color="gate", height=340, hover_data=["kept", "of"])
    charts.show(fig.update_yaxes(tickformat=".0%"), rows, key="bb_structure", name=f"{name}-structure")
    if run.plan_file.exists():
        st.code(PrunePlan.load(run.plan_file).describe(), language="text")
    res = run.results() or {}
    p, a = res.get("p3b", {}), res.get("after", {})
    if a:
        c = st.columns(4)
        c[0].metric("Test top-1", charts.pct(a.get("top1")))
        c[1].metric("Params", charts.human(a.get("params")), charts.pct(p.get("params_fraction")))
        c[2].metric("MACs", charts.human(a.get("macs")), f"×{res.get('ideal_speedup', 0):.2f} ideal speed-up")
        c[3].metric(
            "Masked → sliced top-1",
            f"{charts.pct(p.get('masked_top1'))} → {charts.pct(p.get('sliced_top1'))}",
            help="Before fine-tuning: LayerNorm statistics change at slicing (quirk Q3 of the notes).",
        )


def render() -> None:
    try:
        hist = bb.load_history(run)
    except StudioError as e:
        st.info(str(e))
        return
    if not hist.epochs:
        st.info("Waiting for the first epoch…" if live else "This run recorded no epoch.")
        return
    if live:
        st.caption(f":material/progress_activity: running: {len(hist.epochs)} epochs recorded, refreshing")
    if hist.settings.get("patch_probe") == "mean":
        st.caption(
            ":material/warning: Patch probe: mean-pool + linear, a cheaper deviation from the paper's conv."
        )
    df = pd.DataFrame(hist.curve_rows())
    tabs = st.tabs(["Benefit curves", "Heatmap", "Keep ratios", "Kept parameters", "Final structure"])
    with tabs[0]:
        curves(df, hist.depth)
    with tabs[1]:
        heatmap(hist)
    with tabs[2]:
        budget(hist)
    with tabs[3]:
        part = df[df["token"] == "CLS"]
        fig = charts.line(part, "epoch", "kept_params", color="block", markers=part["epoch"].nunique() < 3)
        charts.show(fig, part[["epoch", "block", "keep_ratio", "kept_params"]], key="bb_kept")
    with tabs[4], state.user_errors():
        structure(hist)


st.fragment(render, run_every="3s" if live else None)()
