"""Importance: which heads and MLP neurons matter (five criteria vs. ablation), what each method would remove at a
MACs budget, and click-to-keep / click-to-drop edits of the active plan, which can then be pruned and measured."""

import pandas as pd
import streamlit as st

from studio.analysis import importance as imp
from studio.jobs import job_status
from studio.ui import attention as ui_attention
from studio.ui import cached, charts, guide, state
from studio.ui import importance as vm
from studio.ui.charts import human, pct
from studio.ui.importance_page import heatmap, on_click, on_edit, replace_plan, scores, use_or_ask
from studio.ui.jobs import job_threads, session_token
from studio.ui.results import show_run_result

st.title("Importance")
st.caption(
    "Scores of every head and MLP neuron on calibration batches: weight magnitude (L1/L2), grouped Taylor |w·g| "
    "(torch-pruning, what Isomorphic pruning ranks), SAViT's squared gate gradient, and the loss increase when a "
    "head is removed (ablation, the ground truth). Grouped criteria score whole dependency groups (qkv + proj, "
    "fc1 + fc2). × marks what the chosen method (or the active plan) removes."
)


with state.user_errors():
    loaded = state.pristine_model()
    base, data = loaded.base, state.data_spec()
    c1, c2, c3, c4 = st.columns([3, 1, 1, 1])
    crits = c1.multiselect("Criteria", imp.CRITERIA.names(), list(imp.DEFAULT_CRITERIA), key="imp_criteria")
    n_batches = int(c2.number_input("Calibration batches", 1, 64, 4, key="imp_batches"))
    n_abl = c3.number_input(
        "Ablation images", 0, 4096, 0, key="imp_ablation", help="0: every calibration image"
    )
    n_bins = int(c4.slider("Neuron bins", 4, 32, 16, key="imp_bins", help="MLP neurons binned by rank"))
    if not crits:
        st.info("Pick at least one criterion.")
        st.stop()
    mkey, dkey = cached.model_key(), cached.data_key()
    spec = vm.importance_spec(state.model_spec(), data, crits, n_batches, ablation_samples=int(n_abl))
    result = scores(spec, loaded)
    if result is None:
        st.stop()  # scoring runs as a job: its panel is drawn above

    st.subheader("What a method removes at a budget", divider="gray")
    b1, b2, b3 = st.columns([1, 2, 1])
    method = b1.selectbox("Method", vm.OVERLAY_METHODS, key="imp_method")
    target = b2.slider("Budget: fraction of the MACs to keep", 0.2, 0.95, 0.5, 0.05, key="imp_target")
    pkey = f"imp_planner:{mkey}:{dkey}:{n_batches}"
    if pkey not in st.session_state:
        batches = imp.calibration(loaded, data, "train", n_batches, 64)
        st.session_state[pkey] = vm.MethodPlanner(loaded, batches)
    with st.spinner(f"Planning {method} at {pct(target, digits=0)} of the MACs…"):
        proposal = st.session_state[pkey].plan(method, target)
    cost = vm.plan_cost_of(proposal, base)
    help_ = f"{cost['macs']:,} MACs; params {human(cost['params'])} ({pct(cost['params_fraction'])})"
    b3.metric(
        "Planned MACs", human(cost["macs"]), pct(cost["macs_fraction"]), "off", help=help_, delta_arrow="off"
    )
    if method == "savit":
        st.caption(
            "SAViT keeps the top 5 % of every layer's units, as its paper intends (the reference code's protect "
            "step scrambles which units it keeps; the studio implements the intent)."
        )
    active = state.active_plan()
    active = active if active is not None and active.base == base else None
    if active is None and st.session_state.get("imp_overlay") == "active plan":
        del st.session_state["imp_overlay"]  # the plan was cleared (sidebar) or belongs to another model
    shown = st.radio(
        "Overlay", ["method plan", "active plan"][: 2 if active else 1], horizontal=True, key="imp_overlay"
    )
    overlay = active if shown == "active plan" else proposal
    use = "Use this method's plan as the active plan"
    same = active is not None and active.to_dict() == proposal.to_dict()
    st.button(
        use,
        key="imp_use_plan",
        icon=":material/check:",
        disabled=same,
        on_click=use_or_ask,
        args=(proposal,),
        help="the active plan is what the Prune, Retrain and Export pages use; replacing one asks first",
    )
    held = state.active_plan()
    if st.session_state.get("imp_use_confirm") and held is not None and not same:
        edits = len(vm.net_edits(held.params.get("edits", [])))
        st.warning(
            f"This replaces the active plan ({held.method}, {held.depth}/{held.base.depth} blocks"
            + (f", {edits} hand edit{'s' * (edits != 1)}" if edits else "")
            + f") with {method}'s plan at {pct(target, digits=0)} of the MACs.",
            icon=":material/warning:",
        )
        y, n, _ = st.columns([1, 1, 3])
        y.button(
            "Replace it", key="imp_use_plan_yes", type="primary", on_click=replace_plan, args=(proposal,)
        )
        n.button(
            "Keep the current one",
            key="imp_use_plan_no",
            on_click=st.session_state.pop,
            args=("imp_use_confirm",),
        )

    st.subheader("Heads", divider="gray")
    gone = imp.removed_heads(overlay, base)
    cols = st.columns(min(3, len(result.scores)))
    for k, s in enumerate(result.scores):
        rho = result.correlation.get(s.criterion)
        title = s.criterion + ("" if rho is None else f" · ρ={rho:.2f} vs ablation")
        fig = heatmap(s.heads, title, "head", gone, "score")
        key = f"imp_heads_{s.criterion}"
        cols[k % len(cols)].plotly_chart(
            fig,
            key=key,
            on_select=lambda key=key: on_click(key, active or proposal),
            selection_mode="points",
            config={"displaylogo": False},
        )
    if result.correlation:
        corr = pd.DataFrame(
            {"criterion": list(result.correlation), "spearman vs ablation": result.correlation.values()}
        )
        st.dataframe(corr, hide_index=True, key="imp_corr")

    st.subheader("MLP neurons", divider="gray")
    with_mlp = [s.criterion for s in result.scores if s.mlp is not None]
    members = None
    if with_mlp:
        crit = st.selectbox("Criterion for the neuron bins", with_mlp, key="imp_bin_criterion")
        values, members = imp.neuron_bins(result.get(crit).mlp, n_bins)
        half = [[f > 0.5 for f in r] for r in imp.removed_fraction(overlay, base, members)]
        fig = heatmap(values, f"{crit}: neuron bins by rank (0 = most important)", "bin", half, "mean_score")
        frame = pd.DataFrame(values).rename_axis("block").reset_index()
        charts.show(fig, frame, key="imp_bins_map", name="neuron_bins")
        st.caption("× marks bins of which the overlay plan removes more than half.")

    st.subheader("Edit the active plan", divider="gray")
    st.caption(
        "Click a head in a heat map to toggle it, or pick a unit here. Without an active plan, edits start "
        "from the method's plan."
    )
    e1, e2, e3, e4 = st.columns([1, 2, 1, 1])
    block = int(e1.selectbox("Block", range(base.depth), key="imp_edit_block"))
    e2.selectbox("Unit", imp.unit_labels(base, block, members), key="imp_edit_unit")
    start = (active or proposal, block)
    e3.button("Keep", key="imp_keep", icon=":material/add:", on_click=on_edit, args=(*start, True, members))
    e4.button(
        "Drop", key="imp_drop", icon=":material/remove:", on_click=on_edit, args=(*start, False, members)
    )
    if active is None:
        st.info("No active plan yet: use the method's plan, or edit a unit.", icon=":material/info:")
        st.stop()
    now, edits = vm.plan_cost_of(active, base), vm.net_edits(active.params.get("edits", []))
    m1, m2, m3 = st.columns(3)
    for col, key, label in ((m1, "macs", "Active plan MACs"), (m2, "params", "Active plan params")):
        col.metric(label, human(now[key]), pct(now[f"{key}_fraction"]), "off", delta_arrow="off")
    m3.metric("Edits", len(edits), help="; ".join(edits[-5:]) or None)  # a toggle back undoes, not adds

    st.subheader("Where each head looks on one image", divider="gray")
    st.caption(
        "The class token's attention per head, in the dense model (top) and with the active plan applied "
        "(bottom), from the models' own attention modules; removed heads are marked."
    )
    if st.toggle(
        "Show the attention maps of the active plan", key="imp_attn_on"
    ):  # a forward pass: on demand
        dense = state.pristine_model()
        ui_attention.view(dense, ui_attention.with_plan(dense, active), state.data_spec(), key="imp_attn")

    st.subheader("Prune and measure", divider="gray")
    r1, r2 = st.columns([1, 1])
    retrain = r1.checkbox("Then retrain in the background", key="imp_retrain")
    epochs = int(r2.number_input("Retraining epochs", 1, 300, 5, key="imp_epochs", disabled=not retrain))
    if st.button("Prune with the active plan", type="primary", key="imp_run", icon=":material/content_cut:"):
        bar = state.StreamlitProgress("Pruning and measuring")
        run, res = vm.run_plan(
            loaded, active, data, root=state.runs_root(), model_spec=state.model_spec(), callbacks=[bar]
        )
        bar.done()
        dev = state.model_spec().device
        job = (
            vm.start_retrain(
                res["export"], data, epochs, device=dev, threads=job_threads(), owner=session_token()
            )
            if retrain
            else None
        )
        st.session_state["imp_last"] = {"run": str(run.path), "results": res, "job": job}
    last = st.session_state.get("imp_last")
    if last:
        show_run_result(last["results"], key="imp")
        st.caption(f"Run folder `{last['run']}` (accuracy on the test split).")
        if last.get("job"):
            status = job_status(last["job"])
            st.markdown(f"Retraining job `{last['job']}`: **{status.state}** {status.error or ''}")
            guide.link("pages/8_runs.py", "Follow it on the Runs page")
guide.next_step(("pages/6_prune.py", "prune with a method"), ("pages/7_retrain.py", "recover the accuracy"))
