"""Prune: pick a method and a budget, prune a copy of the model, see before/after and make it the active plan."""

import pandas as pd
import streamlit as st

from studio import memory
from studio.compare import plan_diff, plan_table
from studio.flows import start
from studio.flows.prune import PruneSpec, calibration_estimate
from studio.plan import PrunePlan
from studio.prune import get_method, load_methods
from studio.prune.presets import CPU, active_preset, apply_preset, get_preset, preset_names
from studio.runs import RunDir
from studio.ui import charts, forms, guide, state, widths
from studio.ui import jobs as ui_jobs
from studio.ui.results import group_diff, show_run_result
from studio.workflow import load_plan_text

st.title("Prune")
st.caption(
    "Every method ends in the same plan (kept blocks, heads, head dims, MLP neurons, channels); one surgery "
    "applies it to a copy of the model. The model you loaded is never changed."
)

methods = load_methods()
c1, c2 = st.columns([1, 2])
name = c1.selectbox("Method", methods.names(), index=methods.names().index("magnitude"), key="prune_method")
method = get_method(name)
c2.markdown(f"**{name}**: {method.summary}")

choices = preset_names(name)
preset_name = c1.selectbox(
    "Preset",
    choices if len(choices) == 1 else [CPU, f"paper:{name}"],
    key=f"prune_preset_{name}",
    help="cpu: the studio's defaults, sized for a CPU. paper: the reference settings, every value with its "
    "source (docs/results/presets.md).",
)
preset = get_preset(preset_name, name)
run_fields: dict = {}
if preset is None:
    st.markdown("##### Budget")
    params = forms.budget_widgets(method, state.pristine_model().base.depth, "prune")
    if method.rounds:
        with st.expander("Hardware-friendly widths, measured on this device"):
            widths.show(state.pristine_model(), "prune_widths")
else:  # the paper's values as they are (the CLI can override single ones: prune --preset paper --OPTION V)
    params, run_fields = apply_preset(preset.name, name, {})
    rows = [{"setting": k, "value": str(v.value), "source": v.source} for k, v in preset.options.items()]
    rows += [
        {"setting": f"run.{k}", "value": str(v.value), "source": v.source} for k, v in preset.run.items()
    ]
    st.dataframe(pd.DataFrame(rows), hide_index=True, key=f"prune_preset_table_{name}")
    for note in preset.not_reproduced:
        st.caption(f"Not reproduced: {note}")
needs_data = method.data_needed(params)  # depends on the options (e.g. isomorphic's importance)
c2.caption("Needs calibration data." if needs_data else "Uses no calibration data with these options.")

with st.expander("Data and measurement"):
    m1, m2, m3, m4 = st.columns(4)
    calib_default = method.calib_batches(
        params, int(run_fields.get("batch_size", 64)), run_fields.get("calib_batches")
    )
    calib = m1.number_input(
        "Calibration batches",
        1,
        max(256, calib_default),
        calib_default,
        key=f"prune_calib_{preset_name}_{name}",
        disabled=not needs_data or method.trains,
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
    batch_size=int(run_fields.get("batch_size", 64)),
    calib_split=str(run_fields.get("calib_split", "train")),
    evaluate=evaluate,
    bench=bench,
    onnx=onnx,
    preset=preset_name,
)
c2.caption(f"Active preset: **{active_preset(name, params, spec.to_dict())}**")
if not method.trains:
    # what the calibration will hold at its peak, before anything runs (studio.memory; checked by the run)
    estimate = calibration_estimate(spec, state.pristine_model())
    if estimate is not None:
        st.caption(
            f"Calibration memory: {estimate.describe()}; {memory.gib(memory.available_bytes())} free here."
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
            st.session_state["prune_last"] = {"run": job, "result": RunDir(job).results()}
else:
    problem = state.problem_of(spec)
    if problem:
        st.error(problem, icon=":material/error:")
    if st.button(
        "Prune", type="primary", key="prune_run", icon=":material/content_cut:", disabled=problem is not None
    ):
        with state.user_errors():
            bar = state.StreamlitProgress(f"Pruning with {name}")
            run, result = start(spec, root=state.runs_root(), loaded=state.pristine_model(), callbacks=[bar])
            bar.done()
            st.session_state["prune_last"] = {"run": str(run.path), "result": result.to_dict()}

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

res = last["result"]
plan = PrunePlan.from_dict(res["plan"])  # the run's own plan, as its results.json records it
st.subheader(f"Result: {plan.method}", divider="gray")
st.caption(f"Run folder `{last['run']}` · {res['device']} · {res['seconds']:.1f} s")
show_run_result(res, key="prune")

table = pd.DataFrame(plan_table(plan))
charts.show(charts.plan_blocks(table), table, key="prune_plan_blocks", name="plan_blocks")
with st.expander("Plan structure"):
    st.code(plan.describe(), language=None)

active = state.active_plan()
is_active = active is not None and active.to_dict() == plan.to_dict()
if active is not None and not is_active:
    changes = group_diff(plan_diff(active, plan))  # one line per change, not one per block
    st.markdown("##### Compared with the active plan")
    st.markdown(
        "\n".join(f"- {c}" for c in changes[:40]) if changes else "Same structure as the active plan."
    )

a1, a2, _ = st.columns([1, 1, 2])
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
