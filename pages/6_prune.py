"""Prune: pick a method and a budget, prune a copy of the model, see before/after and make it the active plan."""

import pandas as pd
import streamlit as st

from studio.compare import plan_diff, plan_table
from studio.flows.prune import PruneSpec
from studio.plan import PrunePlan
from studio.prune import COMMON_OPTIONS, get_method, load_methods
from studio.runs import RunDir
from studio.ui import charts, forms, guide, state
from studio.ui import jobs as ui_jobs
from studio.ui.charts import human, pct
from studio.workflow import load_plan_text, prune_run

st.title("Prune")
st.caption(
    "Every method ends in the same plan (kept blocks, heads, head dims, MLP neurons, channels); one surgery "
    "applies it to a copy of the model. The model you loaded is never changed."
)

methods = load_methods()
c1, c2 = st.columns([1, 2])
name = c1.selectbox("Method", methods.names(), index=methods.names().index("magnitude"), key="prune_method")
method = get_method(name)
c2.markdown(f"**{name}**: {method.summary}" + ("  \nNeeds calibration data." if method.needs_data else ""))

# The budget widgets are exactly the budgets the method declares (a MACs target, a prune ratio, a density...).
st.markdown("##### Budget")
b1, b2, b3 = st.columns([1, 2, 1])
labels = {b.label: b for b in method.budgets}
chosen = (
    labels[b1.radio("Budget", list(labels), key=f"prune_budget_{name}")]
    if len(labels) > 1
    else method.budgets[0]
)
if len(labels) == 1:
    b1.caption(chosen.label)
whole = chosen.step >= 1  # a count (blocks to keep), not a fraction
high = min(chosen.high, state.pristine_model().base.depth) if chosen.option == "keep_blocks" else chosen.high
value = b2.slider(
    chosen.label,
    int(chosen.low) if whole else chosen.low,
    int(high) if whole else high,
    int(min(chosen.default, high)) if whole else chosen.default,
    int(chosen.step) if whole else chosen.step,
    key=f"prune_{chosen.option}",
)
params: dict = {chosen.option: value}
if method.rounds and b3.checkbox(
    "Round widths to 8", value=True, key="prune_round8", help=COMMON_OPTIONS[2].help
):
    params["round_to"] = 8
own = [o for o in method.options if o.name not in {b.option for b in method.budgets}]
if own:
    with st.expander(f"{name} options", expanded=method.trains):
        params.update(forms.option_widgets(own, f"prune_opt_{name}"))

with st.expander("Data and measurement"):
    m1, m2, m3, m4 = st.columns(4)
    calib = m1.number_input(
        "Calibration batches", 1, 256, 8, key="prune_calib", disabled=not method.needs_data or method.trains
    )
    evaluate = m2.checkbox("Accuracy before/after", True, key="prune_eval")
    bench = m3.checkbox("Measure throughput", True, key="prune_bench")
    onnx = m4.checkbox("Also export ONNX", False, key="prune_onnx")
    st.caption(f"Data: {state.data_spec()} (calibration from train, accuracy on test).")

spec = PruneSpec(
    model=state.model_spec(),
    method=name,
    params=params,
    data=state.data_spec(),
    calib_batches=int(calib),
    evaluate=evaluate,
    bench=bench,
    onnx=onnx,
)
if method.trains:  # minutes or more: a job that a reload or a closed tab does not stop
    st.info(
        f"{name} trains while it prunes: it runs as a background job that a reload or a closed tab does not stop."
    )
    device, nproc = ui_jobs.device_picker("prune_job")
    ui_jobs.start_job_button("Start", spec, key="prune_job", device=device, nproc=nproc)
    job = st.session_state.get("prune_job_run")
    if job:
        ui_jobs.job_panel(job)
        if RunDir(job).results() and st.button("Show the result", key="prune_job_show"):
            st.session_state["prune_last"] = {
                "run": job,
                "result": RunDir(job).results(),
                "plan": PrunePlan.load(RunDir(job).plan_file),
            }
