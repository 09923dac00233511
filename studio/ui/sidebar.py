"""The sidebar every page shares: the current model, data, device and the active plan with its MACs/params."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from .. import threads
from ..costs import with_summary
from ..errors import StudioError
from ..plan import PrunePlan
from . import cached, guide, state
from . import jobs as ui_jobs
from .charts import human, pct

PLAN_KEYS = ("params_before", "params_after", "macs_before", "macs_after")


def model_label(source: str) -> str:
    """A short name for a model source (``demo``, a file name, or an export's run folder)."""
    if source in ("demo", "demo-backbone"):
        return f"{source} (digits ViT)"
    p = Path(source)
    return f"{p.parent.name}/{p.name}" if p.name == "export" else p.name


def plan_summary(plan: PrunePlan) -> dict:
    """The plan's params/MACs before and after (computed from its structure when the plan lacks them)."""
    if all(k in plan.summary for k in PLAN_KEYS):
        return dict(plan.summary)

    return dict(with_summary(plan).summary)


def threads_box() -> None:
    """The one thread setting beside the device: threads per job (0: the policy), and how the cores are shared
    now. Also sizes the server's own thread pool beside the running jobs (:mod:`studio.threads`)."""
    cores = threads.budget()
    running = ui_jobs.running_threads(str(state.runs_root()))
    server = ui_jobs.apply_server_threads()
    st.number_input(
        "Threads per job (0: automatic)",
        0,
        max(1, cores),
        0,
        key=ui_jobs.THREADS_KEY,
        help="CPU threads of each job process. Automatic shares the cores: one stays with the studio, a job "
        "gets the rest, several jobs split them (at least 1 each), so no core runs two busy threads.",
    )
    st.caption(
        f"{cores} cores · studio {server} thread{'s' * (server != 1)} · "
        + (f"{len(running)} job(s) running on {sum(running)} · " if running else "")
        + f"a new job gets {ui_jobs.job_threads()}"
    )


def render() -> None:
    """Draw the selection summary into ``st.sidebar`` (below the navigation)."""
    with st.sidebar:
        st.markdown("##### Current selection")
        try:
            loaded = state.pristine_model()
            s = cached.summary()
        except StudioError as e:
            st.error(f"The model cannot be loaded: {e}")
            guide.link("pages/1_model.py", "Pick another model", ":material/neurology:")
            return
        st.markdown(
            f":material/neurology: **{model_label(loaded.source)}**  \n"
            f"{s['arch']} · {s['depth']} blocks · width {s['embed_dim']}  \n"
            f"{human(s['params'])} params · {human(s['macs'])} MACs"
        )
        st.markdown(f":material/dataset: **Data** {state.data_spec()}")
        st.markdown(f":material/memory: **Device** {s['device']}")
        threads_box()
        plan = state.active_plan()
        if plan is None:
            st.caption("No active plan yet: make one on the Prune page.")
            return
        ps = plan_summary(plan)
        st.markdown(
            f":material/content_cut: **Active plan** `{plan.method}`  \n"
            f"MACs {human(ps['macs_after'])} ({pct(ps['macs_after'] / ps['macs_before'])})  \n"
            f"params {human(ps['params_after'])} ({pct(ps['params_after'] / ps['params_before'])})  \n"
            f"{plan.depth}/{plan.base.depth} blocks"
        )
        if st.button("Clear plan", key="sidebar_clear_plan", type="tertiary", icon=":material/close:"):
            state.set_active_plan(None)
            st.rerun()
