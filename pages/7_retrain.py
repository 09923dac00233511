"""Retrain: recover a pruned model's accuracy as a background job, with optional distillation, and watch it."""

from pathlib import Path

import streamlit as st

from studio import jobs
from studio.errors import StudioError
from studio.flows.retrain import RecoverySpec
from studio.models import ModelSpec
from studio.recovery import infer_teacher
from studio.runs import RunDir
from studio.ui import guide, state
from studio.ui.charts import human, pct
from studio.ui.jobs import device_picker, job_panel, start_job_button
from studio.ui.recipe import recipe_form
from studio.ui.run_actions import result_actions, started_as_job, unfinished

st.title("Retrain")
st.caption(
    "Fine-tune a pruned model to win back accuracy, optionally distilling from the unpruned one. The job runs "
    "in its own process: close the tab or reload, it keeps going, and the Runs page lists it."
)

root = state.runs_root()
exported = [r for r in jobs.exports(root) if r["kind"] != "retrain" or r["status"] == "done"]
exported.sort(key=lambda r: r["kind"] == "retrain")  # pruned models first (stable: newest first within)
if not exported:
    guide.needs(
        "No pruned model yet: prune one on the Prune page (each prune run exports its model).",
        "pages/6_prune.py",
        "Prune a model",
    )
    st.stop()


def _label(r: dict) -> str:
    acc = f" · top-1 {pct(r['top1'])}" if r.get("top1") is not None else ""
    return f"{r['run']} · {r['kind']} {r['method']} · {human(r['params'])} params{acc}"


labels = {_label(r): r for r in exported}
wanted = st.session_state.pop("retrain_pick", None)  # a run sent here by another page's Retrain button
if wanted is not None:
    same = [k for k, r in labels.items() if Path(r["path"]).resolve() == Path(wanted).resolve()]
    st.session_state["retrain_model"] = same[0] if same else None
if st.session_state.get("retrain_model") not in labels:
    st.session_state.pop("retrain_model", None)
picked = labels[st.selectbox("Pruned model", list(labels), key="retrain_model")]
model = str(Path(picked["path"]) / "export")
teacher_spec = infer_teacher(model)

st.markdown("##### Recipe")
with state.user_errors():
    choice = recipe_form(
        picked["method"],
        teacher_spec.source if teacher_spec else "demo",
        (teacher_spec.arch or "") if teacher_spec else "",
    )
    device, nproc = device_picker("retrain")
    data = state.data_spec()
    st.caption(f"Data: {data} (train to fit, val to select and stop early, test for the final number).")
teacher = None
if choice.kd != "none" and choice.teacher:
    teacher = ModelSpec(choice.teacher, arch=choice.teacher_arch or None, device=device)
    t = teacher_spec
    if t is not None and t.source == teacher.source and t.arch == teacher.arch:
        teacher = t.with_(device=device)  # the inferred one, with its timm kwargs and data config
# an unknown architecture, or a checkpoint without one, is refused beside the button (RecoverySpec.validate)
spec = RecoverySpec(
    model=ModelSpec(model, device=device),
    data=data,
    teacher=teacher,
    preset=choice.preset,
    overrides=choice.overrides,
)


busy = jobs.device_holder(device, root)
if busy:
    st.info(f"{device} is busy with job {Path(busy['run']).name}; this job will be refused until it ends.")
start_job_button("Start retraining", spec, key="retrain_start", device=device, nproc=nproc)


def _is_retrain(run: str) -> bool:
    """A retraining started as a job (a damaged spec.json is not one)."""
    try:
        return started_as_job(run) and RunDir(run).spec().get("kind") == "retrain"
    except StudioError:
        return False


current = st.session_state.get("retrain_start_run")
if not current or not Path(current).is_dir():
    # nothing started in this session (or a reload): follow the newest retraining still running or resumable
    current = next((s.run for s in jobs.list_jobs(root) if _is_retrain(s.run) and unfinished(s.run)), None)
if current:
    st.subheader("Job", divider="gray")
    job_panel(current)
    if jobs.job_status(current).state == "done" and RunDir(current).results_file.exists():
        result_actions(current, key="retrain_result")
    guide.next_step(("pages/8_runs.py", "compare it with your other runs"))
