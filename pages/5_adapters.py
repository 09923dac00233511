"""Adapters: SPLoRA (structured pruning adapters) vs fine-pruning — accuracy vs density, learned parameters vs
accuracy, and a background job that runs the schedule."""

from pathlib import Path

import streamlit as st

from studio import jobs
from studio.flows.prune import PruneSpec
from studio.models import ModelSpec
from studio.prune.splora import CRITERIA, is_splora_run
from studio.runs import RunDir, list_runs
from studio.ui import guide, state
from studio.ui.adapters import X_AXES, show_curves
from studio.ui.jobs import device_picker, start_job_button
from studio.ui.run_actions import follow, result_actions, started_as_job, unfinished

st.title("Adapters")
st.caption(
    "Structured Pruning Adapters (Hedegaard et al., SPLoRA): the pre-trained backbone stays frozen and shared; "
    "each task learns low-rank adapters (W₀ + B·A), biases, norms and a head, plus channel masks that make the "
    "task model smaller. Fine-pruning trains every weight with the same pruning schedule. Unlike the paper's "
    "code, masks stay enforced during recovery (pruned channels cannot regrow) and every unit group is scored. "
    "LRP is not offered: its rules in the paper are ResNet-specific and a plain ε-rule is not conservative "
    "through LayerNorm and attention."
)

root = state.runs_root()
runs = [r for r in list_runs(root) if is_splora_run(r)]


st.subheader("Curves", divider="gray")
if not runs:
    st.info("No SPLoRA run yet: start one below (a few CPU minutes on the demo).", icon=":material/info:")
else:
    names = [r.path.name for r in runs]
    held = st.session_state.get("adapters_runs")
    # the session's picks that still exist (a run may be deleted), else the newest run
    st.session_state["adapters_runs"] = [n for n in held or () if n in names] or names[:1]
    picked = st.multiselect("Runs", names, key="adapters_runs")
    x_label = st.radio("Density axis", list(X_AXES), horizontal=True, key="adapters_x")
    selected = [r for r in runs if r.path.name in picked]
    active = any(jobs.job_status(r.path).active for r in selected)
    if selected:
        (st.fragment(run_every="3s")(show_curves) if active else show_curves)(selected, x_label)

st.subheader("Run SPLoRA", divider="gray")
m1, m2, m3 = st.columns([2, 1, 1])
source = m1.text_input(
    "Backbone",
    "demo-backbone",
    key="adapters_model",
    help="demo-backbone, a checkpoint or an exported folder (its W₀ stays frozen)",
)
classes = m2.number_input("Classes", 2, 100_000, 10, key="adapters_classes")
reset = m3.toggle(
    "New head", value=True, key="adapters_reset", help="a fresh classifier of that many classes"
)
c1, c2, c3, c4 = st.columns(4)
mode = c1.radio("Train", ["SPLoRA vs fine-pruning", "SPLoRA", "fine-pruning"], key="adapters_mode")
rank = c2.number_input("Rank r", 1, 256, 8, key="adapters_rank", help="integer rank of B·A per layer")
init = c2.selectbox("B init range", [1e-3, 1e-4], key="adapters_init", help="B ~ U(±range) (paper: 1e-3)")
criterion = c3.selectbox("Criterion", CRITERIA, index=CRITERIA.index("taylor"), key="adapters_criterion")
target = c4.slider("Target unit density", 0.05, 0.95, 0.3, 0.05, key="adapters_target")
step = c4.select_slider(
    "Prune step",
    [0.05, 0.1, 0.2, 0.25],
    0.1,
    key="adapters_step",
    help="fraction of the ORIGINAL units per step (paper: 0.05)",
)
# a row of its own: in a quarter-width column the third chip ("embed") was cut off
scope = st.multiselect(
    "Units", ["heads", "head_dims", "mlp", "embed"], ["head_dims", "mlp", "embed"], key="adapters_scope"
)
e1, e2, e3 = st.columns(3)
epochs = e1.number_input("Adapter epochs", 0, 1000, 6, key="adapters_epochs")
recovery = e2.number_input("Recovery epochs per step", 0, 100, 1, key="adapters_recovery")
bench = e3.toggle("Measure throughput", value=False, key="adapters_bench")
device, _ = device_picker("adapters")
data = state.data_spec()
st.caption(f"Data: {data} (train to fit and score, val to select, test for the curves).")


params = {
    "rank": float(int(rank)),
    "init_range": float(init),
    "criterion": criterion,
    "target_density": float(target),
    "prune_step": float(step),
    "scope": ",".join(scope),
    "epochs": int(epochs),
    "recovery_epochs": int(recovery),
    **(
        {"compare": True}
        if mode.startswith("SPLoRA vs")
        else {"mode": "splora" if mode == "SPLoRA" else "finetune"}
    ),
}
spec = PruneSpec(
    model=ModelSpec(source, num_classes=int(classes), reset_head=bool(reset), device=device),
    method="splora",
    params=params,
    data=data,
    bench=bool(bench),
)


busy = jobs.device_holder(device, root)
if busy:
    st.info(f"{device} is busy with job {Path(busy['run']).name}; a new job is refused until it ends.")
if not scope:
    st.error("Pick at least one kind of unit to prune (Units).", icon=":material/error:")
started = start_job_button(
    "Start SPLoRA",
    spec,
    key="adapters_start",
    device=device,
    disabled=not scope,
    field_names={"model": "Backbone"},  # the path guard names the field the visitor typed
)
if started is not None:  # draw the curves of the run just started, not the ones listed before it existed
    st.session_state["adapters_runs"] = [started.name]
    st.rerun()
current = st.session_state.get("adapters_start_run")
if not current or not Path(current).is_dir():
    # nothing started in this session (or a reload): follow the newest SPLoRA job still running or resumable
    current = next((str(r.path) for r in runs if started_as_job(r.path) and unfinished(r.path)), None)
if current:
    st.subheader("Job", divider="gray")
    if follow(current) == "done" and RunDir(current).results_file.exists():
        st.markdown(f":material/check_circle: **{Path(current).name}** · done")
        result_actions(current, key="adapters_result")
guide.next_step(("pages/8_runs.py", "compare it with your other runs"), ("pages/11_export.py", "export it"))
