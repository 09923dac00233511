"""What a page offers on a run it started: follow the job, then act on its result.

- :func:`follow` draws the live job panel (progress, ETA, Cancel, and Resume for a cancelled or failed run
  with a checkpoint) while the run is a job that has not finished;
- :func:`result_actions` offers, on a finished result, **Make active** (its plan becomes the active plan, with
  a confirmation when it replaces another; the run is remembered as the plan's source, so exporting the active
  plan exports the run's *trained* weights), **Retrain** (the Retrain page with this run's export picked) and
  **Export** (the Export page with this run picked).

The P3B (Block benefit), Adapters and Layer separability pages share these, so a result is handled the same
way wherever it was made.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from .. import jobs
from ..plan import PrunePlan
from ..runs import JOB_FILE, RunDir
from . import state
from .jobs import job_panel

EXPORT_PAGE, RETRAIN_PAGE = "pages/11_export.py", "pages/7_retrain.py"
EXPORT_PICK, RETRAIN_PICK = "export_run", "retrain_pick"  # what those pages preselect


def started_as_job(run_dir: str | Path) -> bool:
    """Whether the run was started by the job launcher (it has a ``job.json``) or waits in its queue, so
    Cancel/Resume apply."""
    return (Path(run_dir) / JOB_FILE).exists() or (Path(run_dir) / jobs.QUEUE_FILE).exists()


def unfinished(run_dir: str | Path) -> bool:
    """Whether the run is still running, or stopped with a checkpoint to resume from (worth following)."""
    s = jobs.job_status(run_dir)
    return s.active or (s.state in ("cancelled", "failed") and RunDir(Path(run_dir)).has_checkpoint)


def follow(run_dir: str | Path) -> str:
    """Draw the job panel of ``run_dir`` unless it is done (or not a job); return the run's state."""
    s = jobs.job_status(run_dir)
    if started_as_job(run_dir) and s.state != "done":
        job_panel(str(run_dir))
    return s.state


def _adopt(plan: PrunePlan, source: str | Path | None) -> None:
    state.set_active_plan(plan, source=source)
    st.toast(f"Active plan: {plan.method}, {plan.depth}/{plan.base.depth} blocks", icon=":material/check:")


def make_active_button(plan: PrunePlan, *, key: str, source: str | Path | None = None) -> None:
    """A "Make active" button for ``plan``; when another active plan would be replaced it asks first.

    The plan must be made for the current model (a plan slices its base model's indices): otherwise the refusal
    is shown in one sentence and nothing changes.
    """
    active = state.active_plan()
    same = active is not None and active.to_dict() == plan.to_dict()
    confirm = f"{key}_confirm"
    if st.button(
        "Active plan" if same else "Make active",
        key=key,
        disabled=same,
        icon=":material/check:",
        help="its structure becomes the active plan (Prune, Importance and Export pages use it)",
    ):
        with state.user_errors():
            plan.made_for(state.pristine_model().base)
            if active is None:
                _adopt(plan, source)
                st.rerun()
            st.session_state[confirm] = True
    if st.session_state.get(confirm) and active is not None and not same:
        edits = len(active.params.get("edits", []))
        st.warning(
            f"This replaces the active plan ({active.method}, {active.depth}/{active.base.depth} blocks"
            + (f", {edits} hand edits" if edits else "")
            + ").",
            icon=":material/warning:",
        )
        c = st.columns(2)
        if c[0].button("Replace it", key=f"{key}_yes", type="primary"):
            st.session_state.pop(confirm, None)
            _adopt(plan, source)
            st.rerun()
        if c[1].button("Keep the current one", key=f"{key}_no"):
            st.session_state.pop(confirm, None)
            st.rerun()


def result_actions(run_dir: str | Path, *, key: str) -> None:
    """Make active / Retrain / Export for a finished run (each disabled with a reason when it does not apply)."""
    run = RunDir(Path(run_dir))
    plan = jobs.run_plan(run.path)
    exported = (run.export_dir / "manifest.json").exists()
    no_export = "this run saved no export (it ran with export off)"
    c = st.columns(3)
    with c[0]:
        if plan is not None:
            make_active_button(plan, key=f"{key}_active", source=run.path if exported else None)
        else:
            st.button("Make active", key=f"{key}_active", disabled=True, help="this run wrote no plan")
    if c[1].button(
        "Retrain",
        key=f"{key}_retrain",
        disabled=not exported,
        icon=":material/model_training:",
        help=no_export if not exported else "recover its accuracy on the Retrain page (this model picked)",
    ):
        st.session_state[RETRAIN_PICK] = str(run.path)
        st.switch_page(RETRAIN_PAGE)
    if c[2].button(
        "Export",
        key=f"{key}_export",
        disabled=not exported,
        icon=":material/ios_share:",
        help=no_export if not exported else "downloads, ONNX and the model card on the Export page",
    ):
        st.session_state[EXPORT_PICK] = str(run.path)
        st.switch_page(EXPORT_PAGE)