else:
    problem = state.problem_of(spec)
    if problem:
        st.error(problem, icon=":material/error:")
    if st.button(
        "Prune", type="primary", key="prune_run", icon=":material/content_cut:", disabled=problem is not None
    ):
        with state.user_errors():
            bar = state.StreamlitProgress(f"Pruning with {name}")
            run, result = prune_run(
                spec, root=state.runs_root(), loaded=state.pristine_model(), callbacks=[bar]
            )
            bar.done()
            st.session_state["prune_last"] = {
                "run": str(run.path),
                "result": result.to_dict(),
                "plan": result.plan,
            }

with st.expander("Or load a plan (plan.json of an earlier run)"):
    up = st.file_uploader("Plan JSON", type=["json"], key="prune_plan_upload")
    if up is not None:
        with state.user_errors():
            loaded_plan = load_plan_text(up.getvalue(), state.pristine_model().base)
            st.code(loaded_plan.describe(), language=None)
            if st.button("Make this the active plan", key="prune_upload_active"):
                state.set_active_plan(loaded_plan)
                st.rerun()

last = st.session_state.get("prune_last")
if last is None:
    guide.needs(
        "Choose a method and a budget, then press Prune. Unsure where to cut? The analyze pages show "
        "which layers, heads and neurons matter.",
        "pages/4_importance.py",
        "See the importance of heads and neurons",
    )
    st.stop()

res, plan = last["result"], last["plan"]
before, after = res["before"], res["after"]
st.subheader(f"Result: {plan.method}", divider="gray")
st.caption(f"Run folder `{last['run']}` · {res['device']} · {res['seconds']:.1f} s")
k = st.columns(4)
if "top1" in after:
    k[0].metric(
        "Accuracy (no recovery)",
        pct(after["top1"]),
        f"{100 * (after['top1'] - before['top1']):+.1f} pts",
        help="the pruned model before any retraining: an estimate of what recovery starts from",
    )
k[1].metric("Params", human(after["params"]), f"{after['params'] / before['params'] - 1:+.0%}", "inverse")
k[2].metric("MACs", human(after["macs"]), f"{after['macs'] / before['macs'] - 1:+.0%}", "inverse")
k[3].metric("Ideal speed-up (MACs)", f"×{res['ideal_speedup']:.2f}")
if res["speedup"]:
    rows = [
        {
            "batch size": int(bs),
            "base images/s": before["throughput"][bs]["images_per_s"],
            "pruned images/s": after["throughput"][bs]["images_per_s"],
            "measured speed-up": s,
            "ideal speed-up": res["ideal_speedup"],
        }
        for bs, s in res["speedup"].items()
    ]
    speed = pd.DataFrame(rows)
    st.dataframe(
        speed,
        hide_index=True,
        key="prune_speed_table",
        column_config={c: st.column_config.NumberColumn(format="%.2f") for c in speed.columns[1:]},
    )
if not after.get("matches_plan", True):
    st.warning("The counted params/MACs of the pruned model differ from the plan's analytic cost.")
if plan.params.get("solved", {}).get("target_missed"):
    st.warning(
        f"The closest plan keeps {pct(plan.params['solved']['macs_fraction'])} of the MACs: the scopes move in "
        "steps too coarse for this target. Add scopes (e.g. mlp, embed) for finer steps."
    )

table = pd.DataFrame(plan_table(plan))
charts.show(charts.plan_blocks(table), table, key="prune_plan_blocks", name="plan_blocks")
with st.expander("Plan structure"):
    st.code(plan.describe(), language=None)

active = state.active_plan()
if active is not None and active is not plan:
    changes = plan_diff(active, plan)
    st.markdown("##### Compared with the active plan")
    st.markdown(
        "\n".join(f"- {c}" for c in changes[:40]) if changes else "Same structure as the active plan."
    )

a1, a2, _ = st.columns([1, 1, 2])
is_active = active is not None and active.to_dict() == plan.to_dict()
if a1.button(
    "Make active plan", key="prune_make_active", type="primary", disabled=is_active, icon=":material/check:"
):
    state.set_active_plan(plan)
    st.rerun()
a2.download_button(
    "Plan JSON",
    plan.to_json(),
    "plan.json",
    "application/json",
    key="prune_plan_json",
    icon=":material/download:",
)
if is_active:
    st.success("This is the active plan.", icon=":material/check_circle:")
guide.next_step(
    ("pages/7_retrain.py", "recover the accuracy"), ("pages/11_export.py", "export the pruned model")
)
