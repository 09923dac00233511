"""Work too long for a page's script thread, run as a job of the page's own spec: find the run of exactly that
spec (a reload or a second tab follows the same job, never a second one), draw its live panel, and redraw the
whole page when it is done; otherwise offer to start it, saying how long it would take."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from ..errors import StudioError
from ..flows import Spec
from ..jobs import job_status
from ..runs import RunDir, list_runs
from .jobs import start_job_button
from .run_actions import follow
from .state import runs_root

# Work (multiply-accumulates) a page does inline, in its script thread; more runs as a job with progress and
# cancel. The demo's importance scoring (five criteria, 4 x 64 images) is ~0.13 TMAC (seconds); DeiT-S at 224 px
# is ~46 TMAC, and SLS's features of 1,000 DeiT-S images ~4.6 TMAC (minutes on this project's 2-core CPU, which
# runs ~26 GMAC/s: docs/results/scale.md).
INLINE_MACS = 2e11


def run_of(spec: Spec, root: str | Path | None = None) -> RunDir | None:
    """The newest run of exactly ``spec`` under the runs folder (any state)."""
    want = spec.to_dict()
    for run in list_runs(root or runs_root()):
        try:
            if run.spec() == want:
                return run
        except (OSError, ValueError, StudioError):
            continue  # a damaged spec.json is the Runs page's to report, not a match
    return None


def finished(spec: Spec) -> RunDir | None:
    """The newest run of ``spec`` that is done (its results are there to read), or None."""
    run = run_of(spec)
    return run if run is not None and job_status(run.path).state == "done" and run.results() else None


@st.fragment(run_every="2s")
def _rerun_when_done(run_dir: str) -> None:
    """Redraw the whole page once the job has finished (the job panel is a fragment of its own)."""
    if job_status(run_dir).state == "done":
        st.rerun()


def offer_job(spec: Spec, *, key: str, label: str, why: str, waiting: str) -> None:
    """Follow the running job of ``spec``, or explain ``why`` it runs as a job and offer the ``label`` button.

    Args:
        waiting: what the page shows while the job runs (what appears when it is done).
    """
    run = run_of(spec)
    if run is not None and job_status(run.path).active:
        st.info(waiting, icon=":material/hourglass:")
        follow(run.path)
        _rerun_when_done(str(run.path))
        return
    st.info(why, icon=":material/schedule:")
    if run is not None:
        follow(run.path)  # the last attempt, cancelled or failed: its panel says what happened
    if start_job_button(label, spec, key=key) is not None:
        st.rerun()
